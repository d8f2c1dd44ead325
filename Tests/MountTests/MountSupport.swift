import Foundation
import Testing

let repositoryRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

/// The kmsfs binary built by `swift build` (make test builds it first).
let kmsfsBinary: String = ProcessInfo.processInfo.environment["KMSFS_BIN"]
    ?? repositoryRoot.appendingPathComponent(".build/debug/kmsfs").path

struct Output {
    var status: Int32
    var stdout: String
    var stderr: String
    var ok: Bool { status == 0 }
}

/// Runs a shell script with `bash -euo pipefail`; returns status and output.
@discardableResult
func sh(_ script: String, environment: [String: String] = [:]) throws -> Output {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/bin/bash")
    process.arguments = ["-euo", "pipefail", "-c", script]
    var env = ProcessInfo.processInfo.environment
    for (k, v) in environment { env[k] = v }
    process.environment = env
    // stderr goes to a file so a chatty child can never block on a full pipe.
    let errPath = FileManager.default.temporaryDirectory.appendingPathComponent("kmsfs-stderr-\(UUID().uuidString)").path
    FileManager.default.createFile(atPath: errPath, contents: nil)
    defer { try? FileManager.default.removeItem(atPath: errPath) }
    let out = Pipe()
    process.standardOutput = out
    process.standardError = FileHandle(forWritingAtPath: errPath)
    process.standardInput = FileHandle.nullDevice
    try process.run()
    let outData = out.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    let errData = FileManager.default.contents(atPath: errPath) ?? Data()
    return Output(status: process.terminationStatus, stdout: String(decoding: outData, as: UTF8.self),
                  stderr: String(decoding: errData, as: UTF8.self))
}

/// Quotes a string for the shell.
func q(_ s: String) -> String { "'" + s.replacingOccurrences(of: "'", with: "'\\''") + "'" }

/// A freshly initialised and mounted kmsfs in a temporary directory. It
/// unmounts and removes everything when released, on failure too.
final class MountedFS {
    let root: String
    var cipherdir: String { root + "/cipher" }
    var mountpoint: String { root + "/mnt" }
    var passphraseFile: String { root + "/passphrase" }
    var keystore: String { cipherdir + "/.kmsfs/keystore.db" }
    private(set) var mounted = false
    /// Runs every mount of this filesystem (e.g. "env VAR=value") unless a mount names its own.
    let launcher: String

    init(mountOptions: [String] = [], initOptions: [String] = [], launcher: String = "", mountArguments: [String] = []) throws {
        self.launcher = launcher
        root = FileManager.default.temporaryDirectory.appendingPathComponent("kmsfs-mnt-\(UUID().uuidString.prefix(8))").path
        try FileManager.default.createDirectory(atPath: root + "/mnt", withIntermediateDirectories: true)
        try "mount test passphrase\n".write(toFile: passphraseFile, atomically: true, encoding: .utf8)
        let made = try kmsfs(["init", cipherdir, "--kdf-log-n", "10"] + initOptions)
        precondition(made.ok, "init failed: \(made.stderr)")
        try mount(options: mountOptions, arguments: mountArguments)
    }

    deinit {
        if mounted { _ = try? sh("fusermount3 -u \(q(mountpoint)) 2>/dev/null || fusermount3 -uz \(q(mountpoint))") }
        try? FileManager.default.removeItem(atPath: root)
    }

    /// Runs kmsfs with this filesystem's passphrase file.
    @discardableResult
    func kmsfs(_ arguments: [String]) throws -> Output {
        try sh(([kmsfsBinary] + arguments + ["--passphrase-file", passphraseFile]).map(q).joined(separator: " "))
    }

    /// Runs `kmsfs key …` against this filesystem.
    @discardableResult
    func key(_ arguments: [String]) throws -> Output {
        try kmsfs(["key"] + arguments + ["--fs", cipherdir])
    }

    /// Mounts again; `launcher` (e.g. "prlimit --nofile=256:8192") runs the mount command.
    func mount(options: [String] = [], launcher: String = "", arguments extra: [String] = []) throws {
        let arguments = ["mount", cipherdir, mountpoint] + options.flatMap { ["-o", $0] } + ["--passphrase-file", passphraseFile] + extra
        let result = try sh((launcher.isEmpty ? self.launcher : launcher) + " " + ([kmsfsBinary] + arguments).map(q).joined(separator: " "))
        #expect(result.ok, "mount failed: \(result.stderr)")
        mounted = result.ok
    }

    /// Mounts again after the daemon was killed (its dead mount detached first).
    func remountAfterKill() throws {
        _ = try sh("fusermount3 -uz \(q(mountpoint))")
        try mount()
    }

    func unmount() throws {
        let result = try sh("\(q(kmsfsBinary)) umount \(q(mountpoint))")
        #expect(result.ok, "unmount failed: \(result.stderr)")
        mounted = false
    }

    /// Runs a script inside the mountpoint (`$M`), with `$C` the cipherdir and `$T` a scratch dir.
    @discardableResult
    func run(_ script: String) throws -> Output {
        try FileManager.default.createDirectory(atPath: root + "/tmp", withIntermediateDirectories: true)
        return try sh("cd \(q(mountpoint)); M=\(q(mountpoint)); C=\(q(cipherdir)); T=\(q(root + "/tmp")); K=\(q(kmsfsBinary)); P=\(q(passphraseFile))\n" + script)
    }

    /// Runs Python code inside the mountpoint; `M`, `C` and `T` are set as
    /// variables, and `kill_daemon()` kills the mount's daemon with SIGKILL,
    /// returning the `kmsfs status --json` it read first.
    @discardableResult
    func python(_ code: String) throws -> Output {
        try FileManager.default.createDirectory(atPath: root + "/tmp", withIntermediateDirectories: true)
        let file = root + "/tmp/script-\(UUID().uuidString.prefix(6)).py"
        let prelude = "import os, sys, errno\nM = \(q(mountpoint))\nC = \(q(cipherdir))\nT = \(q(root + "/tmp"))\nos.chdir(M)\n"
            + "def kill_daemon():\n"
            + "    import json, signal, subprocess\n"
            + "    status = json.loads(subprocess.run([\(q(kmsfsBinary)), 'status', '--fs', M, '--json'], capture_output=True, check=True).stdout)\n"
            + "    os.kill(status['daemon']['pid'], signal.SIGKILL)\n"
            + "    return status\n"
        try (prelude + code).write(toFile: file, atomically: true, encoding: .utf8)
        return try sh("python3 \(q(file))")
    }
}

/// A kmsfs made and mounted on a tmpfs of `size` of its own, for full-disk
/// tests. Call `remove()` (in a `defer`) to unmount both and delete it.
struct SmallDisk {
    struct SetupFailed: Error { let output: Output }
    let root: String
    var disk: String { root + "/disk" }
    var cipherdir: String { disk + "/cipher" }
    var mountpoint: String { root + "/mnt" }
    /// `kmsfs`, quoted for a shell, and the passphrase argument.
    let kmsfs = q(kmsfsBinary)
    var passphrase: String { "--passphrase-file \(q(root + "/passphrase"))" }

    init(size: String) throws {
        root = FileManager.default.temporaryDirectory.appendingPathComponent("kmsfs-small-\(UUID().uuidString.prefix(8))").path
        try FileManager.default.createDirectory(atPath: root + "/disk", withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: root + "/mnt", withIntermediateDirectories: true)
        try "small disk passphrase\n".write(toFile: root + "/passphrase", atomically: true, encoding: .utf8)
        let made = try sh("mount -t tmpfs -o size=\(size) kmsfs-small \(q(disk)) && \(kmsfs) init \(q(cipherdir)) --kdf-log-n 10 \(passphrase) >/dev/null"
                          + " && \(kmsfs) mount \(q(cipherdir)) \(q(mountpoint)) \(passphrase)")
        guard made.ok else {
            remove()
            throw SetupFailed(output: made)
        }
    }

    func remove() {
        _ = try? sh("{ fusermount3 -u \(q(mountpoint)) || fusermount3 -uz \(q(mountpoint)); } 2>/dev/null || true; umount \(q(disk)) 2>/dev/null || umount -l \(q(disk)) 2>/dev/null || true")
        try? FileManager.default.removeItem(atPath: root)
    }
}
