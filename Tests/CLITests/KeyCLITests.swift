import Foundation
import Testing
import ChunkCipher
import KeyManager

@Suite(.serialized) struct KeyCLITests {
    @Test("init creates alias/default bound to /, and key create/list/describe report it")
    func createListDescribe() throws {
        let s = try CLIScratch()
        let created = try s.key(["create", "--alias", "alias/prod", "--tag", "env=prod", "--description", "production data"])
        #expect(created.status == 0, "\(created.stderr)")
        let id = created.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(KeyID(hex: id) != nil)
        let list = try s.json(["list"]) as? [[String: Any]] ?? []
        // The ECC key signing audit digests is made by the first command that writes audit records.
        #expect(Set(list.compactMap { ($0["aliases"] as? [String])?.first }) == ["alias/default", "alias/prod", "alias/kmsfs-audit-digest"])
        #expect(list.first { ($0["aliases"] as? [String])?.first == "alias/kmsfs-audit-digest" }?["spec"] as? String == "ECC_NIST_P256")
        // --spec parses each spelling (it once recursed forever and crashed).
        for spec in ["ECC_P256", "ecc_nist_p384", "RSA_2048"] {
            let made = try s.key(["create", "--spec", spec, "--no-rotation"])
            #expect(made.status == 0, "--spec \(spec): \(made.stderr)")
        }
        #expect(try s.key(["create", "--spec", "DES"]).status != 0)
        let prodOnly = try s.json(["list", "--tag", "env=prod"]) as? [[String: Any]] ?? []
        #expect(prodOnly.count == 1 && prodOnly[0]["keyID"] as? String == id)
        let described = try s.json(["describe", "alias/prod"]) as? [String: Any] ?? [:]
        let metadata = described["metadata"] as? [String: Any] ?? [:]
        #expect(metadata["state"] as? String == "Enabled")
        #expect(metadata["description"] as? String == "production data")
        #expect((described["versions"] as? [[String: Any]])?.count == 1)
        let defaultID = (list.first { ($0["aliases"] as? [String])?.first == "alias/default" }?["keyID"] as? String) ?? "?"
        let bindings = try s.key(["bind"]).stdout.split(separator: "\n").map { $0.split(separator: " ").map(String.init) }
        #expect(bindings.dropFirst().map { $0 } == [["/", defaultID]], "init binds the root, and only it, to alias/default")
    }

    @Test("rotate, disable, refused rotate with a message naming key, state and remedy, enable")
    func lifecycleThroughCLI() throws {
        let s = try CLIScratch()
        #expect(try s.key(["rotate", "alias/default"]).stdout.contains("current version is 2"))
        #expect(try s.key(["disable", "alias/default"]).status == 0)
        let refused = try s.key(["rotate", "alias/default"])
        #expect(refused.status != 0)
        #expect(refused.stderr.contains("alias/default") && refused.stderr.contains("Disabled")
                && refused.stderr.contains("kmsfs key enable alias/default"))
        #expect(refused.stdout.isEmpty)
        #expect(try s.key(["enable", "alias/default"]).status == 0)
        let scheduled = try s.key(["schedule-deletion", "alias/default", "--days", "7"])
        #expect(scheduled.status == 0 && scheduled.stdout.contains("PendingDeletion"))
        #expect(try s.key(["schedule-deletion", "alias/default"]).status != 0)
        #expect(try s.key(["cancel-deletion", "alias/default"]).status == 0)
        let state = (try s.json(["describe", "alias/default"]) as? [String: Any])?["metadata"] as? [String: Any]
        #expect(state?["state"] as? String == "Disabled")
    }

    @Test("a wrong passphrase is refused with a clear message and exit status 1")
    func wrongPassphrase() throws {
        let s = try CLIScratch()
        try "not it\n".write(toFile: s.root + "/wrong", atomically: true, encoding: .utf8)
        let result = try kmsfs(["key", "list", "--fs", s.cipherdir, "--passphrase-file", s.root + "/wrong"])
        #expect(result.status == 1)
        #expect(result.stderr.contains("wrong passphrase"))
        let extpass = try kmsfs(["key", "list", "--fs", s.cipherdir, "--extpass", "echo cli test passphrase"])
        #expect(extpass.status == 0, "\(extpass.stderr)")
    }

    @Test("automatic rotation happens when the period has passed on a moved clock")
    func automaticRotation() throws {
        let s = try CLIScratch()
        let t0 = Date().timeIntervalSince1970
        let created = try s.key(["create", "--alias", "alias/auto", "--rotation-days", "90"], environment: ["KMSFS_TEST_NOW": String(t0)])
        #expect(created.status == 0)
        func version(at t: Double) throws -> Int? {
            let d = try s.json(["describe", "alias/auto"], environment: ["KMSFS_TEST_NOW": String(t)]) as? [String: Any]
            return (d?["metadata"] as? [String: Any])?["currentVersion"] as? Int
        }
        #expect(try version(at: t0 + 89 * 86_400) == 1)
        #expect(try version(at: t0 + 91 * 86_400) == 2)
    }

    @Test("policy grant and revoke through the CLI; bad arguments are refused before touching the keystore")
    func policyCLI() throws {
        let s = try CLIScratch()
        let granted = try s.key(["policy", "alias/default", "--grant", "decrypt", "gid:100"])
        #expect(granted.status == 0 && granted.stdout.contains("decrypt:") && granted.stdout.contains("gid:100"))
        let bad = try s.key(["policy", "alias/default", "--grant", "read", "everyone"])
        #expect(bad.status != 0 && bad.stderr.contains("OPERATION SUBJECT"))
        #expect(try s.key(["create", "--rotation-days", "30"]).status != 0)
    }

    @Test("a rotating process and an unwrapping process share the keystore without 'database is locked'")
    func twoProcesses() throws {
        let s = try CLIScratch()
        let manager = try KeyManager.open(in: s.cipherdir + "/.kmsfs", passphrase: SecretKey(copying: Array("cli test passphrase".utf8)))
        let key = try manager.resolve("alias/default")
        let object = ID128.random()
        let principal = Principal(uid: getuid(), gid: getgid())
        let dek = try manager.generateDataKey(for: object, kind: .file, key: key, principal: principal)
        let wrapped = dek.wrapped, version = dek.version
        let expected = dek.key.withUnsafeBytes { Array($0) }
        let stop = Flag(), failures = Counter(), unwraps = Counter()
        let reader = Thread {
            while !stop.isSet {
                do {
                    let k = try manager.decryptDataKey(wrapped, for: object, key: key, version: version, principal: principal)
                    if k.withUnsafeBytes({ Array($0) }) != expected { failures.add() }
                    _ = try manager.generateDataKey(for: .random(), kind: .file, key: key, principal: principal)
                    unwraps.add()
                } catch { failures.add() }
            }
        }
        reader.start()
        for _ in 0..<8 {
            let r = try s.key(["rotate", "alias/default"])
            #expect(r.status == 0, "\(r.stderr)")
            #expect(!r.stderr.contains("locked"))
        }
        stop.set()
        while !reader.isFinished { usleep(1000) }
        #expect(failures.value == 0)
        #expect(unwraps.value > 0)
        let d = try s.json(["describe", "alias/default"]) as? [String: Any]
        #expect((d?["metadata"] as? [String: Any])?["currentVersion"] as? Int == 9)
    }
}

final class Flag: @unchecked Sendable {
    private let lock = NSLock()
    private var value = false
    var isSet: Bool { lock.lock(); defer { lock.unlock() }; return value }
    func set() { lock.lock(); value = true; lock.unlock() }
}

final class Counter: @unchecked Sendable {
    private let lock = NSLock()
    private var n = 0
    var value: Int { lock.lock(); defer { lock.unlock() }; return n }
    func add() { lock.lock(); n += 1; lock.unlock() }
}
