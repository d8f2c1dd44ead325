import Foundation
import Testing

/// Real programs writing and reading through a real mount.
@Suite(.serialized) struct ApplicationTests {
    @Test("cp and cmp of a large file; content and names never reach CIPHERDIR in plain; remount reads back")
    func copyAndSecrecy() throws {
        let fs = try MountedFS()
        let r = try fs.run("""
            head -c 24M /dev/urandom > $T/big
            printf 'TOP-SECRET-CONTENT-%.0s' $(seq 1 500) > $T/secret.txt
            mkdir -p "$M/CONFIDENTIAL-DIRNAME"
            cp $T/big "$M/CONFIDENTIAL-DIRNAME/big.bin"
            cp $T/secret.txt "$M/PRIVATE-FILENAME.txt"
            cmp $T/big "$M/CONFIDENTIAL-DIRNAME/big.bin"
            cmp $T/secret.txt "$M/PRIVATE-FILENAME.txt"
            ! grep -r -a -l -e TOP-SECRET -e CONFIDENTIAL -e PRIVATE-FILENAME "$C"
            ! find "$C" | grep -e CONFIDENTIAL -e PRIVATE
            ls "$M" | sort
            """)
        #expect(r.ok, "\(r.stderr)")
        #expect(r.stdout.split(separator: "\n") == ["CONFIDENTIAL-DIRNAME", "PRIVATE-FILENAME.txt"])
        try fs.unmount()
        try fs.mount()
        let again = try fs.run("cmp $T/big \"$M/CONFIDENTIAL-DIRNAME/big.bin\" && cmp $T/secret.txt \"$M/PRIVATE-FILENAME.txt\"")
        #expect(again.ok, "\(again.stderr)")
    }

    @Test("dd at odd offsets and sizes matches the same writes to a plain file")
    func ddOddOffsets() throws {
        let fs = try MountedFS()
        let r = try fs.run("""
            head -c 3000000 /dev/urandom > $T/src
            for target in "$M/f" "$T/ref"; do
              : > "$target"
              dd if=$T/src of="$target" bs=1 count=1 seek=0 conv=notrunc status=none
              dd if=$T/src of="$target" bs=4097 count=3 skip=5 seek=7 conv=notrunc status=none
              dd if=$T/src of="$target" bs=65535 count=5 skip=1 seek=3 conv=notrunc status=none
              dd if=$T/src of="$target" bs=16384 count=1 seek=200 conv=notrunc status=none
              dd if=$T/src of="$target" bs=1000 count=7 skip=3 seek=333 conv=notrunc status=none
              dd if=$T/src of="$target" bs=128k count=9 skip=2 seek=1 conv=notrunc status=none
            done
            cmp "$M/f" "$T/ref"
            stat -c %s "$M/f"
            dd if="$M/f" bs=777 skip=13 count=50 status=none | cmp - <(dd if=$T/ref bs=777 skip=13 count=50 status=none)
            """)
        #expect(r.ok, "\(r.stderr)")
        #expect(Int(r.stdout.trimmingCharacters(in: .whitespacesAndNewlines)) == 200 * 16384 + 16384)
    }

    @Test("tar extract of a real source tree, checksums verified")
    func tarTree() throws {
        let fs = try MountedFS()
        let r = try fs.run("""
            tar -C /usr/include -cf $T/tree.tar linux openssl
            mkdir "$M/src" && tar -C "$M/src" -xf $T/tree.tar
            (cd /usr/include && find linux openssl -type f -print0 | sort -z | xargs -0 md5sum) > $T/want
            (cd "$M/src" && find linux openssl -type f -print0 | sort -z | xargs -0 md5sum) > $T/got
            cmp $T/want $T/got
            wc -l < $T/got
            """)
        #expect(r.ok, "\(r.stderr)")
        #expect((Int(r.stdout.trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0) > 500)
    }

    @Test("sqlite3: thousands of transactions, then PRAGMA integrity_check is ok")
    func sqlite() throws {
        let fs = try MountedFS()
        let r = try fs.run("""
            sqlite3 "$M/app.db" 'CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT);'
            for i in $(seq 1 30); do
              { for j in $(seq 1 100); do echo "BEGIN; INSERT INTO t (v) VALUES (hex(randomblob(64))); COMMIT;"; done; } | sqlite3 "$M/app.db"
            done
            sqlite3 "$M/app.db" 'DELETE FROM t WHERE id % 3 = 0; VACUUM;'
            sqlite3 "$M/app.db" 'PRAGMA integrity_check; SELECT count(*) FROM t;'
            """)
        #expect(r.ok, "\(r.stderr)")
        #expect(r.stdout.split(separator: "\n") == ["ok", "2000"])
    }

    @Test("git init, add, commit and log work inside the mount")
    func git() throws {
        let fs = try MountedFS()
        let r = try fs.run("""
            mkdir "$M/repo" && cd "$M/repo"
            git init -q .
            git config user.email t@example.com && git config user.name Tester
            cp -r /usr/include/openssl . && git add -A && git commit -qm "first"
            echo change >> openssl/ssl.h && git commit -qam "second"
            git log --format=%s
            git fsck --strict 2>&1 | grep -v '^Checking' || true
            git status --porcelain | wc -l
            """)
        #expect(r.ok, "\(r.stderr)")
        #expect(r.stdout.split(separator: "\n") == ["second", "first", "0"])
    }

    @Test("python writes through mmap")
    func mmapWrites() throws {
        let fs = try MountedFS()
        let r = try fs.python("""
            import mmap, hashlib
            size = 5 * 1024 * 1024 + 123
            with open("mapped.bin", "wb") as f:
                f.truncate(size)
            with open("mapped.bin", "r+b") as f:
                m = mmap.mmap(f.fileno(), size)
                for i in range(0, size, 4099):
                    m[i:i+7] = b"kmsfs!!"
                m.flush(); m.close()
            ref = bytearray(size)
            for i in range(0, size, 4099):
                ref[i:i+7] = b"kmsfs!!"[:max(0, min(7, size - i))]
            data = open("mapped.bin", "rb").read()
            assert len(data) == size, len(data)
            assert data == bytes(ref), "mmap content differs"
            print("ok")
            """)
        #expect(r.ok, "\(r.stderr)")
        #expect(r.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "ok")
    }

    @Test("concurrent writers: to disjoint regions of one file and to many files")
    func concurrentWriters() throws {
        let fs = try MountedFS()
        let r = try fs.run("""
            head -c 8M /dev/urandom > $T/src
            : > "$M/shared"
            for i in 0 1 2 3 4 5 6 7; do
              dd if=$T/src of="$M/shared" bs=1M count=1 skip=$i seek=$i conv=notrunc status=none &
            done
            for i in $(seq 1 40); do
              (head -c $((i * 3001)) $T/src > "$M/many-$i") &
            done
            wait
            cmp $T/src "$M/shared"
            for i in $(seq 1 40); do cmp <(head -c $((i * 3001)) $T/src) "$M/many-$i"; done
            echo done
            """)
        #expect(r.ok, "\(r.stderr)")
        #expect(r.stdout.contains("done"))
    }
}
