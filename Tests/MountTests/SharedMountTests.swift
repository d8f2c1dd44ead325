import Foundation
import Testing

@Suite("shared mounts: allow_other set up on purpose, never misconfigured silently", .serialized)
struct SharedMountTests {
    @Test("allow_other on keys that admit only the owner warns once per key with the command that shares it; status shows who may encrypt and decrypt; after that command the warning is gone")
    func warnsAndShows() throws {
        let fs = try MountedFS()
        try fs.unmount()
        let umount = "\(q(kmsfsBinary)) umount \(q(fs.mountpoint))"
        defer { _ = try? sh("fusermount3 -u \(q(fs.mountpoint)) 2>/dev/null || true") }
        let mounted = try sh(([kmsfsBinary, "mount", fs.cipherdir, fs.mountpoint, "-o", "allow_other", "--passphrase-file", fs.passphraseFile]).map(q).joined(separator: " "))
        #expect(mounted.ok, "\(mounted.stderr)")
        let warnings = mounted.stderr.split(separator: "\n").filter { $0.contains("warning:") }
        #expect(warnings.count == 1 && warnings[0].contains("alias/default") && warnings[0].contains("kmsfs key policy alias/default --grant encrypt,decrypt '*'"),
                "\(mounted.stderr)")
        let line = String(try #require(warnings.first))
        let start = try #require(line.range(of: "kmsfs key policy"))
        let command = String(line[start.lowerBound...])
        let status = try fs.run("$K status --fs $M").stdout
        #expect(status.contains("governing key:  alias/default for /; encrypt: uid:0; decrypt: uid:0"), "\(status)")
        // The printed command works as printed (kmsfs on PATH as the binary).
        let shared = try fs.run("PATH=\(q((kmsfsBinary as NSString).deletingLastPathComponent)):$PATH; \(command)")
        #expect(shared.ok, "\(shared.stderr)")
        let json = jsonObject(try fs.run("$K status --json --fs $M").stdout)
        let keys = (json["daemon"] as? [String: Any])?["governingKeys"] as? [[String: Any]]
        #expect(keys?.first?["encrypt"] as? [String] == ["*", "uid:0"] && keys?.first?["decrypt"] as? [String] == ["*", "uid:0"], "\(json)")
        #expect(try sh(umount).ok)
        let again = try sh(([kmsfsBinary, "mount", fs.cipherdir, fs.mountpoint, "-o", "allow_other", "--passphrase-file", fs.passphraseFile]).map(q).joined(separator: " "))
        #expect(again.ok && !again.stderr.contains("warning"), "\(again.stderr)")
        #expect(try sh(umount).ok)
    }

    @Test("key policy takes several --grant and --revoke in one command, and operations joined by commas")
    func severalGrants() throws {
        let fs = try MountedFS()
        let out = try fs.run("$K key policy alias/default --grant encrypt,decrypt gid:100 --grant administer uid:5 --grant decrypt uid:7 --fs $M")
        #expect(out.ok && out.stdout.contains("encrypt: gid:100 uid:0") && out.stdout.contains("decrypt: gid:100 uid:0 uid:7")
                && out.stdout.contains("administer: uid:0 uid:5"), "\(out.stdout) \(out.stderr)")
        let revoked = try fs.run("$K key policy alias/default --revoke decrypt uid:7 --revoke encrypt,decrypt gid:100 --json --fs $M")
        let policy = jsonObject(revoked.stdout)
        #expect(policy["decrypt"] as? [String] == ["uid:0"] && policy["encrypt"] as? [String] == ["uid:0"], "\(revoked.stdout)")
        let odd = try fs.run("$K key policy alias/default --grant decrypt --fs $M")
        #expect(odd.status != 0 && odd.stderr.contains("OPERATION SUBJECT pairs"))
    }

    @Test("init --shared and allow_other: a second uid works as on ext4 — owner-only files refused, group-writable and sticky directories, setgid inheritance, chown by root then writes by the new owner")
    func posixDecides() throws {
        let fs = try MountedFS(mountOptions: ["allow_other"], initOptions: ["--shared"])
        let as4242 = "setpriv --reuid 4242 --regid 4242 --clear-groups"
        let as4343 = "setpriv --reuid 4343 --regid 4343 --clear-groups"
        let as4444 = "setpriv --reuid 4444 --regid 4242 --clear-groups"
        let out = try fs.run("""
            res() { if "$@" >/dev/null 2>$T/err; then echo ok; else sed 's/.*: //' $T/err | head -1; fi; }
            mkdir -m 1777 $M/tmp && mkdir -m 2775 $M/team && chgrp 4242 $M/team && mkdir -m 0700 $M/private
            res \(as4242) sh -c 'echo mine > \(fs.mountpoint)/tmp/a && chmod 600 \(fs.mountpoint)/tmp/a'
            res \(as4242) sh -c 'echo open > \(fs.mountpoint)/tmp/b && chmod 644 \(fs.mountpoint)/tmp/b'
            res \(as4343) cat $M/tmp/a
            res \(as4343) cat $M/tmp/b
            res \(as4343) rm -f $M/tmp/b
            res \(as4343) ls $M/private
            res \(as4444) sh -c 'echo g > \(fs.mountpoint)/team/g'
            stat -c %g $M/team/g
            res \(as4343) sh -c 'echo x > \(fs.mountpoint)/team/x'
            chown 4343 $M/tmp/a
            res \(as4343) sh -c 'echo now-mine >> \(fs.mountpoint)/tmp/a'
            \(as4343) cat $M/tmp/a
            res \(as4242) ls -l $M $M/tmp $M/team
            """)
        #expect(out.ok, "\(out.stderr)")
        #expect(out.stdout.split(separator: "\n").map(String.init) == [
            "ok", "ok",                          // 4242 writes in the sticky, world-writable directory
            "Permission denied", "ok",           // 0600 refused to another uid, 0644 readable
            "Operation not permitted",           // sticky: not another uid's file
            "Permission denied",                 // 0700 directory
            "ok", "4242",                        // group-writable setgid directory; the new file inherits its group
            "Permission denied",                 // not in the group
            "ok", "mine", "now-mine",            // chown by root, then the new owner writes
            "ok",                                // listing works for the other uid
        ], "\(out.stdout)")
    }

    @Test("set-user-ID and set-group-ID bits are cleared as on the local filesystem: a write, truncate, truncating open or fallocate by another uid, a chown by root; kept for root's writes and for a group member's write to a non-executable setgid file; stat sees it while the file is still open")
    func setIDBitsMatchTheLocalFilesystem() throws {
        let fs = try MountedFS(mountOptions: ["allow_other"], initOptions: ["--shared"])
        // The same steps in the mount and in a directory of the local filesystem beside it.
        let script = """
            as4242="setpriv --reuid 4242 --regid 4242 --clear-groups"
            t() { chmod $1 $D/f; shift; "$@" >/dev/null 2>&1; stat -c %a $D/f; }
            echo hi > $D/f
            t 6777 $as4242 sh -c "echo x >> $D/f"
            t 6767 $as4242 sh -c "echo x >> $D/f"
            chgrp 4242 $D/f; t 2767 $as4242 sh -c "echo x >> $D/f"; chgrp 0 $D/f
            t 6777 sh -c "echo x >> $D/f"
            t 6777 $as4242 truncate -s 1 $D/f
            t 6777 $as4242 sh -c "echo y > $D/f"
            t 6777 $as4242 fallocate -l 65536 $D/f
            t 6777 chown 4343 $D/f; chown 0 $D/f
            t 2745 chown 4343 $D/f; chown 0 $D/f
            chmod 6777 $D/f; $as4242 sh -c "exec 3>>$D/f; echo x >&3; stat -c %a $D/f"
            """
        let mounted = try fs.run("D=$M\n" + script)
        let local = try fs.run("mkdir -m 0777 $T/local && D=$T/local\n" + script)
        #expect(mounted.ok && local.ok, "\(mounted.stderr) \(local.stderr)")
        let expected = ["777", "767", "2767", "6777", "777", "777", "777", "777", "2745", "777"]
        #expect(local.stdout.split(separator: "\n").map(String.init) == expected, "the local filesystem: \(local.stdout)")
        #expect(mounted.stdout.split(separator: "\n").map(String.init) == expected, "kmsfs: \(mounted.stdout)")
    }

    @Test("the kernel asks for security.capability once per file, not before every write: 200 one-byte writes cost about 200 requests (FUSE_HANDLE_KILLPRIV_V2 negotiated)")
    func oneCapabilityQueryPerFile() throws {
        let fs = try MountedFS()
        let out = try fs.run("""
            requests() { $K status --json --fs $M | python3 -c 'import json,sys; print(json.load(sys.stdin)["daemon"]["statistics"]["requests"])'; }
            echo > $M/g
            a=$(requests)
            dd if=/dev/zero of=$M/g bs=1 count=200 conv=notrunc status=none
            b=$(requests)
            echo $((b - a))
            """)
        #expect(out.ok, "\(out.stderr)")
        let delta = Int(out.stdout.trimmingCharacters(in: .whitespacesAndNewlines)) ?? -1
        // 200 WRITEs, an OPEN, a FLUSH, a RELEASE, the first write's GETXATTR and a few
        // attribute requests; with a GETXATTR before every write it would be over 400.
        #expect(delta >= 200 && delta < 260, "\(delta) requests for 200 writes")
    }

    @Test("reads between writes do not make the kernel ask again: 100 reads and 100 writes at random 4 KiB offsets cost no GETATTR before each read and no security.capability query before each write, and read back what was written")
    func readsBetweenWrites() throws {
        let fs = try MountedFS()
        let out = try fs.run("""
            requests() { $K status --json --fs $M | python3 -c 'import json,sys; print(json.load(sys.stdin)["daemon"]["statistics"]["requests"])'; }
            head -c 4M /dev/urandom > $M/r
            a=$(requests)
            python3 - $M/r <<'PY'
            import os, random, sys
            fd = os.open(sys.argv[1], os.O_RDWR); rng = random.Random(3); model = {}
            for i in range(200):
                off = rng.randrange(0, 1024) * 4096
                if i % 2:
                    data = os.urandom(4096); os.pwrite(fd, data, off); model[off] = data
                else:
                    got = os.pread(fd, 4096, off)
                    assert off not in model or got == model[off], off
            os.close(fd)
            PY
            b=$(requests)
            echo $((b - a))
            """)
        #expect(out.ok, "\(out.stderr)")
        let delta = Int(out.stdout.trimmingCharacters(in: .whitespacesAndNewlines)) ?? -1
        // 100 WRITEs, up to 100 READs (some pages are cached), OPEN, FLUSH,
        // RELEASE, one GETXATTR, a lookup or two; with a GETATTR before every
        // read and a GETXATTR before every write it was over 400.
        #expect(delta >= 100 && delta < 230, "\(delta) requests for 100 reads and 100 writes")
    }
}
