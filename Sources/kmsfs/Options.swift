import Administration
import ArgumentParser
import ChunkCipher
import Foundation
import KeyManager

/// Where the passphrase comes from: a file, a command, or a prompt without echo. Never argv.
struct PassphraseOptions: ParsableArguments {
    @Option(name: .long, help: "Read the passphrase from this file (first line).")
    var passphraseFile: String?

    @Option(name: .long, help: "Run this command and read the passphrase from its standard output.")
    var extpass: String?

    /// Reads the passphrase into locked memory. Given no passphrase file or
    /// command, a keystore enrolled with `--unlock aws-kms:KEY` is unlocked
    /// through AWS KMS instead of asking.
    func read(prompt: String = "Passphrase: ", confirm: Bool = false, keystore: String? = nil) throws -> SecretKey {
        if passphraseFile == nil, extpass == nil, let keystore, let unlocked = try KMSUnlock.unlock(in: keystore) { return unlocked }
        return try PassphraseReader.read(file: passphraseFile, command: extpass, prompt: prompt, confirm: confirm)
    }
}

/// `--fs PATH`: the CIPHERDIR (or, once mounted, the MOUNTPOINT).
struct FilesystemOption: ParsableArguments {
    @Option(name: .long, help: "The filesystem: its CIPHERDIR.")
    var fs: String

    @OptionGroup var passphrase: PassphraseOptions

    /// Where the command's requests go: the daemon of a live mount (which
    /// runs them as this user, authenticated by the socket), or, unmounted,
    /// the keystore opened here with the passphrase, after its due rotations
    /// and deletions run. `verifyingIntegrity: false` opens a keystore edited
    /// outside kmsfs too, to report on it (`audit verify`).
    func client(verifyingIntegrity: Bool = true) throws -> AdminClient {
        let cipherdir = try Paths.cipherdir(of: fs)
        let keystore = try Paths.keystore(of: cipherdir)
        return AdminClient(keystore: keystore, principal: caller) {
            let manager = try KeyManager.open(in: keystore, passphrase: passphrase.read(keystore: keystore),
                                              verifyingIntegrity: verifyingIntegrity, clock: Clock.current)
            Invocation.opened = manager
            if verifyingIntegrity { Self.report(try manager.runSchedules()) }
            return manager
        }
    }

    /// Carries out one request (see `client`).
    @discardableResult
    func perform(_ request: AdminRequest, verifyingIntegrity: Bool = true) throws -> AdminReply {
        try client(verifyingIntegrity: verifyingIntegrity).perform(request)
    }

    static func report(_ report: ScheduleReport) {
        for key in report.rotated { Output.note("rotated key \(key) automatically (its period had passed)") }
        for key in report.destroyed { Output.note("destroyed key \(key): its deletion window ended") }
        for key in report.unverified {
            Output.note("key \(key) was not destroyed: a mount ended without flushing the usage index, which may miss files of this key; run `kmsfs fsck`")
        }
        for (key, n) in report.blocked {
            Output.note(KeyManagerError.deletionBlocked(key: key.rawValue.hex, references: n).description)
        }
    }
}

/// A reply of another kind than the request's (a daemon of another version).
struct Unexpected: Error, CustomStringConvertible {
    var description: String { "the filesystem answered the request with a reply of another kind; is the mount's daemon of this kmsfs version?" }
}

/// Files a command reads or writes for its caller, as the caller: the
/// daemon of a live mount never opens a peer's paths (they travel as bytes).
enum CallerFile {
    /// The largest such file.
    static let maxBytes = 256 << 10

    static func read(_ path: String, limit: Int = maxBytes) throws -> [UInt8] {
        guard let handle = FileHandle(forReadingAtPath: path) else { throw Failure("cannot read \(path)") }
        defer { try? handle.close() }
        let data = try handle.read(upToCount: limit + 1) ?? Data()
        guard data.count <= limit else { throw Failure("\(path) is larger than \(limit) bytes") }
        return [UInt8](data)
    }

    static func write(_ path: String, _ bytes: [UInt8]) throws {
        guard FileManager.default.createFile(atPath: path, contents: Data(bytes)) else { throw Failure("cannot write \(path)") }
    }
}

struct JSONOption: ParsableArguments {
    @Flag(name: .long, help: "Print JSON instead of a table.")
    var json = false
}

/// A failure to report as one line on stderr, without the usage text that
/// ArgumentParser prints for invalid arguments.
struct Failure: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

enum Paths {
    /// The CIPHERDIR of `path`: the path itself, or the source of the kmsfs
    /// mount whose MOUNTPOINT it is.
    static func cipherdir(of path: String) throws -> String {
        let absolute = URL(fileURLWithPath: path).standardizedFileURL.path
        if let mount = MountTable.kmsfsMounts().first(where: { $0.mountpoint == absolute }) { return mount.source }
        return absolute
    }

    /// `CIPHERDIR/.kmsfs`, after checking it exists.
    static func keystore(of path: String) throws -> String {
        let dir = URL(fileURLWithPath: path).standardizedFileURL.path + "/.kmsfs"
        guard FileManager.default.fileExists(atPath: dir + "/" + KeyManager.databaseName) else {
            throw Failure("\(path) is not a kmsfs CIPHERDIR (no .kmsfs/\(KeyManager.databaseName)); run `kmsfs init \(path)` first")
        }
        return dir
    }
}

/// The principal running this command.
var caller: Principal { Invocation.principal }

enum Clock {
    /// The system clock; debug builds honour KMSFS_TEST_NOW (seconds since
    /// 1970) and KMSFS_TEST_CLOCK_FILE (a file holding that number, read at
    /// each call, so a test can move a running daemon's time) so end-to-end
    /// tests can move time. Release builds ignore both.
    static var current: @Sendable () -> Double {
        #if DEBUG
        let environment = ProcessInfo.processInfo.environment
        if let text = environment["KMSFS_TEST_NOW"], let now = Double(text) {
            return { now }
        }
        if let file = environment["KMSFS_TEST_CLOCK_FILE"] {
            return {
                let text = (try? String(contentsOfFile: file, encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines)
                return text.flatMap(Double.init) ?? KeyManager.systemClock()
            }
        }
        #endif
        return KeyManager.systemClock
    }
}

enum Output {
    /// A line on stderr (notes and errors; stdout stays machine-readable).
    static func note(_ text: String) {
        FileHandle.standardError.write(Data((text + "\n").utf8))
    }

    /// A line on stdout.
    static func line(_ text: String = "") {
        FileHandle.standardOutput.write(Data((text + "\n").utf8))
    }

    static func json<T: Encodable>(_ value: T) throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        let tree = isoTimes(try JSONSerialization.jsonObject(with: try encoder.encode(value), options: [.fragmentsAllowed]))
        let text = try JSONSerialization.data(withJSONObject: tree, options: [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes, .fragmentsAllowed])
        Output.line(String(decoding: text, as: UTF8.self))
    }

    /// The fields that hold a time. The library types keep seconds since
    /// 1970 (they are also stored, in backups for one); what the CLI prints
    /// turns every one of them into an ISO 8601 UTC string with milliseconds,
    /// as the AWS CLI prints times (docs/JSON.md).
    static let timeFields: Set<String> = ["time", "createdAt", "stateChangedAt", "lastRotatedAt", "deletionDate", "rotationDate", "updatedAt",
                                          "finishedAt", "expiresAt", "lastUsedAt", "nextRotationAt", "startedAt", "expiry", "since", "until"]

    static func isoTimes(_ node: Any, key: String? = nil) -> Any {
        if let object = node as? [String: Any] {
            return Dictionary(uniqueKeysWithValues: object.map { ($0.key, isoTimes($0.value, key: $0.key)) })
        }
        if let array = node as? [Any] { return array.map { isoTimes($0, key: key) } }
        if let key, timeFields.contains(key), let number = node as? NSNumber {
            return isoDate(number.doubleValue)
        }
        return node
    }

    /// `t` (seconds since 1970) as ISO 8601 UTC with milliseconds: 2026-12-04T18:19:23.125Z.
    static func isoDate(_ t: Double) -> String { SecurityFindings.iso(t) }

    static func date(_ t: Double?) -> String {
        guard let t else { return "-" }
        return Date(timeIntervalSince1970: t).formatted(.iso8601)
    }

    /// A plain aligned table.
    static func table(_ header: [String], _ rows: [[String]]) {
        let widths = header.indices.map { i in ([header[i]] + rows.map { $0[i] }).map(\.count).max() ?? 0 }
        for row in [header] + rows {
            Output.line(zip(row, widths).map { $0.padding(toLength: $1, withPad: " ", startingAt: 0) }.joined(separator: "  ")
                .trimmingCharacters(in: .whitespaces))
        }
    }
}

/// PEM text to the DER it carries (the base64 between the BEGIN and END lines).
enum PEM {
    static func der(_ text: String) -> [UInt8]? {
        Data(base64Encoded: text.split(separator: "\n").filter { !$0.hasPrefix("-----") }.joined()).map { [UInt8]($0) }
    }
}
