import Foundation
import Testing

@Suite(.serialized) struct StatusTests {
    @Test("the daemon keeps the descriptors libdispatch made: its event loop has its epoll and eventfd, and the keystore's files are not at their numbers (closing inherited descriptors in the daemon once let libdispatch's wake-ups land in keystore.db-shm)")
    func daemonDescriptors() throws {
        let fs = try MountedFS()
        #expect(try fs.run("for i in 1 2 3; do echo $i > f$i; done; cat f2").stdout == "2\n")
        let pid = (jsonObject(try fs.run("$K status --json --fs $M").stdout)["daemon"] as? [String: Any])?["pid"] as? Int ?? -1
        let fds = try sh("for f in /proc/\(pid)/fd/*; do echo \"${f##*/} $(readlink $f)\"; done").stdout
        let targets = fds.split(separator: "\n").map { $0.split(separator: " ", maxSplits: 1).last.map(String.init) ?? "" }
        #expect(targets.contains("anon_inode:[eventpoll]") && targets.contains("anon_inode:[eventfd]"), "\(fds)")
    }

    @Test("kmsfs status reports the mount, open files, bytes and keys in use from the daemon; other uids are refused")
    func status() throws {
        let fs = try MountedFS()
        let r = try fs.run("""
            head -c 100000 /dev/urandom > "$M/f"
            exec 7< "$M/f"
            "$K" status --fs "$M" --json
            exec 7<&-
            """)
        #expect(r.ok, "\(r.stderr)")
        let report = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any] ?? [:]
        #expect(report["mounted"] as? Bool == true)
        #expect(report["mountpoint"] as? String == fs.mountpoint)
        let daemon = report["daemon"] as? [String: Any] ?? [:]
        let stats = daemon["statistics"] as? [String: Any] ?? [:]
        #expect(stats["openFiles"] as? Int == 1)
        #expect((stats["bytesWritten"] as? Int ?? 0) >= 100000)
        #expect((daemon["keysInUse"] as? [String])?.count == 1)
        let other = try fs.run("chmod 755 \"$C\" \"$C/.kmsfs\"; setpriv --reuid=4242 --regid=4242 --clear-groups \"$K\" status --fs \"$C\" --json")
        #expect(other.ok, "status as uid 4242: \(other.stderr)")
        let seen = (try? JSONSerialization.jsonObject(with: Data(other.stdout.utf8))) as? [String: Any] ?? [:]
        #expect(seen["mounted"] as? Bool == true)
        #expect(seen["daemon"] == nil, "a uid that is neither root nor the daemon's owner gets no statistics")
        try fs.unmount()
        let after = try sh("\(q(kmsfsBinary)) status --fs \(q(fs.cipherdir)) --json")
        #expect(after.stdout.contains("\"mounted\" : false"))
        #expect(!FileManager.default.fileExists(atPath: fs.cipherdir + "/.kmsfs/control.sock"))
    }
}

@Suite(.serialized) struct AuditOnMountTests {
    @Test("creating and opening a file through the mount leave GenerateDataKey and Decrypt records with its file id, once per open")
    func dataKeyEventsAudited() throws {
        let fs = try MountedFS()
        let r = try fs.run("""
            head -c 50000 /dev/urandom > "$M/f"
            for i in 1 2 3; do cat "$M/f" > /dev/null; done
            f=$(find "$C" -path "$C/.kmsfs" -prune -o -type f -size +40k -print | head -1)
            od -An -tx1 -j8 -N16 "$f" | tr -d ' \n'
            """)
        #expect(r.ok, "\(r.stderr)")
        let fileID = r.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        try fs.unmount() // flushes the batch
        let rows = try sh("sqlite3 \(q(fs.keystore)) \"SELECT event FROM audit_log WHERE object_id = '\(fileID)' AND outcome = 'success' ORDER BY seq\"")
        let events = rows.stdout.split(separator: "\n")
        #expect(events.first == "GenerateDataKey")
        // One unwrap per open that found the file closed (each cat), none per chunk read.
        #expect(events.filter { $0 == "Decrypt" }.count == 3, "\(events)")
    }
}

@Suite(.serialized) struct MountErrorTests {
    @Test("mounting an already mounted CIPHERDIR, or with a wrong passphrase, fails with one clear line and exit status 1")
    func refusals() throws {
        let fs = try MountedFS()
        let again = try fs.kmsfs(["mount", fs.cipherdir, fs.root + "/tmp"])
        #expect(again.status == 1)
        #expect(again.stderr.contains("already mounted at \(fs.mountpoint)"))
        #expect(!again.stderr.contains("Usage:"))
        try fs.unmount()
        try "wrong\n".write(toFile: fs.root + "/wrong", atomically: true, encoding: .utf8)
        let wrong = try sh("\(q(kmsfsBinary)) mount \(q(fs.cipherdir)) \(q(fs.mountpoint)) --passphrase-file \(q(fs.root + "/wrong"))")
        #expect(wrong.status == 1)
        #expect(wrong.stderr.trimmingCharacters(in: .whitespacesAndNewlines) == "kmsfs: wrong passphrase: the keystore was not unlocked and nothing was changed")
        #expect(!(try String(contentsOfFile: "/proc/self/mounts", encoding: .utf8)).contains(fs.mountpoint))
    }
}

@Suite(.serialized) struct CrashTests {
    @Test("a daemon killed with SIGKILL mid-append leaves every file readable after remount, with what had been written")
    func killedMidAppend() throws {
        let fs = try MountedFS()
        let r = try fs.python("""
            open("done", "wb").write(b"sealed and closed" * 1000)
            fd = os.open("growing", os.O_WRONLY | os.O_CREAT, 0o644)
            written = b""
            for i in range(7):
                piece = os.urandom(10000)
                os.write(fd, piece); written += piece
            open(os.path.join(T, "expected"), "wb").write(written)
            kill_daemon()
            print("killed")
            """)
        #expect(r.ok, "\(r.stderr)")
        try fs.remountAfterKill()
        let after = try fs.run("""
            cmp "$M/growing" "$T/expected"
            [ "$(head -c 17 "$M/done")" = "sealed and closed" ]
            echo ok
            """)
        #expect(after.ok, "\(after.stderr)")
        #expect(after.stdout.contains("ok"))
    }
}
