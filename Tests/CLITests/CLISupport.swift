import Foundation
import Testing

/// The kmsfs binary built by `swift build` (make test builds it first).
let kmsfsBinary: String = {
    if let path = ProcessInfo.processInfo.environment["KMSFS_BIN"] { return path }
    let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    return root.appendingPathComponent(".build/debug/kmsfs").path
}()

struct CommandResult {
    var status: Int32
    var stdout: String
    var stderr: String
}

/// Runs kmsfs with `arguments` and returns its exit status and output.
@discardableResult
func kmsfs(_ arguments: [String], environment: [String: String] = [:]) throws -> CommandResult {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: kmsfsBinary)
    process.arguments = arguments
    var env = ProcessInfo.processInfo.environment
    for (k, v) in environment { env[k] = v }
    process.environment = env
    let out = Pipe(), err = Pipe()
    process.standardOutput = out
    process.standardError = err
    process.standardInput = FileHandle.nullDevice
    try process.run()
    let outData = out.fileHandleForReading.readDataToEndOfFile()
    let errData = err.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    return CommandResult(status: process.terminationStatus, stdout: String(decoding: outData, as: UTF8.self),
                         stderr: String(decoding: errData, as: UTF8.self))
}

/// A temporary CIPHERDIR made with `kmsfs init` and a passphrase file.
final class CLIScratch {
    let root: String
    var cipherdir: String { root + "/cipher" }
    var passphraseFile: String { root + "/passphrase" }

    init() throws {
        root = FileManager.default.temporaryDirectory.appendingPathComponent("kmsfs-cli-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
        try "cli test passphrase\n".write(toFile: passphraseFile, atomically: true, encoding: .utf8)
        let result = try kmsfs(["init", cipherdir, "--passphrase-file", passphraseFile, "--kdf-log-n", "10"])
        #expect(result.status == 0, "init failed: \(result.stderr)")
    }

    deinit { try? FileManager.default.removeItem(atPath: root) }

    /// Runs `kmsfs key …` against this filesystem.
    @discardableResult
    func key(_ arguments: [String], environment: [String: String] = [:]) throws -> CommandResult {
        try kmsfs(["key"] + arguments + ["--fs", cipherdir, "--passphrase-file", passphraseFile], environment: environment)
    }

    func json(_ arguments: [String], environment: [String: String] = [:]) throws -> Any {
        let result = try key(arguments + ["--json"], environment: environment)
        #expect(result.status == 0, "\(arguments): \(result.stderr)")
        return try JSONSerialization.jsonObject(with: Data(result.stdout.utf8))
    }
}
