import Administration
import ArgumentParser
import EncryptedFS
import Foundation
import KeyManager

extension RekeyMode: ExpressibleByArgument {}

struct RekeyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rekey",
        abstract: "Move files to a new key (rewrap) or a new data key (reencrypt), live or offline; pause, resume, cancel, watch.",
        discussion: """
            On a mounted filesystem the job runs inside the daemon while applications keep working; \
            unmounted, `start` and `resume` run it in the foreground with a progress bar (Ctrl-C pauses). \
            Jobs checkpoint every file and resume after a crash or remount without redoing finished files.
            """,
        subcommands: [Start.self, Status.self, Pause.self, Resume.self, Cancel.self])

    struct Start: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Start a rekey job (by default: the deprecated key's files to its successor).")
        @OptionGroup var fs: FilesystemOption
        @Option(help: "The key whose files move: KEY or KEY:VERSION (default: the deprecated key with a successor).") var key: String?
        @Option(help: "Only files under this directory of the filesystem.") var path: String?
        @Option(help: "The key to move them to (default: the successor of a deprecated key, else the key's current version).") var to: String?
        @Option(help: "rewrap (header only) or reencrypt (new data key, every chunk).") var mode: RekeyMode = .rewrap
        @Option(help: "Throttle to this many MB/s.") var rate: Double?
        @Option(help: "Parallel workers.") var workers: Int = 2
        @OptionGroup var output: JSONOption

        func run() throws {
            let client = try fs.client()
            let reply = try client.perform(.startRekey(RekeyStart(source: key, target: to, mode: mode, path: path, rate: rate, workers: workers)))
            try RekeyCommand.launch(reply, client: client, fs: fs, json: output.json)
        }
    }

    struct Status: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show the newest rekey job: state, files and bytes done of total, failures, rate, ETA.")
        @OptionGroup var fs: FilesystemOption
        @OptionGroup var output: JSONOption
        func run() throws {
            guard case .rekeyStatus(let latest) = try fs.perform(.rekeyStatus) else { throw Unexpected() }
            guard let job = latest else {
                if output.json { Output.line("null") } else { Output.line("no rekey job") }
                return
            }
            RekeyCommand.show(job, json: output.json)
        }
    }

    struct Pause: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Pause the active job after its current batch.")
        @OptionGroup var fs: FilesystemOption
        func run() throws { try RekeyCommand.change(fs, to: .paused) }
    }

    struct Cancel: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Cancel the active job; files already moved stay on the new key.")
        @OptionGroup var fs: FilesystemOption
        func run() throws { try RekeyCommand.change(fs, to: .cancelled) }
    }

    struct Resume: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Resume a paused (or interrupted) job; offline, run it to the end here.")
        @OptionGroup var fs: FilesystemOption
        @Option(help: "A new throttle in MB/s.") var rate: Double?
        @OptionGroup var output: JSONOption
        func run() throws {
            let client = try fs.client()
            try RekeyCommand.launch(try client.perform(.resumeRekey(rate: rate)), client: client, fs: fs, json: output.json)
        }
    }

    /// Pauses or cancels the active job; a live mount answers once its worker has stopped moving files.
    static func change(_ fs: FilesystemOption, to state: RekeyState) throws {
        guard case .rekeyJob(let job, _) = try fs.perform(.changeRekey(state: state)) else { throw Unexpected() }
        Output.line("rekey job \(job.id) \(state.rawValue)")
    }

    /// A live mount's daemon has the job already. Offline: run it here.
    static func launch(_ reply: AdminReply, client: AdminClient, fs: FilesystemOption, json: Bool) throws {
        guard case .rekeyJob(let job, let live) = reply else { throw Unexpected() }
        guard !live, let manager = client.manager else {
            if json { show(job, json: true) } else {
                Output.line("rekey job \(job.id) queued (\(job.mode.rawValue)); it runs inside the mount — `kmsfs rekey status --fs …` shows progress")
            }
            return
        }
        let filesystem = try EncryptedFileSystem(cipherdir: try Paths.cipherdir(of: fs.fs), keyManager: manager)
        let rekeyer = Rekeyer(filesystem: filesystem)
        signal(SIGINT, SIG_IGN)
        let interrupt = DispatchSource.makeSignalSource(signal: SIGINT, queue: .global())
        interrupt.setEventHandler { rekeyer.stopRequested.store(true, ordering: .relaxed) }
        interrupt.resume()
        let meter = ProgressMeter("rekey", unit: "files", json: json)
        var final = try rekeyer.run(job.id) { progress in
            meter.update(progress.filesDone, of: progress.filesTotal, bytes: progress.bytesDone)
        }
        meter.finish()
        if final.state == .running {
            try manager.setRekeyState(job.id, .paused, error: nil, by: caller)
            final = try manager.rekeyJob(job.id) ?? final
            Output.note("paused; `kmsfs rekey resume --fs …` continues where it stopped")
        }
        show(final, json: json)
        if final.state == .failed { throw ExitCode(1) }
    }

    struct Report: Encodable {
        var job: RekeyJob
        var sourceKey: String
        var targetKey: String
        var bytesPerSecond: Double?
        var filesPerSecond: Double?
        var etaSeconds: Double?
    }

    static func report(_ job: RekeyJob) -> Report {
        let elapsed = (job.finishedAt ?? job.updatedAt) - job.createdAt
        let bps = elapsed > 0 ? Double(job.bytesDone) / elapsed : nil
        let fps = elapsed > 0 ? Double(job.filesDone) / elapsed : nil
        var eta: Double?
        if job.state.isActive, let bps, bps > 0 { eta = Double(job.bytesTotal - job.bytesDone) / bps }
        return Report(job: job, sourceKey: job.sourceKey.rawValue.hex, targetKey: job.targetKey.rawValue.hex,
                      bytesPerSecond: bps, filesPerSecond: fps, etaSeconds: eta)
    }

    static func show(_ job: RekeyJob, json: Bool) {
        let r = report(job)
        if json { try? Output.json(r); return }
        Output.line("job:       \(job.id) (\(job.mode.rawValue)) \(job.state.rawValue)")
        Output.line("keys:      \(r.sourceKey)\(job.sourceVersion.map { " v\($0)" } ?? "") → \(r.targetKey)")
        if let path = job.path { Output.line("path:      \(path)") }
        Output.line("files:     \(job.filesDone) of \(job.filesTotal) done, \(job.failures) failure(s)")
        Output.line("bytes:     \(job.bytesDone) of \(job.bytesTotal)")
        if let fps = r.filesPerSecond, let bps = r.bytesPerSecond {
            Output.line(String(format: "rate:      %.0f files/s, %.1f MB/s", fps, bps / 1e6))
        }
        if let eta = r.etaSeconds { Output.line(String(format: "eta:       %.0f s", eta)) }
        if let error = job.lastError { Output.line("last error: \(error)") }
    }
}
