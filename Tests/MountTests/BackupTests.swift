import Foundation
import Testing

@Suite("keystore backups: encrypted, signed, restored into an empty or an existing keystore", .serialized)
struct BackupTests {
    @Test("backup from a live mount, wipe the keystore, restore under a new passphrase: every file reads back; damaged or wrong-passphrase backups are refused")
    func roundTrip() throws {
        let fs = try MountedFS()
        try populate(fs, count: 30)
        #expect(try fs.key(["create", "--alias", "alias/secret-project-name"]).ok)
        let made = try fs.run("echo 'backup passphrase' > $T/bk && $K backup create --out $T/keys.backup --backup-passphrase-file $T/bk --fs $M")
        #expect(made.ok, "\(made.stderr)")
        let fingerprint = try #require(made.stdout.split(separator: " ").first { $0.hasPrefix("sha256:") }.map { String($0.prefix(71)) })
        // Nothing readable inside: not the alias, not the filesystem's settings.
        #expect(try fs.run("grep -c secret-project-name $T/keys.backup || true").stdout == "0\n")
        #expect(try fs.run("$K backup create --out $T/keys.backup --backup-passphrase-file $T/bk --fs $M").status == 1, "an existing file is never overwritten")
        try fs.unmount()
        #expect(try fs.run("rm $C/.kmsfs/keystore.db*; echo 'wrong' > $T/wrong; echo 'new keystore passphrase' > $T/new").ok)

        let untrusted = try fs.run("$K backup restore $T/keys.backup --backup-passphrase-file $T/bk --fs $C --passphrase-file $T/new")
        #expect(untrusted.status == 1 && untrusted.stderr.contains("needs the signer you trust") && untrusted.stderr.contains(fingerprint),
                "an empty keystore trusts no signer by default: \(untrusted.stderr)")
        let wrong = try fs.run("$K backup restore $T/keys.backup --backup-passphrase-file $T/wrong --fs $C --passphrase-file $T/new --trusted-fingerprint \(fingerprint)")
        #expect(wrong.status == 1 && wrong.stderr.contains("wrong backup passphrase"), "\(wrong.stderr)")
        let flipped = try fs.run("""
            python3 -c "import sys; d=bytearray(open(sys.argv[1],'rb').read()); d[len(d)//2]^=1; open(sys.argv[2],'wb').write(d)" $T/keys.backup $T/flipped
            $K backup restore $T/flipped --backup-passphrase-file $T/bk --fs $C --passphrase-file $T/new --trusted-fingerprint \(fingerprint)
            """)
        #expect(flipped.status == 1 && flipped.stderr.contains("signature does not verify"), "\(flipped.stderr)")
        #expect(try fs.run("ls $C/.kmsfs/keystore.db 2>/dev/null | wc -l").stdout == "0\n", "a refused restore writes nothing")

        let restored = try fs.run("$K backup restore $T/keys.backup --backup-passphrase-file $T/bk --fs $C --passphrase-file $T/new --trusted-fingerprint \(fingerprint)")
        #expect(restored.ok && restored.stdout.contains("new keystore"), "\(restored.stderr)")
        #expect(try fs.run("$K mount $C $M --passphrase-file $T/new && diff -r $T/ref $M/data && $K key describe alias/secret-project-name --fs $M > /dev/null && $K umount $M").ok)
        #expect(try fs.run("$K key list --fs $C --passphrase-file $P 2>&1 || true").stdout.contains("passphrase"), "the old passphrase no longer opens it")
    }

    @Test("merging into an existing keystore adds what it lacks and refuses to bring back a destroyed key")
    func mergeRefusesConflicts() throws {
        let fs = try MountedFS()
        #expect(try fs.key(["create", "--alias", "alias/temp"]).ok)
        #expect(try fs.run("echo backup-passphrase > $T/bk && $K backup create --out $T/b1 --backup-passphrase-file $T/bk --fs $M").ok)
        try fs.unmount()
        // Unchanged keystore: nothing to add.
        let same = try fs.run("$K backup restore $T/b1 --backup-passphrase-file $T/bk --fs $C --passphrase-file $P")
        #expect(same.ok && same.stdout.contains("added 0 key(s) and 0 version(s)"), "\(same.stdout) \(same.stderr)")
        // Destroy alias/temp; the backup would resurrect it.
        #expect(try fs.key(["schedule-deletion", "alias/temp", "--days", "7"]).ok)
        let later = String(Int(Date().timeIntervalSince1970) + 8 * 86400)
        #expect(try sh("KMSFS_TEST_NOW=\(later) \(q(kmsfsBinary)) key list --fs \(q(fs.cipherdir)) --passphrase-file \(q(fs.passphraseFile))").stderr.contains("destroyed key"))
        let refused = try fs.run("$K backup restore $T/b1 --backup-passphrase-file $T/bk --fs $C --passphrase-file $P")
        #expect(refused.status == 1 && refused.stderr.contains("bring it back"), "\(refused.stderr)")
        #expect(try fs.key(["list", "--state", "Destroyed"]).stdout.contains("Destroyed"), "the refusal changed nothing")
    }

    @Test("a backup re-signed with an attacker's key is refused: by the keystore's own digest key on merge, by the given fingerprint or public key into an empty keystore, and when the signer is not the copy's digest key")
    func resignedBackupIsRefused() throws {
        let fs = try MountedFS()
        #expect(try fs.run("echo data > $M/f && echo backup-passphrase > $T/bk && $K backup create --out $T/b --backup-passphrase-file $T/bk --fs $M > $T/made").ok)
        #expect(try fs.run("$K key get-public-key alias/kmsfs-audit-digest --out $T/trusted.pem --fs $M").ok)
        // The attacker keeps the (sealed) contents and signs them with a key of its own.
        let forged = try fs.run("""
            cd $T
            openssl ecparam -genkey -name prime256v1 -noout -out evil.key 2>/dev/null
            openssl pkey -in evil.key -pubout -outform DER -out evil.der
            python3 - <<'PY'
            import struct, subprocess
            b = open("b", "rb").read()
            box_len = struct.unpack(">Q", b[65:73])[0]
            signed = b[:73 + box_len]
            signer, version = b[73 + box_len:89 + box_len], b[89 + box_len:93 + box_len]
            open("signed.bin", "wb").write(signed)
            sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", "evil.key", "signed.bin"], capture_output=True, check=True).stdout
            pub = open("evil.der", "rb").read()
            open("forged", "wb").write(signed + signer + version + struct.pack(">H", len(pub)) + pub + struct.pack(">H", len(sig)) + sig)
            PY
            openssl dgst -sha256 -binary evil.der | od -An -tx1 | tr -d ' \\n' | sed 's/^/sha256:/'
            """)
        #expect(forged.ok, "\(forged.stderr)")
        let evil = forged.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(evil.count == 71)
        try fs.unmount()
        // Merge: the keystore trusts only its own digest key.
        let merge = try fs.run("$K backup restore $T/forged --backup-passphrase-file $T/bk --fs $C --passphrase-file $P")
        #expect(merge.status == 1 && merge.stderr.contains("not this keystore's digest key"), "\(merge.stderr)")
        #expect(try fs.run("$K backup restore $T/b --backup-passphrase-file $T/bk --fs $C --passphrase-file $P").ok, "the genuine one merges")
        // Empty keystore: the trusted key or fingerprint decides.
        #expect(try fs.run("mkdir $T/empty && echo 'new keystore passphrase' > $T/new").ok)
        let byKey = try fs.run("$K backup restore $T/forged --backup-passphrase-file $T/bk --fs $T/empty --passphrase-file $T/new --trusted-key $T/trusted.pem")
        #expect(byKey.status == 1 && byKey.stderr.contains("not by the key you trust"), "\(byKey.stderr)")
        // Even told to trust the attacker's key, the copy's own digest key must be the signer.
        let told = try fs.run("$K backup restore $T/forged --backup-passphrase-file $T/bk --fs $T/empty --passphrase-file $T/new --trusted-fingerprint \(evil)")
        #expect(told.status == 1 && told.stderr.contains("do not hold the key that signed it"), "\(told.stderr)")
        #expect(try fs.run("ls $T/empty/.kmsfs/keystore.db 2>/dev/null | wc -l").stdout == "0\n", "refused restores write nothing")
        let genuine = try fs.run("$K backup restore $T/b --backup-passphrase-file $T/bk --fs $T/empty --passphrase-file $T/new --trusted-key $T/trusted.pem")
        #expect(genuine.ok && genuine.stdout.contains("new keystore"), "\(genuine.stderr)")
    }
}
