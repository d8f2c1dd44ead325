import Foundation
import Testing

/// Polls `condition` until it holds or `seconds` pass (the daemon's scheduler ticks every second).
func eventually(within seconds: Double = 30, _ condition: () throws -> Bool) rethrows -> Bool {
    let deadline = Date().addingTimeInterval(seconds)
    while Date() < deadline {
        if try condition() { return true }
        Thread.sleep(forTimeInterval: 0.1)
    }
    return try condition()
}

/// A mount whose daemon reads its time from a file the test moves (debug builds only).
final class ClockedMount {
    let fs: MountedFS
    let clockFile: String
    private(set) var now: Double

    init(options: [String] = []) throws {
        fs = try MountedFS()
        try fs.unmount()
        clockFile = fs.root + "/clock"
        now = Date().timeIntervalSince1970.rounded()
        try String(now).write(toFile: clockFile, atomically: true, encoding: .utf8)
        try fs.mount(options: options, launcher: "env KMSFS_TEST_CLOCK_FILE=\(q(clockFile))")
    }

    /// Moves the daemon's clock (and that of commands run with `environment`).
    func advance(days: Double) throws {
        now += days * 86_400
        try String(now).write(toFile: clockFile, atomically: true, encoding: .utf8)
    }

    var environment: String { "KMSFS_TEST_CLOCK_FILE=\(q(clockFile))" }
}

func describe(_ fs: MountedFS, _ key: String) throws -> [String: Any] {
    jsonObject(try fs.run("$K key describe \(key) --json --fs $M").stdout)
}

@Suite("key features an AWS KMS user expects: schedules, rotations, signing, grants, cut-off, access review", .serialized)
struct KeyFeatureTests {
    @Test("a mounted filesystem runs its own schedules: a key rotates on time (AUTOMATIC) and a deletion window ends, with no command run; files from before and after read")
    func schedulesRunWhileMounted() throws {
        let clocked = try ClockedMount()
        let fs = clocked.fs
        #expect(try fs.run("""
            $K key create --alias alias/r --fs $M >/dev/null && mkdir $M/r && $K key bind /r alias/r --fs $M
            $K key create --alias alias/gone --fs $M >/dev/null && $K key schedule-deletion alias/gone --days 7 --fs $M >/dev/null
            echo before > $M/r/before
            """).ok)
        #expect((try describe(fs, "alias/r")["metadata"] as? [String: Any])?["currentVersion"] as? Int == 1)
        // A destroyed key loses its aliases: follow it by id.
        let gone = try #require((try describe(fs, "alias/gone")["metadata"] as? [String: Any])?["keyID"] as? String)
        try clocked.advance(days: 366)
        // Nothing is run against the keystore here but describe, which changes nothing:
        // the daemon notices the clock jump and runs the schedules itself.
        let rotated = try eventually { ((try describe(fs, "alias/r")["metadata"] as? [String: Any])?["currentVersion"] as? Int) == 2 }
        #expect(rotated, "the mounted key did not rotate on time")
        let destroyed = try eventually { ((try describe(fs, gone)["metadata"] as? [String: Any])?["state"] as? String) == "Destroyed" }
        #expect(destroyed, "the deletion window ended but the key was not destroyed")
        #expect(try fs.run("echo after > $M/r/after && cat $M/r/before $M/r/after").stdout == "before\nafter\n")
        let rotations = jsonArray(try fs.run("$K key rotations alias/r --json --fs $M").stdout)
        #expect(rotations.map { $0["rotationType"] as? String } == ["AUTOMATIC"], "\(rotations)")
        let versions = try describe(fs, "alias/r")["versions"] as? [[String: Any]] ?? []
        #expect(versions.map { $0["usageCount"] as? Int } == [1, 1], "one file under each version: \(versions)")
        // Both still read after a remount, whose schedule run changes nothing more.
        try fs.unmount()
        try fs.mount(launcher: "env \(clocked.environment)")
        #expect(try fs.run("cat $M/r/before $M/r/after").stdout == "before\nafter\n")
        #expect(jsonArray(try fs.run("$K key rotations alias/r --json --fs $M").stdout).count == 1)
    }

    @Test("key rotations lists each rotation's type; on-demand rotations leave the automatic schedule alone and stop at AWS's quota of 25 with a clear refusal")
    func rotationQuota() throws {
        let fs = try teamMount()
        let before = try describe(fs, "alias/team")["nextRotationAt"] as? String
        #expect(before != nil)
        let rotated = try fs.run("\(asTeam) bash -c 'for i in $(seq 25); do \(q(kmsfsBinary)) key rotate alias/team --fs \(q(fs.mountpoint)) >/dev/null || exit 1; done'")
        #expect(rotated.ok, "\(rotated.stderr)")
        let refused = try fs.run("\(asTeam) $K key rotate alias/team --fs $M")
        #expect(refused.status == 1 && refused.stderr.contains("25 on-demand rotations"), "\(refused.stderr)")
        let after = try describe(fs, "alias/team")
        #expect((after["metadata"] as? [String: Any])?["currentVersion"] as? Int == 26)
        #expect(after["nextRotationAt"] as? String == before, "on-demand rotations moved the automatic schedule")
        let list = jsonArray(try fs.run("$K key rotations alias/team --json --fs $M").stdout)
        #expect(list.count == 25 && list.allSatisfy { $0["rotationType"] as? String == "ON_DEMAND" })
        #expect(list.compactMap { $0["version"] as? Int } == Array(2...26))
        let table = try fs.run("$K key rotations alias/team --fs $M").stdout
        #expect(table.hasPrefix("VERSION") && table.contains("ON_DEMAND"))
        // The refusal is in the audit trail.
        let records = try fs.run("$K audit export --format jsonl --fs $M").stdout.split(separator: "\n").map { jsonObject(String($0)) }
        #expect(records.filter { $0["eventName"] as? String == "RotateKeyOnDemand" && $0["errorCode"] == nil }.count == 25)
        #expect(records.contains { $0["eventName"] as? String == "RotateKeyOnDemand" && $0["errorCode"] as? String == "ValidationException" })
    }

    @Test("sign, verify and get-public-key for ECC P-256/P-384/P-521 and RSA, over the socket as uid 4242 with its policy; openssl verifies the signatures; disabled keys and outsiders are refused")
    func signing() throws {
        let fs = try MountedFS()
        #expect(try fs.run("mkdir $T/team && chown 4242:4242 $T/team && printf 'release 1.2.3\\n' > $T/team/msg && chmod 644 $T/team/msg").ok)
        for (spec, digest) in [("ECC_NIST_P256", "sha256"), ("ECC_NIST_P384", "sha384"), ("ECC_NIST_P521", "sha512"), ("RSA_2048", "sha256")] {
            let alias = "alias/sig-" + spec.lowercased().replacingOccurrences(of: "_", with: "-")
            #expect(try fs.run("""
                $K key create --alias \(alias) --spec \(spec) --fs $M >/dev/null
                $K key policy \(alias) --grant encrypt uid:4242 --fs $M >/dev/null && $K key policy \(alias) --grant decrypt uid:4242 --fs $M >/dev/null
                """).ok)
            let signed = try fs.run("""
                cd $T/team
                \(asTeam) $K key sign \(alias) --message-file msg --out sig --fs $M
                \(asTeam) $K key get-public-key \(alias) --out pub.pem --fs $M
                \(asTeam) $K key get-public-key \(alias) --format der --out pub.der --fs $M
                stat -c %u sig
                openssl dgst -\(digest) -verify pub.pem -signature sig msg
                openssl pkey -pubin -inform DER -in pub.der -outform PEM | cmp - pub.pem && echo same-key
                \(asTeam) $K key verify \(alias) --message-file msg --signature-file sig --fs $M
                """)
            #expect(signed.ok, "\(spec): \(signed.stderr)")
            #expect(signed.stdout.contains("\n4242\n") && signed.stdout.contains("Verified OK") && signed.stdout.contains("same-key")
                    && signed.stdout.contains("valid signature"), "\(spec): \(signed.stdout)")
            let tampered = try fs.run("cd $T/team && cp msg other && echo x >> other && \(asTeam) $K key verify \(alias) --message-file other --signature-file sig --fs $M")
            #expect(tampered.status == 1 && tampered.stderr.contains("not valid"), "\(spec): \(tampered.stderr)")
            let outsider = try fs.run("cd $T/team && setpriv --reuid 4343 --regid 4343 --clear-groups $K key sign \(alias) --message-file msg --out /tmp/nope --fs $M")
            #expect(outsider.status == 1 && outsider.stderr.contains("may not"), "\(spec): \(outsider.stderr)")
        }
        // Holding encrypt and decrypt admits 4242 to the socket for key use only, not administration.
        let admin = try fs.run("\(asTeam) $K key disable alias/sig-rsa-2048 --fs $M")
        #expect(admin.status == 1 && admin.stderr.contains("may not administer this filesystem"), "\(admin.stderr)")
        let list = try fs.run("\(asTeam) $K key list --fs $M")
        #expect(list.status == 1 && list.stderr.contains("only key sign, verify, get-public-key and retiring its own grant"), "\(list.stderr)")
        #expect(try fs.run("$K key disable alias/sig-ecc-nist-p256 --fs $M >/dev/null").ok)
        let disabledSign = try fs.run("cd $T/team && $K key sign alias/sig-ecc-nist-p256 --message-file msg --out sig2 --fs $M")
        #expect(disabledSign.status != 0 && disabledSign.stderr.contains("Disabled"), "\(disabledSign.stderr)")
        let disabledVerify = try fs.run("cd $T/team && $K key verify alias/sig-ecc-nist-p256 --message-file msg --signature-file sig --fs $M")
        #expect(disabledVerify.status != 0 && disabledVerify.stderr.contains("Disabled"), "\(disabledVerify.stderr)")
        let aes = try fs.run("cd $T/team && $K key sign alias/default --message-file msg --out sig3 --fs $M")
        #expect(aes.status == 1 && aes.stderr.contains("not a SIGN_VERIFY key"), "\(aes.stderr)")
        // The daemon never wrote outside what the caller could: 4242 may not write into /root.
        let escape = try fs.run("cd $T/team && \(asTeam) $K key sign alias/sig-rsa-2048 --message-file msg --out /root/kmsfs-sig --fs $M")
        #expect(escape.status != 0 && !FileManager.default.fileExists(atPath: "/root/kmsfs-sig"))
        let records = try fs.run("$K audit export --format jsonl --fs $M").stdout.split(separator: "\n").map { jsonObject(String($0)) }
        let signs = records.filter { $0["eventName"] as? String == "Sign" && $0["errorCode"] == nil }
        #expect(signs.count >= 4 && signs.allSatisfy { ($0["requestParameters"] as? [String: String])?["signingAlgorithm"] != nil }, "\(signs)")
        #expect(records.contains { $0["eventName"] as? String == "Verify" && $0["errorCode"] != nil }, "the failed verification is audited")
    }

    @Test("a grant lets one uid use one key until it expires (with no command run) or is revoked; listed, audited, and shown in the access report")
    func grants() throws {
        let clocked = try ClockedMount(options: ["allow_other"])
        let fs = clocked.fs
        // uid 4242 may read the root's names (alias/default), so its path walk
        // to /g never depends on whether the kernel still caches the entry for
        // "g" that root looked up (it failed under load when that had expired).
        #expect(try fs.run("""
            $K key policy alias/default --grant decrypt uid:4242 --fs $M >/dev/null
            $K key create --alias alias/g --fs $M >/dev/null && mkdir $M/g && chmod 755 $M/g && $K key bind /g alias/g --fs $M
            echo shared > $M/g/f && chmod 644 $M/g/f
            """).ok)
        func read() throws -> String {
            let r = try fs.run("\(asTeam) cat $M/g/f 2>&1 || true")
            return r.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        }
        #expect(try read().contains("Permission denied"))
        let expires = Date(timeIntervalSince1970: clocked.now + 86_400).formatted(.iso8601)
        let created = try fs.run("$K key grant create alias/g --grantee uid:4242 --operations decrypt --expires \(expires) --fs $M")
        #expect(created.ok, "\(created.stderr)")
        let grantID = created.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(grantID.count == 32)
        #expect(try read() == "shared")
        // Decrypt only: the grantee may not create files under the key.
        #expect(try fs.run("\(asTeam) sh -c 'echo x > \(fs.mountpoint)/g/new' 2>&1 || true").stdout.contains("denied"))
        let listed = jsonArray(try fs.run("$K key grant list alias/g --json --fs $M").stdout)
        #expect(listed.count == 1 && listed.first?["grantee"] as? String == "uid:4242" && listed.first?["expirationDate"] as? String == expires, "\(listed)")
        let report = jsonArray(try fs.run("$K key access-report --json --fs $M").stdout)
        #expect(report.contains { $0["subject"] as? String == "uid:4242" && ($0["sources"] as? [String])?.first?.hasPrefix("grant \(grantID)") == true }, "\(report)")
        // Two days later it has expired: no command was run, the read is refused.
        try clocked.advance(days: 2)
        #expect(try read().contains("Permission denied"), "an expired grant still works")
        // The grantee may give a grant up itself (RetireGrant), over the socket; then it is refused again.
        let own = try fs.run("$K key grant create alias/g --grantee uid:4242 --operations decrypt --fs $M").stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(try read() == "shared")
        let retired = try fs.run("\(asTeam) $K key grant revoke alias/g \(own) --fs $M")
        #expect(retired.ok, "\(retired.stderr)")
        #expect(try read().contains("Permission denied"))
        // A new grant, then revoked by id: refused again.
        let second = try fs.run("$K key grant create alias/g --grantee uid:4242 --operations decrypt --fs $M").stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        let afterSecond = try read()
        let context = afterSecond == "shared" ? "" : try fs.run("$K key grant list alias/g --fs $M; $K audit list --fs $M | tail -6").stdout
        #expect(afterSecond == "shared", "\(afterSecond) \(context)")
        #expect(try fs.run("$K key grant revoke alias/g \(second) --fs $M").ok)
        #expect(try read().contains("Permission denied"))
        #expect(try fs.run("$K key grant revoke alias/g \(second) --fs $M").status == 1, "revoking twice is an error")
        // The grantee of a grant may not grant: administer is not an operation grants give.
        #expect(try fs.run("$K key grant create alias/g --grantee uid:4242 --operations administer --fs $M").status != 0)
        let records = try fs.run("$K audit export --format jsonl --fs $M").stdout.split(separator: "\n").map { jsonObject(String($0)) }
        let names = Set(records.compactMap { $0["eventName"] as? String })
        #expect(names.isSuperset(of: ["CreateGrant", "RevokeGrant", "RetireGrant"]), "\(names)")
        let used = records.filter { $0["eventName"] as? String == "Decrypt" && ($0["userIdentity"] as? [String: Any]).map { "\($0)".contains("4242") } == true }
        #expect(!used.isEmpty, "the grantee's reads are audited")
    }

    @Test("min-decryption-version cuts older versions off at once (EKEYREVOKED) and --clear undoes it; rekey still moves files off them")
    func minDecryptionVersion() throws {
        let fs = try MountedFS()
        #expect(try fs.run("$K key create --alias alias/m --fs $M >/dev/null && mkdir $M/m && $K key bind /m alias/m --fs $M && echo old > $M/m/old").ok)
        #expect(try fs.run("$K key rotate alias/m --fs $M >/dev/null && echo new > $M/m/new").ok)
        #expect(try fs.run("$K key min-decryption-version alias/m 2 --fs $M").stdout.contains("below 2 no longer decrypt"))
        let cut = try fs.run("cat $M/m/old 2>&1 || true").stdout
        #expect(cut.contains("revoked"), "\(cut)")
        #expect(try fs.run("cat $M/m/new").stdout == "new\n")
        #expect(try describe(fs, "alias/m")["minDecryptionVersion"] as? Int == 2)
        #expect(try fs.run("$K key describe alias/m --fs $M").stdout.contains("cut-off"))
        #expect(try fs.run("$K key min-decryption-version alias/m 3 --fs $M").status == 1, "no version 3 yet")
        #expect(try fs.run("$K key min-decryption-version alias/m --clear --fs $M").ok)
        #expect(try fs.run("cat $M/m/old").stdout == "old\n")
        // Cut off again; the rekey job moves the file onto version 2, and it reads under the cut-off.
        #expect(try fs.run("$K key min-decryption-version alias/m 2 --fs $M >/dev/null && $K rekey start --key alias/m:1 --fs $M >/dev/null").ok)
        let job = try waitForRekey(fs)
        #expect(job["state"] as? String == "done" && job["failures"] as? Int == 0, "\(job)")
        #expect(try fs.run("cat $M/m/old").stdout == "old\n")
        // Survives a remount (the floor is in the keystore, sealed).
        try fs.unmount()
        try fs.mount()
        #expect(try describe(fs, "alias/m")["minDecryptionVersion"] as? Int == 2)
        #expect(try fs.run("$K key min-decryption-version alias/m --clear --fs $M").ok)
        #expect(try describe(fs, "alias/m")["minDecryptionVersion"] == nil)
    }

    @Test("access-report lists who may do what by policy and grant, when each last used the key, and flags subjects unused for N days; non-root sees only keys it administers")
    func accessReport() throws {
        let clocked = try ClockedMount(options: ["allow_other"])
        let fs = clocked.fs
        #expect(try fs.run("""
            $K key create --alias alias/team --fs $M >/dev/null && $K key policy alias/team --grant administer uid:4242 --fs $M >/dev/null
            $K key policy alias/team --grant decrypt uid:5151 --fs $M >/dev/null
            mkdir $M/t && $K key bind /t alias/team --fs $M && echo t > $M/t/f
            """).ok)
        try clocked.advance(days: 100)
        #expect(try fs.run("cat $M/t/f").ok, "root uses the key on day 100")
        let report = jsonArray(try fs.run("$K key access-report --unused-days 90 --json --fs $M").stdout)
        func row(_ key: String, _ subject: String) -> [String: Any]? {
            report.first { ($0["aliases"] as? [String])?.contains(key) == true && $0["subject"] as? String == subject }
        }
        #expect(row("alias/team", "uid:0")?["unused"] as? Bool == false, "\(report)")
        #expect(row("alias/team", "uid:5151")?["unused"] as? Bool == true, "never used in 100 days")
        #expect(row("alias/team", "uid:4242")?["operations"] as? [String] == ["administer"])
        #expect(row("alias/default", "uid:0") != nil)
        let text = try fs.run("$K key access-report --unused-days 90 --fs $M").stdout
        #expect(text.contains("unused 90+ days"))
        let team = jsonArray(try fs.run("\(asTeam) $K key access-report --json --fs $M").stdout)
        #expect(!team.isEmpty && team.allSatisfy { ($0["aliases"] as? [String])?.contains("alias/team") == true }, "\(team)")
        #expect(try fs.run("$K key access-report --unused-days 0 --fs $M").status != 0)
    }
}
