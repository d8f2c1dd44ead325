import ChunkCipher
import GRDB
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

extension KeyManager {
    // MARK: Lifecycle

    /// Makes a new version current for new data keys; older versions keep
    /// decrypting. An on-demand rotation does not move the automatic
    /// schedule, and a key takes at most `KeyLimits.onDemandRotations`.
    @discardableResult
    public func rotate(_ reference: String, by principal: Principal) throws(KeyManagerError) -> KeyVersion {
        try adminOperation(.rotateKeyOnDemand, principal, request: ["keyId": reference]) { () throws(KeyManagerError) in
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
            guard var row = try KeyRow.fetch(rec.id.rawValue.hex, db), row.currentVersion == Int(rec.metadata.currentVersion.rawValue) else { return }
            try KeyVersionRow(key: rec.id, version: next, createdAt: now, material: Data(material)).insert(db)
            try RotationRow(keyID: rec.id.rawValue.hex, version: Int(next.rawValue), time: now, type: type.rawValue).insert(db)
            row.currentVersion = Int(next.rawValue)
            // last_rotated_at anchors the automatic schedule: an on-demand
            // rotation moves it only for a key that does not rotate by itself
            // (where it feeds the rotation-overdue alert).
            if type == .automatic || row.rotationDays == nil { row.lastRotatedAt = now }
            try row.update(db)
            try AuditTrail.append(db, chain: integrity.hmac, AuditEvent(type == .automatic ? .rotateKey : .rotateKeyOnDemand,
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
        try verifiedRead { db in try RotationRow.history(of: id, db) }
    }

    /// Turns automatic rotation on with a period in days, or off with nil.
    /// Turning it on starts the period now (as AWS does); changing the period
    /// of a rotating key keeps its last rotation as the start.
    public func setRotation(_ reference: String, days: Int?, by principal: Principal) throws(KeyManagerError) {
        let event: AuditAction = days == nil ? .disableKeyRotation : .enableKeyRotation
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
                guard var row = try KeyRow.fetch(id.rawValue.hex, db) else { throw KeyManagerError.keyNotFound(reference) }
                // Turning rotation on starts the period now; changing the period keeps the last rotation as the start.
                if row.rotationDays == nil, days != nil { row.lastRotatedAt = now }
                row.rotationDays = days
                try row.update(db)
                try AuditTrail.append(db, chain: integrity.hmac, AuditEvent(event, key: id, principal: principal, request: request), at: now)
            }
            invalidate(id)
        }
    }

    /// Enables a Disabled key, or undeprecates a Deprecated one.
    public func enable(_ reference: String, by principal: Principal) throws(KeyManagerError) {
        try transition(reference, .enable, event: .enableKey, by: principal) { _ in KeyRow.Columns.successor.set(to: nil) }
    }

    /// Disables a key: no new files, no opens, until enabled again.
    public func disable(_ reference: String, by principal: Principal) throws(KeyManagerError) {
        try transition(reference, .disable, event: .disableKey, by: principal) { _ in nil }
    }

    /// Schedules destruction after a window of 7–30 days (default 30). A key
    /// still bound to a directory is not destroyed until it is rebound (the
    /// deletion guard); `key schedule-deletion` warns about such bindings.
    /// A deprecated key keeps handing its directories' new files to its
    /// successor while pending deletion.
    public func scheduleDeletion(_ reference: String, days: Int = KeyLimits.defaultDeletionWindowDays,
                                 by principal: Principal) throws(KeyManagerError) -> Double {
        let date = clock() + Double(days) * 86_400
        try transition(reference, .scheduleDeletion, event: .scheduleKeyDeletion, by: principal,
                       request: ["pendingWindowInDays": String(days)]) { () throws(KeyManagerError) in
            guard KeyLimits.deletionWindowDays.contains(days) else {
                throw .invalidArgument("deletion window \(days) days is outside 7-30")
            }
        } extra: { _ in KeyRow.Columns.deletionDate.set(to: date) }
        return date
    }

    /// The directory paths bound to a key.
    public func boundPaths(of reference: String) throws(KeyManagerError) -> [String] {
        try boundPaths(of: try resolve(reference))
    }

    /// Cancels a scheduled deletion; the key is left Disabled.
    public func cancelDeletion(_ reference: String, by principal: Principal) throws(KeyManagerError) {
        try transition(reference, .cancelDeletion, event: .cancelKeyDeletion, by: principal) { _ in KeyRow.Columns.deletionDate.set(to: nil) }
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
        try transition(reference, .deprecate, event: .deprecateKey, by: principal,
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
                            try PolicyRow.add(op, on: next, to: subject, db)
                            try AuditTrail.append(db, chain: integrity.hmac, AuditEvent(.putKeyPolicy, key: next, principal: principal,
                                                  request: ["operation": op.rawValue, "grant": subject.description, "carriedFrom": id.rawValue.hex]),
                                                  at: clock())
                        }
                    } else {
                        lost.append("\(op.rawValue) \(subject)")
                    }
                }
            }
            invalidate(next)
        } extra: { _ in KeyRow.Columns.successor.set(to: successorHex) }
        return lost
    }

    /// Applies a lifecycle action: policy, table check, `precheck`, state
    /// change and audit in one transaction; any refusal is audited with the
    /// request's parameters.
    private func transition(_ reference: String, _ action: LifecycleAction, event: AuditAction, by principal: Principal,
                            request: [String: String] = [:], precheck: () throws(KeyManagerError) -> Void = {},
                            extra: (KeyRecord) -> ColumnAssignment?) throws(KeyManagerError) {
        let parameters = request.merging(["keyId": reference]) { a, _ in a }
        try adminOperation(event, principal, request: parameters) { () throws(KeyManagerError) in
            let id = try resolve(reference)
            invalidate(id)
            let rec = try authorizeAdmin(principal, id)
            guard case .allowed(let newState) = try check(action, rec) else { return }
            try precheck()
            let now = clock()
            let also = extra(rec)
            try sealedWrite { db in
                guard try KeyRow.move(id, from: rec.state, to: newState, at: now, also: also, db) else {
                    throw KeyManagerError.database("key \(rec.displayName) changed meanwhile; try again")
                }
                try AuditTrail.append(db, chain: integrity.hmac, AuditEvent(event, key: id, principal: principal, request: parameters), at: now)
            }
            invalidate(id)
        }
    }

    /// Retires an old version no data key needs any more; it decrypts nothing after.
    public func retireVersion(_ reference: String, version: KeyVersion, by principal: Principal) throws(KeyManagerError) {
        let request = ["keyId": reference, "keyVersion": String(version.rawValue)]
        try adminOperation(.retireKeyVersion, principal, request: request) { () throws(KeyManagerError) in
            let id = try resolve(reference)
            let rec = try authorizeAdmin(principal, id)
            try check(.change, rec)
            try flushUsage()
            guard version != rec.metadata.currentVersion else {
                throw .invalidArgument("version \(version) is the current version of \(rec.displayName); rotate first")
            }
            try sealedWrite { db in
                let n = try UsageRow.count(of: id, version: version, db)
                guard n == 0 else { throw KeyManagerError.versionInUse(key: rec.displayName, version: version, references: n) }
                try KeyVersionRow.retire(id, version: version, db)
                guard db.changesCount == 1 else { throw KeyManagerError.versionNotFound(key: rec.displayName, version: version) }
                try AuditTrail.append(db, chain: integrity.hmac, AuditEvent(.retireKeyVersion, key: id, version: version, principal: principal,
                                                                            request: request), at: clock())
            }
            forgetWrappers(id)
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
                    (try UsageRow.count(of: rec.id, db))
                        + (try BindingRow.count(of: rec.id, db))
                }
                if references > 0 {
                    report.blocked[rec.id] = references
                    audit(AuditEvent(.deleteKey, outcome: .refused, key: rec.id,
                                     error: KeyManagerError.deletionBlocked(key: rec.displayName, references: references).description))
                    continue
                }
                if indexIncomplete {
                    report.unverified.append(rec.id)
                    audit(AuditEvent(.deleteKey, outcome: .refused, key: rec.id,
                                     error: "a mount ended without flushing the usage index; it may miss files of this key"))
                    continue
                }
                try sealedWrite { db in
                    try KeyVersionRow.retire(rec.id, version: nil, db)
                    try KeyRow.destroy(rec.id, at: now, db)
                    try AliasRow.removeAll(of: rec.id, db)
                    try AuditTrail.append(db, chain: integrity.hmac, AuditEvent(.deleteKey, key: rec.id), at: now)
                }
                // Overwrite freed pages so the material is gone from the file, not just unlinked.
                do { try db.writeWithoutTransaction { db in try db.execute(sql: "PRAGMA wal_checkpoint(TRUNCATE)") } } catch {}
                forgetWrappers(rec.id)
                report.destroyed.append(rec.id)
            }
        }
        return report
    }
}
