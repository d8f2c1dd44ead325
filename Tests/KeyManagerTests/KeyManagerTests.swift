import Foundation
import Testing
import ChunkCipher
import GRDB
@testable import KeyManager

@Suite struct RotationTests {
    @Test("after several rotations, data keys wrapped under every version still decrypt")
    func oldVersionsDecrypt() throws {
        let scratch = Scratch()
        let km = try scratch.create()
        let key = try km.resolve("alias/default")
        var wrapped: [(ID128, KeyVersion, [UInt8], [UInt8])] = []
        for round in 0..<4 {
            let object = ID128.random()
            let dek = try km.generateDataKey(for: object, kind: .file, key: key, principal: owner)
            #expect(dek.version == KeyVersion(rawValue: UInt32(round + 1)))
            wrapped.append((object, dek.version, dek.wrapped, bytes(of: dek.key)))
            try km.rotate("alias/default", by: owner)
        }
        let reopened = try scratch.open()
        for (object, version, blob, plain) in wrapped {
            let dek = try reopened.decryptDataKey(blob, for: object, key: key, version: version, principal: owner)
            #expect(bytes(of: dek) == plain)
        }
        #expect(try reopened.describe("alias/default").versions.map(\.version.rawValue) == [1, 2, 3, 4, 5])
        #expect(try reopened.usage(of: "alias/default") == [KeyVersion(rawValue: 1): 1, KeyVersion(rawValue: 2): 1,
                                                            KeyVersion(rawValue: 3): 1, KeyVersion(rawValue: 4): 1])
    }

    @Test("automatic rotation fires at the period boundary, not before")
    func automaticRotation() throws {
        let scratch = Scratch()
        let km = try scratch.create()
        let key = try km.createKey(aliases: ["alias/auto"], rotationDays: 90, by: owner)
        scratch.clock.advance(days: 89.99)
        #expect(try km.runSchedules().rotated.contains(key.keyID) == false)
        #expect(try km.describe("alias/auto").metadata.currentVersion.rawValue == 1)
        scratch.clock.advance(days: 0.02)
        #expect(try km.runSchedules().rotated.contains(key.keyID))
        #expect(try km.describe("alias/auto").metadata.currentVersion.rawValue == 2)
        // The next one is due a full period after this rotation.
        scratch.clock.advance(days: 89)
        #expect(try km.runSchedules().rotated.contains(key.keyID) == false)
    }

    @Test("rotation periods outside 90–2560 days are refused")
    func rotationBounds() throws {
        let km = try Scratch().create()
        for days in [0, 89, 2561] {
            guard case .invalidArgument = keyError({ _ = try km.createKey(rotationDays: days, by: owner) }) else {
                Issue.record("\(days) days accepted"); continue
            }
        }
    }

    @Test("a data key does not open under another object's context or a changed blob")
    func contextBinding() throws {
        let km = try Scratch().create()
        let key = try km.resolve("alias/default")
        let object = ID128.random()
        let dek = try km.generateDataKey(for: object, kind: .file, key: key, principal: owner)
        let v = dek.version
        #expect(keyError { _ = try km.decryptDataKey(dek.wrapped, for: .random(), key: key, version: v, principal: owner) }
                == .unwrapFailed(key: "alias/default", version: v))
        var damaged = dek.wrapped
        damaged[20] ^= 1
        #expect(keyError { _ = try km.decryptDataKey(damaged, for: object, key: key, version: v, principal: owner) }
                == .unwrapFailed(key: "alias/default", version: v))
    }

    @Test("rewrap moves a data key to a successor without changing it")
    func rewrap() throws {
        let km = try Scratch().create()
        let a = try km.resolve("alias/default")
        let b = try km.createKey(aliases: ["alias/b"], by: owner).keyID
        let object = ID128.random()
        let dek = try km.generateDataKey(for: object, kind: .file, key: a, principal: owner)
        let moved = try km.reencryptDataKey(dek.wrapped, for: object, kind: .file, from: a, version: dek.version, to: b, principal: owner)
        let back = try km.decryptDataKey(moved.wrapped, for: object, key: b, version: moved.version, principal: owner)
        #expect(bytes(of: back) == bytes(of: dek.key))
        #expect(try km.usage(of: "alias/default").isEmpty)
        #expect(try km.usage(of: "alias/b") == [KeyVersion(rawValue: 1): 1])
    }
}

@Suite struct DeletionTests {
    @Test("a referenced key survives the end of its window, says how many files hold it, then is destroyed")
    func deletionGuard() throws {
        let scratch = Scratch()
        let km = try scratch.create()
        let key = try km.createKey(aliases: ["alias/old"], by: owner).keyID
        let objects = (0..<3).map { _ in ID128.random() }
        for o in objects { _ = try km.generateDataKey(for: o, kind: .file, key: key, principal: owner) }
        let wrappedMaterial: Data = try km.db.read { db in
            try Data.fetchOne(db, sql: "SELECT material FROM key_versions WHERE key_id = ?", arguments: [key.rawValue.hex])!
        }
        guard let material = try KeyWrap.open([UInt8](wrappedMaterial), under: km.kek,
                                              context: KeyManager.materialContext(key, KeyVersion(rawValue: 1))) else {
            Issue.record("material does not open"); return
        }
        let materialBytes = bytes(of: material)
        _ = try km.scheduleDeletion("alias/old", days: 7, by: owner)
        scratch.clock.advance(days: 6.9)
        #expect(try km.runSchedules() == ScheduleReport())
        scratch.clock.advance(days: 0.2)
        let blocked = try km.runSchedules()
        #expect(blocked.blocked == [key: 3])
        #expect(try km.describe(key.rawValue.hex).metadata.state == .pendingDeletion)
        #expect(KeyManagerError.deletionBlocked(key: "alias/old", references: 3).description.contains("3 file(s)"))
        let refusals = try km.recentAudit().filter { $0.event == "DeleteKey" && $0.outcome == "refused" }
        #expect(refusals.count == 1)

        for o in objects { try km.forgetUsage(o) }
        let done = try km.runSchedules()
        #expect(done.destroyed == [key])
        #expect(try km.describe(key.rawValue.hex).metadata.state == .destroyed)
        let remaining: Int = try km.db.read { db in
            try Int.fetchOne(db, sql: "SELECT COUNT(*) FROM key_versions WHERE key_id = ? AND material IS NOT NULL", arguments: [key.rawValue.hex])!
        }
        #expect(remaining == 0)
        #expect(!scratch.databaseBytes().contains(subsequence: [UInt8](wrappedMaterial)), "wrapped material still in the files")
        #expect(!scratch.databaseBytes().contains(subsequence: materialBytes))
    }

    @Test("a key still bound to a directory is not destroyed")
    func boundKeyGuard() throws {
        let scratch = Scratch()
        let km = try scratch.create()
        try km.createKey(aliases: ["alias/bound"], by: owner)
        try km.bind(path: "/projects", to: "alias/bound", by: owner)
        let id = try km.resolve("alias/bound")
        _ = try km.scheduleDeletion("alias/bound", days: 7, by: owner)
        scratch.clock.advance(days: 8)
        #expect(try km.runSchedules().blocked == [id: 1])
    }

    @Test("deletion windows outside 7–30 days are refused")
    func windowBounds() throws {
        let km = try Scratch().create()
        for days in [6, 31] {
            guard case .invalidArgument = keyError({ _ = try km.scheduleDeletion("alias/default", days: days, by: owner) }) else {
                Issue.record("\(days) accepted"); continue
            }
        }
    }

    @Test("an old version retires only when nothing uses it")
    func retire() throws {
        let km = try Scratch().create()
        let key = try km.resolve("alias/default")
        let object = ID128.random()
        _ = try km.generateDataKey(for: object, kind: .file, key: key, principal: owner)
        try km.rotate("alias/default", by: owner)
        #expect(keyError { try km.retireVersion("alias/default", version: KeyVersion(rawValue: 1), by: owner) }
                == .versionInUse(key: "alias/default", version: KeyVersion(rawValue: 1), references: 1))
        try km.forgetUsage(object)
        try km.retireVersion("alias/default", version: KeyVersion(rawValue: 1), by: owner)
        #expect(try km.describe("alias/default").versions.first?.retired == true)
    }
}

@Suite struct AtRestTests {
    @Test("no key material, data key or passphrase appears in plain in the database, WAL or logs")
    func noPlainMaterial() throws {
        let scratch = Scratch()
        let secretPhrase = "plain-passphrase-\(UUID().uuidString)"
        let km = try scratch.create(passphrase: secretPhrase)
        var secrets: [[UInt8]] = [Array(secretPhrase.utf8)]
        for i in 0..<3 { try km.createKey(aliases: ["alias/k\(i)"], by: owner) }
        try km.createKey(spec: .eccP256, aliases: ["alias/signer"], by: owner)
        try km.rotate("alias/k0", by: owner)
        for key in try km.listKeys() {
            for v in try km.describe(key.keyID.rawValue.hex).versions {
                let wrapped: Data = try km.db.read { db in
                    try Data.fetchOne(db, sql: "SELECT material FROM key_versions WHERE key_id = ? AND version = ?",
                                      arguments: [key.keyID.rawValue.hex, v.version.rawValue])!
                }
                guard let material = try KeyWrap.open([UInt8](wrapped), under: km.kek,
                                                      context: KeyManager.materialContext(key.keyID, v.version)) else {
                    Issue.record("material does not open"); return
                }
                secrets.append(bytes(of: material))
            }
        }
        for _ in 0..<20 {
            let dek = try km.generateDataKey(for: .random(), kind: .file, key: try km.resolve("alias/k0"), principal: owner)
            secrets.append(bytes(of: dek.key))
        }
        secrets.append(bytes(of: km.metadataKey))
        #expect(secrets.count >= 27)
        let files = scratch.databaseBytes()
        #expect(files.count > 0)
        for secret in secrets {
            #expect(!files.contains(subsequence: Array(secret.prefix(16))), "a secret appears in plain in the keystore")
        }
        // Errors never carry material: every message is built from names and ids only.
        let messages = [KeyManagerError.wrongPassphrase, .unwrapFailed(key: "k", version: KeyVersion(rawValue: 1))].map(\.description)
        for secret in secrets { #expect(!messages.contains { $0.utf8.contains(subsequence: secret) }) }
    }
}

extension String.UTF8View {
    func contains(subsequence: [UInt8]) -> Bool { Array(self).contains(subsequence: subsequence) }
}

@Suite struct KeystoreErrorTests {
    @Test("a wrong passphrase is a clear error and modifies nothing")
    func wrongPassphrase() throws {
        let scratch = Scratch()
        _ = try scratch.create()
        let before = scratch.databaseDigest()
        #expect(keyError { _ = try scratch.open(passphrase: "wrong") } == .wrongPassphrase)
        #expect(scratch.databaseDigest() == before)
        _ = try scratch.open()
    }

    @Test("a truncated keystore is reported as damaged")
    func truncated() throws {
        let scratch = Scratch()
        do { let km = try scratch.create(); try km.db.writeWithoutTransaction { try $0.execute(sql: "PRAGMA wal_checkpoint(TRUNCATE)") } }
        let path = scratch.keystore + "/" + KeyManager.databaseName
        try? FileManager.default.removeItem(atPath: path + "-wal")
        try? FileManager.default.removeItem(atPath: path + "-shm")
        let data = try Data(contentsOf: URL(fileURLWithPath: path))
        try data.prefix(data.count / 2).write(to: URL(fileURLWithPath: path))
        guard case .keystoreCorrupt = keyError({ _ = try scratch.open() }) else {
            Issue.record("truncated keystore not reported as corrupt"); return
        }
    }

    @Test("a keystore overwritten with garbage is reported as damaged, and left as it was")
    func corrupted() throws {
        let scratch = Scratch()
        do { _ = try scratch.create() }
        let path = scratch.keystore + "/" + KeyManager.databaseName
        try? FileManager.default.removeItem(atPath: path + "-wal")
        try? FileManager.default.removeItem(atPath: path + "-shm")
        try Data((0..<8192).map { UInt8(truncatingIfNeeded: $0 * 7) }).write(to: URL(fileURLWithPath: path))
        let before = try Data(contentsOf: URL(fileURLWithPath: path))
        guard case .keystoreCorrupt = keyError({ _ = try scratch.open() }) else {
            Issue.record("garbage keystore not reported as corrupt"); return
        }
        #expect(try Data(contentsOf: URL(fileURLWithPath: path)) == before)
    }

    @Test("a keystore from a newer schema is refused, untouched")
    func newerSchema() throws {
        let scratch = Scratch()
        do {
            let km = try scratch.create()
            try km.db.write { try $0.execute(sql: "INSERT INTO grdb_migrations (identifier) VALUES ('v2-from-the-future')") }
        }
        let before = scratch.databaseDigest()
        guard case .keystoreFromNewerVersion = keyError({ _ = try scratch.open() }) else {
            Issue.record("newer schema not refused"); return
        }
        #expect(scratch.databaseDigest() == before)
    }

    @Test("init refuses to overwrite an existing keystore")
    func noOverwrite() throws {
        let scratch = Scratch()
        _ = try scratch.create()
        guard case .keystoreExists = keyError({ _ = try scratch.create() }) else { Issue.record("overwrote"); return }
    }

    @Test("a new passphrase opens the keystore, the old one no longer does, and data keys still decrypt")
    func changePassphrase() throws {
        let scratch = Scratch()
        let km = try scratch.create()
        let key = try km.resolve("alias/default")
        let object = ID128.random()
        let dek = try km.generateDataKey(for: object, kind: .file, key: key, principal: owner)
        try km.changePassphrase(to: passphrase("new phrase"), by: owner)
        #expect(keyError { _ = try scratch.open() } == .wrongPassphrase)
        let reopened = try scratch.open(passphrase: "new phrase")
        let back = try reopened.decryptDataKey(dek.wrapped, for: object, key: key, version: dek.version, principal: owner)
        #expect(bytes(of: back) == bytes(of: dek.key))
        #expect(try reopened.boundKey(forDirectory: "/") == key)
    }

    @Test("keys created after a passphrase change, in the same session, open under the new passphrase")
    func createAfterPassphraseChange() throws {
        let scratch = Scratch()
        let km = try scratch.create()
        try km.changePassphrase(to: passphrase("second phrase"), by: owner)
        let key = try km.createKey(aliases: ["alias/late"], by: owner).keyID
        let object = ID128.random()
        let dek = try km.generateDataKey(for: object, kind: .file, key: key, principal: owner)
        #expect(try km.externalKey("alias/late") == nil)
        let reopened = try scratch.open(passphrase: "second phrase")
        let back = try reopened.decryptDataKey(dek.wrapped, for: object, key: key, version: dek.version, principal: owner)
        #expect(bytes(of: back) == bytes(of: dek.key))
    }
}

@Suite struct PolicyAndBindingTests {
    @Test("a uid outside the key policy is denied, the denial is audited, and a grant lets it in")
    func policy() throws {
        let km = try Scratch().create()
        let key = try km.resolve("alias/default")
        #expect(keyError { _ = try km.generateDataKey(for: .random(), kind: .file, key: key, principal: stranger) }
                == .accessDenied(key: "alias/default", principal: stranger, operation: .encrypt))
        #expect(try km.recentAudit().last?.outcome == "denied")
        #expect(try km.recentAudit().last?.uid == 4242)
        #expect(keyError { try km.rotate("alias/default", by: stranger) }
                == .accessDenied(key: "alias/default", principal: stranger, operation: .administer))
        try km.grant(.encrypt, to: .gid(4242), on: "alias/default", by: owner)
        _ = try km.generateDataKey(for: .random(), kind: .file, key: key, principal: stranger)
        try km.revoke(.encrypt, from: .gid(4242), on: "alias/default", by: owner)
        #expect(keyError { _ = try km.generateDataKey(for: .random(), kind: .file, key: key, principal: stranger) } != nil)
    }

    @Test("the last administrator cannot be revoked")
    func lastAdmin() throws {
        let km = try Scratch().create()
        try km.revoke(.administer, from: .uid(0), on: "alias/default", by: owner)
        guard case .invalidArgument = keyError({ try km.revoke(.administer, from: .uid(1000), on: "alias/default", by: owner) }) else {
            Issue.record("removed the last administrator"); return
        }
    }

    @Test("new files take the key of the nearest bound ancestor")
    func bindings() throws {
        let km = try Scratch().create()
        let root = try km.resolve("alias/default")
        let prod = try km.createKey(aliases: ["alias/prod"], tags: ["env": "prod"], by: owner).keyID
        let deep = try km.createKey(aliases: ["alias/deep"], by: owner).keyID
        try km.bind(path: "/srv/prod", to: "alias/prod", by: owner)
        try km.bind(path: "/srv/prod/a/b/", to: "alias/deep", by: owner)
        #expect(try km.boundKey(forDirectory: "/") == root)
        #expect(try km.boundKey(forDirectory: "/srv") == root)
        #expect(try km.boundKey(forDirectory: "/srv/prod") == prod)
        #expect(try km.boundKey(forDirectory: "/srv/prod/a") == prod)
        #expect(try km.boundKey(forDirectory: "/srv/prod/a/b/c/d") == deep)
        #expect(try km.boundKey(forDirectory: "/srv/production") == root)
        #expect(try km.listBindings().map(\.path) == ["/", "/srv/prod", "/srv/prod/a/b"])
        try km.unbind(path: "/srv/prod/a/b", by: owner)
        #expect(try km.boundKey(forDirectory: "/srv/prod/a/b/c") == prod)
    }

    @Test("aliases and tags: list filters by state and tag; duplicate aliases are refused")
    func aliasesAndTags() throws {
        let km = try Scratch().create()
        try km.createKey(aliases: ["alias/dev"], tags: ["env": "dev"], by: owner)
        try km.createKey(aliases: ["alias/prod"], tags: ["env": "prod"], by: owner)
        #expect(try km.listKeys(tag: ("env", "prod")).flatMap(\.aliases) == ["alias/prod"])
        try km.disable("alias/dev", by: owner)
        #expect(try km.listKeys(state: .disabled).flatMap(\.aliases) == ["alias/dev"])
        guard case .invalidArgument = keyError({ try km.createKey(aliases: ["alias/dev"], by: owner) }) else {
            Issue.record("duplicate alias accepted"); return
        }
        try km.setAlias("alias/production", to: "alias/prod", by: owner)
        #expect(try km.resolve("alias/production") == km.resolve("alias/prod"))
        try km.setTag("alias/prod", name: "env", value: nil, by: owner)
        #expect(try km.listKeys(tag: ("env", "prod")).isEmpty)
        guard case .invalidArgument = keyError({ try km.setAlias("prod", to: "alias/prod", by: owner) }) else {
            Issue.record("alias without prefix accepted"); return
        }
    }
}

@Suite struct SigningTests {
    @Test("SIGN_VERIFY keys sign and verify; a changed message fails", arguments: [KeySpec.eccP256, .eccP384, .rsa2048])
    func signVerify(spec: KeySpec) throws {
        let km = try Scratch().create()
        let key = try km.createKey(spec: spec, aliases: ["alias/signer"], by: owner)
        #expect(key.rotationPeriodDays == nil)
        let message = Array("audit digest 42".utf8)
        let (version, signature) = try km.sign(message, with: "alias/signer", by: owner)
        #expect(try km.verify(message, signature: signature, key: "alias/signer", version: version))
        #expect(try !km.verify(Array("audit digest 43".utf8), signature: signature, key: "alias/signer", version: version))
        guard case .invalidArgument(let why) = keyError({ _ = try km.generateDataKey(for: .random(), kind: .file, key: key.keyID, principal: owner) }) else {
            Issue.record("a signing key wrapped a data key"); return
        }
        #expect(why.contains("SIGN_VERIFY"))
    }

    @Test("AES keys do not sign; signing keys do not rotate")
    func usageSeparation() throws {
        let km = try Scratch().create()
        try km.createKey(spec: .eccP256, aliases: ["alias/signer"], by: owner)
        guard case .invalidArgument = keyError({ _ = try km.sign([1], with: "alias/default", by: owner) }) else { Issue.record("AES signed"); return }
        guard case .invalidArgument = keyError({ try km.rotate("alias/signer", by: owner) }) else { Issue.record("signer rotated"); return }
    }
}

@Suite struct UsageJournalTests {
    @Test("batched usage changes are flushed before the index is read, and in order")
    func batching() throws {
        let km = try Scratch().create()
        try km.startBatchingUsage(interval: 60)
        let key = try km.resolve("alias/default")
        let objects = (0..<10).map { _ in ID128.random() }
        for o in objects { _ = try km.generateDataKey(for: o, kind: .file, key: key, principal: owner) }
        for o in objects.prefix(4) { try km.forgetUsage(o) }
        // Not yet in the database...
        let stored: Int = try km.db.read { db in try Int.fetchOne(db, sql: "SELECT COUNT(*) FROM usage WHERE kind = 'file'")! }
        #expect(stored == 0)
        // ...but every reader of the index flushes first.
        #expect(try km.usage(of: "alias/default")[KeyVersion(rawValue: 1)] == 6)
        try km.stopBatchingUsage()
        let marker: Int? = try km.db.read { db in try Int.fetchOne(db, sql: "SELECT value FROM meta WHERE name = 'usage_journal_pid'") }
        #expect(marker == nil)
    }

    @Test("a key is not destroyed while a dead mount's journal may have lost usage entries")
    func deadJournalBlocksDeletion() throws {
        let scratch = Scratch()
        let km = try scratch.create()
        let key = try km.createKey(aliases: ["alias/old"], by: owner).keyID
        // A mount that was killed: its marker names a process that no longer exists.
        try km.db.write { db in try db.execute(sql: "INSERT OR REPLACE INTO meta (name, value) VALUES ('usage_journal_pid', 999999)") }
        _ = try km.scheduleDeletion("alias/old", days: 7, by: owner)
        scratch.clock.advance(days: 8)
        let report = try km.runSchedules()
        #expect(report.unverified == [key])
        #expect(report.destroyed.isEmpty)
        #expect(try km.describe(key.rawValue.hex).metadata.state == .pendingDeletion)
    }
}

@Suite struct AuditChainTests {
    func populated() throws -> (Scratch, KeyManager) {
        let scratch = Scratch()
        let km = try scratch.create()
        for i in 0..<4 { try km.createKey(aliases: ["alias/a\(i)"], by: owner) }
        _ = try? km.generateDataKey(for: .random(), kind: .file, key: try km.resolve("alias/a0"), principal: stranger)
        return (scratch, km)
    }

    @Test("an untouched log verifies")
    func intact() throws {
        let (_, km) = try populated()
        let result = try km.verifyAudit()
        #expect(result.firstBad == nil)
        #expect(result.records >= 7)
    }

    @Test("an edited, a removed and a reordered record are each found, by position")
    func tampering() throws {
        do {
            let (_, km) = try populated()
            try km.db.write { try $0.execute(sql: "UPDATE audit_log SET event = 'Forged' WHERE seq = 4") }
            #expect(try km.verifyAudit() == AuditVerification(records: 4, firstBad: 4, problem: "record 4 was altered"))
        }
        do {
            let (_, km) = try populated()
            try km.db.write { try $0.execute(sql: "DELETE FROM audit_log WHERE seq = 3") }
            #expect(try km.verifyAudit().firstBad == 4)
        }
        do {
            let (_, km) = try populated()
            try km.db.write { db in
                try db.execute(sql: "UPDATE audit_log SET seq = 1000 WHERE seq = 2")
                try db.execute(sql: "UPDATE audit_log SET seq = 2 WHERE seq = 5")
                try db.execute(sql: "UPDATE audit_log SET seq = 5 WHERE seq = 1000")
            }
            #expect(try km.verifyAudit().firstBad == 2)
        }
    }
}

@Suite struct AuditChainFormatTests {
    @Test("the chain hash is SHA-256 of the previous hash and the fields joined by U+001F (logs written by earlier builds still verify)")
    func chainHashFormat() {
        let previous = Data((0..<32).map { UInt8($0) })
        for fields in [["1700000000.5", "Decrypt", "success", "", "", "0", "0", "42", "cat", "ab", "", "hmac:00"], [""], ["é", "", "x\u{1F}y"]] {
            let expected = KeyDerivation.sha256([UInt8](previous) + Array(fields.joined(separator: "\u{1F}").utf8))
            #expect(AuditTrail.chainHash(previous: previous, fields: fields) == expected)
        }
        // SHA-256 itself against the FIPS 180-2 "abc" vector.
        #expect(KeyDerivation.sha256(Array("abc".utf8)) == Array(hexBytes: "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"))
    }
}

private extension Array where Element == UInt8 {
    init(hexBytes hex: String) {
        let digits = Array(hex.utf8)
        self = stride(from: 0, to: digits.count, by: 2).map { UInt8(String(decoding: digits[$0..<$0 + 2], as: UTF8.self), radix: 16)! }
    }
}
