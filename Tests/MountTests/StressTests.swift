import Foundation
import Testing

/// Randomised stress: many processes doing creates, writes, truncates,
/// renames, links and unlinks on the mount and, identically, on a plain
/// directory twin; then the two trees must match byte for byte.
@Suite(.serialized) struct StressTests {
    @Test("random concurrent operations leave the mount identical to a plain-directory twin")
    func randomTwin() throws {
        let fs = try MountedFS()
        // Independent worker processes (not a fork-based pool, which can
        // deadlock on locks held at fork time): each owns one subtree.
        try """
            import os, random, sys, errno
            M, TWIN, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
            rng = random.Random(seed)
            roots = [os.path.join(M, f"w{seed}"), os.path.join(TWIN, f"w{seed}")]
            for r in roots: os.makedirs(r)
            for step in range(300):
                op = rng.choice(["create", "write", "write", "truncate", "rename", "link", "unlink", "mkdir"])
                sub = rng.choice(["", "d1/", "d2/"])
                path = sub + f"f{rng.randrange(40)}"
                data = rng.randbytes(rng.choice([0, 1, 100, 4096, 16383, 16384, 16385, 70000]))
                offset = rng.randrange(0, 90000)
                size = rng.randrange(0, 60000)
                other = rng.choice(["", "d1/", "d2/"]) + f"f{rng.randrange(40)}"
                results = []
                for root in roots:
                    p = os.path.join(root, path)
                    try:
                        if op == "mkdir":
                            os.makedirs(os.path.join(root, sub or "d1"), exist_ok=True)
                        elif op == "create":
                            with open(p, "wb") as f: f.write(data)
                        elif op == "write":
                            fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o644)
                            os.pwrite(fd, data, offset); os.close(fd)
                        elif op == "truncate":
                            os.truncate(p, size)
                        elif op == "rename":
                            os.rename(p, os.path.join(root, other))
                        elif op == "link":
                            os.link(p, os.path.join(root, other))
                        elif op == "unlink":
                            os.unlink(p)
                        results.append("ok")
                    except OSError as e:
                        results.append(e.errno)
                assert results[0] == results[1], f"seed {seed} step {step} {op} {path}: mount {results[0]} twin {results[1]}"
            """.write(toFile: fs.root + "/worker.py", atomically: true, encoding: .utf8)
        let workers = try fs.run("""
            mkdir -p $T/twin
            pids=()
            for seed in 0 1 2 3 4 5; do python3 ../worker.py "$M" $T/twin $seed & pids+=($!); done
            for p in "${pids[@]}"; do wait $p; done
            """)
        #expect(workers.ok, "\(workers.stderr)")
        let r = try fs.python("""
            import hashlib
            def snapshot(top):
                out = {}
                for d, dirs, files in os.walk(top):
                    for n in files:
                        p = os.path.join(d, n)
                        st = os.lstat(p)
                        out[os.path.relpath(p, top)] = (st.st_size, st.st_nlink, hashlib.sha256(open(p, "rb").read()).hexdigest())
                    for n in dirs:
                        out[os.path.relpath(os.path.join(d, n), top) + "/"] = "dir"
                return out
            a, b = snapshot(M), snapshot(os.path.join(T, "twin"))
            assert a == b, f"trees differ: {sorted(set(a.items()) ^ set(b.items()))[:5]}"
            print(len(a))
            """)
        #expect(r.ok, "\(r.stderr)")
        #expect((Int(r.stdout.trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0) > 50)
        // And again after a remount: everything was persisted.
        try fs.unmount()
        try fs.mount()
        let again = try fs.run("(cd \"$M\" && find . -type f | sort | xargs md5sum) > $T/a; (cd $T/twin && find . -type f | sort | xargs md5sum) > $T/b; cmp $T/a $T/b")
        #expect(again.ok, "\(again.stderr)")
    }
}

@Suite(.serialized) struct SharedOpenStateTests {
    @Test("an appender and readers opening the same files at once never see EIO (one open state per inode)")
    func appendWhileOpening() throws {
        let fs = try MountedFS()
        let result = try fs.run("""
            mkdir $M/a
            for i in 0 1 2 3; do head -c 5000 /dev/urandom > $M/a/app$i; cp $M/a/app$i $T/app$i; done
            cat > $T/rw.py <<'PY'
            import os, sys
            M, T, mode = sys.argv[1], sys.argv[2], sys.argv[3]
            errors = 0
            for n in range(3000):
                i = n % 4
                try:
                    if mode == "a":
                        line = f"line {n}\\n".encode()
                        with open(f"{M}/a/app{i}", "ab") as f: f.write(line)
                        with open(f"{T}/app{i}", "ab") as f: f.write(line)
                    else:
                        with open(f"{M}/a/app{i}", "rb") as f: f.read()
                except OSError as e:
                    errors += 1
            print(mode, errors)
            PY
            python3 $T/rw.py $M $T a > $T/a.out & python3 $T/rw.py $M $T r > $T/r1.out & python3 $T/rw.py $M $T r > $T/r2.out
            wait
            cat $T/a.out $T/r1.out $T/r2.out
            for i in 0 1 2 3; do cmp $M/a/app$i $T/app$i; done
            """)
        #expect(result.ok, "\(result.stderr)")
        #expect(result.stdout == "a 0\nr 0\nr 0\n", "\(result.stdout)")
    }

    @Test("more files than the daemon may hold descriptors (limit 1,024): tar extracts 6,000 files, find+cat reads them all the same, ls -lR lists them, rm -rf removes them; 5,000 creates, two stat storms and unlinks in one directory; the daemon parked descriptors (by default, as root) or asked the kernel to forget entries (--keep-descriptors) instead of failing with EMFILE",
          arguments: [false, true])
    func moreFilesThanTheHardLimit(keepDescriptors: Bool) throws {
        // Each inode the kernel caches has a node in the daemon; 1,024 descriptors is what many hosts allow.
        // A hard limit, unlike PosixTests.moreFilesThanDescriptors (a soft one the daemon raises): only relief helps here.
        let fs = try MountedFS(launcher: "prlimit --nofile=1024:1024", mountArguments: keepDescriptors ? ["--keep-descriptors"] : [])
        let made = try fs.run("""
            mkdir -p $T/src && cd $T/src && python3 -c '
            import os
            for d in range(12):
                os.makedirs(f"d{d}")
                for i in range(500): open(f"d{d}/f{i}", "w").write(str(i) * (i % 50))
            ' && tar -cf $T/src.tar . && find . -type f | sort | xargs cat | md5sum > $T/sum
            cd $M && tar -xf $T/src.tar && find . -type f | wc -l
            find . -type f | sort | xargs cat | md5sum | cmp - $T/sum && echo same
            ls -lR . | grep -c '^-'
            rm -rf d* && ls | wc -l
            python3 -c '
            import os
            os.makedirs("one")
            for i in range(5000): os.close(os.open(f"one/f{i}", os.O_CREAT | os.O_WRONLY, 0o644))
            for p in range(2): print(sum(1 for i in range(5000) if os.stat(f"one/f{i}").st_size == 0))
            for i in range(5000): os.unlink(f"one/f{i}")
            '
            """)
        #expect(made.ok && made.stdout == "6000\nsame\n6000\n0\n5000\n5000\n", "\(made.stdout) \(made.stderr)")
        let stats = (jsonObject(try fs.run("$K status --json --fs $M").stdout)["daemon"] as? [String: Any])?["statistics"] as? [String: Any]
        if keepDescriptors {
            #expect((stats?["forgottenOnRequest"] as? Int ?? 0) > 0, "\(String(describing: stats))")
            #expect((stats?["parkedDescriptors"] as? Int ?? -1) == 0, "\(String(describing: stats))")
        } else {
            // Parking keeps the kernel's entries: it never had to forget one, and reopened what the reads needed.
            #expect((stats?["parkedDescriptors"] as? Int ?? 0) > 5000, "\(String(describing: stats))")
            #expect((stats?["reopenedDescriptors"] as? Int ?? 0) > 0, "\(String(describing: stats))")
            #expect((stats?["forgottenOnRequest"] as? Int ?? -1) == 0, "\(String(describing: stats))")
        }
        #expect((stats?["descriptors"] as? Int ?? Int.max) < 1024, "\(String(describing: stats))")
        let limit = try fs.run("grep 'Max open files' /proc/$(pgrep -f \"kmsfs mount $C\" | head -1)/limits | awk '{print $4}'").stdout
        #expect(limit == "1024\n", "the daemon ran with \(limit)")
    }
}
