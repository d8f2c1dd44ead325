import Foundation
import Testing

/// Runs as uid/gid 4242: an administrator of its own key only.
let asTeam = "setpriv --reuid 4242 --regid 4242 --clear-groups"

/// A mount with `alias/team`, created by root, administered by uid 4242.
func teamMount(options: [String] = []) throws -> MountedFS {
    let fs = try MountedFS(mountOptions: options)
    #expect(try fs.run("$K key create --alias alias/team --fs $M >/dev/null && $K key policy alias/team --grant administer uid:4242 --fs $M >/dev/null").ok)
    return fs
}

/// An initialised, unmounted filesystem for offline commands.
final class OfflineFS {
    let fs: MountedFS
    init() throws {
        fs = try MountedFS()
        try fs.unmount()
    }
    var cipherdir: String { fs.cipherdir }
    var passphraseFile: String { fs.passphraseFile }

    /// `kmsfs key …` offline, with extra environment (KMSFS_TEST_NOW).
    func key(_ arguments: [String], environment: [String: String] = [:]) throws -> Output {
        try kmsfs(["key"] + arguments, environment: environment)
    }

    func kmsfs(_ arguments: [String], environment: [String: String] = [:]) throws -> Output {
        try sh(([kmsfsBinary] + arguments + ["--fs", fs.cipherdir, "--passphrase-file", fs.passphraseFile]).map(q).joined(separator: " "),
               environment: environment)
    }
}

func jsonArray(_ text: String) -> [[String: Any]] {
    (try? JSONSerialization.jsonObject(with: Data(text.utf8))) as? [[String: Any]] ?? []
}

func jsonObject(_ text: String) -> [String: Any] {
    (try? JSONSerialization.jsonObject(with: Data(text.utf8))) as? [String: Any] ?? [:]
}

@Suite("admin authorization: an administrator of one key changes only what its rights cover", .serialized)
struct AdminAuthorizationTests {
    @Test("key rotation: --days and --off work, no flag is refused; over the socket as uid 4242 the daemon keeps serving")
    func rotationCommand() throws {
        let fs = try teamMount()
        #expect(try fs.run("echo data > $M/f").ok)
        let none = try fs.run("\(asTeam) $K key rotation alias/team --fs $M")
        #expect(none.status != 0 && none.stderr.contains("exactly one of --days N or --off"), "\(none.stderr)")
        let days = try fs.run("\(asTeam) $K key rotation alias/team --days 400 --fs $M")
        #expect(days.ok && days.stdout.contains("every 400 days"), "\(days.stderr)")
        #expect(jsonObject(try fs.run("$K key describe alias/team --json --fs $M").stdout)["metadata"].flatMap { ($0 as? [String: Any])?["rotationPeriodDays"] as? Int } == 400)
        let off = try fs.run("\(asTeam) $K key rotation alias/team --off --fs $M")
        #expect(off.ok && off.stdout.contains("is off"), "\(off.stderr)")
        let both = try fs.run("\(asTeam) $K key rotation alias/team --days 400 --off --fs $M")
        #expect(both.status != 0)
        // Offline too.
        try fs.unmount()
        #expect(try fs.key(["rotation", "alias/team", "--days", "500"]).stdout.contains("every 500 days"))
        #expect(try fs.key(["rotation", "alias/team"]).status != 0)
        try fs.mount()
        #expect(try fs.run("cat $M/f").stdout == "data\n")
    }

    @Test("malformed, truncated, oversized and idle requests from uid 4242 get an error or time out; the daemon keeps serving and a root disable is not delayed")
    func malformedRequests() throws {
        let fs = try teamMount()
        #expect(try fs.run("echo data > $M/f").ok)
        let before = try fs.run("$K status --json --fs $M").stdout
        let pid = (jsonObject(before)["daemon"] as? [String: Any])?["pid"] as? Int
        #expect(pid != nil)
        // The daemon's sockets now: the listener (and any of its own); each connection must give its back.
        func sockets() -> Int {
            let fds = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid ?? 0)/fd")) ?? []
            return fds.filter { (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid ?? 0)/fd/\($0)"))?.hasPrefix("socket:") == true }.count
        }
        let socketsBefore = sockets()
        #expect(socketsBefore >= 1)
        let script = """
        import socket, json, os, sys
        path = sys.argv[1]
        def ask(payload, shut=True):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.connect(path)
            try:
                if payload: s.sendall(payload)
                if shut: s.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the daemon stopped reading (a request too long); its reply is still there
            data = b""
            while True:
                try:
                    chunk = s.recv(65536)
                except ConnectionResetError:
                    break
                if not chunk: break
                data += chunk
            s.close()
            return data
        answers = [ask(b"garbage\\n"), ask(b'{"command": "run", "argume'), ask(b'{"command": 7}\\n'),
                   ask(b'{"command": "run", "arguments": "key list"}\\n'), ask(b'\\x00\\xff\\xfe\\n'),
                   ask(b"x" * (2 << 20)), ask(json.dumps({"command": "admin", "request": {"setRotation": {"key": "alias/team", "days": 5}}}).encode() + b"\\n"),
                   ask(b'{"command": "status"}\\n'), ask(b'{"command": "reboot"}\\n')]
        for a in answers:
            reply = json.loads(a)
            print(json.dumps(reply))
        """
        try script.write(toFile: fs.root + "/tmp-malformed.py", atomically: true, encoding: .utf8)
        let out = try fs.run("\(asTeam) /usr/bin/python3 \(q(fs.root + "/tmp-malformed.py")) $C/.kmsfs/control.sock $C")
        #expect(out.ok, "\(out.stderr)")
        let replies = out.stdout.split(separator: "\n").map { jsonObject(String($0)) }
        #expect(replies.count == 9)
        for (i, reply) in replies.enumerated() {
            #expect(reply["ok"] as? Bool == false && reply["error"] is String, "reply \(i): \(reply)")
        }
        #expect((replies[5]["error"] as? String)?.contains("longer than") == true, "\(replies[5])")
        // The old shape (a command line to re-parse) is no longer served.
        #expect((replies[3]["error"] as? String)?.contains("unknown command run") == true, "\(replies[3])")
        // A well-formed but invalid request runs and fails as the keystore refuses it, with its code.
        #expect(replies[6]["code"] as? String == "ValidationException" && (replies[6]["error"] as? String)?.contains("90") == true, "\(replies[6])")

        // Idle connections held open by uid 4242 (more than it may hold) do not delay root.
        let hold = """
        import socket, sys, os, errno
        import time
        path, go = sys.argv[1], sys.argv[2]
        held = []
        for i in range(40):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.connect(path); held.append(s)
        print("ready", flush=True)
        while not os.path.exists(go): time.sleep(0.01)
        quiet = 0
        for s in held:
            s.setblocking(False)
            try:
                s.recv(1)
            except BlockingIOError:
                quiet += 1
        print(quiet)
        """
        try hold.write(toFile: fs.root + "/tmp-hold.py", atomically: true, encoding: .utf8)
        let race = try fs.run("""
            rm -f $T/go $T/quiet
            \(asTeam) /usr/bin/python3 \(q(fs.root + "/tmp-hold.py")) $C/.kmsfs/control.sock $T/go > $T/quiet &
            holder=$!
            while ! grep -q ready $T/quiet 2>/dev/null; do kill -0 $holder || { wait $holder; exit 3; }; sleep 0.05; done
            $K key disable alias/team --fs $M
            touch $T/go
            wait $holder
            cat $T/quiet
            """)
        #expect(race.ok && race.stdout.contains("alias/team is Disabled"), "\(race.stderr)")
        // Those still waiting for their own time-out when root's disable had finished:
        // root was served while they were held.
        let quiet = Int(race.stdout.split(separator: "\n").last.map(String.init) ?? "") ?? 0
        #expect(quiet >= 4, "\(race.stdout)")
        let after = jsonObject(try fs.run("$K status --json --fs $M").stdout)
        #expect((after["daemon"] as? [String: Any])?["pid"] as? Int == pid, "the same daemon still serves")
        #expect(try fs.run("cat $M/f").stdout == "data\n")
        // Every refused, malformed, oversized, idle and served connection was closed.
        #expect(eventually(within: 15) { sockets() == socketsBefore }, "\(sockets()) sockets, \(socketsBefore) before")
    }

    @Test("moving an alias needs administer on both keys and the same spec; kmsfs's own aliases are reserved; creations and moves are audited with their parameters")
    func aliasHijack() throws {
        let fs = try teamMount()
        let toDefault = try fs.run("\(asTeam) $K key alias alias/default alias/team --fs $M")
        #expect(toDefault.status == 1 && toDefault.stderr.contains("may not administer with key alias/default"), "\(toDefault.stderr)")
        let digest = try fs.run("\(asTeam) $K key alias alias/kmsfs-audit-digest alias/team --fs $M")
        #expect(digest.status == 1 && digest.stderr.contains("reserved"), "\(digest.stderr)")
        #expect(try fs.run("$K key alias alias/kmsfs-mine alias/team --fs $M").status == 1, "reserved for root too")
        #expect(try fs.run("$K key describe alias/default --json --fs $M").stdout.contains("default key of this filesystem"))
        // Root moves an alias between its keys of one spec, not to another spec.
        #expect(try fs.run("$K key create --alias alias/sig --spec ECC_NIST_P256 --fs $M >/dev/null").ok)
        let spec = try fs.run("$K key alias alias/sig alias/team --fs $M")
        #expect(spec.status == 1 && spec.stderr.contains("ECC_NIST_P256"), "\(spec.stderr)")
        #expect(try fs.run("$K key alias alias/moving alias/default --fs $M && $K key alias alias/moving alias/team --fs $M").ok)
        let records = try fs.run("$K audit export --format jsonl --fs $M").stdout.split(separator: "\n").map { jsonObject(String($0)) }
        let created = records.first { $0["eventName"] as? String == "CreateAlias" && $0["errorCode"] == nil }
        let moved = records.first { $0["eventName"] as? String == "UpdateAlias" && $0["errorCode"] == nil }
        #expect((created?["requestParameters"] as? [String: String])?["aliasName"] == "alias/moving", "\(String(describing: created))")
        #expect((moved?["requestParameters"] as? [String: String])?["previousKeyId"] != nil, "\(String(describing: moved))")
        let refused = records.filter { $0["eventName"] as? String == "CreateAlias" && $0["errorCode"] as? String == "ValidationException" }
        #expect(refused.count >= 2, "reserved-name and spec refusals are recorded")
    }

    @Test("rebinding a directory needs administer on the key it replaces: uid 4242 cannot pull / or a new directory under it onto its key")
    func bindingHijack() throws {
        let fs = try teamMount()
        let root = try fs.run("\(asTeam) $K key bind / alias/team --fs $M")
        #expect(root.status == 1 && root.stderr.contains("alias/default"), "\(root.stderr)")
        let sub = try fs.run("\(asTeam) $K key bind /newdir alias/team --fs $M")
        #expect(sub.status == 1, "\(sub.stderr)")
        #expect(try fs.run("echo x > $M/after && $K key usage alias/team --json --fs $M").stdout.contains("\"total\" : 0"))
        // With administer on the replaced key too, it may.
        #expect(try fs.run("$K key policy alias/default --grant administer uid:4242 --fs $M >/dev/null").ok)
        #expect(try fs.run("\(asTeam) $K key bind /newdir alias/team --fs $M").ok)
        let bindings = try fs.run("$K key bind --fs $M").stdout
        #expect(bindings.contains("/newdir"), "\(bindings)")
        let audit = try fs.run("$K audit list --event BindKey --json --fs $M").stdout
        #expect(audit.contains("/newdir") && audit.contains("previousKeyId"), "\(audit)")
    }

    @Test("alias --delete takes NAME or alias/NAME, refuses a key id and a missing alias; a Destroyed key accepts nothing but describe")
    func aliasDeleteAndDestroyedKeys() throws {
        let s = try OfflineFS()
        #expect(try s.key(["create", "--alias", "alias/mine"]).ok)
        let id = try s.key(["create", "--alias", "alias/gone"]).stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        let byID = try s.key(["alias", id, "--delete"])
        #expect(byID.status == 1 && byID.stderr.contains("key id, not an alias"), "\(byID.stderr)")
        #expect(try s.key(["alias", "alias/nope", "--delete"]).status == 1)
        let deleted = try s.key(["alias", "mine", "--delete"])
        #expect(deleted.status == 0 && deleted.stdout.contains("deleted alias/mine"))
        #expect(try s.key(["describe", "alias/mine"]).status == 1, "really gone")

        let now = Date().timeIntervalSince1970
        #expect(try s.key(["schedule-deletion", "alias/gone", "--days", "7"], environment: ["KMSFS_TEST_NOW": String(now)]).status == 0)
        let later = ["KMSFS_TEST_NOW": String(now + 8 * 86400)]
        #expect(try s.key(["list"], environment: later).stderr.contains("destroyed key"))
        for arguments in [["alias", "alias/back", id], ["tag", id, "env=prod"], ["policy", id, "--grant", "decrypt", "uid:7"],
                          ["rotation", id, "--days", "100"], ["retire-version", id, "1"],
                          ["grant", "create", id, "--grantee", "uid:7", "--operations", "decrypt"], ["min-decryption-version", id, "1"],
                          ["rotate", id]] {
            let refused = try s.key(arguments, environment: later)
            #expect(refused.status == 1 && refused.stderr.contains("Destroyed"), "\(arguments): \(refused.stderr)")
        }
        #expect(try s.key(["describe", id], environment: later).stdout.contains("Destroyed"))
    }

    @Test("every remedy a blocked deletion prints works as printed: cancel, deprecate (rekey), schedule again; the key is then destroyed and the file reads")
    func deletionRemedyWorks() throws {
        let fs = try MountedFS()
        #expect(try fs.run("$K key create --alias alias/old --fs $M >/dev/null && mkdir $M/d && $K key bind /d alias/old --fs $M && echo kept > $M/d/f && $K key bind /d alias/default --fs $M").ok)
        try fs.unmount()
        let now = Date().timeIntervalSince1970
        func at(_ days: Double, _ arguments: [String]) throws -> Output {
            try sh("KMSFS_TEST_NOW=\(now + days * 86400) \(q(kmsfsBinary)) " + arguments.map(q).joined(separator: " ")
                   + " --fs \(q(fs.cipherdir)) --passphrase-file \(q(fs.passphraseFile))")
        }
        #expect(try at(0, ["key", "schedule-deletion", "alias/old", "--days", "7"]).ok)
        let blocked = try at(8, ["key", "list"]).stderr
        #expect(blocked.contains("was not destroyed"), "\(blocked)")
        // The remedy's commands, in order, with NEWKEY filled in. The alert names the alias and
        // the notice the key id: the same four commands either way.
        var commands: [[String]] = []
        for command in blocked.components(separatedBy: "`").enumerated().filter({ $0.offset % 2 == 1 }).map(\.element)
        where command.hasPrefix("kmsfs ") && !command.contains("PATH") {
            var words = command.split(separator: " ").dropFirst().map { $0 == "NEWKEY" ? "alias/default" : String($0) }
            if let old = words.firstIndex(where: { $0.count == 32 }) { words[old] = "alias/old" }
            if !commands.contains(words) { commands.append(words) }
        }
        #expect(commands.count == 4, "\(commands)")
        var day = 8.0
        for words in commands {
            let command = words.joined(separator: " ")
            let result = try at(day, words)
            #expect(result.ok, "\(command): \(result.stderr)")
            if words.starts(with: ["key", "deprecate"]) {
                #expect(try at(day, ["rekey", "resume"]).ok, "the queued job runs offline")
            }
            if words.starts(with: ["key", "usage"]) { #expect(result.stdout.contains(": 0 file(s)"), "\(result.stdout)") }
            day += 0.01
        }
        let destroyed = try at(day + 31, ["key", "list"])
        #expect(destroyed.stderr.contains("destroyed key"), "\(destroyed.stderr)")
        try fs.mount()
        #expect(try fs.run("cat $M/d/f").stdout == "kept\n")
    }

    @Test("deprecating warns who loses access once files move, --carry-policy carries it; scheduling a still-bound deprecated key's deletion warns and new files keep going to the successor")
    func deprecationCarriesPolicy() throws {
        let fs = try MountedFS()
        #expect(try fs.run("""
            $K key create --alias alias/a --fs $M >/dev/null && $K key create --alias alias/b --fs $M >/dev/null
            $K key policy alias/a --grant decrypt uid:4242 --fs $M >/dev/null
            mkdir $M/p && $K key bind /p alias/a --fs $M
            """).ok)
        let warned = try fs.run("$K key deprecate alias/a --successor alias/b --fs $M")
        #expect(warned.ok && warned.stderr.contains("decrypt uid:4242"), "\(warned.stderr)")
        #expect(try fs.run("$K key create --alias alias/c --fs $M >/dev/null && $K key create --alias alias/d --fs $M >/dev/null && $K key policy alias/c --grant decrypt uid:4242 --fs $M >/dev/null").ok)
        let carried = try fs.run("$K key deprecate alias/c --successor alias/d --carry-policy --fs $M")
        #expect(carried.ok && !carried.stderr.contains("warning"), "\(carried.stderr)")
        #expect(try fs.run("$K key policy alias/d --fs $M").stdout.contains("decrypt: uid:0 uid:4242"))
        let scheduled = try fs.run("$K key schedule-deletion alias/a --days 7 --fs $M")
        #expect(scheduled.ok && scheduled.stderr.contains("still bound to /p") && scheduled.stderr.contains("successor"), "\(scheduled.stderr)")
        #expect(try fs.run("echo new > $M/p/new && cat $M/p/new").stdout == "new\n", "creates follow the successor, no EKEYREVOKED")
    }

    @Test("refusals with invalid arguments are audited; policy changes, binds and deprecations carry their parameters; on-demand rotations are RotateKeyOnDemand")
    func auditParameters() throws {
        let s = try OfflineFS()
        #expect(try s.key(["create", "--alias", "alias/rsa", "--spec", "RSA_2048"]).status == 0)
        #expect(try s.key(["rotate", "alias/rsa"]).status == 1)
        #expect(try s.key(["create", "--alias", "alias/rsa"]).status == 1, "duplicate alias")
        #expect(try s.key(["create", "--alias", "alias/b"]).status == 0)
        #expect(try s.key(["policy", "alias/default", "--grant", "decrypt", "gid:100"]).status == 0)
        #expect(try s.key(["bind", "/x", "alias/b"]).status == 0)
        #expect(try s.key(["rotate", "alias/b"]).status == 0)
        #expect(try s.key(["deprecate", "alias/b", "--successor", "alias/default"]).status == 0)
        let export = try s.kmsfs(["audit", "export", "--format", "jsonl"])
        let records = export.stdout.split(separator: "\n").map { jsonObject(String($0)) }
        func parameters(_ event: String, ok: Bool = true) -> [[String: String]] {
            records.filter { $0["eventName"] as? String == event && ($0["errorCode"] == nil) == ok }.compactMap { $0["requestParameters"] as? [String: String] }
        }
        #expect(parameters("RotateKeyOnDemand", ok: false).contains { $0["keyId"] == "alias/rsa" })
        #expect(parameters("CreateKey", ok: false).contains { $0["aliasNames"] == "alias/rsa" })
        #expect(parameters("PutKeyPolicy").contains { $0["grant"] == "gid:100" && $0["operation"] == "decrypt" })
        #expect(parameters("BindKey").contains { $0["path"] == "/x" })
        #expect(parameters("DeprecateKey").contains { $0["successorKeyId"] == "alias/default" })
        #expect(parameters("RotateKeyOnDemand").contains { $0["rotationType"] == "ON_DEMAND" })
        #expect(!records.contains { $0["eventName"] as? String == "RotateKey" && ($0["requestParameters"] as? [String: String])?["rotationType"] == "ON_DEMAND" })
    }

    @Test("every command's help is ASCII, so the generated man pages lose no characters")
    func helpIsASCII() throws {
        let pages = try FileManager.default.contentsOfDirectory(atPath: repositoryRoot.appendingPathComponent("man").path)
        #expect(pages.count > 40)
        for page in pages where page.hasSuffix(".1") {
            let words = page.dropLast(2).split(separator: ".").dropFirst().map(String.init)
            let help = try sh(([kmsfsBinary] + words + ["--help"]).map(q).joined(separator: " "))
            let foreign = String(String.UnicodeScalarView(help.stdout.unicodeScalars.filter { !$0.isASCII }))
            #expect(help.ok && foreign.isEmpty, "\(words): \(foreign)")
        }
        let text = try String(contentsOfFile: repositoryRoot.appendingPathComponent("man/kmsfs.key.rotation.1").path, encoding: .utf8)
        #expect(text.contains("90-2560"))
    }
}

@Suite("admin authorization: the audit trail is read by team", .serialized)
struct AuditVisibilityTests {
    @Test("over a live mount, uid 4242 reads only the records of keys it administers and its own; root reads all")
    func teamSeesItsOwnTrail() throws {
        let fs = try teamMount()
        #expect(try fs.run("echo secret > $M/f && cat $M/f >/dev/null && $K key create --alias alias/other --fs $M >/dev/null").ok)
        #expect(try fs.run("\(asTeam) $K key rotate alias/team --fs $M >/dev/null").ok)
        let team = try fs.run("$K key describe alias/team --json --fs $M").stdout
        let teamID = try #require((jsonObject(team)["metadata"] as? [String: Any])?["keyID"] as? String)
        let seen = jsonArray(try fs.run("\(asTeam) $K audit list --json --limit 500 --fs $M").stdout)
        #expect(!seen.isEmpty)
        #expect(seen.allSatisfy { $0["keyID"] as? String == teamID || $0["uid"] as? Int == 4242 }, "\(seen.map { "\($0["event"] ?? "") \($0["keyID"] ?? "-") \($0["uid"] ?? "-")" })")
        #expect(seen.contains { $0["event"] as? String == "RotateKeyOnDemand" })
        let exported = try fs.run("\(asTeam) $K audit export --fs $M").stdout.split(separator: "\n")
        #expect(exported.count == seen.count, "export and list show the same records")
        let all = jsonArray(try fs.run("$K audit list --json --limit 500 --fs $M").stdout)
        #expect(all.contains { $0["event"] as? String == "CreateKey" && $0["keyID"] as? String != teamID }, "root sees every key's records")
    }
}
