import Foundation
import Testing

@Suite("kmsfs fsck: finds every kind of damage, rebuilds the usage index, quarantines with --repair", .serialized)
struct FsckTests {
    func usageRows(_ fs: MountedFS) throws -> String {
        try sh("sqlite3 \(q(fs.keystore)) 'SELECT object_id, kind, key_id, version FROM usage ORDER BY object_id'").stdout
    }

    @Test("a deleted usage index is rebuilt exactly from the headers, and a dead mount's marker is cleared")
    func rebuildsUsageIndex() throws {
        let fs = try MountedFS()
        try populate(fs, count: 40)
        #expect(try fs.key(["rotate", "alias/default"]).ok)
        #expect(try fs.run("mkdir -p $M/data/v2 && echo new > $M/data/v2/x").ok)
        try fs.unmount()
        let before = try usageRows(fs)
        #expect(before.split(separator: "\n").count > 40)
        #expect(try sh("sqlite3 \(q(fs.keystore)) \"DELETE FROM usage; INSERT INTO meta (name, value) VALUES ('usage_journal_pid', 999999)\"").ok)
        let checked = try fs.kmsfs(["fsck", fs.cipherdir])
        #expect(checked.ok && checked.stdout.contains("no damage"), "\(checked.stdout) \(checked.stderr)")
        #expect(try usageRows(fs) == before)
        #expect(try sh("sqlite3 \(q(fs.keystore)) \"SELECT COUNT(*) FROM meta WHERE name = 'usage_journal_pid'\"").stdout == "0\n")
    }

    @Test("fsck shows progress: a bar with rate on a terminal (a pty from script(1)), plain lines ending at 100% otherwise, nothing under --json; backup create says what it is doing")
    func progress() throws {
        let fs = try MountedFS()
        #expect(try fs.run("mkdir -p $M/p/q && for i in $(seq 1 60); do head -c 5000 /dev/urandom > $M/p/f$i; done && echo x > $M/p/q/g").ok)
        try fs.unmount()
        let lines = try fs.run("KMSFS_PROGRESS_SECONDS=0 $K fsck $C --passphrase-file $P 2>&1 >/dev/null | tail -1")
        #expect(lines.stdout.hasPrefix("fsck: 61 of 61 files (100%)"), "\(lines.stdout)")
        let terminal = try fs.run("script -qec \"$K fsck $C --passphrase-file $P\" /dev/null | tr '\\r' '\\n' | grep -c '^fsck \\[#*\\.*\\] [0-9]*/61 files, [0-9.]* MB/s'")
        #expect((Int(terminal.stdout.trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0) >= 1, "\(terminal.stdout) \(terminal.stderr)")
        let json = try fs.run("KMSFS_PROGRESS_SECONDS=0 $K fsck $C --passphrase-file $P --json 2>&1 >/dev/null")
        #expect(json.ok && json.stdout.isEmpty, "\(json.stdout)")
        let backup = try fs.run("echo 'backup passphrase 9' > $T.bp && $K backup create --fs $C --passphrase-file $P --out $T.bak --backup-passphrase-file $T.bp 2>&1 >/dev/null")
        #expect(backup.stdout.contains("backup: deriving the backup key (scrypt)"), "\(backup.stdout)")
    }

    @Test("tampered chunk, header, truncation, name and directory keys are each reported with their path; --repair leaves a clean, mountable filesystem")
    func findsAndQuarantinesDamage() throws {
        let fs = try MountedFS()
        // Inode numbers seen through the mount are the backing files' own: they find the ciphertext.
        let made = try fs.run("""
            mkdir -p $M/d/sub $M/e
            for f in chunk header short keep1 keep2; do head -c 70000 /dev/urandom > $M/d/$f; done
            echo name > $M/d/badname
            echo inside > $M/e/file
            cp -a $M/d/keep1 $M/d/keep2 $T/
            for f in d/chunk d/header d/short d/badname e; do echo "$f $(stat -c %i $M/$f)"; done > $T/inodes
            """)
        #expect(made.ok, "\(made.stderr)")
        try fs.unmount()
        let damaged = try fs.run("""
            b() { find $C -path $C/.kmsfs -prune -o -inum $(grep "^$1 " $T/inodes | cut -d' ' -f2) -print; }
            flip() { python3 -c "import sys; f=open(sys.argv[1],'r+b'); f.seek(int(sys.argv[2])); c=f.read(1); f.seek(int(sys.argv[2])); f.write(bytes([c[0]^1]))" "$1" "$2"; }
            flip "$(b d/chunk)" 500
            flip "$(b d/header)" 0
            truncate -s $((384 + 2 * 16412)) "$(b d/short)"
            bad=$(b d/badname); dir=$(dirname $bad); base=$(basename $bad)
            first=${base:0:1}; if [ "$first" = A ]; then repl=B; else repl=A; fi
            mv "$bad" "$dir/$repl${base:1}"
            flip "$(b e)/.kmsfs.dir" 0
            """)
        #expect(damaged.ok, "\(damaged.stderr)")
        let checked = try fs.kmsfs(["fsck", fs.cipherdir, "--json"])
        #expect(checked.status == 1, "damage found means exit 1")
        let report = try JSONSerialization.jsonObject(with: Data(checked.stdout.utf8)) as? [String: Any]
        let problems = (report?["problems"] as? [[String: Any]] ?? []).map { "\($0["kind"] ?? "") \($0["path"] ?? "")" }.sorted()
        #expect(problems == ["chunk /d/chunk", "directory /e", "header /d/header", "name /d/?", "truncated /d/short"], "\(problems)")

        let repaired = try fs.kmsfs(["fsck", fs.cipherdir, "--repair"])
        #expect(repaired.ok && repaired.stdout.contains("5 damaged, quarantined"), "\(repaired.stdout) \(repaired.stderr)")
        #expect(try fs.run("ls $C/.kmsfs/quarantine | wc -l").stdout == "5\n")
        let again = try fs.kmsfs(["fsck", fs.cipherdir])
        #expect(again.ok && again.stdout.contains("no damage"), "\(again.stdout)")
        try fs.mount()
        let after = try fs.run("ls $M; ls $M/d; cmp $M/d/keep1 $T/keep1 && cmp $M/d/keep2 $T/keep2 && echo same")
        #expect(after.stdout == "d\nkeep1\nkeep2\nsub\nsame\n", "\(after.stdout) \(after.stderr)")
    }

    @Test("files fsck cannot read keep their usage: under a renamed (undecryptable) name, quarantined, or under a Disabled or PendingDeletion key (reported as locked, never quarantined), so the deletion guard holds")
    func neverDropsUsageOfExistingFiles() throws {
        let fs = try MountedFS()
        #expect(try fs.key(["create", "--alias", "alias/team"]).ok)
        #expect(try fs.key(["bind", "/team", "alias/team"]).ok)
        let made = try fs.run("""
            mkdir $M/team $M/d; echo t > $M/team/f; echo n > $M/d/renamed
            echo "$(stat -c %i $M/d/renamed)" > $T/inode
            """)
        #expect(made.ok, "\(made.stderr)")
        try fs.unmount()
        let before = try usageRows(fs)
        // A name an attacker changed: the file behind it still exists.
        #expect(try fs.run("""
            bad=$(find $C -path $C/.kmsfs -prune -o -inum $(cat $T/inode) -print); base=$(basename $bad)
            if [ "${base:0:1}" = A ]; then repl=B; else repl=A; fi
            mv "$bad" "$(dirname $bad)/$repl${base:1}"
            """).ok)
        #expect(try fs.key(["disable", "alias/team"]).ok)
        let checked = try fs.kmsfs(["fsck", fs.cipherdir, "--json"])
        #expect(checked.status == 1)
        let report = try JSONSerialization.jsonObject(with: Data(checked.stdout.utf8)) as? [String: Any]
        let problems = (report?["problems"] as? [[String: Any]] ?? []).map { "\($0["kind"] ?? "") \($0["path"] ?? "")" }
        #expect(problems == ["name /d/?"], "\(problems)")
        let locked = (report?["locked"] as? [[String: Any]] ?? []).map { "\($0["path"] ?? ""): \($0["detail"] ?? "")" }.sorted()
        #expect(locked == ["/team: unreadable while key alias/team is Disabled"], "\(locked)")
        #expect(try usageRows(fs) == before, "fsck dropped usage of files that exist")
        let repaired = try fs.kmsfs(["fsck", fs.cipherdir, "--repair"])
        #expect(repaired.ok && repaired.stdout.contains("1 damaged, quarantined"), "\(repaired.stdout) \(repaired.stderr)")
        #expect(try usageRows(fs) == before, "a quarantined file still needs its key")
        #expect(try fs.kmsfs(["fsck", fs.cipherdir]).ok)
        #expect(try usageRows(fs) == before)
        // The guard holds: the key the disabled team's files need is not destroyed when its window ends.
        #expect(try fs.key(["schedule-deletion", "alias/team", "--days", "7"]).ok)
        #expect(try fs.kmsfs(["fsck", fs.cipherdir, "--repair"]).ok)
        #expect(try usageRows(fs) == before)
        let later = try sh("KMSFS_TEST_NOW=\(Date().timeIntervalSince1970 + 8 * 86400) \(q(kmsfsBinary)) key list --fs \(q(fs.cipherdir)) --passphrase-file \(q(fs.passphraseFile)) 2>&1")
        #expect(later.stdout.contains("was not destroyed"), "\(later.stdout)")
    }
}
