import Foundation
import Testing

@Suite("the administrator's toolbox: versions, formats, JSON other tools read, mount(8) and fstab", .serialized)
struct ToolboxTests {
    @Test("kmsfs --version names its version, the formats it writes and the OpenSSL, SQLite and libfuse it runs with (as the system's tools report them)")
    func version() throws {
        let out = try sh("\(q(kmsfsBinary)) --version")
        #expect(out.ok)
        let lines = out.stdout.split(separator: "\n").map(String.init)
        #expect(lines.first?.hasPrefix("kmsfs ") == true && lines.first?.split(separator: " ").last?.split(separator: ".").count == 3, "\(lines)")
        #expect(lines.contains { $0.hasPrefix("file format 1, keystore schema v") }, "\(lines)")
        let openssl = try sh("openssl version | awk '{print $2}'").stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(lines.contains { $0.hasPrefix("OpenSSL \(openssl)") }, "\(openssl) \(lines)")
        let fuse = try sh("fusermount3 -V | awk '{print $3}'").stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(lines.contains("libfuse \(fuse)"), "\(fuse) \(lines)")
        let sqlite = try sh("dpkg-query -W -f '${Version}' libsqlite3-0 | cut -d- -f1").stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(!sqlite.isEmpty && lines.contains("SQLite \(sqlite)"), "\(sqlite) \(lines)")
    }

    @Test("status shows a filesystem's format, mounted or not; JSON output has no escaped slashes")
    func statusFormat() throws {
        let fs = try MountedFS()
        let text = try fs.run("$K status --fs $M").stdout
        #expect(text.contains("format:         file format 1, keystore schema v"), "\(text)")
        let json = try fs.run("$K status --json --fs $M").stdout
        let format = jsonObject(json)["format"] as? [String: Any]
        #expect(format?["fileFormat"] as? Int == 1 && (format?["keystoreSchema"] as? String)?.hasPrefix("v") == true, "\(json)")
        #expect(!json.contains("\\/") && json.contains(fs.cipherdir), "\(json)")
        let described = try fs.run("$K key describe alias/default --json --fs $M").stdout
        #expect(described.contains("\"alias/default\"") && !described.contains("\\/"))
        // key bind lists bindings as JSON too; with PATH KEY, --json is refused.
        #expect(try fs.run("$K key create --alias alias/p --fs $M >/dev/null && mkdir p && $K key bind /p alias/p --fs $M").ok)
        let bindings = jsonArray(try fs.run("$K key bind --json --fs $M").stdout)
        #expect(bindings.count == 2 && bindings.contains { $0["path"] as? String == "/p" && $0["aliases"] as? [String] == ["alias/p"] && ($0["keyId"] as? String)?.count == 32 },
                "\(bindings)")
        #expect(try fs.run("$K key bind /q alias/p --json --fs $M").status == 64)
        try fs.unmount()
        #expect(try fs.run("$K status --fs $C").stdout.contains("file format 1"))
    }

    @Test("every list and describe command's --json parses, has no escaped slashes, and gives every time field as an ISO 8601 UTC string (docs/JSON.md)")
    func jsonEverywhere() throws {
        let fs = try MountedFS()
        #expect(try fs.run("""
            $K key create --alias alias/j --tag env=dev --fs $M >/dev/null && mkdir j && $K key bind /j alias/j --fs $M >/dev/null
            echo x > j/f && $K key rotate alias/j --fs $M >/dev/null && $K key grant create alias/j --grantee uid:4242 --operations decrypt --fs $M >/dev/null
            $K key create --alias alias/sig --spec ECC_NIST_P256 --fs $M >/dev/null
            $K rekey start --key alias/j:1 --path /j --fs $M >/dev/null
            """).ok)
        _ = try waitForRekey(fs)
        let commands = ["key list", "key describe alias/j", "key rotations alias/j", "key usage alias/j", "key policy alias/j", "key bind",
                        "key grant list alias/j", "key access-report", "audit list --limit 50", "audit alerts", "audit verify", "rekey status", "status"]
        let times: Set<String> = ["time", "createdAt", "stateChangedAt", "lastRotatedAt", "nextRotationAt", "deletionDate", "rotationDate",
                                  "updatedAt", "finishedAt", "expiresAt", "lastUsedAt", "startedAt", "expiry", "expirationDate"]
        for command in commands + commands.map({ $0 + " @offline" }) {
            let offline = command.hasSuffix(" @offline")
            if offline, fs.mounted { try fs.unmount() }
            let line = "$K \(command.replacingOccurrences(of: " @offline", with: "")) --json --fs \(offline ? "$C --passphrase-file $P" : "$M")"
            let out = try fs.run(line)
            #expect(out.ok, "\(command): \(out.stderr)")
            #expect(!out.stdout.contains("\\/"), "\(command) escapes slashes")
            guard let parsed = try? JSONSerialization.jsonObject(with: Data(out.stdout.utf8), options: [.fragmentsAllowed]) else {
                Issue.record("\(command): not JSON: \(out.stdout.prefix(200))")
                continue
            }
            var bad: [String] = []
            func walk(_ node: Any) {
                if let object = node as? [String: Any] {
                    for (key, value) in object {
                        if times.contains(key), !(value is NSNull) {
                            let text = value as? String ?? ""
                            if text.range(of: #"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$"#, options: .regularExpression) == nil { bad.append("\(key)=\(value)") }
                        }
                        walk(value)
                    }
                } else if let array = node as? [Any] { array.forEach(walk) }
            }
            walk(parsed)
            #expect(bad.isEmpty, "\(command): times not ISO 8601: \(bad)")
        }
    }

    @Test("mount -t fuse.kmsfs and an fstab line (passfile=, metrics-file=, noauto, nofail, _netdev, x-systemd.*) mount through the mount.fuse.kmsfs helper; umount unmounts; without passfile= the helper refuses")
    func mountHelper() throws {
        let fs = try MountedFS()
        try fs.unmount()
        let helper = "/sbin/mount.fuse.kmsfs"
        let existing = try? FileManager.default.destinationOfSymbolicLink(atPath: helper)
        let created = existing == nil && !FileManager.default.fileExists(atPath: helper)
        if created {
            try FileManager.default.createSymbolicLink(atPath: helper, withDestinationPath: kmsfsBinary)
        } else {
            #expect(existing == kmsfsBinary, "\(helper) is another program; remove it to run this test")
        }
        defer { if created { try? FileManager.default.removeItem(atPath: helper) } }
        let direct = try fs.run("""
            mount -t fuse.kmsfs $C $M -o passfile=$P,noauto,nofail,_netdev,x-systemd.automount,rw,metrics-file=$T/helper.prom,metrics-interval=5
            echo data > $M/f && cat $M/f
            grep -c " $M fuse.kmsfs " /proc/mounts
            grep -c '^kmsfs_up{' $T/helper.prom
            umount $M
            grep -c " $M fuse.kmsfs " /proc/mounts || true
            """)
        #expect(direct.ok && direct.stdout == "data\n1\n1\n0\n", "\(direct.stdout) \(direct.stderr)")
        let fstab = try fs.run("""
            printf '%s %s fuse.kmsfs passfile=%s,noauto,nofail,_netdev 0 0\\n' $C $M $P > $T/fstab
            mount --fstab $T/fstab $M
            cat $M/f
            umount $M
            """)
        #expect(fstab.ok && fstab.stdout == "data\n", "\(fstab.stdout) \(fstab.stderr)")
        let refused = try fs.run("mount -t fuse.kmsfs $C $M -o noauto")
        #expect(refused.status != 0 && refused.stderr.contains("passfile=FILE"), "\(refused.stderr)")
        #expect(try fs.run("grep -c \" $M fuse.kmsfs \" /proc/mounts || true").stdout == "0\n")
    }

    @Test("mount --metrics-file writes a Prometheus text-format snapshot (valid by the format's grammar) with requests, errors by errno, bytes, denials, data keys generated and unwrapped per key, and rekey progress; replaced atomically, a last one at unmount")
    func prometheusMetrics() throws {
        let fs = try MountedFS()
        try fs.unmount()
        let prom = fs.root + "/kmsfs.prom"
        try fs.mount(arguments: ["--metrics-file", prom, "--metrics-interval", "1"])
        #expect(try fs.run("""
            head -c 300000 /dev/urandom > big && cat big > /dev/null && for i in 1 2 3 4 5; do echo $i > f$i; done
            cat nosuch 2>/dev/null || true; mkdir d && { rmdir nosuchdir 2>/dev/null || true; }
            $K key create --alias alias/m --fs $M >/dev/null && $K rekey start --key alias/default --to alias/m --path /d --fs $M >/dev/null
            """).ok)
        try fs.unmount()   // the last snapshot is written as the daemon stops
        let text = try String(contentsOfFile: prom, encoding: .utf8)
        // The grammar of the text format: HELP/TYPE comments, then NAME{LABELS} VALUE lines, each name typed first.
        let checked = try sh("""
            python3 - \(q(prom)) <<'PY'
            import re, sys
            typed, samples = set(), {}
            line_re = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)\\{((?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\\]|\\\\.)*",?)*)\\} (-?[0-9.e+]+)$')
            for line in open(sys.argv[1]).read().splitlines():
                if line.startswith('# TYPE '):
                    name, kind = line.split()[2:4]; assert kind in ('counter', 'gauge'), line; typed.add(name); continue
                if line.startswith('# HELP '): continue
                m = line_re.match(line); assert m, 'bad line: ' + line; assert m.group(1) in typed, 'untyped: ' + line
                samples[(m.group(1), m.group(2))] = float(m.group(3))
            print(len(samples))
            PY
            """)
        #expect(checked.ok, "\(checked.stderr) \(text)")
        func value(_ name: String, _ labels: String = "") -> Double? {
            text.split(separator: "\n").first { $0.hasPrefix(name + "{") && (labels.isEmpty || $0.contains(labels)) }
                .flatMap { $0.split(separator: " ").last }.flatMap { Double($0) }
        }
        #expect((value("kmsfs_requests_total") ?? 0) > 20, "\(text)")
        #expect((value("kmsfs_written_bytes_total") ?? 0) >= 300_000 && (value("kmsfs_read_bytes_total") ?? 0) >= 300_000, "\(text)")
        #expect((value("kmsfs_request_errors_total", "errno=\"ENOENT\"") ?? 0) >= 2, "\(text)")
        #expect((value("kmsfs_key_operations_total", "alias=\"alias/default\",operation=\"GenerateDataKey\",outcome=\"success\"") ?? 0) >= 7, "\(text)")
        #expect(text.contains("kmsfs_rekey_files{") && text.contains("kmsfs_up{mountpoint=\"\(fs.mountpoint)\"} 1"), "\(text)")
        #expect(!FileManager.default.fileExists(atPath: prom + ".tmp"))
    }

    @Test("scripts/deb.sh (make deb) builds a package whose Depends names libfuse3, libssl3, libsqlite3 and fuse3; dpkg -i installs it (kmsfs --version runs, mount helpers and man pages in place), dpkg -r removes every file")
    func debianPackage() throws {
        guard try sh("command -v dpkg-deb && command -v dpkg-shlibdeps").ok else {
            print("skipped: dpkg-deb or dpkg-shlibdeps (dpkg-dev) is missing")
            return
        }
        guard !(try sh("dpkg -s kmsfs 2>/dev/null | grep -q '^Status: install ok installed'").ok) else {
            print("skipped: a kmsfs package is installed on this machine; the test will not replace it")
            return
        }
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("kmsfs-deb-\(UUID().uuidString.prefix(8))").path
        try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
        defer {
            _ = try? sh("dpkg -s kmsfs >/dev/null 2>&1 && dpkg -r kmsfs >/dev/null 2>&1")
            try? FileManager.default.removeItem(atPath: root)
        }
        // The debug build links the Swift runtime from the toolchain (make deb links it in statically).
        let built = try sh("KMSFS_DEB_ALLOW_UNPACKAGED=1 \(q(repositoryRoot.path))/scripts/deb.sh \(q(kmsfsBinary)) \(q(root))")
        #expect(built.ok, "\(built.stderr)")
        let deb = try sh("ls \(q(root))/kmsfs_*.deb").stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        let depends = try sh("dpkg-deb -f \(q(deb)) Depends").stdout
        #expect(["libfuse3-3", "libssl3", "libsqlite3-0", "fuse3", "libc6"].allSatisfy { depends.contains($0) }, "\(depends)")
        let installed = try sh("""
            dpkg -i \(q(deb)) >/dev/null
            dpkg -s kmsfs | grep '^Status:'
            /usr/bin/kmsfs --version | head -1
            readlink /sbin/mount.kmsfs /sbin/mount.fuse.kmsfs
            test -f /usr/share/man/man1/kmsfs.mount.1.gz && test -f /usr/lib/systemd/system/kmsfs@.service && echo files
            """)
        let version = try sh("\(q(kmsfsBinary)) --version | head -1").stdout
        #expect(installed.ok && installed.stdout == "Status: install ok installed\n\(version)/usr/bin/kmsfs\n/usr/bin/kmsfs\nfiles\n",
                "\(installed.stdout) \(installed.stderr)")
        let listed = try sh("dpkg -L kmsfs").stdout.split(separator: "\n").map(String.init)
        let removed = try sh("dpkg -r kmsfs >/dev/null && dpkg -s kmsfs 2>/dev/null | grep '^Status:' || echo gone")
        #expect(removed.stdout.contains("deinstall") || removed.stdout.contains("gone"), "\(removed.stdout)")
        let left = listed.filter { $0.contains("kmsfs") && FileManager.default.fileExists(atPath: $0) }
        #expect(left.isEmpty, "left behind: \(left)")
    }

    @Test("scripts/install.sh (make install) puts the binary, both mount helpers, every man page, bash/zsh/fish completions and the systemd unit under PREFIX and DESTDIR")
    func install() throws {
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("kmsfs-install-\(UUID().uuidString.prefix(8))").path
        defer { try? FileManager.default.removeItem(atPath: root) }
        let installed = try sh("DESTDIR=\(q(root)) \(q(repositoryRoot.path))/scripts/install.sh \(q(kmsfsBinary)) /opt/kmsfs /opt/kmsfs/sbin")
        #expect(installed.ok, "\(installed.stderr)")
        let p = root + "/opt/kmsfs"
        #expect(try sh("\(q(p))/bin/kmsfs --version").stdout.hasPrefix("kmsfs "))
        for helper in ["mount.kmsfs", "mount.fuse.kmsfs"] {
            #expect((try? FileManager.default.destinationOfSymbolicLink(atPath: p + "/sbin/" + helper)) == "/opt/kmsfs/bin/kmsfs", "\(helper)")
        }
        let pages = try FileManager.default.contentsOfDirectory(atPath: p + "/share/man/man1").filter { $0.hasSuffix(".1") }
        let shipped = try FileManager.default.contentsOfDirectory(atPath: repositoryRoot.path + "/man").filter { $0.hasSuffix(".1") }
        #expect(pages.count == shipped.count && pages.contains("kmsfs.mount.1"))
        #expect(try sh("bash -n \(q(p))/share/bash-completion/completions/kmsfs && grep -c kmsfs \(q(p))/share/zsh/site-functions/_kmsfs \(q(p))/share/fish/vendor_completions.d/kmsfs.fish").ok)
        let unit = try String(contentsOfFile: p + "/lib/systemd/system/kmsfs@.service", encoding: .utf8)
        #expect(unit.contains("ExecStart=/opt/kmsfs/bin/kmsfs mount") && unit.contains("LoadCredential=passphrase:") && !unit.contains("/usr/bin/kmsfs"))
    }

    @Test("with --json, errors are one JSON object on stderr with a stable code, offline and over the mount (as uid 4242 too); without it, the usual message")
    func jsonErrors() throws {
        let fs = try MountedFS()
        func error(_ output: Output) -> (code: String?, message: String?) {
            let body = jsonObject(output.stderr.trimmingCharacters(in: .whitespacesAndNewlines))["error"] as? [String: Any]
            return (body?["code"] as? String, body?["message"] as? String)
        }
        let missing = try fs.run("$K key describe alias/nope --json --fs $M")
        #expect(missing.status == 1 && error(missing).code == "NotFoundException" && error(missing).message?.contains("alias/nope") == true, "\(missing.stderr)")
        let usage = try fs.run("$K key policy alias/default --grant read everyone --json --fs $M")
        #expect(usage.status == 64 && error(usage).code == "UsageError", "\(usage.stderr)")
        let denied = try fs.run("setpriv --reuid 4242 --regid 4242 --clear-groups $K key list --json --fs $M")
        #expect(denied.status == 1 && error(denied).code == "ControlRefused", "\(denied.stderr)")
        #expect(missing.stderr.split(separator: "\n").count == 1, "one object, nothing else: \(missing.stderr)")
        try fs.unmount()
        let offline = try fs.kmsfs(["key", "describe", "alias/nope", "--json", "--fs", fs.cipherdir])
        #expect(error(offline).code == "NotFoundException", "\(offline.stderr)")
        let plain = try fs.kmsfs(["key", "describe", "alias/nope", "--fs", fs.cipherdir])
        #expect(plain.stderr.hasPrefix("kmsfs: no key alias/nope"), "\(plain.stderr)")
    }
}
