import Foundation
import Testing

/// Streaming appends answered before their ciphertext reaches CIPHERDIR
/// (docs/FILESYSTEM.md, "Write-behind"): nothing a user can ask shows the
/// difference, a full disk still fails the write itself, and what close or
/// fsync returned for survives a killed daemon.
@Suite("write-behind: streaming appends", .serialized) struct WriteBehindTests {
    @Test("mid-stream, every answer is as if each write had landed: size by fstat and stat, contents through a second descriptor, utime after a write kept, reserved space given back at close")
    func visibleAtOnce() throws {
        let fs = try MountedFS()
        let r = try fs.python("""
            import glob
            fd = os.open("stream", os.O_WRONLY | os.O_CREAT, 0o644)
            reader = os.open("stream", os.O_RDONLY)
            written = bytearray()
            # 1 MiB writes: each takes the writer long enough that the stat,
            # read or utime right after it would meet it still in flight.
            for i in range(48):
                piece = os.urandom(1 << 20)
                assert os.write(fd, piece) == len(piece)
                written += piece
                if i % 3 == 0: assert os.fstat(fd).st_size == len(written), (i, os.fstat(fd).st_size)
                if i % 3 == 1: assert os.stat("stream").st_size == len(written), i
                if i % 3 == 2:
                    # Another descriptor reads what was just written, to the last byte.
                    assert os.pread(reader, 262144, len(written) - 262144) == bytes(written[-262144:]), i
                    # Times set right after a write stay set (the write's landing must not move them).
                    os.utime("stream", (1000000000, 1000000000))
                    assert os.stat("stream").st_mtime == 1000000000, (i, os.stat("stream").st_mtime)
            os.close(fd); os.close(reader)
            assert open("stream", "rb").read() == bytes(written)
            # The backing file holds no more space than its ciphertext needs:
            # the space reserved ahead of the stream went back at close.
            backing = [p for p in glob.glob(C + "/*") if os.path.isfile(p)]
            assert len(backing) == 1, backing
            st = os.stat(backing[0])
            assert st.st_blocks * 512 <= st.st_size + 65536, (st.st_blocks * 512, st.st_size)
            print("ok")
            """)
        #expect(r.ok, "\(r.stderr)")
        #expect(r.stdout.contains("ok"))
        let status = jsonObject(try fs.run("$K status --json --fs $M").stdout)
        #expect(((status["daemon"] as? [String: Any])?["statistics"] as? [String: Any])?["writesBehind"] as? Int ?? 0 >= 48, "\(status)")
    }

    @Test("a full disk under 128 KiB appends: ENOSPC from the write itself, never later; every byte a write accepted reads back; no reserved space outlives the close")
    func fullDisk() throws {
        let small = try SmallDisk(size: "16m")
        defer { small.remove() }
        let root = small.root, disk = small.disk, mnt = small.mountpoint
        let script = root + "/fill.py"
        try """
            import os, sys, errno
            M, disk = sys.argv[1], sys.argv[2]
            files = {}
            for n in range(3):
                name = f"{M}/s{n}"
                try:
                    fd = os.open(name, os.O_WRONLY | os.O_CREAT, 0o644)
                except OSError as e:
                    assert e.errno == errno.ENOSPC and n > 0, e  # no room even for a header
                    break
                accepted = bytearray()
                try:
                    while True:
                        piece = os.urandom(131072)
                        accepted += piece[:os.write(fd, piece)]
                except OSError as e:
                    assert e.errno == errno.ENOSPC, e
                # The error came from a write: closing reports nothing more.
                os.close(fd)
                files[name] = bytes(accepted)
            assert len(files[f"{M}/s0"]) >= 4 << 20, len(files[f"{M}/s0"])
            for name, data in files.items():
                got = open(name, "rb").read()
                assert got == data, (name, len(got), len(data))
            # No space reserved ahead of a stream outlives its close.
            for p in os.listdir(f"{disk}/cipher"):
                st = os.stat(f"{disk}/cipher/{p}")
                if not p.startswith(".") and os.path.isfile(f"{disk}/cipher/{p}"):
                    assert st.st_blocks * 512 <= st.st_size + 65536, (p, st.st_blocks * 512, st.st_size)
            print("ok")
            """.write(toFile: script, atomically: true, encoding: .utf8)
        let fill = try sh("python3 \(q(script)) \(q(mnt)) \(q(disk))")
        #expect(fill.ok, "\(fill.stderr)")
        #expect(fill.stdout.contains("ok"))
        // The appends were handed over (else this tests the old path).
        let status = jsonObject(try sh("\(small.kmsfs) status --json --fs \(q(mnt))").stdout)
        #expect(((status["daemon"] as? [String: Any])?["statistics"] as? [String: Any])?["writesBehind"] as? Int ?? 0 > 20, "\(status)")
    }

    @Test("a daemon killed with SIGKILL in a stream of 128 KiB appends: after remount the file holds every byte up to the last fsync, and what follows is a prefix of what was written")
    func killedMidStream() throws {
        let fs = try MountedFS()
        let r = try fs.python("""
            fd = os.open("stream", os.O_WRONLY | os.O_CREAT, 0o644)
            written = bytearray()
            for i in range(40):
                piece = os.urandom(131072)
                os.write(fd, piece); written += piece
            os.fsync(fd)
            synced = len(written)
            for i in range(24):
                piece = os.urandom(131072)
                os.write(fd, piece); written += piece
            open(os.path.join(T, "expected"), "wb").write(written)
            open(os.path.join(T, "synced"), "w").write(str(synced))
            status = kill_daemon()
            # The appends were handed over (else this tests the old path).
            assert status["daemon"]["statistics"]["writesBehind"] >= 24, status["daemon"]["statistics"]
            print("killed")
            """)
        #expect(r.ok, "\(r.stderr)")
        try fs.remountAfterKill()
        let after = try fs.python("""
            expected = open(os.path.join(T, "expected"), "rb").read()
            synced = int(open(os.path.join(T, "synced")).read())
            size = os.stat("stream").st_size
            assert synced <= size <= len(expected), (synced, size)
            fd = os.open("stream", os.O_RDONLY)
            assert os.pread(fd, synced, 0) == expected[:synced]
            # Past the fsync: whole chunks read back as written; only a chunk
            # the kill tore may fail, and only as EIO (never other bytes).
            offset = synced
            while offset < size:
                try:
                    got = os.pread(fd, 16384, offset)
                except OSError as e:
                    assert e.errno == errno.EIO and size - offset <= 16384, (offset, size, e)
                    break
                assert got == expected[offset:offset + len(got)], offset
                offset += len(got)
            print("ok", synced, size)
            """)
        #expect(after.ok, "\(after.stderr)")
        #expect(after.stdout.contains("ok"))
    }
}

/// `kmsfs mount --poll-us`: after answering a request one worker polls the
/// device for the next before it sleeps (CFUSEIO's fuseio.c).
@Suite("polling for the next request", .serialized) struct PollingTests {
    @Test("by default requests that follow closely (an untar of 300 files) are found by polling, and the files are intact; with --poll-us 0 none is", arguments: [nil, 0])
    func polls(window: Int?) throws {
        let fs = try MountedFS(mountArguments: window.map { ["--poll-us", String($0)] } ?? [])
        let r = try fs.run("""
            mkdir -p $T/src && cd $T/src && for i in $(seq 300); do echo "file $i" > f$i; done && tar -cf $T/s.tar .
            cd $M && tar -xf $T/s.tar && cat f* | md5sum | cut -c1-32 && cat $T/src/f* | md5sum | cut -c1-32
            """)
        #expect(r.ok, "\(r.stderr)")
        let sums = r.stdout.split(separator: "\n")
        #expect(sums.count == 2 && sums[0] == sums[1], "\(r.stdout)")
        let stats = (jsonObject(try fs.run("$K status --json --fs $M").stdout)["daemon"] as? [String: Any])?["statistics"] as? [String: Any]
        // (Polls also find FORGETs, which `requests` does not count: no bound above.)
        let polled = stats?["polledRequests"] as? Int ?? -1
        if window == 0 {
            #expect(polled == 0, "\(String(describing: stats))")
        } else {
            #expect(polled > 0, "\(String(describing: stats))")
        }
    }
}
