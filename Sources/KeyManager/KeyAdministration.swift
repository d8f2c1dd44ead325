import ChunkCipher
import GRDB
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Limits of AWS KMS that kmsfs keeps.
public enum KeyLimits {
    public static let rotationDays = 90...2560
    public static let defaultRotationDays = 365
    public static let deletionWindowDays = 7...30
    public static let defaultDeletionWindowDays = 30
    /// The shortest passphrase a keystore or backup is locked with (bytes).
    public static let minimumPassphraseLength = 8
    /// On-demand rotations a key may have in its life (AWS KMS allows 25).
    public static let onDemandRotations = 25

    /// Refuses a passphrase too short to resist guessing, even behind scrypt.
    static func checkPassphrase(_ passphrase: borrowing SecretKey, _ what: String) throws(KeyManagerError) {
        guard passphrase.count >= minimumPassphraseLength else {
            throw .invalidArgument("the \(what) is \(passphrase.count) character(s); use at least \(minimumPassphraseLength) (a generated one is best)")
        }
    }
}

/// What a periodic schedule check did.
public struct ScheduleReport: Sendable, Equatable {
    public var rotated: [KeyID] = []
    public var destroyed: [KeyID] = []
    /// Keys whose deletion window ended but which are still referenced, with the count.
    public var blocked: [KeyID: Int] = [:]
    /// Keys not destroyed because a mount died before flushing the usage index.
    public var unverified: [KeyID] = []
}

extension KeyManager {
    // MARK: Resolving

    /// The key named by a 32-hex-digit id or an alias (`alias/…`).
    public func resolve(_ reference: String) throws(KeyManagerError) -> KeyID {
        if let id = KeyID(hex: reference) {
            _ = try record(id)
            return id
        }
        let alias = reference.hasPrefix("alias/") ? reference : "alias/" + reference
        let hex: String? = try verifiedRead { db in try String.fetchOne(db, sql: "SELECT key_id FROM aliases WHERE alias = ?", arguments: [alias]) }
        guard let hex, let id = KeyID(hex: hex) else { throw .keyNotFound(reference) }
        return id
    }

    /// Refuses unless `action` is allowed in the key's state; returns the outcome.
    @discardableResult
    func check(_ action: LifecycleAction, _ record: KeyRecord) throws(KeyManagerError) -> LifecycleOutcome {
        let outcome = KeyLifecycle.outcome(of: action, in: record.state, key: record.displayName)
        if case .refused(let remedy) = outcome {
            throw .invalidState(key: record.displayName, state: record.state, operation: action.rawValue,
                                since: record.metadata.stateChangedAt, remedy: remedy)
        }
        if Self.dataKeyActions.contains(action) { try checkExternalState(record, action) }
        return outcome
    }

    // MARK: Creating and listing

    /// Creates a master key, Enabled, with version 1. AES keys rotate
    /// automatically every `rotationDays` (default 365; nil turns it off).
    @discardableResult
    public func createKey(spec: KeySpec = .aes256, description: String = "", aliases: [String] = [],
                          tags: [String: String] = [:], rotationDays: Int? = KeyLimits.defaultRotationDays,
                          by principal: Principal) throws(KeyManagerError) -> KeyMetadata {
        var request = ["keySpec": spec.rawValue]
        if !aliases.isEmpty { request["aliasNames"] = aliases.joined(separator: ",") }
        return try adminOperation("CreateKey", principal, request: request) { () throws(KeyManagerError) in
            for alias in aliases { try Self.refuseReserved(alias) }
            return try makeKey(spec: spec, description: description, aliases: aliases, tags: tags, rotationDays: rotationDays, by: principal)
        }
    }

    /// Creates a key; kmsfs's own keys (reserved aliases) come through here directly.
    func makeKey(spec: KeySpec, description: String, aliases: [String], tags: [String: String] = [:],
                 rotationDays: Int? = KeyLimits.defaultRotationDays, by principal: Principal,
                 external: ExternalKeyConfig? = nil, provider: (any KeyProvider)? = nil) throws(KeyManagerError) -> KeyMetadata {
        for alias in aliases { try Self.validate(alias: alias) }
        for (name, value) in tags { try Self.validate(tag: name, value: value) }
        let rotation = spec == .aes256 ? rotationDays : nil
        if let days = rotation, !KeyLimits.rotationDays.contains(days) {
            throw .invalidArgument("rotation period \(days) days is outside \(KeyLimits.rotationDays.lowerBound)–\(KeyLimits.rotationDays.upperBound)")
        }
        let id = KeyID.random()
        let now = clock()
        let (material, publicKey) = try newMaterial(spec, id: id, version: KeyVersion(rawValue: 1), provider: provider ?? local)
        try sealedWrite { db in
            try db.execute(sql: """
                INSERT INTO keys (id, spec, state, description, created_at, state_changed_at, current_version, rotation_days, last_rotated_at)
                VALUES (?, ?, 'Enabled', ?, ?, ?, 1, ?, ?)
                """, arguments: [id.rawValue.hex, spec.rawValue, description, now, now, rotation, now])
            try db.execute(sql: "INSERT INTO key_versions (key_id, version, created_at, material, public_key) VALUES (?, 1, ?, ?, ?)",
                           arguments: [id.rawValue.hex, now, Data(material), publicKey.map { Data($0) }])
            if let external {
                let config = String(decoding: try JSONEncoder().encode(external), as: UTF8.self)
                try db.execute(sql: "INSERT INTO external_keys (key_id, provider, config) VALUES (?, ?, ?)",
                               arguments: [id.rawValue.hex, external.provider, config])
            }
            for alias in aliases {
                guard try Int.fetchOne(db, sql: "SELECT 1 FROM aliases WHERE alias = ?", arguments: [alias]) == nil else {
                    throw KeyManagerError.invalidArgument("alias \(alias) is already in use; pick another or move it with `kmsfs key alias`")
                }
                try db.execute(sql: "INSERT INTO aliases (alias, key_id) VALUES (?, ?)", arguments: [alias, id.rawValue.hex])
            }
            for (name, value) in tags {
                try db.execute(sql: "INSERT INTO tags (key_id, name, value) VALUES (?, ?, ?)", arguments: [id.rawValue.hex, name, value])
            }
            var subjects: Set<PolicySubject> = [.uid(0), .uid(principal.uid)]
            if principal.uid == 0 { subjects = [.uid(0)] }
            for op in KeyOperation.allCases {
                for subject in subjects {
                    try db.execute(sql: "INSERT OR IGNORE INTO policies (key_id, operation, subject) VALUES (?, ?, ?)",
                                   arguments: [id.rawValue.hex, op.rawValue, subject.description])
                }
            }
            var request = ["keySpec": spec.rawValue]
            if !aliases.isEmpty { request["aliasNames"] = aliases.joined(separator: ",") }
            if !tags.isEmpty { request["tags"] = tags.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: ",") }
            try AuditTrail.append(db, chain: integrity.hmac, AuditEvent("CreateKey", key: id, version: KeyVersion(rawValue: 1), principal: principal,
                                                                        request: request), at: now)
        }
        return try record(id).metadata
    }

    /// New material for a key version (and the public key of a key pair), from the provider.
    func newMaterial(_ spec: KeySpec, id: KeyID, version: KeyVersion, provider: (any KeyProvider)? = nil) throws(KeyManagerError) -> ([UInt8], [UInt8]?) {
        let chosen: any KeyProvider
        if let provider { chosen = provider } else { chosen = try self.provider(for: id) }
        let material = try chosen.createVersion(spec: spec, key: id, version: version)
        return (material.stored, material.publicKey)
    }

    /// All keys, optionally only those in `state` or carrying tag `name=value`.
    public func listKeys(state: KeyState? = nil, tag: (name: String, value: String)? = nil) throws(KeyManagerError) -> [KeyMetadata] {
        let all = try verifiedRead { db in try KeyRecord.fetchAll(db) }.map(\.metadata)
        return all.filter { key in
            if let state, key.state != state { return false }
            if let tag, key.tags[tag.name] != tag.value { return false }
            return true
        }
    }

    /// A key's metadata, versions with their usage, and policy.
    public func describe(_ reference: String) throws(KeyManagerError) -> (metadata: KeyMetadata, versions: [KeyVersionInfo], policy: [KeyOperation: [String]]) {
        let id = try resolve(reference)
        invalidate(id)
        try flushUsage()
        let rec = try record(id)
        let versions: [KeyVersionInfo] = try read { db in
            try Row.fetchAll(db, sql: """
                SELECT v.version, v.created_at, v.retired, (SELECT COUNT(*) FROM usage u WHERE u.key_id = v.key_id AND u.version = v.version) AS n
                FROM key_versions v WHERE v.key_id = ? ORDER BY v.version
                """, arguments: [id.rawValue.hex]).map { row in
                KeyVersionInfo(version: KeyVersion(rawValue: UInt32(row["version"] as Int)), createdAt: row["created_at"],
                               retired: (row["retired"] as Int) != 0, usageCount: row["n"])
            }
        }
        let policy = rec.policy.mapValues { $0.map(\.description).sorted() }
        return (rec.metadata, versions, policy)
    }

    // MARK: Lifecycle

    /// Makes a new version current for new data keys; older versions keep
    /// decrypting. An on-demand rotation does not move the automatic
    /// schedule, and a key takes at most `KeyLimits.onDemandRotations`.
    @discardableResult
    public func rotate(_ reference: String, by principal: Principal) throws(KeyManagerError) -> KeyVersion {
        try adminOperation("RotateKeyOnDemand", principal, request: ["keyId": reference]) { () throws(KeyManagerError) in
            let id = try resolve(reference)
            let rec = try authorizeAdmin(principal, id)
            try check(.change, rec)
            guard rec.metadata.spec == .aes256 else {
                throw .invalidArgument("key \(rec.displayName) is \(rec.metadata.spec.rawValue): only AES_256 keys rotate; create a new signing key instead")
            }
            try check(.rotate, rec)
            let done = try rotations(of: id).filter { $0.rotationType == .onDemand }.count
            guard done < KeyLimits.onDemandRotations else {
                throw .invalidArgument("key \(rec.displayName) has had \(done) on-demand rotations, the most a key may have "
                                       + "(\(KeyLimits.onDemandRotations), as in AWS KMS); automatic rotation continues, or create a new key and deprecate this one")
            }
            return try rotateUnchecked(rec, principal: principal, type: .onDemand)
        }
    }

    func rotateUnchecked(_ rec: KeyRecord, principal: Principal?, type: RotationType) throws(KeyManagerError) -> KeyVersion {
        let now = clock()
        let next = KeyVersion(rawValue: rec.metadata.currentVersion.rawValue + 1)
        let (material, _) = try newMaterial(.aes256, id: rec.id, version: next)
        try sealedWrite { db in
            // Re-check inside the transaction: another process may have rotated.
            let current = try Int.fetchOne(db, sql: "SELECT current_version FROM keys WHERE id = ?", arguments: [rec.id.rawValue.hex])
            guard current == Int(rec.metadata.currentVersion.rawValue) else { return }
            try db.execute(sql: "INSERT INTO key_versions (key_id, version, created_at, material) VALUES (?, ?, ?, ?)",
                           arguments: [rec.id.rawValue.hex, next.rawValue, now, Data(material)])
            try db.execute(sql: "INSERT INTO rotations (key_id, version, time, type) VALUES (?, ?, ?, ?)",
                           arguments: [rec.id.rawValue.hex, next.rawValue, now, type.rawValue])
            // last_rotated_at anchors the automatic schedule: an on-demand
            // rotation moves it only for a key that does not rotate by itself
            // (where it feeds the rotation-overdue alert).
            try db.execute(sql: """
                UPDATE keys SET current_version = ?,
                    last_rotated_at = CASE WHEN ? OR rotation_days IS NULL THEN ? ELSE last_rotated_at END WHERE id = ?
                """, arguments: [next.rawValue, type == .automatic, now, rec.id.rawValue.hex])
            try AuditTrail.append(db, chain: integrity.hmac, AuditEvent(type == .automatic ? "RotateKey" : "RotateKeyOnDemand",
                                                                        key: rec.id, version: next, principal: principal,
                                                                        request: ["keyId": rec.id.rawValue.hex, "rotationType": type.rawValue]), at: now)
        }
        invalidate(rec.id)
        return try record(rec.id).metadata.currentVersion
    }

    /// Every rotation of a key, oldest first: the version it made, when, and
    /// whether it was AUTOMATIC or ON_DEMAND. (Rotations made before kmsfs
    /// recorded their type take it from the audit log.)
    public func rotations(of reference: String) throws(KeyManagerError) -> [KeyRotation] {
        try rotations(of: try resolve(reference))
    }

    func rotations(of id: KeyID) throws(KeyManagerError) -> [KeyRotation] {
        try verifiedRead { db in
            try Row.fetchAll(db, sql: """
                SELECT v.version, v.created_at, r.type,
                    (SELECT a.event FROM audit_log a WHERE a.key_id = v.key_id AND a.key_version = v.version
                        AND a.event IN ('RotateKey', 'RotateKeyAutomatically', 'RotateKeyOnDemand') ORDER BY a.seq LIMIT 1) AS event
                FROM key_versions v LEFT JOIN rotations r ON r.key_id = v.key_id AND r.version = v.version
                WHERE v.key_id = ? AND v.version > 1 ORDER BY v.version
                """, arguments: [id.rawValue.hex]).map { row in
                let recorded = (row["type"] as String?).flatMap(RotationType.init(rawValue:))
                let legacy: RotationType = (row["event"] as String?) == "RotateKeyAutomatically" ? .automatic : .onDemand
                return KeyRotation(keyID: id, version: KeyVersion(rawValue: UInt32(row["version"] as Int)),
                                   rotationDate: row["created_at"], rotationType: recorded ?? legacy)
            }
        }
    }

    /// Turns automatic rotation on with a period in days, or off with nil.
    /// Turning it on starts the period now (as AWS does); changing the period
    /// of a rotating key keeps its last rotation as the start.
    public func setRotation(_ reference: String, days: Int?, by principal: Principal) throws(KeyManagerError) {
        let event = days == nil ? "DisableKeyRotation" : "EnableKeyRotation"
        var request = ["keyId": reference]
        if let days { request["rotationPeriodInDays"] = String(days) }
        try adminOperation(event, principal, request: request) { () throws(KeyManagerError) in
            let id = try resolve(reference)
            let rec = try authorizeAdmin(principal, id)
            try check(.change, rec)
            guard rec.metadata.spec == .aes256 else {
                throw .invalidArgument("key \(rec.displayName) is \(rec.metadata.spec.rawValue): only AES_256 keys rotate")
            }
            if let days, !KeyLimits.rotationDays.contains(days) {
                throw .invalidArgument("rotation period \(days) days is outside \(KeyLimits.rotationDays.lowerBound)-\(KeyLimits.rotationDays.upperBound)")
            }
            let now = clock()
            try sealedWrite { db in
                try db.execute(sql: """
                    UPDATE keys SET rotation_days = ?, last_rotated_at = CASE WHEN rotation_days IS NULL AND ? IS NOT NULL THEN ? ELSE last_rotated_at END
                    WHERE id = ?
                    """, arguments: [days, days, now, id.rawValue.hex])
                try AuditTrail.append(db, chain: integrity.hmac, AuditEvent(event, key: id, principal: principal, request: request), at: now)
            }
            invalidate(id)
        }
    }

    /// Enables a Disabled key, or undeprecates a Deprecated one.
    public func enable(_ reference: String, by principal: Principal) throws(KeyManagerError) {
        try transition(reference, .enable, event: "EnableKey", by: principal) { _ in ("successor", nil) }
    }

    /// Disables a key: no new files, no opens, until enabled again.
    public func disable(_ reference: String, by principal: Principal) throws(KeyManagerError) {
        try transition(reference, .disable, event: "DisableKey", by: principal) { _ in nil }
    }

    /// Schedules destruction after a window of 7–30 days (default 30). A key
    /// still bound to a directory is not destroyed until it is rebound (the
    /// deletion guard); `key schedule-deletion` warns about such bindings.
    /// A deprecated key keeps handing its directories' new files to its
    /// successor while pending deletion.
    public func scheduleDeletion(_ reference: String, days: Int = KeyLimits.defaultDeletionWindowDays,
                                 by principal: Principal) throws(KeyManagerError) -> Double {
        let date = clock() + Double(days) * 86_400
        try transition(reference, .scheduleDeletion, event: "ScheduleKeyDeletion", by: principal,
                       request: ["pendingWindowInDays": String(days)]) { () throws(KeyManagerError) in
            guard KeyLimits.deletionWindowDays.contains(days) else {
                throw .invalidArgument("deletion window \(days) days is outside 7-30")
            }
        } extra: { _ in ("deletion_date", date) }
        return date
    }

    /// The directory paths bound to a key.
    public func boundPaths(of reference: String) throws(KeyManagerError) -> [String] {
        try boundPaths(of: try resolve(reference))
    }

    /// Cancels a scheduled deletion; the key is left Disabled.
    public func cancelDeletion(_ reference: String, by principal: Principal) throws(KeyManagerError) {
        try transition(reference, .cancelDeletion, event: "CancelKeyDeletion", by: principal) { _ in ("deletion_date", nil) }
    }

    /// Deprecates a key in favour of `successor`: no new data keys; its files
    /// are to move to the successor (DESIGN.md §7). The successor will hold
    /// the old key's files, so this takes administer rights on both. Returns
    /// the policy subjects that may use the old key but not the successor
    /// (after `carryPolicy` copied the old key's encrypt and decrypt
    /// subjects over, none): once the files move, they lose access.
    @discardableResult
    public func deprecate(_ reference: String, successor: String, carryPolicy: Bool = false,
                          by principal: Principal) throws(KeyManagerError) -> [String] {
        var lost = [String]()
        var successorHex = ""
        try transition(reference, .deprecate, event: "DeprecateKey", by: principal,
                       request: ["successorKeyId": successor, "carryPolicy": String(carryPolicy)]) { () throws(KeyManagerError) in
            let next = try resolve(successor)
            let id = try resolve(reference)
            guard next != id else { throw .invalidArgument("a key cannot succeed itself") }
            successorHex = next.rawValue.hex
            let nextRecord = try authorizeAdmin(principal, next)
            guard nextRecord.metadata.spec == .aes256 else { throw .invalidArgument("the successor must be an AES_256 key") }
            try check(.rewrapTo, nextRecord)
            let old = try record(id)
            for op in [KeyOperation.encrypt, .decrypt] {
                for subject in old.policy[op, default: []].subtracting(nextRecord.policy[op, default: []]).sorted(by: { $0.description < $1.description }) {
                    if carryPolicy {
                        try sealedWrite { db in
                            try db.execute(sql: "INSERT OR IGNORE INTO policies (key_id, operation, subject) VALUES (?, ?, ?)",
                                           arguments: [next.rawValue.hex, op.rawValue, subject.description])
                            try AuditTrail.append(db, chain: integrity.hmac, AuditEvent("PutKeyPolicy", key: next, principal: principal,
                                                  request: ["operation": op.rawValue, "grant": subject.description, "carriedFrom": id.rawValue.hex]),
                                                  at: clock())
                        }
                    } else {
                        lost.append("\(op.rawValue) \(subject)")
                    }
                }
            }
            invalidate(next)
        } extra: { _ in ("successor", successorHex) }
        return lost
    }

    /// Applies a lifecycle action: policy, table check, `precheck`, state
    /// change and audit in one transaction; any refusal is audited with the
    /// request's parameters.
    private func transition(_ reference: String, _ action: LifecycleAction, event: String, by principal: Principal,
                            request: [String: String] = [:], precheck: () throws(KeyManagerError) -> Void = {},
                            extra: (KeyRecord) -> (column: String, value: (any DatabaseValueConvertible)?)?) throws(KeyManagerError) {
        let parameters = request.merging(["keyId": reference]) { a, _ in a }
        try adminOperation(event, principal, request: parameters) { () throws(KeyManagerError) in
            let id = try resolve(reference)
            invalidate(id)
            let rec = try authorizeAdmin(principal, id)
            guard case .allowed(let newState) = try check(action, rec) else { return }
            try precheck()
            let now = clock()
            // Every value bound; the one extra column's name is a literal of the caller's.
            let more = extra(rec)
            let set = "state = ?, state_changed_at = ?" + (more.map { ", \($0.column) = ?" } ?? "")
            var values: [(any DatabaseValueConvertible)?] = [newState.rawValue, now]
            if let more { values.append(more.value) }
            values += [id.rawValue.hex, rec.state.rawValue]
            try sealedWrite { db in
                try db.execute(sql: "UPDATE keys SET \(set) WHERE id = ? AND state = ?", arguments: StatementArguments(values))
                guard db.changesCount == 1 else { throw KeyManagerError.database("key \(rec.displayName) changed meanwhile; try again") }
                try AuditTrail.append(db, chain: integrity.hmac, AuditEvent(event, key: id, principal: principal, request: parameters), at: now)
            }
            invalidate(id)
        }
    }

    /// Retires an old version no data key needs any more; it decrypts nothing after.
    public func retireVersion(_ reference: String, version: KeyVersion, by principal: Principal) throws(KeyManagerError) {
        let request = ["keyId": reference, "keyVersion": String(version.rawValue)]
        try adminOperation("RetireKeyVersion", principal, request: request) { () throws(KeyManagerError) in
            let id = try resolve(reference)
            let rec = try authorizeAdmin(principal, id)
            try check(.change, rec)
            try flushUsage()
            guard version != rec.metadata.currentVersion else {
                throw .invalidArgument("version \(version) is the current version of \(rec.displayName); rotate first")
            }
            try sealedWrite { db in
                let n = try Int.fetchOne(db, sql: "SELECT COUNT(*) FROM usage WHERE key_id = ? AND version = ?",
                                         arguments: [id.rawValue.hex, version.rawValue]) ?? 0
                guard n == 0 else { throw KeyManagerError.versionInUse(key: rec.displayName, version: version, references: n) }
                try db.execute(sql: "UPDATE key_versions SET retired = 1, material = NULL WHERE key_id = ? AND version = ?",
                               arguments: [id.rawValue.hex, version.rawValue])
                guard db.changesCount == 1 else { throw KeyManagerError.versionNotFound(key: rec.displayName, version: version) }
                try AuditTrail.append(db, chain: integrity.hmac, AuditEvent("RetireKeyVersion", key: id, version: version, principal: principal,
                                                                            request: request), at: clock())
            }
            forgetWrappers(id)
        }
    }

    /// Runs `body`, an admin operation; a refusal is audited as `event` with
    /// the request's parameters (a denial was already audited by the policy
    /// check, an outside keystore edit by the integrity check).
    func adminOperation<T>(_ event: String, _ principal: Principal, key: KeyID? = nil, request: [String: String],
                           _ body: () throws(KeyManagerError) -> T) throws(KeyManagerError) -> T {
        do { return try body() } catch {
            switch error {
            case .accessDenied, .keystoreTampered, .wrongPassphrase: break
            case .invalidArgument, .keyNotFound, .versionNotFound, .versionInUse, .deletionBlocked:
                audit(AuditEvent(event, outcome: "invalid", key: key, principal: principal, error: error.description, request: request))
            default:
                audit(AuditEvent(event, outcome: "refused", key: key, principal: principal, error: error.description, request: request))
            }
            throw error
        }
    }

    /// Runs due automatic rotations and ends deletion windows. A key whose
    /// window ended is destroyed only if no file or directory references any
    /// of its versions and no directory is bound to it; otherwise it stays
    /// pending and is reported.
    public func runSchedules() throws(KeyManagerError) -> ScheduleReport {
        var report = ScheduleReport()
        let now = clock()
        try flushUsage()
        let indexIncomplete = try usageIndexMayBeIncomplete()
        let records = try verifiedRead({ db in try KeyRecord.fetchAll(db) })
        checkOverdueRotations(records)
        for rec in records {
            if rec.state == .enabled, let due = rec.metadata.nextRotationAt, due <= now {
                _ = try rotateUnchecked(rec, principal: nil, type: .automatic)
                report.rotated.append(rec.id)
            }
            if rec.state == .pendingDeletion, let date = rec.metadata.deletionDate, date <= now {
                let references = try read { db in
                    (try Int.fetchOne(db, sql: "SELECT COUNT(*) FROM usage WHERE key_id = ?", arguments: [rec.id.rawValue.hex]) ?? 0)
                        + (try Int.fetchOne(db, sql: "SELECT COUNT(*) FROM bindings WHERE key_id = ?", arguments: [rec.id.rawValue.hex]) ?? 0)
                }
                if references > 0 {
                    report.blocked[rec.id] = references
                    audit(AuditEvent("DeleteKey", outcome: "refused", key: rec.id,
                                     error: KeyManagerError.deletionBlocked(key: rec.displayName, references: references).description))
                    continue
                }
                if indexIncomplete {
                    report.unverified.append(rec.id)
                    audit(AuditEvent("DeleteKey", outcome: "refused", key: rec.id,
                                     error: "a mount ended without flushing the usage index; it may miss files of this key"))
                    continue
                }
                try sealedWrite { db in
                    try db.execute(sql: "UPDATE key_versions SET material = NULL, retired = 1 WHERE key_id = ?", arguments: [rec.id.rawValue.hex])
                    try db.execute(sql: "UPDATE keys SET state = 'Destroyed', state_changed_at = ? WHERE id = ?", arguments: [now, rec.id.rawValue.hex])
                    try db.execute(sql: "DELETE FROM aliases WHERE key_id = ?", arguments: [rec.id.rawValue.hex])
                    try AuditTrail.append(db, chain: integrity.hmac, AuditEvent("DeleteKey", key: rec.id), at: now)
                }
                // Overwrite freed pages so the material is gone from the file, not just unlinked.
                do { try db.writeWithoutTransaction { db in try db.execute(sql: "PRAGMA wal_checkpoint(TRUNCATE)") } } catch {}
                forgetWrappers(rec.id)
                report.destroyed.append(rec.id)
            }
        }
        return report
    }

    // MARK: Aliases and tags

    /// Points `alias` at a key, creating it or moving it. As in AWS KMS,
    /// moving an alias takes administer rights on the key it leaves as well
    /// as the key it joins, and both must have the same spec and usage.
    /// Names kmsfs uses itself (`alias/kmsfs-…`) are reserved.
    public func setAlias(_ alias: String, to reference: String, by principal: Principal) throws(KeyManagerError) {
        var event = "CreateAlias"
        try adminOperation(event, principal, request: ["aliasName": alias, "targetKeyId": reference]) { () throws(KeyManagerError) in
            try Self.validate(alias: alias)
            try Self.refuseReserved(alias)
            let id = try resolve(reference)
            let rec = try authorizeAdmin(principal, id)
            try check(.change, rec)
            let currentHex: String? = try verifiedRead { db in try String.fetchOne(db, sql: "SELECT key_id FROM aliases WHERE alias = ?", arguments: [alias]) }
            var previous: KeyID?
            if let currentHex, let current = KeyID(hex: currentHex) {
                event = "UpdateAlias"
                guard current != id else { return }
                let old = try authorizeAdmin(principal, current)
                guard old.metadata.spec == rec.metadata.spec, old.metadata.usage == rec.metadata.usage else {
                    throw .invalidArgument("\(alias) names a \(old.metadata.spec.rawValue) key; it can move only to another \(old.metadata.spec.rawValue) key, not \(rec.metadata.spec.rawValue)")
                }
                previous = current
            }
            try sealedWrite { db in
                try db.execute(sql: "INSERT INTO aliases (alias, key_id) VALUES (?, ?) ON CONFLICT(alias) DO UPDATE SET key_id = excluded.key_id",
                               arguments: [alias, id.rawValue.hex])
                var request = ["aliasName": alias, "targetKeyId": id.rawValue.hex]
                if let previous { request["previousKeyId"] = previous.rawValue.hex }
                try AuditTrail.append(db, chain: integrity.hmac, AuditEvent(event, key: id, principal: principal, request: request), at: clock())
            }
            invalidate(id)
            if let previous { invalidate(previous) }
        }
    }

    /// Removes an alias (`alias/NAME`, or NAME). A key id is not an alias and is refused.
    public func deleteAlias(_ name: String, by principal: Principal) throws(KeyManagerError) {
        let alias = name.hasPrefix("alias/") ? name : "alias/" + name
        try adminOperation("DeleteAlias", principal, request: ["aliasName": alias]) { () throws(KeyManagerError) in
            guard KeyID(hex: name) == nil else {
                throw .invalidArgument("\(name) is a key id, not an alias; `kmsfs key describe \(name)` lists its aliases")
            }
            try Self.refuseReserved(alias)
            let hex: String? = try verifiedRead { db in try String.fetchOne(db, sql: "SELECT key_id FROM aliases WHERE alias = ?", arguments: [alias]) }
            guard let hex, let id = KeyID(hex: hex) else { throw .invalidArgument("there is no alias \(alias); `kmsfs key list` shows the aliases") }
            let rec = try authorizeAdmin(principal, id)
            try check(.change, rec)
            try sealedWrite { db in
                try db.execute(sql: "DELETE FROM aliases WHERE alias = ?", arguments: [alias])
                guard db.changesCount == 1 else { throw KeyManagerError.database("alias \(alias) changed meanwhile; try again") }
                try AuditTrail.append(db, chain: integrity.hmac, AuditEvent("DeleteAlias", key: id, principal: principal,
                                                                            request: ["aliasName": alias]), at: clock())
            }
            invalidate(id)
        }
    }

    /// Sets (or with nil removes) a tag such as `env=prod`.
    public func setTag(_ reference: String, name: String, value: String?, by principal: Principal) throws(KeyManagerError) {
        let event = value == nil ? "UntagResource" : "TagResource"
        var request = ["keyId": reference, "tagKey": name]
        if let value { request["tagValue"] = value }
        try adminOperation(event, principal, request: request) { () throws(KeyManagerError) in
            let id = try resolve(reference)
            let rec = try authorizeAdmin(principal, id)
            try check(.change, rec)
            if let value { try Self.validate(tag: name, value: value) }
            try sealedWrite { db in
                if let value {
                    try db.execute(sql: "INSERT INTO tags (key_id, name, value) VALUES (?, ?, ?) ON CONFLICT(key_id, name) DO UPDATE SET value = excluded.value",
                                   arguments: [id.rawValue.hex, name, value])
                } else {
                    try db.execute(sql: "DELETE FROM tags WHERE key_id = ? AND name = ?", arguments: [id.rawValue.hex, name])
                }
                try AuditTrail.append(db, chain: integrity.hmac, AuditEvent(event, key: id, principal: principal, request: request), at: clock())
            }
            invalidate(id)
        }
    }

    /// Aliases kmsfs makes and relies on itself: no command may create, move or delete them.
    public static let reservedAliasPrefixes = ["alias/kmsfs-", "alias/aws/"]

    static func refuseReserved(_ alias: String) throws(KeyManagerError) {
        if reservedAliasPrefixes.contains(where: { alias.hasPrefix($0) }) {
            throw .invalidArgument("\(alias) is reserved for kmsfs's own keys (names starting \(reservedAliasPrefixes.joined(separator: " or "))); pick another name")
        }
    }

    static func validate(alias: String) throws(KeyManagerError) {
        let body = alias.dropFirst("alias/".count)
        guard alias.hasPrefix("alias/"), !body.isEmpty, body.count <= 250,
              body.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || "/_-".contains($0)) }) else {
            throw .invalidArgument("alias '\(alias)' must look like alias/NAME with letters, digits, '/', '_' or '-'")
        }
    }

    static func validate(tag name: String, value: String) throws(KeyManagerError) {
        guard !name.isEmpty, name.count <= 128, value.count <= 256, !name.contains("=") else {
            throw .invalidArgument("tag '\(name)=\(value)' must be NAME=VALUE with a 1–128 character name")
        }
    }

    // MARK: Passphrase

    /// Rewraps every master-key version (and the keystore's own keys) under a
    /// key derived from `newPassphrase`. Nothing else is rewritten. An old
    /// copy of the keystore still opens with the old passphrase.
    public func changePassphrase(to newPassphrase: borrowing SecretKey, scrypt: ScryptParameters? = nil,
                                 by principal: Principal) throws(KeyManagerError) {
        let stored: ScryptParameters = try read { db in
            let logN = try Int.fetchOne(db, sql: "SELECT value FROM meta WHERE name = 'scrypt_logn'") ?? 16
            let r = try Int.fetchOne(db, sql: "SELECT value FROM meta WHERE name = 'scrypt_r'") ?? 8
            let p = try Int.fetchOne(db, sql: "SELECT value FROM meta WHERE name = 'scrypt_p'") ?? 1
            return ScryptParameters(logN: UInt8(logN), r: UInt32(r), p: UInt32(p))
        }
        try KeyLimits.checkPassphrase(newPassphrase, "new passphrase")
        let params = scrypt ?? stored
        let salt = SecureRandom.bytes(32)
        let newKEK = try AESGCM.make(try params.deriveKey(passphrase: newPassphrase, salt: salt))
        try sealedWrite { db in
            try rewrapSecrets(db, from: kek, to: newKEK, salt: salt, scrypt: params)
            try AuditTrail.append(db, chain: integrity.hmac, AuditEvent("ChangePassphrase", principal: principal), at: clock())
        }
        local.replaceKEK(newKEK)
        do { try db.writeWithoutTransaction { db in try db.execute(sql: "PRAGMA wal_checkpoint(TRUNCATE)") } } catch {}
    }

    // MARK: Signing

    /// Signs `message` with the current version of a SIGN_VERIFY key.
    public func sign(_ message: [UInt8], with reference: String, by principal: Principal) throws(KeyManagerError) -> (version: KeyVersion, signature: [UInt8]) {
        let id = try resolve(reference)
        let rec = try record(id)
        guard rec.metadata.usage == .signVerify else { throw .invalidArgument("key \(rec.displayName) is not a SIGN_VERIFY key") }
        try authorize(principal, .encrypt, rec)
        try check(.generateDataKey, rec)
        let version = rec.metadata.currentVersion
        let wrapped: Data? = try read { db in
            try Data.fetchOne(db, sql: "SELECT material FROM key_versions WHERE key_id = ? AND version = ?", arguments: [id.rawValue.hex, version.rawValue])
        }
        guard let wrapped else { throw .versionNotFound(key: rec.displayName, version: version) }
        return (version, try provider(for: id).sign(message, spec: rec.metadata.spec, key: id, version: version, stored: [UInt8](wrapped)))
    }

    /// Verifies a signature made by `sign` (public key only; any state but Destroyed).
    public func verify(_ message: [UInt8], signature: [UInt8], key reference: String, version: KeyVersion) throws(KeyManagerError) -> Bool {
        let id = try resolve(reference)
        let rec = try record(id)
        let publicKey: Data? = try verifiedRead { db in
            try Data.fetchOne(db, sql: "SELECT public_key FROM key_versions WHERE key_id = ? AND version = ?", arguments: [id.rawValue.hex, version.rawValue])
        }
        guard let publicKey else { throw .versionNotFound(key: rec.displayName, version: version) }
        if let answered = try provider(for: id).verify(message, signature: signature, spec: rec.metadata.spec, key: id, version: version) {
            return answered
        }
        return AsymmetricKeys.verify(message, signature: signature, publicKey: [UInt8](publicKey), spec: rec.metadata.spec)
    }
}
