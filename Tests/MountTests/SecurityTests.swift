import Foundation
import Testing

/// Tampering, key state and key policy on a live mount.
@Suite(.serialized) struct SecurityTests {
    @Test("a tampered chunk reads as EIO, the rest of the file and the filesystem keep working, and the failure is audited with the file id")
    func tamperedChunk() throws {
        let fs = try MountedFS()
        #expect(try fs.run("head -c $((5 * 16384)) /dev/urandom > $T/ref && cp $T/ref \"$M/victim\" && echo fine > \"$M/other\"").ok)
        // Remounted, so the kernel holds no page of the plaintext cp wrote
        // (it would rightly serve those) and no open state lingers.
        try fs.unmount()
        try fs.mount()
        let setup = try fs.run("""
            f=$(find "$C" -path "$C/.kmsfs" -prune -o -type f -size +80k -print | head -1)
            # the file id is header bytes 8..23
            od -An -tx1 -j8 -N16 "$f" | tr -d ' \\n'; echo
            # flip one byte inside chunk 2 (XOR: writing a fixed 0xff changed nothing when the byte was 0xff already, 1 run in 256)
            python3 -c 'import sys; f = open(sys.argv[1], "r+b"); o = 384 + 2 * (16384 + 28) + 100; f.seek(o); b = f.read(1)[0]; f.seek(o); f.write(bytes([b ^ 0xFF]))' "$f"
            """)
        #expect(setup.ok, "\(setup.stderr)")
        let fileID = setup.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(fileID.count == 32)
        let r = try fs.python("""
            ref = open(os.path.join(T, "ref"), "rb").read()
            fd = os.open("victim", os.O_RDONLY)
            assert os.pread(fd, 16384, 0) == ref[:16384], "chunk 0 must read"
            assert os.pread(fd, 16384, 4 * 16384) == ref[4 * 16384:], "chunk 4 must read"
            try:
                os.pread(fd, 100, 2 * 16384 + 50); raise AssertionError("tampered chunk returned data")
            except OSError as e:
                assert e.errno == errno.EIO, e
            try:
                open("victim", "rb").read(); raise AssertionError("whole-file read returned data")
            except OSError as e:
                assert e.errno == errno.EIO, e
            os.close(fd)
            assert open("other").read() == "fine\\n"
            open("after", "w").write("still writable")
            print("ok")
            """)
        #expect(r.ok, "\(r.stderr)")
        let audit = try sh("sqlite3 \(q(fs.keystore)) \"SELECT object_id FROM audit_log WHERE event = 'IntegrityFailure'\"")
        #expect(audit.stdout.split(separator: "\n").contains(Substring(fileID)), "audit: \(audit.stdout) \(audit.stderr)")
        // The record also names the file — as the keyed hash of its path, not the name.
        let hash = try fs.kmsfs(["audit", "paths", "--hash", "/victim", "--fs", fs.cipherdir]).stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(hash.hasPrefix("hmac:"))
        let paths = try sh("sqlite3 \(q(fs.keystore)) \"SELECT DISTINCT path FROM audit_log WHERE event = 'IntegrityFailure' AND object_id = '\(fileID)'\"")
        #expect(paths.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == hash, "\(paths.stdout)")
    }

    @Test("a tampered header or a truncated file reads as EIO")
    func tamperedHeaderAndTruncation() throws {
        let fs = try MountedFS()
        #expect(try fs.run("head -c 100000 /dev/urandom > \"$M/h\"; head -c 100000 /dev/urandom > \"$M/t\"").ok)
        try fs.unmount()  // a cold kernel cache: see tamperedChunk
        try fs.mount()
        let r = try fs.run("""
            for f in $(find "$C" -path "$C/.kmsfs" -prune -o -type f -size +90k -print); do
              if [ -z "${first:-}" ]; then first=$f
                python3 -c 'import sys; f = open(sys.argv[1], "r+b"); f.seek(50); b = f.read(1)[0]; f.seek(50); f.write(bytes([b ^ 0x01]))' "$f"   # key id byte, flipped
              else
                truncate -s $((384 + 2 * (16384 + 28))) "$f"                        # cut at a chunk boundary
              fi
            done
            for name in h t; do
              if cat "$M/$name" > /dev/null 2> $T/err; then echo "$name read"; else grep -o 'Input/output error' $T/err; fi
            done
            """)
        #expect(r.ok, "\(r.stderr)")
        #expect(r.stdout.split(separator: "\n") == ["Input/output error", "Input/output error"])
    }

    @Test("disabling a key makes the next open fail with EKEYREVOKED within a second; enabling restores it; both audited")
    func disabledKey() throws {
        let fs = try MountedFS()
        #expect(try fs.run("echo data > \"$M/file\"").ok)
        #expect(try fs.key(["disable", "alias/default"]).ok)
        let denied = try fs.python("""
            import time
            deadline = time.monotonic() + 1.0
            while True:
                try:
                    open("file").read()
                except OSError as e:
                    if e.errno == errno.EKEYREVOKED: print("revoked"); break
                    raise
                if time.monotonic() > deadline: raise AssertionError("still readable after 1 s")
            """)
        #expect(denied.ok, "\(denied.stderr)")
        #expect(denied.stdout.contains("revoked"))
        #expect(try fs.key(["enable", "alias/default"]).ok)
        let back = try fs.python("""
            import time
            deadline = time.monotonic() + 1.0
            while True:
                try:
                    assert open("file").read() == "data\\n"; print("back"); break
                except OSError as e:
                    if e.errno != errno.EKEYREVOKED or time.monotonic() > deadline: raise
            """)
        #expect(back.ok, "\(back.stderr)")
        let audit = try sh("sqlite3 \(q(fs.keystore)) \"SELECT event || ':' || outcome FROM audit_log\"")
        #expect(audit.stdout.contains("DisableKey:success") && audit.stdout.contains("EnableKey:success"))
        #expect(audit.stdout.contains(":refused"), "the refused open is audited")
        let hash = try fs.kmsfs(["audit", "paths", "--hash", "/file", "--fs", fs.cipherdir]).stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        let refused = try sh("sqlite3 \(q(fs.keystore)) \"SELECT DISTINCT path FROM audit_log WHERE outcome = 'refused' AND path IS NOT NULL\"")
        #expect(refused.stdout.split(separator: "\n").contains(Substring(hash)), "the refusal names the file: \(refused.stdout) vs \(hash)")
    }

    @Test("a uid outside the key policy gets EACCES (allow_other, setpriv), and the denial is audited")
    func deniedUID() throws {
        let fs = try MountedFS(mountOptions: ["allow_other"])
        let r = try fs.run("""
            echo secret > "$M/file"; chmod 644 "$M/file"; chmod 755 "$M" "$(dirname "$M")"
            if setpriv --reuid=4242 --regid=4242 --clear-groups cat "$M/file" 2> $T/err; then echo "read it"; fi
            grep -o 'Permission denied' $T/err | head -1
            cat "$M/file"
            """)
        #expect(r.ok, "\(r.stderr)")
        #expect(r.stdout.split(separator: "\n") == ["Permission denied", "secret"])
        let audit = try sh("sqlite3 \(q(fs.keystore)) \"SELECT count(*) FROM audit_log WHERE outcome = 'denied' AND uid = 4242\"")
        #expect((Int(audit.stdout.trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0) >= 1)
        // The denial names the file it was for, as the keyed hash of its path.
        let hash = try fs.kmsfs(["audit", "paths", "--hash", "/file", "--fs", fs.cipherdir]).stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        let denied = try sh("sqlite3 \(q(fs.keystore)) \"SELECT DISTINCT path FROM audit_log WHERE outcome = 'denied' AND uid = 4242 AND path IS NOT NULL\"")
        #expect(denied.stdout.split(separator: "\n").contains(Substring(hash)), "\(denied.stdout) vs \(hash)")
        // A grant lets the uid in.
        #expect(try fs.key(["policy", "alias/default", "--grant", "decrypt", "uid:4242"]).ok)
        let granted = try fs.python("""
            import subprocess, time
            deadline = time.monotonic() + 1.0
            while True:
                p = subprocess.run(["setpriv", "--reuid=4242", "--regid=4242", "--clear-groups", "cat", "file"], capture_output=True)
                if p.returncode == 0: print(p.stdout.decode().strip()); break
                if time.monotonic() > deadline: raise AssertionError(p.stderr)
            """)
        #expect(granted.stdout.contains("secret"), "\(granted.stderr)")
    }

    @Test("xattr values and symlink targets follow the governing key: a uid allowed on the root's key but not on /prod's reads and writes neither under /prod")
    func xattrsAndSymlinksFollowTheGoverningKey() throws {
        let fs = try MountedFS(mountOptions: ["allow_other"])
        for op in ["decrypt", "encrypt"] { #expect(try fs.key(["policy", "alias/default", "--grant", op, "uid:4242"]).ok) }
        #expect(try fs.key(["create", "--alias", "alias/prod"]).ok)
        #expect(try fs.key(["bind", "/prod", "alias/prod"]).ok)
        let r = try fs.run("""
            chmod 755 "$M" "$(dirname "$M")"
            mkdir -m 777 "$M/prod" "$M/open"
            echo p > "$M/prod/f"; chmod 666 "$M/prod/f"; setfattr -n user.owner -v team-prod "$M/prod/f"; setfattr -n user.d -v dirval "$M/prod"
            ln -s /secret/target "$M/prod/link"
            echo o > "$M/open/f"; chmod 666 "$M/open/f"; setfattr -n user.owner -v team-open "$M/open/f"
            as() { setpriv --reuid=4242 --regid=4242 --clear-groups "$@"; }
            res() { if "$@" >/dev/null 2>$T/err; then echo allowed; else grep -o 'Permission denied' $T/err | head -1; fi; }
            echo "get prod file: $(res as getfattr -n user.owner "$M/prod/f")"
            echo "set prod file: $(res as setfattr -n user.owner -v mine "$M/prod/f")"
            echo "get prod dir: $(res as getfattr -n user.d "$M/prod")"
            echo "list prod file: $(res as getfattr -d "$M/prod/f")"
            echo "readlink prod: $(res as readlink -v "$M/prod/link")"
            echo "symlink in prod: $(res as ln -s x "$M/prod/mine")"
            echo "get open file: $(res as getfattr -n user.owner "$M/open/f")"
            echo "set open file: $(res as setfattr -n user.owner -v mine "$M/open/f")"
            getfattr --only-values -n user.owner "$M/prod/f"; echo
            getfattr --only-values -n user.owner "$M/open/f"; echo
            readlink "$M/prod/link"
            """)
        #expect(r.ok, "\(r.stderr)")
        #expect(r.stdout.split(separator: "\n").map(String.init) == [
            "get prod file: Permission denied", "set prod file: Permission denied", "get prod dir: Permission denied",
            "list prod file: Permission denied", "readlink prod: Permission denied", "symlink in prod: Permission denied",
            "get open file: allowed", "set open file: allowed",
            "team-prod", "mine", "/secret/target",
        ], "\(r.stdout) \(r.stderr)")
        // The values are sealed per object: the backing attribute of one file does not open on another.
        try fs.unmount()
        let moved = try fs.python("""
            files = []
            for d, subdirs, names in os.walk(C):
                subdirs[:] = [x for x in subdirs if x != ".kmsfs"]
                for n in names:
                    p = os.path.join(d, n)
                    if os.path.islink(p): continue
                    if any(a.startswith("user.kmsfs.") for a in os.listxattr(p)): files.append(p)
            assert len(files) == 2, files
            name = [a for a in os.listxattr(files[0]) if a.startswith("user.kmsfs.")][0]
            os.setxattr(files[1], name, os.getxattr(files[0], name))
            """)
        #expect(moved.ok, "\(moved.stderr)")
        try fs.mount()
        let after = try fs.run("getfattr -n user.owner $M/prod/f >/dev/null 2>&1 && echo ok1; getfattr -n user.owner $M/open/f >/dev/null 2>&1 && echo ok2; true")
        #expect(after.stdout.split(separator: "\n").count == 1, "a value copied to another file must fail there: \(after.stdout)")
    }

    @Test("a name that does not authenticate is not skipped in silence: the listing shows the intact entries, then fails with EIO, and the failure is audited with the reader's uid")
    func damagedNameSurfaces() throws {
        let fs = try MountedFS()
        #expect(try fs.run("mkdir $M/d; echo a > $M/d/intact; echo b > $M/d/victim; stat -c %i $M/d/victim > $T/inode").ok)
        try fs.unmount()
        #expect(try fs.run("""
            bad=$(find $C -path $C/.kmsfs -prune -o -inum $(cat $T/inode) -print); base=$(basename $bad)
            if [ "${base:0:1}" = A ]; then repl=B; else repl=A; fi
            mv "$bad" "$(dirname $bad)/$repl${base:1}"
            """).ok)
        try fs.mount()
        let listed = try fs.python("""
            names = []
            try:
                with os.scandir("d") as it:
                    for e in it: names.append(e.name)
                raise AssertionError("the listing hid the damaged name: %r" % names)
            except OSError as e:
                assert e.errno == errno.EIO, e
            assert names == ["intact"], names
            assert open("d/intact").read() == "a\\n"
            print("ok")
            """)
        #expect(listed.ok, "\(listed.stderr)")
        let audit = try sh("sqlite3 \(q(fs.keystore)) \"SELECT uid, error FROM audit_log WHERE event = 'IntegrityFailure'\"")
        #expect(audit.stdout.contains("0|1 name(s) in a directory"), "\(audit.stdout)")
    }
}
