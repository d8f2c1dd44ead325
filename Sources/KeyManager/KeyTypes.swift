import ChunkCipher

/// What a master key is made of, as in AWS KMS's KeySpec.
public enum KeySpec: String, CaseIterable, Sendable, Codable {
    case aes256 = "AES_256"
    case rsa2048 = "RSA_2048"
    case rsa3072 = "RSA_3072"
    case rsa4096 = "RSA_4096"
    case eccP256 = "ECC_NIST_P256"
    case eccP384 = "ECC_NIST_P384"
    case eccP521 = "ECC_NIST_P521"

    /// What keys of this spec may do.
    public var usage: KeyUsage { self == .aes256 ? .encryptDecrypt : .signVerify }

    /// Parses the AWS spelling, or the short forms ECC_P256/ECC_P384.
    public init?(argument: String) {
        guard let spec = Self.parse(argument) else { return nil }
        self = spec
    }

    /// The spec named `text` (case-insensitive; ECC_P256/ECC_P384 accepted).
    public static func parse(_ text: String) -> KeySpec? {
        switch text.uppercased() {
        case "ECC_P256": return .eccP256
        case "ECC_P384": return .eccP384
        case "ECC_P521": return .eccP521
        case let upper: return KeySpec(rawValue: upper)
        }
    }
}

/// ENCRYPT_DECRYPT keys wrap data keys; SIGN_VERIFY keys sign audit digests and backups.
public enum KeyUsage: String, Sendable, Codable {
    case encryptDecrypt = "ENCRYPT_DECRYPT"
    case signVerify = "SIGN_VERIFY"
}

/// The life-cycle states of DESIGN.md §5.
public enum KeyState: String, CaseIterable, Sendable, Codable {
    case enabled = "Enabled"
    case disabled = "Disabled"
    case deprecated = "Deprecated"
    case pendingDeletion = "PendingDeletion"
    case destroyed = "Destroyed"
}

/// An operation a key policy grants.
public enum KeyOperation: String, CaseIterable, Sendable, Codable {
    /// Create files: generate and wrap new data keys.
    case encrypt
    /// Open files: unwrap data keys.
    case decrypt
    /// Change the key: rotate, enable, disable, delete, policy, aliases.
    case administer
}

/// Who asks: the uid/gid of a FUSE request or of the admin-command caller.
public struct Principal: Hashable, Sendable, Codable, CustomStringConvertible {
    public var uid: UInt32
    public var gid: UInt32
    public var pid: Int32
    public var processName: String?

    public init(uid: UInt32, gid: UInt32, pid: Int32 = 0, processName: String? = nil) {
        self.uid = uid
        self.gid = gid
        self.pid = pid
        self.processName = processName
    }

    public var description: String { "uid \(uid) gid \(gid)" }
}

/// One grant in a key policy: a uid, a gid, or everyone.
public enum PolicySubject: Hashable, Sendable, Codable, CustomStringConvertible {
    case uid(UInt32)
    case gid(UInt32)
    case anyone

    /// Parses `uid:N`, `gid:N` or `*`.
    public init?(argument: String) {
        if argument == "*" { self = .anyone; return }
        let parts = argument.split(separator: ":", maxSplits: 1)
        guard parts.count == 2, let n = UInt32(parts[1]) else { return nil }
        switch parts[0] {
        case "uid": self = .uid(n)
        case "gid": self = .gid(n)
        default: return nil
        }
    }

    public var description: String {
        switch self {
        case .uid(let n): "uid:\(n)"
        case .gid(let n): "gid:\(n)"
        case .anyone: "*"
        }
    }

    func matches(_ p: Principal) -> Bool {
        switch self {
        case .uid(let n): p.uid == n
        case .gid(let n): p.gid == n
        case .anyone: true
        }
    }
}

/// A master key as the admin plane shows it (no material).
public struct KeyMetadata: Sendable, Codable, Equatable {
    public var keyID: KeyID
    public var spec: KeySpec
    public var usage: KeyUsage { spec.usage }
    public var state: KeyState
    public var description: String
    public var aliases: [String]
    public var tags: [String: String]
    public var createdAt: Double
    public var stateChangedAt: Double
    public var currentVersion: KeyVersion
    /// Automatic rotation period in days, nil when off.
    public var rotationPeriodDays: Int?
    public var lastRotatedAt: Double
    /// When a PendingDeletion key may be destroyed.
    public var deletionDate: Double?
    /// The key that replaces a Deprecated one.
    public var successor: KeyID?

    /// When automatic rotation is next due, if on.
    public var nextRotationAt: Double? {
        rotationPeriodDays.map { lastRotatedAt + Double($0) * 86_400 }
    }
}

/// How a key version came to be (AWS ListKeyRotations' RotationType).
public enum RotationType: String, Sendable, Codable {
    case automatic = "AUTOMATIC"
    case onDemand = "ON_DEMAND"
}

/// One rotation: the version it made current, when, and how.
public struct KeyRotation: Sendable, Codable, Equatable {
    public var keyID: KeyID
    public var version: KeyVersion
    public var rotationDate: Double
    public var rotationType: RotationType
}

/// One version of a master key.
public struct KeyVersionInfo: Sendable, Codable, Equatable {
    public var version: KeyVersion
    public var createdAt: Double
    /// Retired versions decrypt nothing; only versions no file needs can retire.
    public var retired: Bool
    /// Files and directories whose data key this version wraps.
    public var usageCount: Int
}

extension KeyID: Codable {
    public init(from decoder: any Decoder) throws {
        let text = try decoder.singleValueContainer().decode(String.self)
        guard let id = KeyID(hex: text) else {
            throw DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: "not a key id"))
        }
        self = id
    }
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.singleValueContainer()
        try c.encode(rawValue.hex)
    }
}

extension KeyVersion: Codable {
    public init(from decoder: any Decoder) throws { self.init(rawValue: try decoder.singleValueContainer().decode(UInt32.self)) }
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.singleValueContainer()
        try c.encode(rawValue)
    }
}
