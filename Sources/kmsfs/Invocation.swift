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
    /// Files the caller read as itself and sent with the command (path → bytes).
    var inputs: [String: [UInt8]] = [:]
    /// Files made for the caller, which it writes as itself (path → bytes).
    private(set) var outputs: [String: [UInt8]] = [:]
    var forwarded: Bool { captures }

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

    /// Reads an input file: from disk as this process, or inside the daemon
    /// from what the caller sent (the daemon never opens a peer's paths).
    func readInput(_ path: String, limit: Int = Invocation.maxFileBytes) throws -> [UInt8] {
        if captures {
            guard let bytes = inputs[Self.absolute(path)] else { throw Failure("\(path) was not sent with the request") }
            return bytes
        }
        guard let handle = FileHandle(forReadingAtPath: path) else { throw Failure("cannot read \(path)") }
        defer { try? handle.close() }
        let data = try handle.read(upToCount: limit + 1) ?? Data()
        guard data.count <= limit else { throw Failure("\(path) is larger than \(limit) bytes") }
        return [UInt8](data)
    }

    /// Writes an output file: directly, or inside the daemon into the reply
    /// for the caller to write as itself.
    func writeOutput(_ path: String, _ bytes: [UInt8]) throws {
        if captures { outputs[Self.absolute(path)] = bytes; return }
        guard FileManager.default.createFile(atPath: path, contents: Data(bytes)) else { throw Failure("cannot write \(path)") }
    }

    /// The largest input or output file carried over the control socket.
    static let maxFileBytes = 256 << 10
    /// Options naming files the command reads, and those it writes for the caller.
    static let inputOptions: Set<String> = ["--message-file", "--signature-file"]
    static let outputOptions: [String: Set<String>] = ["sign": ["--out"], "get-public-key": ["--out"]]

    static func absolute(_ path: String) -> String { path.isEmpty ? path : URL(fileURLWithPath: path).standardizedFileURL.path }

    /// The command families a daemon runs for a peer.
    static let forwardable: Set<String> = ["key", "audit", "rekey", "backup"]

    /// If a daemon serves `keystore`, runs this process's command line there,
    /// prints what it printed, and ends the command with its exit code.
    static func forwardIfMounted(keystore: String, cipherdir: String) throws {
        let arguments = Array(CommandLine.arguments.dropFirst())
        guard let family = arguments.first, forwardable.contains(family) else { return }
        let forwarded = absolutizingFilesystem(arguments, cipherdir)
        // Input files are read here, as the caller, and sent along.
        var inputs = [String: String]()
        var expected = Set<String>()
        let outputs = arguments.count > 1 ? outputOptions[arguments[1], default: []] : []
        for (option, value) in optionValues(forwarded) {
            if inputOptions.contains(option) {
                let bytes = try Invocation.current.readInput(value)
                inputs[value] = Data(bytes).base64EncodedString()
            }
            if outputs.contains(option) { expected.insert(value) }
        }
        // A refusal (ControlRefusal) reaches the caller as it is: `report` gives it its code.
        guard let result = try ControlServer.forward(directory: keystore, arguments: forwarded, inputs: inputs) else { return }
        for (path, encoded) in result.files ?? [:] where expected.contains(path) {
            guard let data = Data(base64Encoded: encoded) else { throw Failure("the daemon sent an unreadable \(path)") }
            try Invocation.current.writeOutput(path, [UInt8](data))
        }
        FileHandle.standardOutput.write(Data(result.stdout.utf8))
        FileHandle.standardError.write(Data(result.stderr.utf8))
        throw ExitCode(result.code)
    }

    /// Paths given to a command are relative to this shell's directory, not
    /// the daemon's: `--fs` becomes the CIPHERDIR, file options absolute.
    static func absolutizingFilesystem(_ arguments: [String], _ cipherdir: String) -> [String] {
        let fileOptions = Set(["--jsonl", "--out", "--backup-passphrase-file"]).union(inputOptions)
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

    /// (option, value) pairs of a command line, both `--o v` and `--o=v`.
    static func optionValues(_ arguments: [String]) -> [(String, String)] {
        var out = [(String, String)]()
        for (i, argument) in arguments.enumerated() where argument.hasPrefix("--") {
            if let eq = argument.firstIndex(of: "=") {
                out.append((String(argument[..<eq]), String(argument[argument.index(after: eq)...])))
            } else if i + 1 < arguments.count {
                out.append((argument, arguments[i + 1]))
            }
        }
        return out
    }

    /// Runs a forwarded command line inside the daemon as `peer`.
    static func runForwarded(_ command: ForwardedCommand, as peer: Principal, manager: KeyManager, daemon: DaemonServices) -> ForwardedResult {
        let arguments = command.arguments
        let invocation = Invocation(principal: peer, manager: manager, daemon: daemon, captures: true)
        for (path, encoded) in command.inputs {
            if let data = Data(base64Encoded: encoded), data.count <= maxFileBytes { invocation.inputs[path] = [UInt8](data) }
        }
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
            code = report(error, json: arguments.contains("--json"))
        }
        return ForwardedResult(code: code, stdout: invocation.stdout, stderr: invocation.stderr,
                               files: invocation.outputs.isEmpty ? nil : invocation.outputs.mapValues { Data($0).base64EncodedString() })
    }

    /// Prints an error the way kmsfs does and returns the exit code. With
    /// `json` (the command line has `--json`), the error is one JSON object on
    /// stderr: `{"error": {"code": CODE, "message": TEXT}}` (docs/JSON.md).
    static func report(_ error: Error, json: Bool = false) -> Int32 {
        let (code, message, status): (String, String, Int32)
        switch error {
        case let error as KeyManagerError: (code, message, status) = (error.code, error.description, 1)
        case let error as ControlRefusal: (code, message, status) = ("ControlRefused", error.description, 1)
        case let error as Failure: (code, message, status) = ("Failed", error.description, 1)
        case let error as MountError: (code, message, status) = ("MountFailed", error.description, 1)
        default:
            let exit = KMSFS.exitCode(for: error).rawValue
            let text = KMSFS.fullMessage(for: error)
            // Help and --version are not errors: printed as they are. An ExitCode
            // with no message (a forwarded command's status) prints nothing more.
            if exit == 0 || !json || text.isEmpty {
                if !text.isEmpty { exit == 0 ? Output.line(text) : Output.note(text) }
                return exit
            }
            (code, message, status) = ("UsageError", text, exit)
        }
        if json {
            struct Body: Encodable { var error: Detail; struct Detail: Encodable { var code: String; var message: String } }
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
            let data = (try? encoder.encode(Body(error: .init(code: code, message: message)))) ?? Data()
            Output.note(String(decoding: data, as: UTF8.self))
        } else {
            Output.note("kmsfs: " + message)
        }
        return status
    }
}

/// What a running mount offers the commands it runs for peers.
final class DaemonServices: Sendable {
    let rekey: RekeyService
    init(rekey: RekeyService) { self.rekey = rekey }
}
