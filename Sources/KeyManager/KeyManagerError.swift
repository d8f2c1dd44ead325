import ChunkCipher
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Errors of the key manager. Each message names the key, its state and what
/// to do; none carries key material.
public enum KeyManagerError: Error, Equatable, Sendable, CustomStringConvertible {
    case wrongPassphrase
    case keystoreNotFound(String)
    case keystoreExists(String)
    case keystoreCorrupt(String)
    case keystoreFromNewerVersion(String)
    /// Protected rows were edited outside kmsfs; one line per row.
    case keystoreTampered([String])
    case keyNotFound(String)
    /// The operation is not allowed in the key's current state.
    case invalidState(key: String, state: KeyState, operation: String, since: Double, remedy: String)
    case accessDenied(key: String, principal: Principal, operation: KeyOperation)
    case invalidArgument(String)
    case deletionBlocked(key: String, references: Int)
    case unwrapFailed(key: String, version: KeyVersion)
    case versionNotFound(key: String, version: KeyVersion)
    case versionInUse(key: String, version: KeyVersion, references: Int)
    /// The version is below the key's minimum decryption version (reversible cut-off).
    case versionCutOff(key: String, version: KeyVersion, minimum: KeyVersion)
    case crypto(String)
    case database(String)
    /// An external key provider (AWS KMS, PKCS#11) failed; `code` is its error name.
    case provider(provider: String, code: String, message: String, remedy: String)

    /// A stable, machine-readable code (AWS KMS's exception name where one
    /// fits), as `--json` error output gives it. Documented in docs/JSON.md.
    public var code: String {
        switch self {
        case .wrongPassphrase: "WrongPassphrase"
        case .keystoreNotFound: "KeystoreNotFound"
        case .keystoreExists: "KeystoreExists"
        case .keystoreCorrupt: "KeystoreCorrupt"
        case .keystoreFromNewerVersion: "KeystoreFromNewerVersion"
        case .keystoreTampered: "KeystoreTampered"
        case .keyNotFound, .versionNotFound: "NotFoundException"
        case .invalidState: "KMSInvalidStateException"
        case .accessDenied: "AccessDeniedException"
        case .invalidArgument: "ValidationException"
        case .deletionBlocked: "DeletionBlocked"
        case .unwrapFailed: "InvalidCiphertextException"
        case .versionInUse: "VersionInUse"
        case .versionCutOff: "KeyVersionCutOff"
        case .crypto: "CryptoError"
        case .database: "DatabaseError"
        case .provider(_, let code, _, _): code
        }
    }

    public var description: String {
        switch self {
        case .wrongPassphrase:
            return "wrong passphrase: the keystore was not unlocked and nothing was changed"
        case .keystoreNotFound(let path):
            return "no kmsfs keystore at \(path); run `kmsfs init` first"
        case .keystoreExists(let path):
            return "\(path) already holds a kmsfs keystore; refusing to overwrite it"
        case .keystoreCorrupt(let why):
            return "the keystore is damaged (\(why)); restore it from a backup"
        case .keystoreFromNewerVersion(let why):
            return "the keystore was written by a newer kmsfs (\(why)); upgrade kmsfs to open it"
        case .keystoreTampered(let findings):
            return "the keystore was edited outside kmsfs and is not used: " + findings.joined(separator: "; ")
                + ". Restore it from a backup (`kmsfs backup restore`), or if you made these edits yourself, "
                + "accept them with `kmsfs fsck CIPHERDIR --accept-keystore-edits`"
        case .keyNotFound(let key):
            return "no key \(key); `kmsfs key list` shows the keys"
        case .invalidState(let key, let state, let operation, let since, let remedy):
            return "cannot \(operation) key \(key): it is \(state.rawValue) since \(Self.date(since)); \(remedy)"
        case .accessDenied(let key, let principal, let operation):
            return "access denied: \(principal) may not \(operation.rawValue) with key \(key); "
                + "an administrator can grant it with `kmsfs key policy \(key) --grant \(operation.rawValue) uid:\(principal.uid)`"
        case .invalidArgument(let why):
            return why
        case .provider(let provider, let code, let message, let remedy):
            return "\(provider): \(code): \(message)" + (remedy.isEmpty ? "" : "; \(remedy)")
        case .deletionBlocked(let key, let references):
            return "key \(key) was not destroyed: \(references) file(s), directories or bindings still use it. To move them: "
                + "`kmsfs key cancel-deletion \(key)`, then `kmsfs key deprecate \(key) --successor NEWKEY` (queues a rekey of its files), "
                + "rebind its directories with `kmsfs key bind PATH NEWKEY`, and once `kmsfs key usage \(key)` shows 0, "
                + "`kmsfs key schedule-deletion \(key)` again"
        case .unwrapFailed(let key, let version):
            return "the data key could not be unwrapped with key \(key) version \(version): the header was altered or belongs elsewhere"
        case .versionNotFound(let key, let version):
            return "key \(key) has no version \(version)"
        case .versionInUse(let key, let version, let references):
            return "key \(key) version \(version) still wraps \(references) data key(s); rekey them before retiring it"
        case .versionCutOff(let key, let version, let minimum):
            return "key \(key) version \(version) is cut off: versions below \(minimum) do not decrypt "
                + "(undo with `kmsfs key min-decryption-version \(key) --clear`, or rekey the file onto a newer version)"
        case .crypto(let what):
            return "cryptographic failure: \(what)"
        case .database(let what):
            return "keystore error: \(what)"
        }
    }

    static func date(_ t: Double) -> String {
        Date(timeIntervalSince1970: t).formatted(.iso8601)
    }
}
