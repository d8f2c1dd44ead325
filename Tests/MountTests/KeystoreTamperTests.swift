import Foundation
import Testing

/// The storage attacker and the database-writer insider of docs/THREAT-MODEL.md:
/// they can edit CIPHERDIR (the keystore file included) with sqlite3 or plain
/// writes, but hold no passphrase. Every edit below is refused, named and audited.
@Suite(.serialized) struct KeystoreTamperTests {
    /// Runs sqlite3 on the keystore.
    func sql(_ fs: MountedFS, _ statement: String) throws -> Output {
        try sh("sqlite3 \(q(fs.keystore)) \(q(statement))")
    }

    func defaultKeyID(_ fs: MountedFS) throws -> String {
        try sql(fs, "SELECT key_id FROM aliases WHERE alias = 'alias/default'").stdout.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// Whether the audit log holds a `KeystoreIntegrityFailure` record naming `what`.
    func auditedTampering(_ fs: MountedFS, _ what: String) throws -> Bool {
        let rows = try sql(fs, "SELECT error FROM audit_log WHERE event = 'KeystoreIntegrityFailure'").stdout
        return rows.contains(what)
    }

    @Test("re-enabling a disabled key with UPDATE keys SET state='Enabled' is refused at mount and by every command, naming the row")
    func reEnableByEdit() throws {
        let fs = try MountedFS()
        #expect(try fs.run("echo secret > $M/f").ok)
        try fs.unmount()
        let key = try defaultKeyID(fs)
        #expect(try fs.key(["disable", "alias/default"]).ok)
        #expect(try sql(fs, "UPDATE keys SET state = 'Enabled' WHERE id = '\(key)'").ok)
        let mount = try fs.kmsfs(["mount", fs.cipherdir, fs.mountpoint])
        #expect(!mount.ok, "a mount over an edited keystore must fail")
        #expect(mount.stderr.contains("keys row \(key) was changed"), "\(mount.stderr)")
        let list = try fs.key(["list"])
        #expect(!list.ok && list.stderr.contains("edited outside kmsfs"), "\(list.stderr)")
        #expect(try auditedTampering(fs, "keys row \(key) was changed"))
        // Nothing was decrypted under the re-enabled key meanwhile.
        #expect(try sql(fs, "SELECT COUNT(*) FROM audit_log WHERE event = 'Decrypt' AND outcome = 'success' AND seq > (SELECT MAX(seq) FROM audit_log WHERE event = 'DisableKey')").stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "0")
    }

    @Test("an inserted policy row granting '*', a removed policy row, and plaintext_names=1 are each refused and named")
    func policyAndSettingEdits() throws {
        let fs = try MountedFS()
        try fs.unmount()
        let key = try defaultKeyID(fs)
        let original = try sh("cp \(q(fs.keystore)) \(q(fs.root + "/pristine.db"))")
        #expect(original.ok)
        let edits: [(String, String)] = [
            ("INSERT INTO policies (key_id, operation, subject) VALUES ('\(key)', 'decrypt', '*')", "policies row \(key)/decrypt/* was added"),
            ("DELETE FROM policies WHERE key_id = '\(key)' AND operation = 'encrypt'", "was removed"),
            ("UPDATE meta SET value = 1 WHERE name = 'plaintext_names'", "meta row plaintext_names was changed"),
            ("INSERT INTO aliases (alias, key_id) VALUES ('alias/prod', '\(key)')", "aliases row alias/prod was added"),
            ("DELETE FROM meta WHERE name = 'integrity_seal'", "integrity seal was removed"),
        ]
        for (edit, finding) in edits {
            #expect(try sh("cp \(q(fs.root + "/pristine.db")) \(q(fs.keystore)); rm -f \(q(fs.keystore))-wal \(q(fs.keystore))-shm").ok)
            #expect(try sql(fs, edit).ok, "\(edit)")
            let mount = try fs.kmsfs(["mount", fs.cipherdir, fs.mountpoint])
            #expect(!mount.ok, "mount accepted: \(edit)")
            #expect(mount.stderr.contains(finding), "\(edit): \(mount.stderr)")
            #expect(!(try sh("grep -q ' \(fs.mountpoint) ' /proc/mounts").ok), "left mounted after: \(edit)")
        }
        // The untouched copy still mounts.
        #expect(try sh("cp \(q(fs.root + "/pristine.db")) \(q(fs.keystore)); rm -f \(q(fs.keystore))-wal \(q(fs.keystore))-shm").ok)
        try fs.mount()
    }

    @Test("a row put back from an older copy together with its own MAC fails the seal")
    func replayedRow() throws {
        let fs = try MountedFS()
        try fs.unmount()
        let key = try defaultKeyID(fs)
        #expect(try sh("cp \(q(fs.keystore)) \(q(fs.root + "/before.db"))").ok)
        #expect(try fs.key(["disable", "alias/default"]).ok)
        // Both the row and its MAC record come from the copy taken while the key was Enabled.
        let replay = try sql(fs, """
            ATTACH '\(fs.root)/before.db' AS old;
            UPDATE keys SET state = (SELECT state FROM old.keys WHERE id = '\(key)'),
                            state_changed_at = (SELECT state_changed_at FROM old.keys WHERE id = '\(key)') WHERE id = '\(key)';
            UPDATE row_macs SET mac = (SELECT mac FROM old.row_macs WHERE tbl = 'keys' AND row = '\(key)') WHERE tbl = 'keys' AND row = '\(key)';
            """)
        #expect(replay.ok, "\(replay.stderr)")
        #expect(try sql(fs, "SELECT state FROM keys WHERE id = '\(key)'").stdout.contains("Enabled"))
        let mount = try fs.kmsfs(["mount", fs.cipherdir, fs.mountpoint])
        #expect(!mount.ok)
        #expect(mount.stderr.contains("replaced by another copy"), "\(mount.stderr)")
    }

    @Test("while mounted, an edit that re-enables a disabled key never lets a file open, and is audited")
    func liveEdit() throws {
        let fs = try MountedFS()
        #expect(try fs.run("echo secret > $M/f").ok)
        try fs.unmount()
        try fs.mount()
        let key = try defaultKeyID(fs)
        #expect(try fs.key(["disable", "alias/default"]).ok)
        #expect(try fs.run("! cat $M/f 2>/dev/null").ok, "a disabled key must refuse the open")
        #expect(try sql(fs, "UPDATE keys SET state = 'Enabled' WHERE id = '\(key)'").ok)
        // Every open from now on fails (the edit is seen at the next re-read of the record, within 0.5 s).
        let attempts = try fs.python("""
            import time
            seen_eio = False
            deadline = time.time() + 10
            while time.time() < deadline:
                try:
                    open("f").read(); raise AssertionError("the edited keystore let a file open")
                except OSError as e:
                    assert e.errno in (errno.EKEYREVOKED, errno.EIO), e
                    if e.errno == errno.EIO:
                        seen_eio = True
                        break
            assert seen_eio, "the edit was never noticed"
            print("ok")
            """)
        #expect(attempts.ok, "\(attempts.stderr)")
        #expect(try auditedTampering(fs, "keys row \(key) was changed"))
    }

    @Test("fsck --accept-keystore-edits accepts edits made by a passphrase holder, and records what they were")
    func acceptEdits() throws {
        let fs = try MountedFS()
        try fs.unmount()
        #expect(try sql(fs, "UPDATE keys SET description = 'edited by hand'").ok)
        #expect(!(try fs.key(["list"]).ok))
        let accepted = try fs.kmsfs(["fsck", fs.cipherdir, "--accept-keystore-edits"])
        #expect(accepted.ok, "\(accepted.stderr)")
        #expect(accepted.stdout.contains("accepted: keys row"), "\(accepted.stdout)")
        #expect(try fs.key(["list"]).ok)
        #expect(try sql(fs, "SELECT COUNT(*) FROM audit_log WHERE event = 'AcceptKeystoreEdits' AND error LIKE '%keys row%'").stdout.hasPrefix("1"))
        try fs.mount()
    }

    @Test("forged rekey intents pointing outside CIPHERDIR touch nothing there and are refused in the audit log")
    func forgedIntents() throws {
        let fs = try MountedFS()
        #expect(try fs.run("echo inside > $M/f").ok)
        try fs.unmount()
        let key = try defaultKeyID(fs)
        let outside = fs.root + "/outside"
        #expect(try sh("mkdir -p \(q(outside)); echo precious > \(q(outside))/victim; echo evil > \(q(outside))/evil").ok)
        let header = String(repeating: "41", count: 384)
        let forged = try sql(fs, """
            INSERT INTO rekey_intents (object_id, job_id, mode, kind, path, old_header, new_header, old_key, old_version, backup, mac)
            VALUES ('\(String(repeating: "ab", count: 16))', 1, 'rewrap', 'file', '../outside/victim', X'\(header)', X'\(header)', '\(key)', 1, NULL, NULL);
            INSERT INTO rekey_intents (object_id, job_id, mode, kind, path, old_header, new_header, old_key, old_version, backup, mac)
            VALUES ('\(String(repeating: "cd", count: 16))', 1, 'reencrypt', 'file', '../outside/victim', X'\(header)', X'\(header)', '\(key)', 1,
                    '../outside/evil', X'\(String(repeating: "00", count: 32))');
            """)
        #expect(forged.ok, "\(forged.stderr)")
        let check = try fs.kmsfs(["fsck", fs.cipherdir])
        #expect(check.ok, "\(check.stdout) \(check.stderr)")
        try fs.mount()
        #expect(try sh("cat \(q(outside))/victim").stdout == "precious\n", "a file outside CIPHERDIR was written")
        #expect(try sh("cat \(q(outside))/evil").stdout == "evil\n")
        #expect(try fs.run("cat $M/f").stdout == "inside\n")
        let refused = try sql(fs, "SELECT COUNT(*) FROM audit_log WHERE event = 'RekeyRecovery' AND outcome = 'refused' AND error LIKE '%MAC%'")
        #expect(refused.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "2", "\(refused.stdout)")
        #expect(try sql(fs, "SELECT COUNT(*) FROM rekey_intents").stdout.hasPrefix("0"))
    }

    @Test("an alert command written into the keystore is never run, and the mount refuses the edited setting")
    func alertCommandByEdit() throws {
        let fs = try MountedFS()
        try fs.unmount()
        let marker = fs.root + "/pwned"
        let config = #"{"syslog":false,"command":"touch \#(marker)","denialBurst":1,"denialWindow":60,"rotationOverdueDays":365,"configuredBy":0}"#
        #expect(try sql(fs, "INSERT OR REPLACE INTO meta (name, value) VALUES ('alert_config', '\(config)')").ok)
        let mount = try fs.kmsfs(["mount", fs.cipherdir, fs.mountpoint])
        #expect(!mount.ok)
        #expect(mount.stderr.contains("meta row alert_config was added"), "\(mount.stderr)")
        #expect(!FileManager.default.fileExists(atPath: marker), "the stored command ran")
    }

    @Test("audit verify catches a record appended after the last digest with a recomputed SHA-256 link, and a swapped digest public key")
    func auditForgery() throws {
        let fs = try MountedFS()
        #expect(try fs.run("echo a > $M/a").ok)
        try fs.unmount()
        #expect(try fs.kmsfs(["audit", "verify", "--fs", fs.cipherdir]).ok)
        #expect(try sql(fs, ".backup '\(fs.root)/clean.db'").ok)
        // A forged record after the newest digest, linked the way an unkeyed chain links.
        let forge = try sh("""
            python3 - \(q(fs.keystore)) <<'EOF'
            import sqlite3, sys, hashlib
            db = sqlite3.connect(sys.argv[1])
            seq, prev = db.execute("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1").fetchone()
            fields = ["1800000000.0", "Decrypt", "success", "", "", "0", "0", "0", "innocent", "", ""]
            h = hashlib.sha256(prev + "\\x1f".join(fields).encode()).digest()
            db.execute("INSERT INTO audit_log (time, event, outcome, uid, gid, pid, process, prev_hash, hash) VALUES (1800000000.0, 'Decrypt', 'success', 0, 0, 0, 'innocent', ?, ?)", (prev, h))
            db.commit()
            EOF
            """)
        #expect(forge.ok, "\(forge.stderr)")
        let verify = try fs.kmsfs(["audit", "verify", "--fs", fs.cipherdir])
        #expect(!verify.ok)
        #expect(verify.stderr.contains("was altered"), "\(verify.stdout) \(verify.stderr)")
        // A digest key whose public half was replaced: the keystore itself no longer verifies.
        #expect(try sh("rm -f \(q(fs.keystore))-wal \(q(fs.keystore))-shm; cp \(q(fs.root + "/clean.db")) \(q(fs.keystore))").ok)
        #expect(try fs.kmsfs(["audit", "verify", "--fs", fs.cipherdir]).ok, "the clean copy verifies")
        #expect(try sh("openssl ecparam -name prime256v1 -genkey -noout -out \(q(fs.root))/k.pem && openssl ec -in \(q(fs.root))/k.pem -pubout -outform DER -out \(q(fs.root))/pub.der 2>/dev/null").ok)
        let swap = try sql(fs, "UPDATE key_versions SET public_key = readfile('\(fs.root)/pub.der') WHERE public_key IS NOT NULL")
        #expect(swap.ok, "\(swap.stderr)")
        let swapped = try fs.kmsfs(["audit", "verify", "--fs", fs.cipherdir])
        #expect(!swapped.ok)
        #expect(swapped.stderr.contains("key_versions row") && swapped.stderr.contains("was changed"), "\(swapped.stdout) \(swapped.stderr) \(swap.stdout)")
    }
}
