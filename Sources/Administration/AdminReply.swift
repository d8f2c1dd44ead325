import ChunkCipher
import Foundation
import KeyManager

/// What an `AdminRequest` returns: values, never text. The CLI renders them
/// (tables, `--json`); the same reply comes from a live mount's daemon and
/// from a keystore the CLI opened itself.
public enum AdminReply: Codable, Sendable {
    /// The request changed what it named; nothing more to show.
    case done
    case key(KeyMetadata)
    case keys([KeyMetadata])
    case keyDescription(KeyDescription)
    case rotated(version: KeyVersion)
    /// The deletion date, the directories still bound to the key, and the
    /// successor that new files there go to meanwhile.
    case deletionScheduled(date: Double, boundPaths: [String], successor: KeyID?)
    case deprecated(DeprecationOutcome)
    case usage(KeyUsageReport)
    case tags([String: String])
    /// Operation → subjects, for every operation.
    case policy([String: [String]])
    case bindings([KeyBindingView])
    case rotations([KeyRotation])
    case signature(Data)
    case verified(Bool)
    case publicKey(pem: String)
    case grant(KeyGrant)
    case grants([KeyGrant])
    case access([AccessFinding])
    case auditVerification(AuditVerification)
    /// Records oldest first, with the id (hex) of the filesystem they belong to (exports name it).
    case auditRecords([AuditRecord], filesystem: String)
    case auditPaths(mode: AuditPathMode, hash: String?)
    case alerts(AlertConfig)
    /// A rekey job queued or changed. `live`: a mount's daemon runs it;
    /// otherwise the CLI that opened the keystore runs it in the foreground.
    case rekeyJob(RekeyJob, live: Bool)
    case rekeyStatus(RekeyJob?)
    case backupWritten(bytes: Int, signer: String, fingerprint: String)
}

/// `key describe`.
public struct KeyDescription: Codable, Sendable {
    public var metadata: KeyMetadata
    public var versions: [KeyVersionInfo]
    public var policy: [String: [String]]
    public var nextRotationAt: Double?
    /// Versions below it refuse to decrypt (`key min-decryption-version`).
    public var minDecryptionVersion: KeyVersion?
    /// Where the material lives: "local", "aws-kms" or "pkcs11".
    public var provider: String
    /// For an external key: which one, where.
    public var externalKey: ExternalKeyConfig?
    /// For an AWS KMS key that KMS can rotate: whether it rotates the material itself (GetKeyRotationStatus).
    public var externalRotation: ExternalRotation?

    public struct ExternalRotation: Codable, Sendable {
        public var enabled: Bool
        public var periodDays: Int?
    }
}

/// `key deprecate`: the grants the successor lacks, and the rekey job that
/// moves the files (or the active one that must end first).
public struct DeprecationOutcome: Codable, Sendable {
    public var lostGrants: [String]
    public var queued: RekeyJob?
    public var busy: RekeyJob?
    /// A mount's daemon runs the queued job now.
    public var live: Bool
}

/// `key usage`.
public struct KeyUsageReport: Codable, Sendable {
    public var key: String
    public var total: Int
    /// Version → files and directories it wraps.
    public var versions: [String: Int]
    /// "OBJECT KIND vVERSION", when asked for.
    public var objects: [String]?
}

/// One directory binding as `key bind --json` lists it.
public struct KeyBindingView: Codable, Sendable {
    public var path: String
    public var keyId: String
    public var aliases: [String]
}

/// A refusal or failure, as the daemon sends it: the machine-readable code
/// of docs/JSON.md and the message a person reads.
public struct AdminFailure: Error, Codable, Sendable, CustomStringConvertible {
    public var code: String
    public var message: String
    public var description: String { message }
    public init(code: String = "Failed", _ message: String) {
        self.code = code
        self.message = message
    }
}
