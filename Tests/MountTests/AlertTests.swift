import Foundation
import Testing

@Suite("alerts: each default rule fires once under its trigger and stays quiet under a normal workload", .serialized)
struct AlertTests {
    /// The alerts in the JSON-lines sink, by rule.
    func alerts(_ fs: MountedFS, _ file: String = "alerts.jsonl") throws -> [String] {
        let text = (try? String(contentsOfFile: fs.root + "/tmp/" + file, encoding: .utf8)) ?? ""
        return text.split(separator: "\n").compactMap { line in
            (try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])?["rule"] as? String
        }
    }

    @Test("quiet workload; then denial burst, disabled-key use, integrity failure, refused deletion and overdue rotation each alert once, to the file and the command")
    func rulesFireOnce() throws {
        let fs = try MountedFS()
        let configured = try fs.run("mkdir -p $T && $K audit alerts --syslog off --jsonl $T/alerts.jsonl --command \"cat >> $T/command.jsonl\" --fs $M")
        #expect(configured.ok, "\(configured.stderr)")
        // A normal workload raises nothing.
        let normal = try fs.run("""
            mkdir $M/d && for i in 1 2 3 4 5 6 7 8; do echo $i > $M/d/f$i; cat $M/d/f$i > /dev/null; done
            mv $M/d/f1 $M/d/g1 && rm $M/d/f2 && $K key rotate alias/default --fs $M && $K key list --fs $M > /dev/null
            """)
        #expect(normal.ok, "\(normal.stderr)")
        #expect(try alerts(fs) == [])

        // A burst of denials by one uid: six refused admin requests.
        let setpriv = "setpriv --reuid 4242 --regid 4242 --clear-groups"
        #expect(try fs.run("for i in 1 2 3 4 5 6; do \(setpriv) $K key list --fs $M 2>/dev/null || true; done").ok)
        // Use of a disabled key, three times.
        #expect(try fs.run("$K key disable alias/default --fs $M; for i in 1 2 3; do cat $M/d/f3 2>/dev/null || true; done; $K key enable alias/default --fs $M").ok)
        // An integrity failure, read twice.
        let ino = try fs.run("stat -c %i $M/d/f4").stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(try fs.run("""
            f=$(find $C -path $C/.kmsfs -prune -o -inum \(ino) -print)
            python3 -c 'import sys; f = open(sys.argv[1], "r+b"); f.seek(400); b = f.read(1)[0]; f.seek(400); f.write(bytes([b ^ 0xFF]))' "$f"  # flip, never a no-op
            cat $M/d/f4 2>/dev/null || true; cat $M/d/f4 2>/dev/null || true
            """).ok)
        #expect(try fs.run("$K audit list --limit 1 --fs $M").ok)  // the daemon has written them by now
        // A refused deletion and an overdue rotation, found by a later schedule check.
        #expect(try fs.run("""
            $K key create --alias alias/held --fs $M && $K key bind /d alias/held --fs $M && $K key schedule-deletion alias/held --days 7 --fs $M
            $K key create --alias alias/static --no-rotation --fs $M
            """).ok)
        try fs.unmount()
        let later = String(Int(Date().timeIntervalSince1970) + 400 * 86400)
        let checked = try sh("KMSFS_TEST_NOW=\(later) \(q(kmsfsBinary)) key list --fs \(q(fs.cipherdir)) --passphrase-file \(q(fs.passphraseFile))")
        #expect(checked.ok, "\(checked.stderr)")

        let fired = try alerts(fs)
        #expect(fired.sorted() == ["deletion-refused", "denial-burst", "integrity", "key-state", "rotation-overdue"], "\(fired)")
        let viaCommand = try alerts(fs, "command.jsonl")
        #expect(viaCommand.sorted() == fired.sorted(), "the command sink got the same alerts: \(viaCommand)")
    }
}
