import ArgumentParser
import EncryptedFS
import Foundation
import FUSEBridge
import KeyManager

/// Where a command runs and whom for. From a shell, a command acts as the
/// calling user and prints to the terminal. Forwarded over a mount's control
/// socket, the same command runs inside the daemon: as the peer the socket
/// authenticated, with the daemon's unlocked key manager, its output
/// captured for the reply. Commands reach both through `caller`, `Output`
/// and `FilesystemOption.open()`, so each is written once.
final class Invocation: @unchecked Sendable {
    let principal: Principal
    let manager: KeyManager?
    let daemon: DaemonServices?
    private let captures: Bool
    /// A keystore this process opened itself (offline); its audit records
    /// get a signed digest when the command ends.
    var opened: KeyManager?
    private(set) var stdout = ""
    private(set) var stderr = ""

    init(principal: Principal, manager: KeyManager? = nil, daemon: DaemonServices? = nil, captures: Bool = false) {
        self.principal = principal
        self.manager = manager
        self.daemon = daemon
        self.captures = captures
    }

    /// The command being run. The daemon serves control requests one at a
    /// time on one thread, and nothing else reads this there.
    nonisolated(unsafe) static var current = Invocation(
        principal: Principal(uid: getuid(), gid: getgid(), pid: getpid(), processName: "kmsfs"))

    func write(_ text: String, error: Bool) {
        if captures {
            if error { stderr += text } else { stdout += text }
        } else {
            (error ? FileHandle.standardError : FileHandle.standardOutput).write(Data(text.utf8))
        }
    }

    /// The command families a daemon runs for a peer.
    static let forwardable: Set<String> = ["key", "audit", "rekey", "backup"]

    /// If a daemon serves `keystore`, runs this process's command line there,
    /// prints what it printed, and ends the command with its exit code.
    static func forwardIfMounted(keystore: String, cipherdir: String) throws {
        let arguments = Array(CommandLine.arguments.dropFirst())
        guard let family = arguments.first, forwardable.contains(family) else { return }
        let result: ForwardedResult?
        do {
            result = try ControlServer.forward(directory: keystore, arguments: absolutizingFilesystem(arguments, cipherdir))
        } catch let refusal as ControlRefusal {
            throw Failure(refusal.message)
        }
        guard let result else { return }
        FileHandle.standardOutput.write(Data(result.stdout.utf8))
        FileHandle.standardError.write(Data(result.stderr.utf8))
        throw ExitCode(result.code)
    }

    /// Paths given to a command are relative to this shell's directory, not
    /// the daemon's: `--fs` becomes the CIPHERDIR, file options absolute.
    static func absolutizingFilesystem(_ arguments: [String], _ cipherdir: String) -> [String] {
        let fileOptions: Set<String> = ["--jsonl", "--out", "--backup-passphrase-file"]
        func absolute(_ path: String) -> String { path.isEmpty ? path : URL(fileURLWithPath: path).standardizedFileURL.path }
        var out = [String]()
        var pending: String?
        for argument in arguments {
            if let option = pending {
                out.append(option == "--fs" ? cipherdir : absolute(argument))
                pending = nil
                continue
            }
            if argument == "--fs" || fileOptions.contains(argument) { pending = argument; out.append(argument); continue }
            if argument.hasPrefix("--fs=") { out.append("--fs=" + cipherdir); continue }
            if let option = fileOptions.first(where: { argument.hasPrefix($0 + "=") }) {
                out.append(option + "=" + absolute(String(argument.dropFirst(option.count + 1))))
                continue
            }
            out.append(argument)
        }
        return out
    }

    /// Runs a forwarded command line inside the daemon as `peer`.
    static func runForwarded(_ arguments: [String], as peer: Principal, manager: KeyManager, daemon: DaemonServices) -> ForwardedResult {
        let invocation = Invocation(principal: peer, manager: manager, daemon: daemon, captures: true)
        let previous = current
        current = invocation
        defer { current = previous }
        var code: Int32 = 0
        do {
            guard let family = arguments.first, forwardable.contains(family) else {
                throw Failure("the daemon runs only `kmsfs key`, `audit`, `rekey` and `backup create` commands")
            }
            var command = try KMSFS.parseAsRoot(arguments)
            try command.run()
        } catch {
            code = report(error)
        }
        return ForwardedResult(code: code, stdout: invocation.stdout, stderr: invocation.stderr)
    }

    /// Prints an error the way kmsfs does and returns the exit code.
    static func report(_ error: Error) -> Int32 {
        switch error {
        case let error as KeyManagerError: Output.note("kmsfs: \(error.description)"); return 1
        case let error as Failure: Output.note("kmsfs: \(error.description)"); return 1
        case let error as MountError: Output.note("kmsfs: \(error.description)"); return 1
        default:
            let code = KMSFS.exitCode(for: error).rawValue
            let message = KMSFS.fullMessage(for: error)
            if !message.isEmpty { code == 0 ? Output.line(message) : Output.note(message) }
            return code
        }
    }
}

/// What a running mount offers the commands it runs for peers.
final class DaemonServices: Sendable {
    let rekey: RekeyService
    init(rekey: RekeyService) { self.rekey = rekey }
}
