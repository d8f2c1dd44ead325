import Administration
import ArgumentParser
import ChunkCipher
import EncryptedFS
import Foundation
import KeyManager

struct Mount: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Mount CIPHERDIR at MOUNTPOINT: applications read and write plaintext there.",
        discussion: """
            Runs in the background once the filesystem is mounted, unless -f is given. \
            Unmount with `kmsfs umount MOUNTPOINT` (or SIGINT/SIGTERM to a foreground mount).
            """)

    @Argument(help: "The encrypted directory made by `kmsfs init`.") var cipherdir: String
    @Argument(help: "An empty directory to mount on.") var mountpoint: String
    @OptionGroup var passphrase: PassphraseOptions
    @Flag(name: .customShort("f"), help: "Stay in the foreground.") var foreground = false
    @Option(name: .customShort("o"), help: "Mount options, comma-separated: allow_other (adds default_permissions), ro, default_permissions, max_read=N, ...")
    var options: [String] = []
    @Option(help: "FUSE worker threads.") var threads = 4
    @Flag(help: "Keep a backing descriptor for every inode the kernel caches. By default a mount by root closes the oldest ones near the descriptor limit and reopens them by file handle when needed; with this flag (and always without root) the daemon asks the kernel to forget entries instead.")
    var keepDescriptors = false
    @Option(help: "Microseconds a worker polls for the next request after answering one, before it sleeps (one worker at a time; 0: never). Cuts a wake-up from requests that follow each other closely, at the cost of CPU while they do.")
    var pollUs = 50
    @Option(help: "Write metrics in the Prometheus text format to this file (for node_exporter's textfile collector), replaced every --metrics-interval seconds.")
    var metricsFile: String?
    @Option(help: "Seconds between metrics snapshots.") var metricsInterval: Double = 15
    @Option(help: ArgumentHelp("Record successful file opens and creates in the audit log: on (always, but for benchmarks).", visibility: .private))
    var auditOpens: Toggle = .on
    @Option(help: ArgumentHelp("Read the passphrase from this file descriptor (used when daemonising).", visibility: .private))
    var passphraseFD: Int32?
    @Option(help: ArgumentHelp("Write the mount outcome to this file descriptor.", visibility: .private))
    var notifyFD: Int32?

    func run() throws {
        let cipher = URL(fileURLWithPath: cipherdir).standardizedFileURL.path
        let mount = URL(fileURLWithPath: mountpoint).standardizedFileURL.path
        let keystore = try Paths.keystore(of: cipher)
        if passphraseFD == nil, let existing = MountTable.kmsfsMounts().first(where: { $0.source == cipher || $0.mountpoint == mount }) {
            throw Failure("\(existing.source) is already mounted at \(existing.mountpoint); unmount it first with `kmsfs umount \(existing.mountpoint)`")
        }
        let secret = try passphraseFD.map { try PassphraseReader.read(fd: $0) } ?? passphrase.read(keystore: keystore)
        if !foreground {
            let metrics = metricsFile.map { ["--metrics-file", URL(fileURLWithPath: $0).standardizedFileURL.path,
                                             "--metrics-interval", String(metricsInterval)] } ?? []
            let warnings = try MountDaemon.spawn(passphrase: secret, arguments: [cipher, mount, "-f"] + options.flatMap { ["-o", $0] }
                                                 + ["--threads", String(threads), "--audit-opens", auditOpens.rawValue] + metrics
                                                 + (keepDescriptors ? ["--keep-descriptors"] : []) + ["--poll-us", String(pollUs)])
            for warning in warnings { Output.note("kmsfs: " + warning) }
            return
        }
        let notify = notifyFD
        let plan = MountPlan(cipherdir: cipher, mountpoint: mount, keystore: keystore, options: options, threads: threads,
                             metricsFile: metricsFile, metricsInterval: metricsInterval, auditOpens: auditOpens == .on,
                             caller: caller, clock: Clock.current, keepDescriptors: keepDescriptors,
                             pollMicroseconds: max(0, pollUs))
        do {
            try MountServer.serve(plan, passphrase: secret) { warnings in
                if let notify {
                    MountDaemon.report(notify, (["ok"] + warnings.map { "warning: " + $0 }).joined(separator: "\n"))
                } else {
                    warnings.forEach { Output.note("kmsfs: warning: " + $0) }
                }
            }
        } catch {
            let message = (error as? KeyManagerError)?.description ?? "\(error)"
            if let notify { MountDaemon.report(notify, message) }
            throw error
        }
    }
}

struct Unmount: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "umount", abstract: "Unmount a kmsfs mount.")
    @Argument(help: "The mountpoint.") var mountpoint: String

    func run() throws {
        let mount = URL(fileURLWithPath: mountpoint).standardizedFileURL.path
        let source = MountTable.kmsfsMounts().first { $0.mountpoint == mount }?.source
        let daemon = source.flatMap { try? ControlServer.query(directory: $0 + "/.kmsfs") }?.pid
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/fusermount3")
        process.arguments = ["-u", mountpoint]
        try process.run()
        process.waitUntilExit()
        guard process.terminationStatus == 0 else { throw ExitCode(process.terminationStatus) }
        // The daemon still stops its rekey worker and flushes the usage index
        // and audit log; return once it has, so what follows sees a quiet keystore.
        if let daemon {
            let deadline = Date().addingTimeInterval(60)
            while Self.isRunning(daemon), Date() < deadline { usleep(10_000) }
        }
    }
}

extension Unmount {
    /// Whether `pid` is alive (an unreaped zombie is not).
    static func isRunning(_ pid: Int32) -> Bool {
        guard let status = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
              let close = status.lastIndex(of: ")") else { return false }
        let state = status[status.index(after: close)...].trimmingCharacters(in: .whitespaces).prefix(1)
        return state != "Z" && state != "X"
    }
}

extension Status {
    /// The format version in the header of CIPHERDIR's root `.kmsfs.dir`.
    static func headerVersion(of cipherdir: String) -> Int? {
        guard let handle = FileHandle(forReadingAtPath: cipherdir + "/.kmsfs.dir") else { return nil }
        defer { try? handle.close() }
        return (try? handle.read(upToCount: FormatV1.headerSize)).flatMap { FormatV1.version(ofHeader: [UInt8]($0)) }.map(Int.init)
    }
}

struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show whether a filesystem is mounted, where, its open files, bytes and errors, and (with the passphrase) its keys.")
    @Option(help: "The CIPHERDIR or MOUNTPOINT.") var fs: String
    @OptionGroup var passphrase: PassphraseOptions
    @OptionGroup var output: JSONOption

    struct Report: Encodable {
        var cipherdir: String
        var mounted: Bool
        var mountpoint: String?
        var daemon: MountStatus?
        var keys: [KeyMetadata]?
        /// The on-disk formats: the root directory's header version and the keystore's schema.
        var format: Format
        struct Format: Encodable {
            var fileFormat: Int?
            var keystoreSchema: String?
            /// What this build writes.
            var current: String
        }
    }

    func run() throws {
        let path = URL(fileURLWithPath: fs).standardizedFileURL.path
        let mount = MountTable.kmsfsMounts().first { $0.source == path || $0.mountpoint == path }
        let cipherdir = mount?.source ?? path
        var report = Report(cipherdir: cipherdir, mounted: mount != nil, mountpoint: mount?.mountpoint,
                            format: .init(fileFormat: Self.headerVersion(of: cipherdir),
                                          keystoreSchema: KeyManager.appliedSchema(in: cipherdir + "/.kmsfs"),
                                          current: "file format \(FormatV1.version), keystore schema \(KeyManager.knownSchema)"))
        if mount != nil { report.daemon = try? ControlServer.query(directory: cipherdir + "/.kmsfs") }
        if passphrase.passphraseFile != nil || passphrase.extpass != nil {
            report.keys = try KeyManager.open(in: try Paths.keystore(of: cipherdir), passphrase: passphrase.read()).listKeys()
        }
        if output.json { try Output.json(report); return }
        Output.line("cipherdir:      \(cipherdir)")
        Output.line("format:         file format \(report.format.fileFormat.map(String.init) ?? "unknown"), keystore schema \(report.format.keystoreSchema ?? "unknown")")
        Output.line("mounted:        \(report.mounted ? "yes, at \(mount!.mountpoint)" : "no")")
        if let d = report.daemon {
            let s = d.statistics
            Output.line("daemon:         pid \(d.pid), up since \(Output.date(d.startedAt))")
            Output.line("open files:     \(s.openFiles) (\(s.nodes) inodes known)")
            Output.line("bytes:          \(s.bytesRead) read, \(s.bytesWritten) written (\(s.requests) requests)")
            Output.line("errors:         \(s.integrityFailures) integrity failures, \(s.deniedRequests) denied requests")
            Output.line("keys in use:    \(d.keysInUse.isEmpty ? "-" : d.keysInUse.joined(separator: ", "))")
            for key in d.governingKeys ?? [] {
                Output.line("governing key:  \(key.key) for \(key.paths.joined(separator: ", ")); "
                            + "encrypt: \(key.encrypt.joined(separator: " ")); decrypt: \(key.decrypt.joined(separator: " "))")
            }
        } else if report.mounted {
            Output.line("daemon:         not answering on \(cipherdir)/.kmsfs/\(ControlServer.socketName) (run as root or the mounting user)")
        }
        for key in report.keys ?? [] {
            Output.line("key:            \(key.aliases.first ?? key.keyID.rawValue.hex) \(key.state.rawValue) v\(key.currentVersion)")
        }
    }
}
