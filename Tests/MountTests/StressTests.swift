import Foundation
import Testing

/// Randomised stress: many processes doing creates, writes, truncates,
/// renames, links and unlinks on the mount and, identically, on a plain
/// directory twin; then the two trees must match byte for byte.
@Suite(.serialized) struct StressTests {
    @Test("random concurrent operations leave the mount identical to a plain-directory twin")
    func randomTwin() throws {
        let fs = try MountedFS()
        let r = try fs.python("""
            import random, hashlib, multiprocessing
            TWIN = os.path.join(T, "twin")
            os.makedirs(TWIN, exist_ok=True)

            def worker(seed):
                rng = random.Random(seed)
                roots = [os.path.join(M, f"w{seed}"), os.path.join(TWIN, f"w{seed}")]
                for r in roots: os.makedirs(r)
                names = []
                for step in range(300):
                    op = rng.choice(["create", "write", "write", "truncate", "rename", "link", "unlink", "mkdir"])
                    name = f"f{rng.randrange(40)}"
                    sub = rng.choice(["", "d1/", "d2/"])
                    path = sub + name
                    data = rng.randbytes(rng.choice([0, 1, 100, 4096, 16383, 16384, 16385, 70000]))
                    offset = rng.randrange(0, 90000)
                    size = rng.randrange(0, 60000)
                    other = rng.choice(["", "d1/", "d2/"]) + f"f{rng.randrange(40)}"
                    results = []
                    for root in roots:
                        p = os.path.join(root, path)
                        try:
                            if op == "mkdir":
                                os.makedirs(os.path.join(root, sub or "d1"), exist_ok=True); results.append("ok"); continue
                            if op == "create":
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

            with multiprocessing.Pool(6) as pool:
                pool.map(worker, range(6))
            a, b = snapshot(M), snapshot(TWIN)
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
