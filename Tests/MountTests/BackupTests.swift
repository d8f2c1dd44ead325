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
        // Nothing readable inside: not the alias, not the filesystem's settings.
        #expect(try fs.run("grep -c secret-project-name $T/keys.backup || true").stdout == "0\n")
        #expect(try fs.run("$K backup create --out $T/keys.backup --backup-passphrase-file $T/bk --fs $M").status == 1, "an existing file is never overwritten")
        try fs.unmount()
        #expect(try fs.run("rm $C/.kmsfs/keystore.db*; echo 'wrong' > $T/wrong; echo 'new keystore passphrase' > $T/new").ok)

        let wrong = try fs.run("$K backup restore $T/keys.backup --backup-passphrase-file $T/wrong --fs $C --passphrase-file $T/new")
        #expect(wrong.status == 1 && wrong.stderr.contains("wrong backup passphrase"), "\(wrong.stderr)")
        let flipped = try fs.run("""
            python3 -c "import sys; d=bytearray(open(sys.argv[1],'rb').read()); d[len(d)//2]^=1; open(sys.argv[2],'wb').write(d)" $T/keys.backup $T/flipped
            $K backup restore $T/flipped --backup-passphrase-file $T/bk --fs $C --passphrase-file $T/new
            """)
        #expect(flipped.status == 1 && flipped.stderr.contains("signature does not verify"), "\(flipped.stderr)")
        #expect(try fs.run("ls $C/.kmsfs/keystore.db 2>/dev/null | wc -l").stdout == "0\n", "a refused restore writes nothing")

        let restored = try fs.run("$K backup restore $T/keys.backup --backup-passphrase-file $T/bk --fs $C --passphrase-file $T/new")
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
}
