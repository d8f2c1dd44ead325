import ChunkCipher
import Dispatch
import GRDB
import Synchronization
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#endif

/// Where alerts go and when the rules fire. Stored in the keystore
/// (`meta.alert_config`), changed with `kmsfs audit alerts`.
public struct AlertConfig: Codable, Sendable, Equatable {
    /// Send each alert to syslog (facility authpriv, priority warning).
    public var syslog = true
    /// Append each alert as one JSON line to this file.
    public var jsonl: String?
    /// Run `/bin/sh -c command` with each alert as JSON on its stdin.
    public var command: String?
    /// Access denials by one uid within `denialWindow` seconds that make a burst.
    public var denialBurst = 5
    public var denialWindow = 60.0
    /// Keys without automatic rotation not rotated for this many days are overdue.
    public var rotationOverdueDays = 365
    /// What the file and command sinks receive: "kmsfs" (the alert as kmsfs
    /// writes it, the default), "asff" (an AWS Security Finding, ready for
    /// `aws securityhub batch-import-findings`) or "ocsf" (an OCSF Detection Finding).
    public var format: String?
    /// The account and region ASFF findings name (Security Hub requires them).
    public var asffAccount: SecurityFindings.ASFFAccount?
    /// The uid that stored this configuration (set by `setAlertConfig`). A
    /// process running as root runs the command and writes the file only
    /// when root configured them.
    public var configuredBy: UInt32?

    public init() {}
}

/// One alert, as the sinks receive it.
public struct Alert: Codable, Sendable {
    public var time: Double
    /// denial-burst, key-state, integrity, deletion-refused, rotation-overdue.
    public var rule: String
    public var severity: String
    public var message: String
    public var keyID: String?
    public var uid: UInt32?
    public var objectID: String?
}

/// The alert rules' memory (per process): recent denials per uid and when
/// each rule last fired for a subject, so a burst or a retried open alerts once.
struct AlertState: ~Copyable {
    var config: (value: AlertConfig, fetchedAt: Double)?
    var denials: [UInt32: [Double]] = [:]
    var fired: [String: Double] = [:]
}

extension KeyManager {
    static let alertQueue = DispatchQueue(label: "kmsfs.alerts")
    /// A retried refusal or a repeated integrity failure of one subject alerts once per this many seconds.
    static let alertQuietPeriod = 60.0

    public func alertConfig() throws(KeyManagerError) -> AlertConfig {
        let now = clock()
        if let cached = alertState.withLock({ $0.config }), abs(now - cached.fetchedAt) < Self.recordTTL * 10 { return cached.value }
        let stored: String? = try verifiedRead { db in try KeystoreMeta.value(.alertConfig, db, as: String.self) }
        let config = stored.flatMap { try? JSONDecoder().decode(AlertConfig.self, from: Data($0.utf8)) } ?? AlertConfig()
        alertState.withLock { $0.config = (config, now) }
        return config
    }

    /// Replaces the alert configuration (administrators of the default key; audited).
    public func setAlertConfig(_ config: AlertConfig, by principal: Principal) throws(KeyManagerError) {
        _ = try authorizeAdmin(principal, try resolve("alias/default"))
        guard config.denialBurst >= 1, config.denialWindow > 0, config.rotationOverdueDays >= 1 else {
            throw .invalidArgument("alert thresholds must be positive")
        }
        guard [nil, "kmsfs", "asff", "ocsf"].contains(config.format) else { throw .invalidArgument("the alert format is kmsfs, asff or ocsf") }
        if config.format == "asff" {
            guard let account = config.asffAccount, account.accountID.count == 12, account.accountID.allSatisfy(\.isNumber), !account.region.isEmpty else {
                throw .invalidArgument("ASFF findings name an AWS account and region: give --asff-account 123456789012 --asff-region REGION")
            }
        }
        var config = config
        config.configuredBy = principal.uid
        let json = String(decoding: (try? JSONEncoder().encode(config)) ?? Data(), as: UTF8.self)
        try sealedWrite { db in
            try KeystoreMeta.set(.alertConfig, to: json, db)
            try AuditTrail.append(db, chain: integrity.hmac, AuditEvent(.putAlertConfig, principal: principal, error: json), at: clock())
        }
        alertState.withLock { $0.config = nil }
    }

    /// Applies the rules to an audit event as it is recorded.
    func observeForAlerts(_ event: AuditEvent) {
        guard event.outcome != .success else { return }
        let now = clock()
        guard let config = try? alertConfig() else { return }
        switch (event.event, event.outcome) {
        case (_, .denied):
            guard let uid = event.principal?.uid else { return }
            let burst = alertState.withLock { s -> Int? in
                var times = (s.denials[uid] ?? []).filter { now - $0 < config.denialWindow }
                times.append(now)
                s.denials[uid] = times
                guard times.count >= config.denialBurst, now - (s.fired["denials:\(uid)"] ?? -.infinity) >= config.denialWindow else { return nil }
                s.fired["denials:\(uid)"] = now
                return times.count
            }
            if let burst {
                raise(Alert(time: now, rule: "denial-burst", severity: "high",
                            message: "uid \(uid) was denied \(burst) times within \(Int(config.denialWindow)) s", keyID: event.key?.rawValue.hex, uid: uid))
            }
        case (.decrypt, .refused), (.generateDataKey, .refused):
            guard let key = event.key, let state = try? record(key).state,
                  [.disabled, .pendingDeletion, .destroyed].contains(state), once("state:\(key.rawValue.hex)", now) else { return }
            raise(Alert(time: now, rule: "key-state", severity: "high",
                        message: "a \(state.rawValue) key was used: \(event.error ?? event.event.rawValue)", keyID: key.rawValue.hex,
                        uid: event.principal?.uid, objectID: event.object?.hex))
        case (.integrityFailure, _):
            guard once("integrity:\(event.object?.hex ?? event.error ?? "")", now) else { return }
            raise(Alert(time: now, rule: "integrity", severity: "critical", message: event.error ?? "integrity failure",
                        keyID: event.key?.rawValue.hex, uid: event.principal?.uid, objectID: event.object?.hex))
        case (.deleteKey, .refused):
            guard let key = event.key, once("deletion:\(key.rawValue.hex)", now) else { return }
            raise(Alert(time: now, rule: "deletion-refused", severity: "medium", message: event.error ?? "deletion refused",
                        keyID: key.rawValue.hex))
        default:
            return
        }
    }

    private func once(_ subject: String, _ now: Double) -> Bool {
        alertState.withLock { s in
            guard now - (s.fired[subject] ?? -.infinity) >= Self.alertQuietPeriod else { return false }
            s.fired[subject] = now
            return true
        }
    }

    /// Warns about Enabled keys without automatic rotation whose last
    /// rotation is older than the configured days; at most once a day per key
    /// (remembered in the keystore, so separate commands do not repeat it).
    func checkOverdueRotations(_ records: [KeyRecord]) {
        guard let config = try? alertConfig() else { return }
        let now = clock()
        for rec in records where rec.state == .enabled && rec.metadata.usage == .encryptDecrypt && rec.metadata.rotationPeriodDays == nil {
            let age = now - rec.metadata.lastRotatedAt
            guard age > Double(config.rotationOverdueDays) * 86400 else { continue }
            let name = MetaName.rotationAlerted(rec.id)
            let last = try? read { db in try KeystoreMeta.value(name, db, as: Double.self) }
            if let last, now - last < 86400 { continue }
            _ = try? write { db in try KeystoreMeta.set(name, to: now, db) }
            raise(Alert(time: now, rule: "rotation-overdue", severity: "medium",
                        message: "key \(rec.displayName) was last rotated \(Int(age / 86400)) days ago and does not rotate automatically",
                        keyID: rec.id.rawValue.hex))
        }
    }

    /// Sends an alert to every configured sink, off the caller's thread.
    func raise(_ alert: Alert) {
        // A setting that fails its seal is not obeyed: syslog only.
        let config = (try? alertConfig()) ?? AlertConfig()
        logger.warning("alert", metadata: ["rule": .string(alert.rule), "message": .string(alert.message)])
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        guard let data = try? encoder.encode(alert) else { return }
        // Syslog keeps kmsfs's own form; the file and the command get the configured format.
        let native = String(decoding: data, as: UTF8.self)
        let line: String = switch config.format {
        case "asff": SecurityFindings.line(SecurityFindings.asff(alert, filesystem: filesystemID,
                                                                 account: config.asffAccount ?? .init(accountID: "000000000000", region: "us-east-1")))
        case "ocsf": SecurityFindings.line(SecurityFindings.ocsf(alert, filesystem: filesystemID))
        default: native
        }
        // A command or file sink that root did not configure never runs as root.
        let privileged = geteuid() == 0 && config.configuredBy != 0 && (config.command != nil || config.jsonl != nil)
        if privileged {
            logger.error("alert command and file sinks ignored: configured by uid \(config.configuredBy.map(String.init) ?? "unknown"), not root, and this process runs as root")
        }
        Self.alertQueue.async {
            if config.syslog {
                openlog("kmsfs", LOG_PID, LOG_AUTHPRIV)
                native.withCString { text in withVaList([text]) { vsyslog(LOG_WARNING, "%s", $0) } }
            }
            if let path = config.jsonl, !privileged {
                let fd = Glibc.open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0o600)
                if fd >= 0 {
                    let bytes = Array((line + "\n").utf8)
                    _ = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
                    close(fd)
                }
            }
            if let command = config.command, !privileged { Self.run(command, input: line + "\n") }
        }
    }

    /// Waits until every alert raised so far has reached its sinks (a short-lived command calls this before exiting).
    public static func drainAlerts() {
        alertQueue.sync {}
    }

    /// A command that exits without reading its stdin (`touch FILE`) made
    /// the write below raise SIGPIPE, which killed the process raising the
    /// alert — the daemon, or a test run. Ignored, the write fails with EPIPE.
    private static let ignoreBrokenPipes: Void = { _ = signal(SIGPIPE, SIG_IGN) }()

    /// `/bin/sh -c command` with `input` on its stdin (called on the alert queue).
    static func run(_ command: String, input: String) {
        _ = ignoreBrokenPipes
        var fds: [Int32] = [0, 0]
        guard pipe(&fds) == 0 else { return }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        // The command gets SIGPIPE's default action back (it is ignored here, see below).
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var defaults = sigset_t()
        sigemptyset(&defaults)
        sigaddset(&defaults, SIGPIPE)
        posix_spawnattr_setsigdefault(&attributes, &defaults)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGDEF))
        posix_spawn_file_actions_adddup2(&actions, fds[0], 0)
        posix_spawn_file_actions_addclose(&actions, fds[1])
        var argv: [UnsafeMutablePointer<CChar>?] = [strdup("/bin/sh"), strdup("-c"), strdup(command), nil]
        defer { argv.forEach { free($0) } }
        var pid: pid_t = 0
        let status = posix_spawn(&pid, "/bin/sh", &actions, &attributes, &argv, environ)
        close(fds[0])
        if status == 0 {
            let bytes = Array(input.utf8)
            _ = bytes.withUnsafeBytes { Glibc.write(fds[1], $0.baseAddress, $0.count) }
        }
        close(fds[1])
        // Waited for on the alert queue, so alerts reach the command in order
        // and a short-lived kmsfs command does not exit before it has run.
        if status == 0 {
            var code: Int32 = 0
            waitpid(pid, &code, 0)
        }
    }
}
