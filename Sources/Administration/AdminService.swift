import ChunkCipher
import EncryptedFS
import Foundation
import KeyManager

/// The rekey worker of a live mount, as the admin plane drives it.
public protocol RekeyDriver: Sendable {
    /// Look for queued or resumed work now.
    func wake()
    /// Return once the worker has stopped moving files (after a pause or cancel).
    func interruptAndWait()
}

extension RekeyService: RekeyDriver {}

/// Carries out `AdminRequest`s against one keystore, for one principal at a
/// time: inside a live mount's daemon (`rekey` set, peers authenticated by
/// the control socket) or in a CLI that opened the keystore itself. Every
/// key operation is checked against its key's policy by `KeyManager`; what
/// this type adds is what only a live mount needs to decide — a peer other
/// than root and the mounting user sees only its own audit trail and may not
/// make the daemon run a command, write a file, load a PKCS#11 module or
/// use its AWS credentials.
public struct AdminService: Sendable {
    public let manager: KeyManager
    /// A live mount's rekey worker; nil when the keystore was opened offline.
    public let rekey: RekeyDriver?
    /// The uid the daemon runs as (the mounting user).
    public let owner: UInt32

    public init(manager: KeyManager, rekey: RekeyDriver? = nil, owner: uid_t = geteuid()) {
        self.manager = manager
        self.rekey = rekey
        self.owner = owner
    }

    var live: Bool { rekey != nil }

    /// Whether `principal` has the daemon's own standing: root, the mounting
    /// user, or anyone when there is no daemon (the CLI acts as its caller).
    func trusted(_ principal: Principal) -> Bool {
        !live || principal.hasDaemonStanding(owner: owner)
    }

    /// Runs `request` as `principal`.
    public func perform(_ request: AdminRequest, as principal: Principal) throws(AdminFailure) -> AdminReply {
        do {
            return try run(request, principal)
        } catch let error as KeyManagerError {
            throw AdminFailure(code: error.code, error.description)
        } catch let error as AdminFailure {
            throw error
        } catch {
            throw AdminFailure("\(error)")
        }
    }

    private func run(_ request: AdminRequest, _ caller: Principal) throws -> AdminReply {
        let m = manager
        switch request {
        case .createKey(let creation):
            return .key(try createKey(creation, caller))
        case .listKeys(let state, let tag):
            return .keys(try m.listKeys(state: state, tag: tag.map { ($0.name, $0.value) }))
        case .describeKey(let key):
            return .keyDescription(try describe(key))
        case .rotateKey(let key):
            return .rotated(version: try m.rotate(key, by: caller))
        case .setRotation(let key, let days):
            try m.setRotation(key, days: days, by: caller)
        case .enableKey(let key):
            try m.enable(key, by: caller)
        case .disableKey(let key):
            try m.disable(key, by: caller)
        case .scheduleDeletion(let key, let days):
            let date = try m.scheduleDeletion(key, days: days, by: caller)
            let bound = try m.boundPaths(of: key)
            return .deletionScheduled(date: date, boundPaths: bound, successor: bound.isEmpty ? nil : try m.describe(key).metadata.successor)
        case .cancelDeletion(let key):
            try m.cancelDeletion(key, by: caller)
        case .deprecateKey(let key, let successor, let mode, let rate, let carryPolicy):
            let lost = try m.deprecate(key, successor: successor, carryPolicy: carryPolicy, by: caller)
            // Queue the move of its files; the mount runs it, or `rekey resume` offline.
            if let active = try m.activeRekeyJob() {
                return .deprecated(DeprecationOutcome(lostGrants: lost, queued: nil, busy: active, live: live))
            }
            let job = try m.createRekeyJob(source: key, target: successor, mode: mode, rate: rate, by: caller)
            rekey?.wake()
            return .deprecated(DeprecationOutcome(lostGrants: lost, queued: job, busy: nil, live: live))
        case .keyUsage(let key, let objects):
            let usage = try m.usage(of: key)
            let ids = objects ? try m.objects(using: key).map { "\($0.object.hex) \($0.kind.rawValue) v\($0.version)" } : nil
            return .usage(KeyUsageReport(key: key, total: usage.values.reduce(0, +),
                                         versions: Dictionary(uniqueKeysWithValues: usage.map { (String($0.key.rawValue), $0.value) }),
                                         objects: ids))
        case .setAlias(let alias, let key):
            try m.setAlias(alias, to: key, by: caller)
        case .deleteAlias(let alias):
            try m.deleteAlias(alias, by: caller)
        case .changeTags(let key, let set, let remove):
            for tag in set { try m.setTag(key, name: tag.name, value: tag.value, by: caller) }
            for name in remove { try m.setTag(key, name: name, value: nil, by: caller) }
            return .tags(try m.describe(key).metadata.tags)
        case .changePolicy(let key, let grants, let revocations):
            for change in grants { try m.grant(change.operation, to: change.subject, on: key, by: caller) }
            for change in revocations { try m.revoke(change.operation, from: change.subject, on: key, by: caller) }
            let policy = try m.describe(key).policy
            return .policy(Dictionary(uniqueKeysWithValues: KeyOperation.allCases.map { ($0.rawValue, policy[$0] ?? []) }))
        case .bind(let path, let key):
            try m.bind(path: path, to: key, by: caller)
        case .unbind(let path):
            try m.unbind(path: path, by: caller)
        case .listBindings:
            let aliases = Dictionary(try m.listKeys().map { ($0.keyID, $0.aliases) }, uniquingKeysWith: { a, _ in a })
            return .bindings(try m.listBindings().map { KeyBindingView(path: $0.path, keyId: $0.key.rawValue.hex, aliases: aliases[$0.key] ?? []) })
        case .retireVersion(let key, let version):
            try m.retireVersion(key, version: version, by: caller)
        case .listRotations(let key):
            return .rotations(try m.rotations(of: key))
        case .setMinDecryptionVersion(let key, let version):
            try m.setMinDecryptionVersion(key, version: version, by: caller)
        case .sign(let key, let message):
            return .signature(Data(try m.signMessage([UInt8](message), with: key, by: caller)))
        case .verify(let key, let message, let signature):
            return .verified(try m.verifyMessage([UInt8](message), signature: [UInt8](signature), with: key, by: caller))
        case .getPublicKey(let key):
            return .publicKey(pem: try m.publicKeyPEM(key, by: caller))
        case .createGrant(let key, let grantee, let operations, let expiresAt):
            return .grant(try m.createGrant(on: key, grantee: grantee, operations: operations, expiresAt: expiresAt, by: caller))
        case .listGrants(let key):
            return .grants(try m.listGrants(key, by: caller))
        case .revokeGrant(let key, let grantID):
            try m.revokeGrant(key, grantID: grantID, by: caller)
        case .accessReport(let unusedDays):
            guard unusedDays > 0 else { throw AdminFailure(code: "ValidationException", "--unused-days must be at least 1") }
            return .access(try m.accessReport(unusedDays: unusedDays, by: caller))
        case .verifyAudit:
            return .auditVerification(try m.verifyAudit())
        case .auditRecords(var filter, let limit):
            // One team does not read another's trail through the mount.
            filter.viewer = trusted(caller) ? filter.viewer : caller
            return .auditRecords(try m.auditRecords(filter, limit: limit), filesystem: m.filesystemID.hex)
        case .auditPaths(let mode, let hash):
            if let mode { try m.setAuditPathMode(mode, by: caller) }
            return .auditPaths(mode: m.auditPathMode(), hash: hash.map { m.auditPathHash($0) })
        case .alerts(let change):
            return .alerts(try alerts(change, caller))
        case .startRekey(let start):
            let source = try start.source ?? deprecatedSource()
            let job = try m.createRekeyJob(source: source, target: start.target, mode: start.mode, path: start.path, rate: start.rate,
                                           workers: start.workers, by: caller)
            rekey?.wake()
            return .rekeyJob(job, live: live)
        case .rekeyStatus:
            return .rekeyStatus(try m.latestRekeyJob())
        case .changeRekey(let state):
            guard state == .paused || state == .cancelled else { throw AdminFailure(code: "ValidationException", "a job is paused or cancelled") }
            guard let job = try m.activeRekeyJob() else { throw AdminFailure("no active rekey job") }
            try m.setRekeyState(job.id, state, by: caller)
            // Answer once the worker has stopped moving files.
            rekey?.interruptAndWait()
            return .rekeyJob(try m.rekeyJob(job.id) ?? job, live: live)
        case .resumeRekey(let rate):
            guard let job = try m.activeRekeyJob() else { throw AdminFailure("no rekey job to resume") }
            if let rate { try m.setRekeyRate(job.id, rate, by: caller) }
            if job.state == .paused { try m.setRekeyState(job.id, .running, by: caller) }
            rekey?.wake()
            return .rekeyJob(try m.rekeyJob(job.id) ?? job, live: live)
        case .createBackup(let out, let passphraseFile):
            return try backup(out: out, passphraseFile: passphraseFile, caller)
        }
        return .done
    }

    private func createKey(_ c: KeyCreation, _ caller: Principal) throws -> KeyMetadata {
        // An external key makes the daemon load a PKCS#11 module and read a
        // PIN file, or call AWS with its own credentials, at paths and
        // endpoints the request names: only for those with the daemon's standing.
        if c.external != nil, !trusted(caller) {
            throw AdminFailure(code: "AccessDeniedException",
                               "only root or the mounting user may create a key held in AWS KMS or a PKCS#11 token through the mount's daemon "
                               + "(it would load the module, read the PIN file and use the credentials as the daemon); create it offline or ask them")
        }
        guard let external = c.external else {
            return try manager.createKey(spec: c.spec ?? .aes256, description: c.description, aliases: c.aliases, tags: c.tags,
                                         rotationDays: c.rotationDays, by: caller)
        }
        return try manager.createExternalKey(external, spec: external.provider == "pkcs11" ? c.spec ?? .aes256 : c.spec,
                                             createInToken: c.createInToken, description: c.description, aliases: c.aliases,
                                             tags: c.tags, by: caller)
    }

    private func describe(_ key: String) throws -> KeyDescription {
        let (metadata, versions, policy) = try manager.describe(key)
        let floor = metadata.state == .destroyed ? nil : try manager.minDecryptionVersion(key)
        let external = try manager.externalKey(key)
        let rotation = try manager.externalRotation(key)
        return KeyDescription(metadata: metadata, versions: versions,
                              policy: Dictionary(uniqueKeysWithValues: policy.map { ($0.key.rawValue, $0.value) }),
                              nextRotationAt: metadata.nextRotationAt, minDecryptionVersion: floor,
                              provider: external?.provider ?? "local", externalKey: external,
                              externalRotation: rotation.map { .init(enabled: $0.enabled, periodDays: $0.periodDays) })
    }

    private func deprecatedSource() throws -> String {
        guard let key = try manager.listKeys(state: .deprecated).first(where: { $0.successor != nil }) else {
            throw AdminFailure(code: "ValidationException", "no deprecated key with a successor; name the key with --key KEY[:VERSION]")
        }
        return key.keyID.rawValue.hex
    }

    private func alerts(_ change: AlertChange, _ caller: Principal) throws -> AlertConfig {
        var config = try manager.alertConfig()
        // The daemon may run as root: only root or the mounting user may make it run a command or write a file.
        if !trusted(caller), change.command != nil || change.jsonl != nil {
            throw AdminFailure("only root or the mounting user may set the alert command or file of a mounted filesystem")
        }
        if let syslog = change.syslog { config.syslog = syslog }
        if let jsonl = change.jsonl { config.jsonl = jsonl.isEmpty ? nil : jsonl }
        if let command = change.command { config.command = command.isEmpty ? nil : command }
        if let burst = change.denialBurst { config.denialBurst = burst }
        if let window = change.denialWindow { config.denialWindow = window }
        if let days = change.rotationOverdueDays { config.rotationOverdueDays = days }
        if let format = change.format { config.format = format == "kmsfs" ? nil : format }
        if change.asffAccount != nil || change.asffRegion != nil {
            config.asffAccount = .init(accountID: change.asffAccount ?? config.asffAccount?.accountID ?? "",
                                       region: change.asffRegion ?? config.asffAccount?.region ?? "")
        }
        if !change.isEmpty { try manager.setAlertConfig(config, by: caller) }
        return config
    }

    private func backup(out: String, passphraseFile: String, _ caller: Principal) throws -> AdminReply {
        if !trusted(caller) { throw AdminFailure("only root or the mounting user may write a backup through the mount's daemon") }
        guard !FileManager.default.fileExists(atPath: out) else { throw AdminFailure("\(out) exists; choose a new file") }
        let secret = try SecretFile.read(passphraseFile)
        let bytes = try manager.createBackup(backupPassphrase: secret, by: caller)
        guard FileManager.default.createFile(atPath: out, contents: nil, attributes: [.posixPermissions: 0o600]),
              let handle = FileHandle(forWritingAtPath: out) else { throw AdminFailure("cannot create \(out)") }
        try handle.write(contentsOf: Data(bytes))
        try handle.synchronize()
        try handle.close()
        let signer = try KeyManager.backupSigner(bytes)
        return .backupWritten(bytes: bytes.count, signer: signer.keyID, fingerprint: signer.fingerprint)
    }
}

/// A passphrase kept in a file: its first line, read into locked memory.
public enum SecretFile {
    public static func read(_ path: String) throws(AdminFailure) -> SecretKey {
        guard let data = FileManager.default.contents(atPath: path) else { throw AdminFailure(code: "ValidationException", "cannot read passphrase file \(path)") }
        var raw = [UInt8](data)
        defer { for i in raw.indices { raw[i] = 0 } }
        return try firstLine(raw)
    }

    /// The first line of `raw` (as gocryptfs reads a passphrase), checked for length.
    public static func firstLine(_ raw: [UInt8]) throws(AdminFailure) -> SecretKey {
        let line = raw.prefix { $0 != 0x0A && $0 != 0x0D }
        guard !line.isEmpty else { throw AdminFailure(code: "ValidationException", "the passphrase is empty") }
        guard line.count <= 1024 else { throw AdminFailure(code: "ValidationException", "the passphrase is longer than 1024 bytes") }
        return SecretKey(copying: Array(line))
    }
}

extension Principal {
    /// Root or the uid the daemon runs as (the mounting user): the one
    /// notion of "the daemon's own standing" that the control socket (never
    /// turned away for capacity, sees status) and the admin service (full
    /// audit view, alert sinks, backups, external keys) both decide by.
    public func hasDaemonStanding(owner: uid_t = geteuid()) -> Bool { uid == 0 || uid == owner }
}
