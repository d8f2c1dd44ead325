import Administration
import ArgumentParser
import ChunkCipher
import Foundation

/// Reads passphrases straight into locked memory from a file, a command's
/// output, or the terminal with echo off.
enum PassphraseReader {
    static func read(file: String?, command: String?, prompt: String, confirm: Bool) throws -> SecretKey {
        // A refusal of the passphrase is a usage error (exit 64), as ArgumentParser reports one.
        func usage<T: ~Copyable>(_ body: () throws(AdminFailure) -> T) throws -> T {
            do { return try body() } catch { throw ValidationError(error.message) }
        }
        if let file { return try usage { () throws(AdminFailure) in try SecretFile.read(file) } }
        var raw: [UInt8]
        if let command {
            raw = try run(command)
        } else {
            raw = try prompted(prompt)
            if confirm {
                var again = try prompted("Repeat: ")
                defer { wipe(&again) }
                guard again == raw else {
                    wipe(&raw)
                    throw ValidationError("the passphrases differ; nothing was changed")
                }
            }
        }
        defer { wipe(&raw) }
        return try usage { () throws(AdminFailure) in try SecretFile.firstLine(raw) }
    }

    /// Reads a passphrase written to a pipe by the parent process.
    static func read(fd: Int32) throws -> SecretKey {
        var raw = [UInt8]()
        var chunk = [UInt8](repeating: 0, count: 1024)
        while true {
            let n = Glibc.read(fd, &chunk, chunk.count)
            if n <= 0 { break }
            raw.append(contentsOf: chunk[0..<n])
        }
        close(fd)
        wipe(&chunk)
        defer { wipe(&raw) }
        guard !raw.isEmpty else { throw ValidationError("no passphrase on descriptor \(fd)") }
        return SecretKey(copying: raw)
    }

    private static func wipe(_ bytes: inout [UInt8]) {
        for i in bytes.indices { bytes[i] = 0 }
    }

    private static func run(_ command: String) throws -> [UInt8] {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/sh")
        process.arguments = ["-c", command]
        let pipe = Pipe()
        process.standardOutput = pipe
        try process.run()
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        guard process.terminationStatus == 0 else {
            throw ValidationError("--extpass command exited with status \(process.terminationStatus)")
        }
        return [UInt8](data)
    }

    /// Reads a line from /dev/tty with echo off.
    private static func prompted(_ prompt: String) throws -> [UInt8] {
        let fd = open("/dev/tty", O_RDWR)
        guard fd >= 0 else {
            throw ValidationError("no terminal to ask for the passphrase; use --passphrase-file or --extpass")
        }
        defer { close(fd) }
        _ = prompt.withCString { write(fd, $0, strlen($0)) }
        var saved = termios()
        tcgetattr(fd, &saved)
        var quiet = saved
        quiet.c_lflag &= ~tcflag_t(ECHO)
        tcsetattr(fd, TCSAFLUSH, &quiet)
        defer {
            tcsetattr(fd, TCSAFLUSH, &saved)
            _ = write(fd, "\n", 1)
        }
        var out = [UInt8]()
        var byte: UInt8 = 0
        while Glibc.read(fd, &byte, 1) == 1 && byte != 0x0A { out.append(byte) }
        return out
    }
}
