import Foundation
import Testing

/// The newest rekey job's JSON status, parsed.
func rekeyStatus(_ fs: MountedFS, offline: Bool = false) throws -> [String: Any] {
    let out = try offline ? fs.kmsfs(["rekey", "status", "--json", "--fs", fs.cipherdir])
                          : fs.run("$K rekey status --json --fs $M")
    let json = try JSONSerialization.jsonObject(with: Data(out.stdout.utf8)) as? [String: Any]
    return json?["job"] as? [String: Any] ?? [:]
}

/// Polls (no fixed sleep) until the newest rekey job leaves the running states, up to `limit` seconds.
func waitForRekey(_ fs: MountedFS, limit: Double = 60) throws -> [String: Any] {
    let deadline = Date().addingTimeInterval(limit)
    while Date() < deadline {
        let job = try rekeyStatus(fs)
        if let state = job["state"] as? String, !["queued", "running"].contains(state) { return job }
        Thread.sleep(forTimeInterval: 0.05)
    }
    return try rekeyStatus(fs)
}

/// Writes `count` files of assorted sizes under `$M/data` (hard links and a
/// long name among them) and a copy of the tree at `$T/ref`.
func populate(_ fs: MountedFS, count: Int, bigFiles: Int = 0) throws {
    let made = try fs.python("""
        import random
        random.seed(7)
        for d in ("data/a", "data/b/c", "data/moving1", "data/moving2"):
            os.makedirs(d, exist_ok=True)
        for i in range(\(count)):
            size = random.choice([0, 1, 4095, 16384, 16385, 40000, 200000])
            with open(f"data/{'a' if i % 2 else 'b/c'}/f{i}", "wb") as f:
                f.write(os.urandom(size))
        for i in range(10):
            with open(f"data/moving1/r{i}", "wb") as f:
                f.write(os.urandom(30000))
            with open(f"data/a/app{i}", "wb") as f:
                f.write(os.urandom(5000))
        with open("data/a/" + "L" * 200, "wb") as f:
            f.write(b"long name")
        os.link("data/a/f1", "data/b/hardlink-to-f1")
        for i in range(\(bigFiles)):
            with open(f"data/big{i}", "wb") as f:
                f.write(os.urandom(3 << 20))
        """)
    #expect(made.ok, "\(made.stderr)")
    #expect(try fs.run("cp -a $M/data $T/ref").ok)
}

@Suite("re-keying live data: deprecate, background job, crash safety", .serialized)
struct RekeyTests {
    @Test("deprecate A for B on a live mount: the job runs while files are appended, renamed and read; all data intact, A unused, then deleted")
    func liveDeprecation() throws {
        let fs = try MountedFS()
        try populate(fs, count: 120)
        #expect(try fs.key(["rotate", "alias/default"]).ok)
        #expect(try fs.run("echo after-rotation > $M/data/a/new-v2 && cp $M/data/a/new-v2 $T/ref/a/").ok)
        #expect(try fs.key(["create", "--alias", "alias/b"]).ok)
        // Three applications run until told to stop: an appender, a renamer and a reader.
        let apps = try fs.run("""
            cat > $T/append.py <<'PY'
            import os, sys
            M, T = sys.argv[1], sys.argv[2]
            n = 0
            while not os.path.exists(T + "/stop"):
                i = n % 10
                line = f"line {n}\\n".encode()
                with open(f"{M}/data/a/app{i}", "ab") as f: f.write(line)
                with open(f"{T}/ref/a/app{i}", "ab") as f: f.write(line)
                n += 1
            print(n)
            PY
            cat > $T/rename.py <<'PY'
            import os, sys
            M, T = sys.argv[1], sys.argv[2]
            n = 0
            while not os.path.exists(T + "/stop"):
                i = n % 10
                src, dst = ("moving1", "moving2") if (n // 10) % 2 == 0 else ("moving2", "moving1")
                os.rename(f"{M}/data/{src}/r{i}", f"{M}/data/{dst}/r{i}")
                os.rename(f"{T}/ref/{src}/r{i}", f"{T}/ref/{dst}/r{i}")
                n += 1
            print(n)
            PY
            cat > $T/read.py <<'PY'
            import os, sys
            M, T = sys.argv[1], sys.argv[2]
            names = [os.path.join(d, f) for d, _, fs in os.walk(M + "/data") if "moving" not in d for f in fs]
            rounds = errors = 0
            while not os.path.exists(T + "/stop"):
                for p in names:
                    try:
                        with open(p, "rb") as f: f.read()
                    except OSError as e:
                        errors += 1
                        print("error", p, e, file=sys.stderr)
                rounds += 1
            print(rounds, errors)
            sys.exit(1 if errors else 0)
            PY
            # The background apps must not hold this shell's output pipe open.
            for fd in /proc/$$/fd/*; do n=${fd##*/}; if [ "$n" -gt 2 ]; then eval "exec $n>&-" 2>/dev/null || true; fi; done
            python3 $T/append.py $M $T > $T/append.out 2>&1 & echo $! > $T/append.pid
            python3 $T/rename.py $M $T > $T/rename.out 2>&1 & echo $! > $T/rename.pid
            python3 $T/read.py $M $T > $T/read.out 2>$T/read.err & echo $! > $T/read.pid
            """)
        #expect(apps.ok)
        // Throttled so the job overlaps the applications for a while.
        let deprecated = try fs.run("$K key deprecate alias/default --successor alias/b --rate 3 --fs $M")
        #expect(deprecated.ok && deprecated.stdout.contains("rekey job 1 queued"), "\(deprecated.stdout) \(deprecated.stderr)")
        // A file created under A's binding after the deprecation lands on B.
        let bornAfter = try fs.run("echo born-after > $M/data/a/born-after && cp $M/data/a/born-after $T/ref/a/")
        #expect(bornAfter.ok, "\(bornAfter.stderr)")
        let job = try waitForRekey(fs)
        let stopped = try fs.run("""
            touch $T/stop
            for p in append rename read; do
              pid=$(cat $T/$p.pid)
              while kill -0 $pid 2>/dev/null; do wait $pid 2>/dev/null || true; done
            done
            cat $T/append.out $T/rename.out $T/read.out $T/read.err
            """)
        #expect(job["state"] as? String == "done", "\(job)")
        #expect(job["failures"] as? Int == 0)
        #expect((job["filesDone"] as? Int ?? 0) >= 130, "\(job)")
        let counts = stopped.stdout.split(separator: "\n")
        #expect(counts.count == 3, "\(stopped.stdout)")
        if counts.count == 3 {
            #expect((Int(counts[0]) ?? 0) > 0 && (Int(counts[1]) ?? 0) > 0, "the appender and renamer ran: \(counts)")
            #expect(counts[2].hasSuffix(" 0") && !counts[2].hasPrefix("0 "), "the reader ran and never failed: \(counts[2])")
        }
        // Byte-identical to the reference, through this mount and after a remount.
        #expect(try fs.run("diff -r $T/ref $M/data").ok)
        let usage = try fs.run("$K key usage alias/default --json --fs $M").stdout
        #expect(usage.contains("\"total\" : 0"), "\(usage)")
        try fs.unmount()
        try fs.mount()
        #expect(try fs.run("diff -r $T/ref $M/data").ok)
        try fs.unmount()
        // The index the job kept matches every header exactly.
        let checked = try fs.kmsfs(["fsck", fs.cipherdir])
        #expect(checked.ok && checked.stdout.contains("(0 added, 0 removed, 0 changed)"), "\(checked.stdout) \(checked.stderr)")
        // Every header in CIPHERDIR now names B.
        let b = try fs.key(["describe", "alias/b", "--json"]).stdout
        let bID = (try JSONSerialization.jsonObject(with: Data(b.utf8)) as? [String: Any]).flatMap { ($0["metadata"] as? [String: Any])?["keyID"] as? String }
        #expect(bID != nil)
        let headers = try fs.python("""
            import os
            keys = {}
            for d, dirs, files in os.walk(C):
                dirs[:] = [x for x in dirs if not (d == C and x == ".kmsfs")]
                for f in files:
                    data = open(os.path.join(d, f), "rb").read(40)
                    if data[:4] == b"KMFS": keys[data[24:40].hex()] = keys.get(data[24:40].hex(), 0) + 1
            print(" ".join(f"{k}={n}" for k, n in sorted(keys.items())))
            """).stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(headers.hasPrefix("\(bID ?? "-")=") && !headers.contains(" "), "key ids in the headers: \(headers)")
        // The old key can now go: its deletion is scheduled and, a week later, completes.
        #expect(try fs.key(["retire-version", "alias/default", "1"]).ok)
        #expect(try fs.key(["bind", "/", "alias/b"]).ok)  // bindings also keep a key alive
        #expect(try fs.key(["schedule-deletion", "alias/default", "--days", "7"]).ok)
        let later = String(Int(Date().timeIntervalSince1970) + 8 * 86400)
        let listed = try sh("KMSFS_TEST_NOW=\(later) \(q(kmsfsBinary)) key list --fs \(q(fs.cipherdir)) --passphrase-file \(q(fs.passphraseFile))")
        #expect(listed.stderr.contains("destroyed key"), "\(listed.stderr)")
        #expect(listed.stdout.contains("Destroyed"), "\(listed.stdout)")
        try fs.mount()
        #expect(try fs.run("diff -r $T/ref $M/data").ok)
    }

    /// Checks the job finished every file once (a kill may cost a redo of
    /// what was in flight, never of what was committed) and nothing is left on A.
    func checkFinished(_ fs: MountedFS, _ job: [String: Any], kills: Int) throws {
        #expect(job["state"] as? String == "done", "\(job)")
        let total = job["filesTotal"] as? Int ?? -1, done = job["filesDone"] as? Int ?? -2, rewrites = job["rewrites"] as? Int ?? .max
        #expect(total > 100 && done == total, "\(job)")
        #expect(rewrites <= total + 2 * kills, "committed files were redone: \(rewrites) rewrites for \(total) files and \(kills) kills")
        #expect(try fs.run("diff -r $T/ref $M/data").ok)
        #expect(try fs.run("$K key usage alias/default --json --fs $M").stdout.contains("\"total\" : 0"))
        #expect(try fs.run("ls -A $C/.kmsfs/rekey 2>/dev/null | wc -l").stdout == "0\n", "no backup left behind")
    }

    @Test("an offline reencrypt killed with SIGKILL at 20 random moments: after each, every file reads correctly; the job finishes without redoing files")
    func offlineCrashes() throws {
        let fs = try MountedFS()
        try populate(fs, count: 200)
        #expect(try fs.key(["create", "--alias", "alias/b"]).ok)
        try fs.unmount()
        var generator = SystemRandomNumberGenerator()
        let kills = 20
        for i in 0..<kills {
            let verb = i == 0 ? "start --key alias/default --to alias/b --mode reencrypt --rate 0.5" : "resume"
            let delay = Double.random(in: 0.15...0.4, using: &generator)
            let run = try sh("timeout -s KILL \(delay) \(q(kmsfsBinary)) rekey \(verb) --fs \(q(fs.cipherdir)) --passphrase-file \(q(fs.passphraseFile)) || echo status=$?")
            #expect(run.stdout.contains("status=137"), "killed mid-job: \(run.stdout) \(run.stderr) \((try? rekeyStatus(fs, offline: true)) ?? [:])")
            // Paused, so the mount that reads everything back (after repairing
            // what the kill left) does not carry the job on itself.
            #expect(try fs.kmsfs(["rekey", "pause", "--fs", fs.cipherdir]).ok)
            try fs.mount()
            #expect(try fs.run("diff -r $T/ref $M/data").ok, "after kill \(i + 1)")
            try fs.unmount()
        }
        let finish = try fs.kmsfs(["rekey", "resume", "--rate", "100", "--fs", fs.cipherdir])
        #expect(finish.ok && finish.stdout.contains("done"), "\(finish.stdout) \(finish.stderr)")
        try fs.mount()
        try checkFinished(fs, try rekeyStatus(fs), kills: kills)
    }

    @Test("the mount daemon killed with SIGKILL at 20 random moments of a reencrypt: each remount repairs and resumes; the job finishes without redoing files")
    func daemonCrashes() throws {
        let fs = try MountedFS()
        try populate(fs, count: 150)
        #expect(try fs.key(["create", "--alias", "alias/b"]).ok)
        let deprecated = try fs.run("$K key deprecate alias/default --successor alias/b --mode reencrypt --rate 0.15 --fs $M && $K rekey pause --fs $M")
        #expect(deprecated.ok, "\(deprecated.stderr)")
        var generator = SystemRandomNumberGenerator()
        let kills = 20
        for i in 0..<kills {
            // The job runs for a random moment, then the daemon dies.
            let delay = Double.random(in: 0.05...0.3, using: &generator)
            let killed = try fs.run("""
                started=$(date +%s.%N)
                $K rekey resume --fs $M > /dev/null
                pid=$($K status --json --fs $M | python3 -c 'import json,sys; print(json.load(sys.stdin)["daemon"]["pid"])')
                python3 -c 'import time; time.sleep(\(delay))'
                kill -KILL $pid
                while kill -0 $pid 2>/dev/null && ! grep -q '^State:.*Z' /proc/$pid/status; do :; done
                fusermount3 -uz $M
                echo "$started $(date +%s.%N)"
                """)
            #expect(killed.ok, "\(killed.stderr) \(killed.stdout)")
            // Paused, so only the repair at mount runs before the check.
            let paused = try fs.kmsfs(["rekey", "pause", "--fs", fs.cipherdir])
            #expect(paused.ok, "\(paused.stderr) \((try? rekeyStatus(fs, offline: true)) ?? [:])")
            try fs.mount()
            #expect(try fs.run("diff -r $T/ref $M/data").ok, "after kill \(i + 1)")
        }
        let state = try rekeyStatus(fs)
        #expect(state["state"] as? String == "paused" && (state["filesDone"] as? Int ?? 0) > 0, "still mid-job after the kills: \(state)")
        #expect(try fs.run("$K rekey resume --rate 100 --fs $M").ok)
        try checkFinished(fs, try waitForRekey(fs, limit: 120), kills: kills)
    }

    @Test("pause stops a live job before its next file, resume continues it, cancel ends it with moved files staying moved")
    func pauseResumeCancel() throws {
        let fs = try MountedFS()
        try populate(fs, count: 60)
        #expect(try fs.key(["create", "--alias", "alias/b"]).ok)
        #expect(try fs.run("$K rekey start --key alias/default --to alias/b --rate 0.2 --fs $M && $K rekey pause --fs $M").ok)
        let paused = try rekeyStatus(fs)
        #expect(paused["state"] as? String == "paused")
        let done = paused["filesDone"] as? Int ?? -1
        #expect(try rekeyStatus(fs)["filesDone"] as? Int == done, "nothing moves while paused")
        #expect(try fs.run("$K rekey resume --fs $M && $K rekey cancel --fs $M").ok)
        let cancelled = try rekeyStatus(fs)
        #expect(cancelled["state"] as? String == "cancelled")
        let moved = cancelled["filesDone"] as? Int ?? -1
        let usage = try fs.run("$K key usage alias/b --json --fs $M").stdout
        #expect(usage.contains("\"total\" : \(moved)"), "files moved before the cancel stay on B: \(moved) \(usage)")
        #expect(try fs.run("diff -r $T/ref $M/data").ok)
        #expect(try fs.run("$K rekey resume --fs $M").status == 1, "a cancelled job cannot be resumed")
    }
}
