import Foundation
import GRDB
import Testing
import ChunkCipher
@testable import KeyManager

/// The fields an audit record's link covers, as `verifyAudit` reads them.
func chainFields(_ row: Row) -> [String] {
    func text(_ column: String) -> String {
        switch (row[column] as DatabaseValue).storage {
        case .null: return ""
        case .int64(let n): return String(n)
        case .double(let d): return String(d)
        case .string(let t): return t
        case .blob: return "?"
        }
    }
    return ["time", "event", "outcome", "key_id", "key_version", "uid", "gid", "pid", "process", "object_id", "error"].map(text)
        + ((row["path"] as String?).map { [$0] } ?? [])
        + ((row["request"] as String?).map { ["request:" + $0] } ?? [])
}

/// The keystore's own defences against someone who can write its file.
@Suite struct IntegrityTests {
    @Test("every admin operation leaves the keystore sealed: it reopens without findings")
    func adminOperationsReseal() throws {
        let scratch = Scratch()
        let km = try scratch.create()
        let key = try km.createKey(aliases: ["alias/team"], tags: ["env": "dev"], by: owner).keyID.rawValue.hex
        try km.rotate(key, by: owner)
        try km.setRotation(key, days: 400, by: owner)
        try km.setTag(key, name: "env", value: "prod", by: owner)
        try km.setAlias("alias/other", to: key, by: owner)
        try km.grant(.decrypt, to: .uid(77), on: key, by: owner)
        try km.bind(path: "/team", to: key, by: owner)
        try km.disable(key, by: owner)
        try km.enable(key, by: owner)
        _ = try km.scheduleDeletion(key, days: 7, by: owner)
        try km.cancelDeletion(key, by: owner)
        try km.setAuditPathMode(.plain, by: owner)
        try km.changePassphrase(to: passphrase("another long phrase"), by: owner)
        #expect(try km.integrityFindings().isEmpty)
        let reopened = try scratch.open(passphrase: "another long phrase")
        #expect(try reopened.integrityFindings().isEmpty)
        #expect(try reopened.listKeys().count == 2)
    }

    @Test("a keystore from before rows were sealed is sealed once at open; removing its seal afterwards is an edit")
    func legacyKeystoreIsSealedOnce() throws {
        let scratch = Scratch()
        do {
            let km = try scratch.create()
            // What an earlier kmsfs wrote: a v1 check value, no seal, no row MACs.
            let fs = km.filesystemID
            let check = try fs.bytes.withUnsafeBytes { raw in try KeyWrap.seal(raw, under: km.kek, context: KeyManager.legacyKEKCheckContext(fs)) }
            try km.db.write { db in
                try db.execute(sql: "UPDATE meta SET value = ? WHERE name = 'kek_check'", arguments: [Data(check)])
                try db.execute(sql: "DELETE FROM meta WHERE name IN ('integrity_seal', 'audit_keyed_from')")
                try db.execute(sql: "DELETE FROM row_macs")
                // and an audit chain of bare SHA-256 links.
                var previous = Data(count: 32)
                for row in try Row.fetchAll(db, sql: "SELECT * FROM audit_log ORDER BY seq") {
                    let hash = Data(AuditTrail.chainHash(previous: previous, fields: chainFields(row)))
                    try db.execute(sql: "UPDATE audit_log SET prev_hash = ?, hash = ? WHERE seq = ?", arguments: [previous, hash, row["seq"] as Int64])
                    previous = hash
                }
            }
        }
        let upgraded = try scratch.open()
        #expect(try upgraded.integrityFindings().isEmpty)
        #expect(try upgraded.auditRecords(AuditFilter(event: "SealKeystore"), limit: nil).count == 1)
        #expect(try upgraded.verifyAudit().problem == nil, "records before and after the switch to a keyed chain verify")
        try upgraded.db.write { db in try db.execute(sql: "DELETE FROM meta WHERE name = 'integrity_seal'") }
        #expect(keyError { _ = try scratch.open() } == .keystoreTampered(["the keystore's integrity seal was removed"]))
    }

    @Test("records are chained with HMAC under the keystore's integrity key, not bare SHA-256")
    func auditChainIsKeyed() throws {
        let scratch = Scratch()
        let km = try scratch.create()
        let rows = try km.db.read { db in try Row.fetchAll(db, sql: "SELECT * FROM audit_log ORDER BY seq") }
        let first = try #require(rows.first)
        let fields = chainFields(first)
        let stored: Data = first["hash"]
        #expect([UInt8](stored) == AuditTrail.chainHash(previous: Data(count: 32), key: km.integrity.hmac, fields: fields))
        #expect([UInt8](stored) != AuditTrail.chainHash(previous: Data(count: 32), fields: fields))
    }

    @Test("a command or file alert sink that a non-root administrator configured never runs in a root process")
    func nonRootSinksDoNotRunAsRoot() throws {
        try #require(geteuid() == 0, "needs root: it checks what a root process refuses")
        let scratch = Scratch()
        let km = try scratch.create()
        let marker = scratch.root + "/command-ran"
        let file = scratch.root + "/alerts.jsonl"
        var config = AlertConfig()
        config.syslog = false
        config.command = "touch \(marker)"
        config.jsonl = file
        try km.setAlertConfig(config, by: owner)
        #expect(try km.alertConfig().configuredBy == owner.uid)
        km.raise(Alert(time: 0, rule: "integrity", severity: "high", message: "test"))
        KeyManager.drainAlerts()
        #expect(!FileManager.default.fileExists(atPath: marker))
        #expect(!FileManager.default.fileExists(atPath: file))
        // The same sinks configured by root do run.
        try km.setAlertConfig(config, by: Principal(uid: 0, gid: 0))
        km.raise(Alert(time: 0, rule: "integrity", severity: "high", message: "test"))
        KeyManager.drainAlerts()
        #expect(FileManager.default.fileExists(atPath: marker))
        #expect(FileManager.default.fileExists(atPath: file))
    }

    @Test("passphrases shorter than 8 bytes are refused at init, passwd and backup")
    func shortPassphrases() throws {
        let scratch = Scratch()
        #expect(keyError { _ = try scratch.create(passphrase: "x") } == .invalidArgument("the passphrase is 1 character(s); use at least 8 (a generated one is best)"))
        let km = try scratch.create()
        #expect(keyError { try km.changePassphrase(to: passphrase("short"), by: owner) } != nil)
        #expect(keyError { _ = try km.createBackup(backupPassphrase: passphrase("bk"), scrypt: fastKDF, by: owner) } != nil)
    }
}
