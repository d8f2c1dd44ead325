import Foundation
import Testing

@Suite("removing directories: a directory keeps its keys unless it is really gone", .serialized)
struct RemovalTests {
    @Test("an rmdir the backing filesystem refuses (immutable parent) leaves the directory usable; a later rmdir and a rename over an empty directory work and leave nothing behind")
    func failedRmdirKeepsKeys() throws {
        let fs = try MountedFS()
        #expect(try fs.run("mkdir -p $M/p/d $M/p/e $M/p/f && echo kept > $M/p/f/x").ok)
        let backing = try fs.run("find $C -path $C/.kmsfs -prune -o -inum $(stat -c %i $M/p) -print").stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(!backing.isEmpty)
        let refused = try fs.run("""
            chattr +i \(q(backing))
            trap 'chattr -i \(q(backing))' EXIT
            if rmdir $M/p/d 2>$T/err; then echo removed; else cat $T/err; fi
            if mv -T $M/p/f $M/p/e 2>$T/err; then echo renamed; else cat $T/err; fi
            """)
        #expect(refused.ok && refused.stdout.contains("Operation not permitted") && !refused.stdout.contains("removed"), "\(refused.stdout) \(refused.stderr)")
        #expect(!refused.stdout.contains("renamed"))
        // Both directories still have their keys: names are written and read in them.
        let usable = try fs.run("echo new > $M/p/d/made && cat $M/p/d/made && ls $M/p/e | wc -l && cat $M/p/f/x")
        #expect(usable.ok && usable.stdout == "new\n0\nkept\n", "\(usable.stdout) \(usable.stderr)")
        try fs.unmount()
        try fs.mount()
        #expect(try fs.run("cat $M/p/d/made").stdout == "new\n", "after a remount too")
        // Now the removals succeed and leave no set-aside keys behind.
        #expect(try fs.run("rm $M/p/d/made && rmdir $M/p/d && mv -T $M/p/f $M/p/e && cat $M/p/e/x && ls -A $M/p").stdout == "kept\ne\n")
        #expect(try fs.run("ls -A \(q(backing)) | grep -c '^.kmsfs.rmdir' || true").stdout == "0\n")
        try fs.unmount()
        let checked = try fs.kmsfs(["fsck", fs.cipherdir])
        #expect(checked.ok, "\(checked.stdout) \(checked.stderr)")
    }

    @Test("files removed after the kernel forgot them (their ids not read by this mount) leave the usage index at once: key usage right after rm counts them gone, with the mount still up and after it; fsck finds the index exact")
    func removedFilesLeaveTheUsageIndex() throws {
        let fs = try MountedFS()
        let total = { () throws -> Int in jsonObject(try fs.run("$K key usage alias/default --json --fs $M").stdout)["total"] as? Int ?? -1 }
        let before = try total()
        #expect(try fs.run("mkdir $M/u && for i in $(seq 40); do echo $i > $M/u/f$i; done && echo kept > $M/u/keep").ok)
        #expect(try total() == before + 42)  // the directory and its 41 files
        // The kernel forgets every node; a listing brings them back without their file ids.
        #expect(try fs.run("sync; echo 2 > /proc/sys/vm/drop_caches; ls -l $M/u | wc -l").stdout == "42\n")
        #expect(try fs.run("rm $M/u/f*").ok)
        #expect(try total() == before + 2, "right after rm")
        // A file unlinked while something still holds its inode (an O_PATH
        // descriptor: no open reaches the daemon, so its id is still unread)
        // leaves the index at the unlink too, not when the kernel lets go.
        let held = try fs.python("""
            import subprocess, json
            fd = os.open("u/keep", os.O_PATH); os.unlink("u/keep")
            out = subprocess.run([\(q(kmsfsBinary)), "key", "usage", "alias/default", "--json", "--fs", M], capture_output=True, text=True).stdout
            print(json.loads(out)["total"]); os.close(fd)
            """)
        #expect(held.ok && held.stdout == "\(before + 1)\n", "\(held.stdout) \(held.stderr)")
        #expect(try total() == before + 1)
        try fs.unmount()
        #expect(try fs.kmsfs(["key", "usage", "alias/default", "--json", "--fs", fs.cipherdir, "--passphrase-file", fs.passphraseFile]).stdout.contains("\"total\" : \(before + 1)"))
        let checked = try fs.kmsfs(["fsck", fs.cipherdir, "--passphrase-file", fs.passphraseFile])
        #expect(checked.ok && checked.stdout.contains("(0 added, 0 removed, 0 changed)"), "\(checked.stdout) \(checked.stderr)")
    }
}

@Suite("rekey crash recovery: a file that cannot be repaired keeps its intent and is named", .serialized)
struct RecoveryFailureTests {
    @Test("an interrupted reencrypt whose file is immutable: mount refuses naming the file and errno, fsck reports it, the intent stays; once writable, the mount repairs it and every file reads")
    func unrepairableFileIsNamed() throws {
        let fs = try MountedFS()
        // One large file, so re-encrypting it takes long enough to be caught in the middle
        // (small files finish between the poll and the kill).
        #expect(try fs.run("mkdir -p $M/data $T/ref && head -c 160M /dev/urandom > $M/data/big && cp $M/data/big $T/ref/big").ok)
        #expect(try fs.key(["create", "--alias", "alias/b"]).ok)
        try fs.unmount()
        func intents() throws -> [String] {
            try sh("sqlite3 \(q(fs.keystore)) 'SELECT path FROM rekey_intents'").stdout.split(separator: "\n").map(String.init)
        }
        // Start a reencrypt and kill it the moment it has recorded a file's intent (polled, with a deadline).
        let killed = try sh("""
            \(q(kmsfsBinary)) rekey start --key alias/default --to alias/b --mode reencrypt --fs \(q(fs.cipherdir)) --passphrase-file \(q(fs.passphraseFile)) >/dev/null 2>&1 &
            job=$!
            for i in $(seq 1 3000); do
              if [ -n "$(sqlite3 \(q(fs.keystore)) 'SELECT path FROM rekey_intents' 2>/dev/null)" ]; then kill -9 $job; wait $job || true; echo killed; exit 0; fi
              kill -0 $job 2>/dev/null || break
              sleep 0.01
            done
            kill -9 $job 2>/dev/null || true
            echo missed
            """)
        #expect(killed.stdout.contains("killed"), "\(killed.stdout) \(killed.stderr)")
        let pending = try intents()
        try #require(pending.count == 1, "the kill did not land inside a file")
        #expect(try fs.kmsfs(["rekey", "pause", "--fs", fs.cipherdir]).ok)
        let file = fs.cipherdir + "/" + pending[0]
        #expect(try sh("chattr +i \(q(file))").ok)
        defer { _ = try? sh("chattr -i \(q(file))") }
        let refused = try sh(([kmsfsBinary, "mount", fs.cipherdir, fs.mountpoint, "--passphrase-file", fs.passphraseFile]).map(q).joined(separator: " "))
        #expect(refused.status != 0 && refused.stderr.contains("interrupted rekey of \(pending[0])")
                && refused.stderr.contains("could not open it") && refused.stderr.contains("not permitted") && !refused.stderr.contains("database"),
                "\(refused.stderr)")
        #expect(try intents() == pending, "the intent is kept for the next try")
        let checked = try fs.kmsfs(["fsck", fs.cipherdir, "--json"])
        let problems = (jsonObject(checked.stdout)["problems"] as? [[String: Any]] ?? []).filter { $0["kind"] as? String == "rekey" }
        #expect(checked.status == 1 && problems.count == 1 && problems.first?["backing"] as? String == pending[0], "\(checked.stdout)")
        #expect(try intents() == pending)
        #expect(try sh("chattr -i \(q(file))").ok)
        try fs.mount()
        #expect(try intents().isEmpty, "repaired at mount")
        #expect(try fs.run("diff -r $T/ref $M/data").ok)
        let audit = try fs.run("$K audit list --event RekeyRecovery --json --limit 10 --fs $M").stdout
        #expect(audit.contains("\"outcome\" : \"failure\""), "\(audit)")
    }
}
