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

    @Test("alerts as AWS Security Finding Format findings (the AWS CLI validates them against Security Hub's model and moto imports them) and as OCSF Detection Findings; audit export --format ocsf writes OCSF API Activity events")
    func securityFindingFormats() throws {
        let moto = try MotoServer()
        let fs = try MountedFS()
        let setpriv = "setpriv --reuid 4242 --regid 4242 --clear-groups"
        let bad = try fs.run("$K audit alerts --format asff --fs $M")
        #expect(!bad.ok && bad.stderr.contains("--asff-account"), "\(bad.stderr)")
        #expect(try fs.run("""
            mkdir -p $T && $K audit alerts --syslog off --jsonl $T/asff.jsonl --command "cat >> $T/asff-command.jsonl" --format asff --asff-account 123456789012 --asff-region eu-west-1 --fs $M >/dev/null
            for i in 1 2 3 4 5 6; do \(setpriv) $K key list --fs $M 2>/dev/null || true; done
            $K audit list --limit 1 --fs $M >/dev/null
            $K audit alerts --jsonl $T/ocsf.jsonl --command '' --format ocsf --fs $M >/dev/null
            echo data > $M/f && $K key disable alias/default --fs $M && { cat $M/f 2>/dev/null || true; } && $K key enable alias/default --fs $M
            $K audit list --limit 1 --fs $M >/dev/null
            """).ok)
        let findings = try String(contentsOfFile: fs.root + "/tmp/asff.jsonl", encoding: .utf8).split(separator: "\n").map { jsonObject(String($0)) }
        #expect(findings.count == 1 && findings.first?["GeneratorId"] as? String == "kmsfs-denial-burst"
                && (findings.first?["Severity"] as? [String: Any])?["Label"] as? String == "HIGH"
                && findings.first?["AwsAccountId"] as? String == "123456789012", "\(findings)")
        // The AWS CLI checks each finding against Security Hub's API model before sending it; moto then imports it.
        let imported = try sh("""
            cd \(q(fs.root))/tmp && python3 -c 'import json,sys; print(json.dumps([json.loads(l) for l in open("asff.jsonl")]))' > batch.json
            AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing aws --endpoint-url \(moto.endpoint) --region eu-west-1 securityhub batch-import-findings --findings file://batch.json --output json
            """)
        let counts = jsonObject(imported.stdout)
        #expect(imported.ok && counts["SuccessCount"] as? Int == 1 && counts["FailedCount"] as? Int == 0, "\(imported.stdout) \(imported.stderr)")
        #expect(try String(contentsOfFile: fs.root + "/tmp/asff-command.jsonl", encoding: .utf8).contains("\"SchemaVersion\":\"2018-10-08\""))
        let ocsf = try String(contentsOfFile: fs.root + "/tmp/ocsf.jsonl", encoding: .utf8).split(separator: "\n").map { jsonObject(String($0)) }
        #expect(ocsf.count == 1 && ocsf.first?["class_uid"] as? Int == 2004 && ocsf.first?["type_uid"] as? Int == 200401
                && (ocsf.first?["finding_info"] as? [String: Any])?["types"] as? [String] == ["key-state"]
                && ((ocsf.first?["metadata"] as? [String: Any])?["product"] as? [String: Any])?["name"] as? String == "kmsfs", "\(ocsf)")
        // The audit trail as OCSF API Activity: every record typed, timed in ms, the failures marked.
        let events = try fs.run("$K audit export --format ocsf --fs $M").stdout.split(separator: "\n").map { jsonObject(String($0)) }
        let records = jsonArray(try fs.run("$K audit list --json --limit 100000 --fs $M").stdout)
        #expect(events.count == records.count && !events.isEmpty)
        #expect(events.allSatisfy { e in
            let activity = e["activity_id"] as? Int ?? -1
            return e["class_uid"] as? Int == 6003 && e["category_uid"] as? Int == 6 && e["type_uid"] as? Int == 600300 + activity
                && [1, 2, 3, 4, 99].contains(activity) && (e["time"] as? Int ?? 0) > 1_600_000_000_000
                && (e["api"] as? [String: Any])?["operation"] is String && e["actor"] != nil && e["src_endpoint"] != nil && e["cloud"] != nil
        }, "\(events.prefix(3))")
        let denied = events.filter { (($0["actor"] as? [String: Any])?["user"] as? [String: Any])?["uid"] as? String == "4242" && $0["status_id"] as? Int == 2 }
        #expect(denied.count >= 5 && denied.allSatisfy { $0["status_detail"] as? String == "denied" }, "\(denied.prefix(2))")
        #expect(events.contains { ($0["api"] as? [String: Any])?["operation"] as? String == "CreateKey" && $0["activity_id"] as? Int == 1 })
    }
}
