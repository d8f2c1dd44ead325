import ChunkCipher
import Foundation
import KeyManager

/// One administrative request, as the CLI builds it from a command line and
/// a live mount's daemon receives it on the control socket (docs/JSON.md,
/// "control socket"). Every case names its parameters; the daemon never
/// parses a command line. Paths are those of the filesystem (`/prod`), not
/// of the caller's shell; files the caller reads or writes travel as bytes
/// (base64 in JSON).
public enum AdminRequest: Codable, Sendable, Equatable {
    // Keys
    case createKey(KeyCreation)
    case listKeys(state: KeyState?, tag: KeyTag?)
    case describeKey(key: String)
    case rotateKey(key: String)
    /// Automatic rotation every `days`, or off (nil).
    case setRotation(key: String, days: Int?)
    case enableKey(key: String)
    case disableKey(key: String)
    case scheduleDeletion(key: String, days: Int)
    case cancelDeletion(key: String)
    case deprecateKey(key: String, successor: String, mode: RekeyMode, rate: Double?, carryPolicy: Bool)
    case keyUsage(key: String, objects: Bool)
    case setAlias(alias: String, key: String)
    case deleteAlias(alias: String)
    /// Tags set in order, then names removed.
    case changeTags(key: String, set: [KeyTag], remove: [String])
    /// Grants then revocations; with neither, the policy is only read.
    case changePolicy(key: String, grant: [PolicyChange], revoke: [PolicyChange])
    case bind(path: String, key: String)
    case unbind(path: String)
    case listBindings
    case retireVersion(key: String, version: KeyVersion)
    case listRotations(key: String)
    /// Versions below `version` stop decrypting; nil lifts the floor.
    case setMinDecryptionVersion(key: String, version: KeyVersion?)
    case sign(key: String, message: Data)
    case verify(key: String, message: Data, signature: Data)
    case getPublicKey(key: String)
    case createGrant(key: String, grantee: PolicySubject, operations: [KeyOperation], expiresAt: Double?)
    case listGrants(key: String)
    case revokeGrant(key: String, grantID: String)
    case accessReport(unusedDays: Int)
    // Audit
    case verifyAudit
    /// The daemon narrows the filter for a peer other than root and the
    /// mounting user (its keys' records and its own), whatever `viewer` says.
    case auditRecords(filter: AuditFilter, limit: Int?)
    /// Sets the mode when given; hashes `hash` when given.
    case auditPaths(mode: AuditPathMode?, hash: String?)
    case alerts(change: AlertChange)
    // Rekey
    case startRekey(RekeyStart)
    case rekeyStatus
    /// Pause or cancel the active job.
    case changeRekey(state: RekeyState)
    case resumeRekey(rate: Double?)
    // Backup
    /// Writes the keystore's backup to `out` under the passphrase in
    /// `passphraseFile` (both absolute; a live mount's daemon reads and
    /// writes them itself, so only root and the mounting user may ask).
    case createBackup(out: String, passphraseFile: String)

    /// What a holder of encrypt or decrypt who administers no key may ask a
    /// live mount: using a key it holds, and giving up a grant.
    public var isKeyUse: Bool {
        switch self {
        case .sign, .verify, .getPublicKey, .revokeGrant: true
        default: false
        }
    }
}

/// `NAME=VALUE`.
public struct KeyTag: Codable, Sendable, Equatable {
    public var name: String
    public var value: String
    public init(name: String, value: String) {
        self.name = name
        self.value = value
    }
}

/// One operation for one subject, granted or revoked in a key's policy.
public struct PolicyChange: Codable, Sendable, Equatable {
    public var operation: KeyOperation
    public var subject: PolicySubject
    public init(_ operation: KeyOperation, _ subject: PolicySubject) {
        self.operation = operation
        self.subject = subject
    }
}

/// What `key create` asks for. `external` names an AWS KMS key or a PKCS#11
/// token key (resolved by the CLI: region from the caller's environment, PIN
/// file absolute); without it the material is made in the keystore.
public struct KeyCreation: Codable, Sendable, Equatable {
    public var spec: KeySpec?
    public var description: String
    public var aliases: [String]
    public var tags: [String: String]
    /// Automatic rotation period; nil for none.
    public var rotationDays: Int?
    public var external: ExternalKeyConfig?
    /// With a PKCS#11 `external`: generate a new non-extractable key in the token.
    public var createInToken: Bool

    public init(spec: KeySpec?, description: String, aliases: [String], tags: [String: String], rotationDays: Int?,
                external: ExternalKeyConfig? = nil, createInToken: Bool = false) {
        self.spec = spec
        self.description = description
        self.aliases = aliases
        self.tags = tags
        self.rotationDays = rotationDays
        self.external = external
        self.createInToken = createInToken
    }
}

/// Changes to where alerts go and when they fire; nil fields stay as they are.
public struct AlertChange: Codable, Sendable, Equatable {
    public var syslog: Bool?
    /// A JSON-lines file (absolute), or "" for none.
    public var jsonl: String?
    /// A shell command, or "" for none.
    public var command: String?
    public var denialBurst: Int?
    public var denialWindow: Double?
    public var rotationOverdueDays: Int?
    /// kmsfs, asff or ocsf.
    public var format: String?
    public var asffAccount: String?
    public var asffRegion: String?
    public init() {}

    public var isEmpty: Bool { self == AlertChange() }
}

/// What `rekey start` asks for.
public struct RekeyStart: Codable, Sendable, Equatable {
    /// KEY or KEY:VERSION; nil for the deprecated key with a successor.
    public var source: String?
    public var target: String?
    public var mode: RekeyMode
    public var path: String?
    public var rate: Double?
    public var workers: Int
    public init(source: String?, target: String?, mode: RekeyMode, path: String?, rate: Double?, workers: Int) {
        self.source = source
        self.target = target
        self.mode = mode
        self.path = path
        self.rate = rate
        self.workers = workers
    }
}
