import Foundation
import Testing

/// moto's AWS KMS in server mode on 127.0.0.1, started for a test and
/// stopped when released (on failure too). `aws` runs the AWS CLI against it.
final class MotoServer {
    let port: Int
    let process = Process()
    var endpoint: String { "http://127.0.0.1:\(port)" }

    init() throws {
        port = Int(try sh("python3 -c 'import socket; s=socket.socket(); s.bind((\"127.0.0.1\", 0)); print(s.getsockname()[1])'")
            .stdout.trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0
        let server = try sh("command -v moto_server").stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        process.executableURL = URL(fileURLWithPath: server.isEmpty ? "/usr/local/bin/moto_server" : server)
        process.arguments = ["-H", "127.0.0.1", "-p", String(port)]
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        let up = try eventually(within: 30) { try sh("curl -s -o /dev/null \(endpoint)/ || python3 -c 'import urllib.request; urllib.request.urlopen(\"\(endpoint)/\")'").ok }
        precondition(up, "moto_server did not start on port \(port)")
    }

    deinit { stop() }

    /// Runs the AWS CLI against this server.
    func aws(_ arguments: String) throws -> Output {
        try sh("aws --endpoint-url \(endpoint) --region us-east-1 \(arguments)")
    }

    /// A new symmetric key in moto's KMS; its key id.
    func createKey() throws -> String {
        try aws("kms create-key --query KeyMetadata.KeyId --output text").stdout.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// Stops the server (to test an unreachable KMS). moto_server's SIGTERM
    /// handler exits only its main thread, so it is killed outright.
    func stop() {
        guard process.isRunning else { return }
        kill(process.processIdentifier, SIGKILL)
        process.waitUntilExit()
    }
}

/// Shell lines (for `MountedFS.run`) that sign `../msg` with `alias`, check the
/// signature with openssl against `get-public-key`'s PEM and with `key
/// verify`, and show `key verify` refusing it for an altered message: they
/// print "Verified OK", "valid signature" and the refusal.
func signingRoundTrip(_ alias: String, digest: String) -> String {
    """
    $K key sign \(alias) --message-file ../msg --out ../sig --fs $M >/dev/null
    $K key get-public-key \(alias) --fs $M > ../pub.pem
    openssl dgst -\(digest) -verify ../pub.pem -signature ../sig ../msg
    $K key verify \(alias) --message-file ../msg --signature-file ../sig --fs $M
    { echo altered; cat ../msg; } > ../msg2
    $K key verify \(alias) --message-file ../msg2 --signature-file ../sig --fs $M 2>&1; rm -f ../msg2
    """
}

@Suite("keys held in AWS KMS (moto): files unaware, per-file cost local, KMS's key state enforced by kmsfs", .serialized)
struct ExternalKeyTests {
    /// The daemon reads external keys' state every 2 s in these tests (60 s by default).
    static let polling = "env KMSFS_EXTERNAL_POLL_SECONDS=2"
    init() {
        // Credentials as the AWS CLI reads them; moto accepts any. The daemon
        // inherits them from `kmsfs mount`.
        setenv("AWS_ACCESS_KEY_ID", "testing", 1)
        setenv("AWS_SECRET_ACCESS_KEY", "testing", 1)
        setenv("AWS_DEFAULT_REGION", "us-east-1", 1)
    }

    /// A mounted filesystem with `alias/aws` on a new moto key, bound to /sec.
    func setUp(_ moto: MotoServer) throws -> (MountedFS, String) {
        let kid = try moto.createKey()
        let fs = try MountedFS(launcher: Self.polling)
        let created = try fs.run("$K key create --alias alias/aws --provider aws-kms --external-key \(kid) --endpoint-url \(moto.endpoint) --fs $M && mkdir sec && $K key bind /sec alias/aws --fs $M")
        #expect(created.ok, "\(created.stderr)")
        return (fs, kid)
    }

    @Test("key create --provider aws-kms checks the key in KMS and describe shows it; 200 files in a bound directory read back after a remount, wrapped under one intermediate key (one GenerateDataKey, not 200)")
    func filesUnaware() throws {
        let moto = try MotoServer()
        let (fs, kid) = try setUp(moto)
        let described = jsonObject(try fs.run("$K key describe alias/aws --json --fs $M").stdout)
        let external = described["externalKey"] as? [String: Any]
        #expect(described["provider"] as? String == "aws-kms" && (external?["arn"] as? String)?.hasSuffix("key/\(kid)") == true, "\(described)")
        #expect(try fs.run("$K key describe alias/aws --fs $M").stdout.contains("provider:      aws-kms: arn:aws:kms:us-east-1:"))
        let wrote = try fs.run("for i in $(seq 1 200); do echo \"secret $i\" > sec/f$i; done; cp /etc/services sec/services; tar -cf - -C /usr/share/doc/sqlite3 . | tar -xf - -C sec")
        #expect(wrote.ok, "\(wrote.stderr)")
        try fs.unmount()
        try fs.mount()
        let read = try fs.run("cat sec/f137; cmp sec/services /etc/services && echo same; diff -r /usr/share/doc/sqlite3 sec --exclude='f*' --exclude=services >/dev/null && echo tree")
        #expect(read.stdout == "secret 137\nsame\ntree\n", "\(read.stdout) \(read.stderr)")
        let intermediates = try sh("sqlite3 \(q(fs.keystore)) 'SELECT COUNT(*) FROM intermediate_keys'").stdout
        #expect(intermediates == "1\n", "\(intermediates)")
        // A key kmsfs cannot use (asymmetric ENCRYPT_DECRYPT), or a key KMS does not have, is refused at creation.
        let asymmetric = try moto.aws("kms create-key --key-usage ENCRYPT_DECRYPT --key-spec RSA_2048 --query KeyMetadata.KeyId --output text").stdout
            .trimmingCharacters(in: .whitespacesAndNewlines)
        let refused = try fs.run("$K key create --alias alias/sign --provider aws-kms --external-key \(asymmetric) --endpoint-url \(moto.endpoint) --fs $M")
        #expect(!refused.ok && refused.stderr.contains("is a RSA_2048 ENCRYPT_DECRYPT key; kmsfs uses symmetric ENCRYPT_DECRYPT keys"), "\(refused.stderr)")
        let missing = try fs.run("$K key create --alias alias/none --provider aws-kms --external-key 11111111-2222-3333-4444-555555555555 --endpoint-url \(moto.endpoint) --fs $M")
        #expect(!missing.ok && missing.stderr.contains("aws-kms: NotFoundException") && missing.stderr.contains("--region"), "\(missing.stderr)")
    }

    @Test("a key disabled in KMS behind kmsfs's back refuses with EKEYREVOKED within one poll (moto itself would still decrypt), audited; enabled again, files open again")
    func externalStateEnforced() throws {
        let moto = try MotoServer()
        let (fs, kid) = try setUp(moto)
        #expect(try fs.run("echo before > sec/a && cat sec/a").stdout == "before\n")
        #expect(try moto.aws("kms disable-key --key-id \(kid)").ok)
        let revoked = try eventually(within: 20) {
            try fs.python("""
                try:
                    open('sec/a').read(); print('read')
                except OSError as e:
                    print(errno.errorcode[e.errno])
                """).stdout == "EKEYREVOKED\n"
        }
        #expect(revoked)
        let create = try fs.run("sh -c 'echo x > sec/new' 2>&1 || true").stdout
        #expect(create.contains("Key has been revoked"), "\(create)")
        let audit = try fs.run("$K audit list --json --fs $M").stdout
        #expect(audit.contains("ExternalKeyStateChange") && audit.contains("is Disabled"), "\(audit.suffix(600))")
        #expect(try moto.aws("kms enable-key --key-id \(kid)").ok)
        #expect(try eventually(within: 20) { try fs.run("cat sec/a").stdout == "before\n" })
        // Files under the local default key never depended on KMS.
        #expect(try fs.run("echo local > l && cat l").stdout == "local\n")
    }

    @Test("KMS unreachable: files already open keep working from the cached key, a new one fails within the bounded retries with an error naming aws-kms and the remedy, audited; nothing is lost")
    func unreachable() throws {
        let moto = try MotoServer()
        let (fs, _) = try setUp(moto)
        #expect(try fs.run("echo kept > sec/kept").ok)
        let script = fs.root + "/tmp/hold.py"
        try FileManager.default.createDirectory(atPath: fs.root + "/tmp", withIntermediateDirectories: true)
        // Holds sec/kept open across the outage and reads it after, through the same descriptor.
        try """
            import os, sys, time
            fd = os.open(sys.argv[1], os.O_RDONLY)
            print(os.pread(fd, 100, 0).decode(), end="", flush=True)
            sys.stdin.readline()
            print(os.pread(fd, 100, 0).decode(), end="", flush=True)
            """.write(toFile: script, atomically: true, encoding: .utf8)
        let holder = Process()
        holder.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        holder.arguments = ["python3", script, fs.mountpoint + "/sec/kept"]
        let input = Pipe(), output = Pipe()
        holder.standardInput = input
        holder.standardOutput = output
        try holder.run()
        defer { if holder.isRunning { holder.terminate() } }
        #expect(String(decoding: output.fileHandleForReading.availableData, as: UTF8.self) == "kept\n")
        moto.stop()
        let started = Date()
        let failed = try fs.run("$K key create --alias alias/later --provider aws-kms --external-key x --endpoint-url \(moto.endpoint) --fs $M")
        #expect(!failed.ok && failed.stderr.contains("aws-kms: Unreachable") && failed.stderr.contains("--endpoint-url"), "\(failed.stderr)")
        #expect(Date().timeIntervalSince(started) < 40, "retries are bounded")
        input.fileHandleForWriting.write("\n".data(using: .utf8)!)
        holder.waitUntilExit()
        #expect(String(decoding: output.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self) == "kept\n")
        #expect(try fs.run("echo local > l && cat l").stdout == "local\n")
    }

    @Test("strict mode (--strict): KMS wraps every data key itself — no intermediate keys, files read back after a remount, describe says so")
    func strictMode() throws {
        let moto = try MotoServer()
        let kid = try moto.createKey()
        let fs = try MountedFS(launcher: Self.polling)
        let created = try fs.run("$K key create --alias alias/strict --provider aws-kms --strict --external-key \(kid) --endpoint-url \(moto.endpoint) --fs $M && mkdir s && $K key bind /s alias/strict --fs $M")
        #expect(created.ok, "\(created.stderr)")
        #expect(try fs.run("$K key describe alias/strict --fs $M").stdout.contains("strict: KMS wraps every data key"))
        #expect(try fs.run("for i in $(seq 1 20); do echo \"strict $i\" > s/f$i; done").ok)
        try fs.unmount()
        try fs.mount()
        #expect(try fs.run("cat s/f7 s/f20").stdout == "strict 7\nstrict 20\n")
        #expect(try sh("sqlite3 \(q(fs.keystore)) 'SELECT COUNT(*) FROM intermediate_keys'").stdout == "0\n")
        let local = try fs.run("$K key create --alias alias/bad --strict --fs $M")
        #expect(!local.ok && local.stderr.contains("go with --provider aws-kms"), "\(local.stderr)")
    }

    @Test("init --unlock aws-kms:KEY: mount, key commands and fsck need no passphrase; passwd switches to a passphrase and back; a key disabled in KMS refuses to unlock with a clear error")
    func unlockThroughKMS() throws {
        let moto = try MotoServer()
        let kid = try moto.createKey()
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("kmsfs-unlock-\(UUID().uuidString.prefix(8))").path
        try FileManager.default.createDirectory(atPath: root + "/m", withIntermediateDirectories: true)
        defer {
            _ = try? sh("fusermount3 -u \(q(root))/m 2>/dev/null || true")
            try? FileManager.default.removeItem(atPath: root)
        }
        let k = q(kmsfsBinary), c = q(root + "/c"), m = q(root + "/m")
        let made = try sh("""
            \(k) init \(c) --unlock aws-kms:\(kid) --endpoint-url \(moto.endpoint) --kdf-log-n 10 </dev/null >/dev/null
            stat -c %a \(c)/.kmsfs/unlock.json
            \(k) mount \(c) \(m) </dev/null && echo secret > \(m)/f && cat \(m)/f
            \(k) key list --fs \(m) | grep -c alias/default
            \(k) umount \(m)
            \(k) key list --fs \(c) </dev/null | grep -c alias/default
            \(k) fsck \(c) </dev/null | grep -c 'no damage'
            """)
        #expect(made.stdout == "600\nsecret\n1\n1\n1\n", "\(made.stdout) \(made.stderr)")
        // To a passphrase (the unlock file goes), and back to KMS.
        let switched = try sh("""
            echo 'a passphrase for later' > \(q(root))/pw
            \(k) passwd \(c) --new-passphrase-file \(q(root))/pw </dev/null
            test ! -e \(c)/.kmsfs/unlock.json && echo gone
            \(k) key list --fs \(c) --passphrase-file \(q(root))/pw | grep -c alias/default
            \(k) passwd \(c) --passphrase-file \(q(root))/pw --unlock aws-kms:\(kid) --endpoint-url \(moto.endpoint) </dev/null
            \(k) key list --fs \(c) </dev/null | grep -c alias/default
            \(k) key list --fs \(c) --passphrase-file \(q(root))/pw 2>&1 | grep -c 'wrong passphrase'
            """)
        #expect(switched.stdout.contains("gone\n1\n") && switched.stdout.hasSuffix("no passphrase opens it\n1\n1\n"), "\(switched.stdout) \(switched.stderr)")
        #expect(try moto.aws("kms disable-key --key-id \(kid)").ok)
        let refused = try sh("\(k) mount \(c) \(m) </dev/null")
        #expect(!refused.ok && refused.stderr.contains("aws-kms: DisabledException") && refused.stderr.contains("enable it in AWS KMS"), "\(refused.stderr)")
    }

    @Test("SIGN_VERIFY keys held in AWS KMS: the spec is KMS's, Sign and Verify are KMS calls, openssl verifies the signature with get-public-key's PEM; a wrong --spec is refused; describe shows KMS's own rotation (GetKeyRotationStatus)")
    func signingAndRotationStatus() throws {
        let moto = try MotoServer()
        let fs = try MountedFS(launcher: Self.polling)
        try "a release to sign\n".write(toFile: fs.root + "/msg", atomically: true, encoding: .utf8)
        for (spec, digest) in [("ECC_NIST_P256", "sha256"), ("ECC_NIST_P384", "sha384"), ("RSA_2048", "sha256")] {
            let kid = try moto.aws("kms create-key --key-usage SIGN_VERIFY --key-spec \(spec) --query KeyMetadata.KeyId --output text").stdout
                .trimmingCharacters(in: .whitespacesAndNewlines)
            let alias = "alias/sign-" + spec.lowercased()
            let made = try fs.run("""
                $K key create --alias \(alias) --provider aws-kms --external-key \(kid) --endpoint-url \(moto.endpoint) --fs $M >/dev/null
                $K key describe \(alias) --json --fs $M | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["metadata"]["spec"], d["provider"])'
                \(signingRoundTrip(alias, digest: digest))
                """)
            #expect(made.stdout == "\(spec) aws-kms\nVerified OK\nvalid signature\nkmsfs: the signature is not valid for this message and key\n",
                    "\(spec): \(made.stdout) \(made.stderr)")
        }
        let calls = try fs.run("$K audit list --json --limit 500 --fs $M").stdout
        let events = jsonArray(calls).compactMap { $0["event"] as? String }
        let table = try fs.run("$K audit list --limit 40 --fs $M").stdout
        #expect(events.filter { $0 == "Sign" }.count == 3 && events.filter { $0 == "Verify" }.count == 6, "\(events) \(table)")
        // A symmetric key is not a signing key, whatever --spec says; KMS's rotation shows in describe.
        let kid = try moto.createKey()
        let wrong = try fs.run("$K key create --alias alias/x --spec RSA_2048 --provider aws-kms --external-key \(kid) --endpoint-url \(moto.endpoint) --fs $M")
        #expect(!wrong.ok && wrong.stderr.contains("is AES_256 (ENCRYPT_DECRYPT), not RSA_2048"), "\(wrong.stderr)")
        #expect(try moto.aws("kms enable-key-rotation --key-id \(kid)").ok)
        #expect(try fs.run("$K key create --alias alias/rotating --provider aws-kms --external-key \(kid) --endpoint-url \(moto.endpoint) --fs $M").ok)
        let on = jsonObject(try fs.run("$K key describe alias/rotating --json --fs $M").stdout)["externalRotation"] as? [String: Any]
        #expect(on?["enabled"] as? Bool == true, "\(String(describing: on))")
        #expect(try fs.run("$K key describe alias/rotating --fs $M").stdout.contains("in AWS KMS:    material rotation on"))
        #expect(try moto.aws("kms disable-key-rotation --key-id \(kid)").ok)
        let off = jsonObject(try fs.run("$K key describe alias/rotating --json --fs $M").stdout)["externalRotation"] as? [String: Any]
        #expect(off?["enabled"] as? Bool == false, "\(String(describing: off))")
    }

    @Test("strict keys rekey through ReEncrypt: after a rotation, a live rewrap moves every data key to the new version inside KMS (audited via aws-kms:ReEncrypt), and the files read the same after a remount")
    func strictReEncrypt() throws {
        let moto = try MotoServer()
        let kid = try moto.createKey()
        let fs = try MountedFS(launcher: Self.polling)
        #expect(try fs.run("$K key create --alias alias/strict --provider aws-kms --strict --external-key \(kid) --endpoint-url \(moto.endpoint) --fs $M >/dev/null && mkdir s && $K key bind /s alias/strict --fs $M").ok)
        #expect(try fs.run("for i in $(seq 1 12); do head -c $((i * 3000)) /etc/services > s/f$i; done").ok)
        let sum = try fs.run("cat s/* | md5sum").stdout
        #expect(try fs.run("$K key rotate alias/strict --fs $M").ok)
        #expect(try fs.run("$K rekey start --key alias/strict:1 --path /s --fs $M").ok)
        let job = try waitForRekey(fs)
        let trail = try fs.run("$K audit list --fs $M | tail -6").stdout
        #expect(job["state"] as? String == "done", "\(job) \(trail)")
        let records = try fs.run("$K audit export --format jsonl --fs $M").stdout.split(separator: "\n").map { jsonObject(String($0)) }
        let moved = records.filter { $0["eventName"] as? String == "ReEncrypt" }
        #expect(moved.count == 12 && moved.allSatisfy { ($0["requestParameters"] as? [String: Any])?["via"] as? String == "aws-kms:ReEncrypt" },
                "\(moved.count) \(moved.first ?? [:])")
        let usage = jsonObject(try fs.run("$K key describe alias/strict --json --fs $M").stdout)["versions"] as? [[String: Any]] ?? []
        #expect(usage.map { $0["usageCount"] as? Int ?? -1 } == [0, 12], "\(usage)")
        try fs.unmount()
        try fs.mount()
        #expect(try fs.run("cat s/* | md5sum").stdout == sum)
    }

    @Test("rekey, live: files move from the local default key onto the AWS KMS key and back, and read the same throughout")
    func rekeyBetweenProviders() throws {
        let moto = try MotoServer()
        let (fs, _) = try setUp(moto)
        #expect(try fs.run("mkdir data && for i in $(seq 1 30); do head -c $((i * 1000)) /etc/services > data/f$i; done").ok)
        let sum = try fs.run("cat data/* | md5sum").stdout
        #expect(try fs.run("$K rekey start --key alias/default --to alias/aws --path /data --fs $M").ok)
        let first = try waitForRekey(fs)
        let firstTrail = try fs.run("$K audit list --fs $M | tail -8").stdout
        #expect(first["state"] as? String == "done", "\(first) \(firstTrail)")
        #expect(try sh("sqlite3 \(q(fs.keystore)) 'SELECT COUNT(*) FROM usage u JOIN aliases a ON a.key_id = u.key_id WHERE a.alias = \"alias/aws\"'").stdout != "0\n")
        #expect(try fs.run("cat data/* | md5sum").stdout == sum)
        #expect(try fs.run("$K rekey start --key alias/aws --to alias/default --path /data --fs $M").ok)
        let back = try waitForRekey(fs)
        let trail = try fs.run("$K audit list --fs $M | tail -8").stdout
        #expect(back["state"] as? String == "done", "\(back) \(trail)")
        try fs.unmount()
        try fs.mount()
        #expect(try fs.run("cat data/* | md5sum").stdout == sum)
    }
}

@Suite("keys held in a PKCS#11 token (SoftHSM): generated inside it, non-extractable, data keys wrapped inside it", .serialized)
struct PKCS11KeyTests {
    static let module = "/usr/lib/softhsm/libsofthsm2.so"

    /// A SoftHSM token "kmsfs-test" (user PIN in `hsm/pin`, a wrong one in
    /// `hsm/wrong`) in `root/hsm`, found through SOFTHSM2_CONF, which the
    /// daemon inherits from `kmsfs mount`.
    static func makeToken(in root: String) throws -> String {
        let hsm = root + "/hsm"
        try FileManager.default.createDirectory(atPath: hsm + "/tokens", withIntermediateDirectories: true)
        try "directories.tokendir = \(hsm)/tokens\nobjectstore.backend = file\nlog.level = ERROR\n".write(toFile: hsm + "/softhsm2.conf", atomically: true, encoding: .utf8)
        setenv("SOFTHSM2_CONF", hsm + "/softhsm2.conf", 1)
        let made = try sh("softhsm2-util --init-token --free --label kmsfs-test --pin 4321 --so-pin 8765 >/dev/null && printf '4321\\n' > \(q(hsm))/pin && chmod 600 \(q(hsm))/pin && printf '0000\\n' > \(q(hsm))/wrong")
        precondition(made.ok, "softhsm2-util: \(made.stderr)")
        return hsm
    }

    @Test("key create --provider pkcs11 makes a non-extractable, sensitive AES-256 key in the token (pkcs11-tool agrees); files in a bound directory read back after a remount, under one intermediate key the token sealed (or, --strict, each wrapped by the token); a wrong PIN is a clear error")
    func tokenKey() throws {
        let fs = try MountedFS()
        let hsm = try Self.makeToken(in: fs.root)
        try fs.unmount()
        try fs.mount()
        let created = try fs.run("$K key create --alias alias/hsm --provider pkcs11 --module \(Self.module) --token kmsfs-test --pin-file \(q(hsm))/pin --fs $M >/dev/null && mkdir h && $K key bind /h alias/hsm --fs $M && $K key describe alias/hsm --fs $M | grep provider")
        #expect(created.ok && created.stdout.contains("pkcs11: key 'kmsfs-") && created.stdout.contains("in token 'kmsfs-test'"), "\(created.stdout) \(created.stderr)")
        #expect(try fs.run("for i in $(seq 1 50); do echo \"hsm $i\" > h/f$i; done; cp /etc/services h/services").ok)
        try fs.unmount()
        try fs.mount()
        #expect(try fs.run("cat h/f42; cmp h/services /etc/services && echo same").stdout == "hsm 42\nsame\n")
        let objects = try sh("pkcs11-tool --module \(Self.module) --token-label kmsfs-test --login --pin 4321 --list-objects 2>/dev/null").stdout
        #expect(objects.contains("Secret Key Object; AES length 32") && objects.contains("never extractable") && objects.contains("sensitive"), "\(objects)")
        // 51 files, one intermediate key sealed by the token (one C_Encrypt for the lot).
        #expect(try sh("sqlite3 \(q(fs.keystore)) 'SELECT COUNT(*) FROM intermediate_keys'").stdout == "1\n")
        // --strict: the token wraps each data key itself; no intermediate key.
        let strict = try fs.run("$K key create --alias alias/hsm-strict --strict --provider pkcs11 --module \(Self.module) --token kmsfs-test --pin-file \(q(hsm))/pin --fs $M >/dev/null && mkdir hs && $K key bind /hs alias/hsm-strict --fs $M && for i in 1 2 3; do echo \"strict $i\" > hs/f$i; done && $K key describe alias/hsm-strict --fs $M | grep provider")
        #expect(strict.stdout.contains("strict: the token wraps every data key"), "\(strict.stdout) \(strict.stderr)")
        #expect(try sh("sqlite3 \(q(fs.keystore)) 'SELECT COUNT(*) FROM intermediate_keys'").stdout == "1\n")
        try fs.unmount()
        try fs.mount()
        #expect(try fs.run("cat hs/f2 h/f7").stdout == "strict 2\nhsm 7\n")
        // Offline, so the login is this process's own (PKCS#11 logins are per process and token).
        try fs.unmount()
        let wrong = try fs.key(["create", "--alias", "alias/hsm2", "--provider", "pkcs11", "--module", Self.module, "--token", "kmsfs-test",
                                "--pin-file", hsm + "/wrong"])
        #expect(!wrong.ok && wrong.stderr.contains("pkcs11: TokenUnavailable") && wrong.stderr.contains("wrong PIN"), "\(wrong.stderr)")
        let noToken = try fs.key(["create", "--alias", "alias/hsm3", "--provider", "pkcs11", "--module", Self.module, "--token", "nosuch",
                                  "--pin-file", hsm + "/pin"])
        #expect(!noToken.ok && noToken.stderr.contains("no token labelled 'nosuch'"), "\(noToken.stderr)")
    }

    @Test("signing keys made inside the token (ECC_NIST_P256/P384 and RSA_2048): the private key is sensitive and never extractable (pkcs11-tool agrees), signatures are made by C_Sign and verify with openssl and kmsfs")
    func tokenSigningKeys() throws {
        let fs = try MountedFS()
        let hsm = try Self.makeToken(in: fs.root)
        try fs.unmount()
        try fs.mount()
        try "a release to sign\n".write(toFile: fs.root + "/msg", atomically: true, encoding: .utf8)
        for (spec, digest) in [("ECC_NIST_P256", "sha256"), ("ECC_NIST_P384", "sha384"), ("RSA_2048", "sha256")] {
            let alias = "alias/t-" + spec.lowercased()
            let made = try fs.run("""
                $K key create --alias \(alias) --spec \(spec) --provider pkcs11 --module \(Self.module) --token kmsfs-test --pin-file \(q(hsm))/pin --fs $M >/dev/null
                \(signingRoundTrip(alias, digest: digest))
                """)
            #expect(made.stdout == "Verified OK\nvalid signature\nkmsfs: the signature is not valid for this message and key\n", "\(spec): \(made.stdout) \(made.stderr)")
        }
        let objects = try sh("pkcs11-tool --module \(Self.module) --token-label kmsfs-test --login --pin 4321 --list-objects 2>/dev/null").stdout
        let privateKeys = objects.components(separatedBy: "Private Key Object").dropFirst()
        #expect(privateKeys.count == 3 && privateKeys.allSatisfy { $0.contains("never extractable") && $0.contains("sensitive") && $0.contains("sign") },
                "\(objects)")
        let wrong = try fs.run("$K key create --alias alias/t-x --spec ECC_NIST_P256 --provider pkcs11 --module \(Self.module) --token kmsfs-test --pin-file \(q(hsm))/pin --object-label nosuch --fs $M")
        #expect(!wrong.ok && wrong.stderr.contains("the token has no private key labelled 'nosuch'"), "\(wrong.stderr)")
    }

    @Test("init --unlock with a PKCS#11 URI: the token seals the unlock secret (a key is made there), mount and key commands need no passphrase, a PIN on the command line is refused, a wrong PIN is a clear error")
    func unlockThroughToken() throws {
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("kmsfs-p11unlock-\(UUID().uuidString.prefix(8))").path
        try FileManager.default.createDirectory(atPath: root + "/m", withIntermediateDirectories: true)
        defer {
            _ = try? sh("fusermount3 -u \(q(root))/m 2>/dev/null || true")
            try? FileManager.default.removeItem(atPath: root)
        }
        let hsm = try Self.makeToken(in: root)
        let k = q(kmsfsBinary), c = q(root + "/c"), m = q(root + "/m")
        let uri = "pkcs11:token=kmsfs-test;object=unlock?module-path=\(Self.module)&pin-source=file:\(hsm)/pin"
        let made = try sh("""
            \(k) init \(c) --unlock '\(uri)' --kdf-log-n 10 </dev/null >/dev/null
            stat -c %a \(c)/.kmsfs/unlock.json
            \(k) mount \(c) \(m) </dev/null && echo secret > \(m)/f && cat \(m)/f
            \(k) umount \(m)
            \(k) key list --fs \(c) </dev/null | grep -c alias/default
            """)
        #expect(made.stdout == "600\nsecret\n1\n", "\(made.stdout) \(made.stderr)")
        let objects = try sh("pkcs11-tool --module \(Self.module) --token-label kmsfs-test --login --pin 4321 --list-objects 2>/dev/null").stdout
        #expect(objects.contains("label:      unlock") && objects.contains("never extractable"), "\(objects)")
        let pinInline = try sh("\(k) init \(q(root))/c2 --unlock 'pkcs11:token=kmsfs-test?module-path=\(Self.module)&pin-value=4321' </dev/null")
        #expect(!pinInline.ok && pinInline.stderr.contains("a PIN is never given on the command line"), "\(pinInline.stderr)")
        #expect(try sh("cp \(q(hsm))/wrong \(q(hsm))/pin").ok)
        let wrongPIN = try sh("\(k) mount \(c) \(m) </dev/null")
        #expect(!wrongPIN.ok && wrongPIN.stderr.contains("pkcs11: TokenUnavailable") && wrongPIN.stderr.contains("wrong PIN"), "\(wrongPIN.stderr)")
    }

    @Test("a token removed while mounted is noticed within one poll: files under its key refuse with EKEYREVOKED, audited as ExternalKeyStateChange; other files are untouched")
    func tokenRemoved() throws {
        let fs = try MountedFS(launcher: ExternalKeyTests.polling)
        let hsm = try Self.makeToken(in: fs.root)
        try fs.unmount()
        try fs.mount()
        #expect(try fs.run("$K key create --alias alias/hsm --provider pkcs11 --module \(Self.module) --token kmsfs-test --pin-file \(q(hsm))/pin --fs $M >/dev/null && mkdir h && $K key bind /h alias/hsm --fs $M && echo in-token > h/a && echo plain > b").ok)
        #expect(try sh("softhsm2-util --delete-token --token kmsfs-test >/dev/null").ok)
        let refused = try eventually(within: 20) { try fs.run("cat h/a").stderr.contains("Key has been revoked") }
        let seen = try fs.run("cat h/a; $K audit list --fs $M | tail -4")
        #expect(refused, "\(seen.stdout) \(seen.stderr)")
        #expect(try fs.run("cat b").stdout == "plain\n")
        let audited = try fs.run("$K audit list --event ExternalKeyStateChange --json --fs $M").stdout
        #expect(jsonArray(audited).contains { $0["outcome"] as? String == "refused" && ($0["error"] as? String)?.contains("Unavailable") == true }, "\(audited)")
    }
}
