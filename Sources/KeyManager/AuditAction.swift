/// What an audit record says was done: CloudTrail's `eventName` where AWS
/// KMS has the operation (same spelling, so tools that read CloudTrail read
/// these), kmsfs's own name where it has none. One type, so a misspelt name
/// is a compile error rather than a record no filter, export mapping or
/// alert rule knows (as a rekey recovery's outcome once was), and a filter
/// can be checked against the names that exist. Records read back keep
/// their stored string: older keystores may hold names retired since.
public enum AuditAction: String, Codable, Sendable, CaseIterable {
    // Using a key.
    case decrypt = "Decrypt"
    case generateDataKey = "GenerateDataKey"
    case reEncrypt = "ReEncrypt"
    case sign = "Sign"
    case verify = "Verify"
    case getPublicKey = "GetPublicKey"
    /// A caller asked to use a key and the policy or a grant was consulted (no key material touched).
    case authorize = "Authorize"

    // Administering keys.
    case createKey = "CreateKey"
    case describeKey = "DescribeKey"
    case enableKey = "EnableKey"
    case disableKey = "DisableKey"
    case scheduleKeyDeletion = "ScheduleKeyDeletion"
    case cancelKeyDeletion = "CancelKeyDeletion"
    case deleteKey = "DeleteKey"
    case deprecateKey = "DeprecateKey"
    case rotateKey = "RotateKey"
    case rotateKeyOnDemand = "RotateKeyOnDemand"
    case enableKeyRotation = "EnableKeyRotation"
    case disableKeyRotation = "DisableKeyRotation"
    case retireKeyVersion = "RetireKeyVersion"
    case setMinDecryptionVersion = "SetMinDecryptionVersion"
    case putKeyPolicy = "PutKeyPolicy"
    case createAlias = "CreateAlias"
    case updateAlias = "UpdateAlias"
    case deleteAlias = "DeleteAlias"
    case tagResource = "TagResource"
    case untagResource = "UntagResource"
    case createGrant = "CreateGrant"
    case listGrants = "ListGrants"
    case retireGrant = "RetireGrant"
    case revokeGrant = "RevokeGrant"
    case bindKey = "BindKey"
    case unbindKey = "UnbindKey"
    /// A key held in AWS KMS or a token changed state there (seen by kmsfs, not done by it).
    case externalKeyStateChange = "ExternalKeyStateChange"

    // Re-keying.
    case startRekey = "StartRekey"
    case rekeyQueued = "RekeyQueued"
    case rekeyRunning = "RekeyRunning"
    case rekeyPaused = "RekeyPaused"
    case rekeyDone = "RekeyDone"
    case rekeyFailed = "RekeyFailed"
    case rekeyCancelled = "RekeyCancelled"
    case rekeyRecovery = "RekeyRecovery"

    // The keystore, the audit log and the mount.
    case changePassphrase = "ChangePassphrase"
    case createBackup = "CreateBackup"
    case restoreBackup = "RestoreBackup"
    case sealKeystore = "SealKeystore"
    case acceptKeystoreEdits = "AcceptKeystoreEdits"
    case keystoreIntegrityFailure = "KeystoreIntegrityFailure"
    case rebuildUsageIndex = "RebuildUsageIndex"
    case putAuditSettings = "PutAuditSettings"
    case putAlertConfig = "PutAlertConfig"
    case mountWithoutOpenAudit = "MountWithoutOpenAudit"
    /// A peer of the control socket was refused or let in.
    case adminAccess = "AdminAccess"
    /// A file's chunk or header failed authentication.
    case integrityFailure = "IntegrityFailure"

    /// Names earlier builds recorded and no longer write (the first rotation
    /// scheduler's `RotateKeyAutomatically`, now CloudTrail's `RotateKey`):
    /// their records stay in old logs, readable and filterable.
    public static let retiredNames: Set<String> = [RotationRow.legacyAutomatic]

    /// A rekey job entering `state`.
    static func rekey(_ state: RekeyState) -> AuditAction {
        switch state {
        case .queued: .rekeyQueued
        case .running: .rekeyRunning
        case .paused: .rekeyPaused
        case .done: .rekeyDone
        case .failed: .rekeyFailed
        case .cancelled: .rekeyCancelled
        }
    }
}
