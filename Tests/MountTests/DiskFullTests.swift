import Foundation
import Testing

/// A full disk under CIPHERDIR (a 4 MiB tmpfs): writers get ENOSPC, nothing
/// already written is lost or damaged, and the keystore — on the same full
/// disk — catches up once there is room again.
@Suite(.serialized) struct DiskFullTests {
    @Test("a full disk: ENOSPC for the writer, every file written before reads back intact, the usage index and audit log catch up")
    func fullDisk() throws {
        let small = try SmallDisk(size: "4m")
        defer { small.remove() }
        let root = small.root, cipher = small.cipherdir, mnt = small.mountpoint, k = small.kmsfs, p = small.passphrase

        let script = root + "/fill.py"
        try """
            import os, sys, errno, json
            M = sys.argv[1]
            written, failed = {}, None
            i = 0
            while True:
                data = os.urandom(60000 + i)
                try:
                    with open(f"{M}/f{i}", "wb") as f: f.write(data)
                except OSError as e:
                    assert e.errno == errno.ENOSPC, e
                    failed = f"f{i}"
                    break
                written[f"f{i}"] = data
                i += 1
            assert len(written) >= 20, len(written)
            # Appending to an existing file until the disk refuses.
            original, appended = written["f0"], 0
            with open(f"{M}/f0", "ab", buffering=0) as f:
                try:
                    while True:
                        appended += f.write(b"a" * 7000)  # a short count is a partial write
                except OSError as e:
                    assert e.errno == errno.ENOSPC, e
            # Everything written before reads back exactly; the file whose
            # write failed, and the appended file, read without EIO.
            for name, data in written.items():
                got = open(f"{M}/{name}", "rb").read()
                if name == "f0":
                    assert got[:len(original)] == original and len(got) == len(original) + appended, (len(got), appended)
                    assert set(got[len(original):]) <= {ord("a")}
                else:
                    assert got == data, name
            if os.path.exists(f"{M}/{failed}"):
                open(f"{M}/{failed}", "rb").read()
            # Room again: delete half, and files can be written and read.
            for name in list(written)[1::2]: os.remove(f"{M}/{name}")
            with open(f"{M}/after", "wb") as f: f.write(b"room again")
            assert open(f"{M}/after", "rb").read() == b"room again"
            print(json.dumps({"created": len(written) + 1}))
            """.write(toFile: script, atomically: true, encoding: .utf8)
        let fill = try sh("python3 \(q(script)) \(q(mnt))")
        #expect(fill.ok, "\(fill.stderr)")
        let created = (try? JSONSerialization.jsonObject(with: Data(fill.stdout.utf8)) as? [String: Int])?["created"] ?? 0

        #expect(try sh("\(k) umount \(q(mnt))").ok)
        // The usage-index entries and audit records of the full-disk minutes
        // were kept and written once there was room: fsck finds the index
        // exact and the log verifies, with a data-key record per file.
        let fsck = try sh("\(k) fsck \(q(cipher)) \(p) 2>&1")
        #expect(fsck.ok, "\(fsck.stdout)")
        #expect(fsck.stdout.contains("0 added, 0 removed, 0 changed"), "\(fsck.stdout)")
        let verify = try sh("\(k) audit verify --fs \(q(cipher)) \(p) 2>&1")
        #expect(verify.ok && verify.stdout.contains("chain intact"), "\(verify.stdout)")
        let keystore = cipher + "/.kmsfs/keystore.db"
        let generated = try sh("sqlite3 \(q(keystore)) \"SELECT count(*) FROM audit_log WHERE event = 'GenerateDataKey' AND outcome = 'success'\"")
        #expect((Int(generated.stdout.trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0) >= created, "\(generated.stdout) < \(created)")
    }
}
