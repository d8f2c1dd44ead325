import Foundation
import Testing

@Suite("admin commands on a live mount go through the daemon's control socket", .serialized)
struct AdminPlaneTests {
    @Test("key commands without a passphrase reach the daemon by MOUNTPOINT or CIPHERDIR and take effect at once")
    func forwardedCommandsTakeEffect() throws {
        let fs = try MountedFS()
        try fs.run("echo hello > $M/a")
        // No passphrase: only the daemon can have run these.
        let disabled = try fs.run("$K key disable alias/default --fs $M")
        #expect(disabled.ok, "\(disabled.stderr)")
        #expect(disabled.stdout.contains("alias/default is Disabled"))
        let denied = try fs.run("cat $M/a 2>&1 || echo status=$?")
        #expect(denied.stdout.contains("Key has been revoked"), "\(denied.stdout)")
        #expect(try fs.run("$K key enable alias/default --fs $C").ok)
        #expect(try fs.run("cat $M/a").stdout == "hello\n")
        let listed = try fs.run("cd $T && $K key list --json --fs ../mnt")
        #expect(listed.ok && listed.stdout.contains("\"state\" : \"Enabled\""), "\(listed.stderr)")
        // A failing command keeps its message and exit status across the socket.
        let missing = try fs.run("$K key describe alias/nope --fs $M")
        #expect(missing.status == 1 && missing.stderr.contains("alias/nope"), "\(missing.stderr)")
        let audit = try fs.run("$K audit list --json --limit 50 --fs $M")
        #expect(audit.stdout.contains("\"event\" : \"DisableKey\""), "\(audit.stdout)")
    }

    @Test("a uid that administers no key is refused by the socket and the refusal is audited; a granted uid is bound by key policy")
    func socketRefusesNonAdministrators() throws {
        let fs = try MountedFS()
        let other = try fs.key(["create", "--alias", "alias/other"])
        #expect(other.ok)
        let setpriv = "setpriv --reuid 4242 --regid 4242 --clear-groups"
        let refused = try fs.run("\(setpriv) $K key disable alias/default --fs $C")
        #expect(refused.status == 1)
        #expect(refused.stderr.contains("uid 4242 may not use this filesystem's keys"), "\(refused.stderr)")
        #expect(try fs.run("$K key describe alias/default --fs $M").stdout.contains("Enabled"))
        let audit = try fs.run("$K audit list --json --limit 5 --fs $M").stdout
        #expect(audit.contains("\"event\" : \"AdminAccess\"") && audit.contains("\"uid\" : 4242"), "\(audit)")

        #expect(try fs.run("$K key policy alias/default --grant administer uid:4242 --fs $M").ok)
        let admitted = try fs.run("\(setpriv) $K key rotate alias/default --fs $C")
        #expect(admitted.ok, "\(admitted.stderr)")
        let escalate = try fs.run("\(setpriv) $K audit alerts --command 'touch /tmp/kmsfs-pwned' --fs $C")
        #expect(escalate.status == 1 && escalate.stderr.contains("only root or the mounting user"), "\(escalate.stderr)")
        let notTheirs = try fs.run("\(setpriv) $K key disable alias/other --fs $C")
        #expect(notTheirs.status == 1 && notTheirs.stderr.contains("denied"), "\(notTheirs.stderr)")
        #expect(try fs.run("$K key describe alias/other --fs $M").stdout.contains("Enabled"))
    }
}

@Suite("audit log: filters, CloudTrail-shaped export, signed digests catch a truncated log", .serialized)
struct AuditLogTests {
    @Test("audit list filters by event, uid, key, outcome and time; export writes CloudTrail-shaped JSON lines")
    func listAndExport() throws {
        let fs = try MountedFS()
        #expect(try fs.run("echo a > $M/a && cat $M/a && { setpriv --reuid 4242 --regid 4242 --clear-groups $K key list --fs $M 2>/dev/null || true; }").ok)
        #expect(try fs.key(["create", "--alias", "alias/x"]).ok)
        let decrypts = try fs.run("$K audit list --event Decrypt --uid 0 --json --limit 100 --fs $M").stdout
        let records = try JSONSerialization.jsonObject(with: Data(decrypts.utf8)) as? [[String: Any]] ?? []
        #expect(!records.isEmpty && records.allSatisfy { $0["event"] as? String == "Decrypt" && $0["uid"] as? Int == 0 }, "\(decrypts)")
        let future = try fs.run("$K audit list --since 2100-01-01T00:00:00Z --json --fs $M").stdout
        #expect((try JSONSerialization.jsonObject(with: Data(future.utf8)) as? [Any])?.isEmpty == true, "\(future)")
        let past = try fs.run("$K audit list --until 2000-01-01T00:00:00Z --json --fs $M").stdout
        #expect((try JSONSerialization.jsonObject(with: Data(past.utf8)) as? [Any])?.isEmpty == true, "\(past)")
        let deniedOnly = try fs.run("$K audit list --outcome denied --json --fs $M").stdout
        let deniedRecords = try JSONSerialization.jsonObject(with: Data(deniedOnly.utf8)) as? [[String: Any]] ?? []
        #expect(deniedRecords.count == 1 && deniedRecords.allSatisfy { $0["outcome"] as? String == "denied" }, "\(deniedOnly)")
        // An outcome no record can have is a usage error, not an empty list.
        let bogus = try fs.run("$K audit list --outcome failed --fs $M")
        #expect(bogus.status == 64 && bogus.stderr.contains("integrity-failure"), "\(bogus.stderr)")
        // So is an event name kmsfs never records (a typo would otherwise list nothing).
        let typo = try fs.run("$K audit list --event Decryt --fs $M")
        #expect(typo.status == 64 && typo.stderr.contains("GenerateDataKey"), "\(typo.stderr)")
        // A name only older builds wrote is still a filter (old logs hold it), not an error.
        let retired = try fs.run("$K audit list --event RotateKeyAutomatically --json --fs $M")
        #expect(retired.status == 0 && (try? JSONSerialization.jsonObject(with: Data(retired.stdout.utf8)) as? [Any])?.isEmpty == true,
                "\(retired.stdout) \(retired.stderr)")
        let byKey = try fs.run("$K audit list --key alias/x --json --fs $M").stdout
        #expect(byKey.contains("\"event\" : \"CreateKey\"") && !byKey.contains("\"Decrypt\""), "\(byKey)")
        let exported = try fs.run("$K audit export --format jsonl --fs $M").stdout.split(separator: "\n")
        #expect(exported.count > 3)
        for line in exported {
            let event = try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any] ?? [:]
            #expect(event["eventTime"] is String && event["eventName"] is String && event["eventSource"] as? String == "kmsfs.amazonaws.com")
            #expect(event["userIdentity"] is [String: Any] && event["additionalEventData"] is [String: Any])
        }
        let denied = exported.compactMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }
            .filter { $0["errorCode"] as? String == "AccessDeniedException" }
        #expect(denied.count == 1 && (denied.first?["userIdentity"] as? [String: Any])?["uid"] as? Int == 4242,
                "the uid 4242 refusal is exported with CloudTrail's error code: \(denied)")
    }

    @Test("editing, deleting or reordering a record, or cutting the log's tail under a signed digest, fails verify and names the position")
    func tamperingIsDetected() throws {
        let fs = try MountedFS()
        #expect(try fs.run("for i in 1 2 3 4 5; do echo $i > $M/f$i; cat $M/f$i; done").ok)
        try fs.unmount()  // the daemon signs a digest at unmount
        let db = q(fs.keystore)
        let clean = try fs.kmsfs(["audit", "verify", "--fs", fs.cipherdir])
        #expect(clean.ok && clean.stdout.contains("chain intact"), "\(clean.stdout) \(clean.stderr)")
        #expect(try sh("sqlite3 \(db) 'SELECT COUNT(*) FROM audit_digests'").stdout != "0\n")
        try sh("cp \(db) \(db).orig")
        func verifyAfter(_ sql: String) throws -> String {
            try sh("cp \(db).orig \(db) && rm -f \(db)-wal \(db)-shm && sqlite3 \(db) \(q(sql))")
            let out = try fs.kmsfs(["audit", "verify", "--fs", fs.cipherdir])
            #expect(out.status == 1, "\(sql): \(out.stdout)")
            return out.stderr
        }
        let n = Int(try sh("sqlite3 \(db) 'SELECT MAX(seq) FROM audit_log'").stdout.trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0
        #expect(n > 10)
        #expect(try verifyAfter("UPDATE audit_log SET outcome = 'denied' WHERE seq = 5").contains("record 5 was altered"))
        #expect(try verifyAfter("DELETE FROM audit_log WHERE seq = 6").contains("record 7 does not follow"))
        #expect(try verifyAfter("UPDATE audit_log SET seq = -1 WHERE seq = 8; UPDATE audit_log SET seq = 8 WHERE seq = 9; UPDATE audit_log SET seq = 9 WHERE seq = -1").contains("record 8"))
        let cut = try verifyAfter("DELETE FROM audit_log WHERE seq > \(n - 3)")
        #expect(cut.contains("cut off the end") && cut.contains("\(n - 2)"), "\(cut)")
        try sh("cp \(db).orig \(db) && rm -f \(db)-wal \(db)-shm")
        #expect(try fs.kmsfs(["audit", "verify", "--fs", fs.cipherdir]).ok)
    }

    @Test("file paths in records: a keyed hash by default (no name at rest), plaintext only when opted in, or none")
    func pathsInRecords() throws {
        let fs = try MountedFS()
        func lastOpenPath() throws -> String? {
            let out = try fs.run("$K audit list --event Decrypt --limit 1 --json --fs $M").stdout
            return (try JSONSerialization.jsonObject(with: Data(out.utf8)) as? [[String: Any]])?.last?["path"] as? String
        }
        #expect(try fs.run("mkdir $M/classified-project && echo x > $M/classified-project/merger-plan.txt").ok)
        // Each open below finds no handle held, so it unwraps and is recorded.
        #expect(try fs.run("cat $M/classified-project/merger-plan.txt").ok)
        let hashed = try lastOpenPath()
        let expected = try fs.run("$K audit paths --hash /classified-project/merger-plan.txt --fs $M").stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(hashed == expected && expected.hasPrefix("hmac:"), "\(String(describing: hashed)) vs \(expected)")
        #expect(try fs.run("$K audit paths plain --fs $M && cat $M/classified-project/merger-plan.txt").ok)
        #expect(try lastOpenPath() == "/classified-project/merger-plan.txt")
        #expect(try fs.run("$K audit paths off --fs $M && cat $M/classified-project/merger-plan.txt").ok)
        #expect(try lastOpenPath() == nil)
        try fs.unmount()
        #expect(try fs.kmsfs(["audit", "verify", "--fs", fs.cipherdir]).ok, "records with paths chain and verify")
        // Only the opted-in record holds the name; the hashed one does not.
        #expect(try fs.run("sqlite3 $C/.kmsfs/keystore.db \"SELECT COUNT(*) FROM audit_log WHERE path LIKE '%merger%'\"").stdout == "1\n")
    }
}
