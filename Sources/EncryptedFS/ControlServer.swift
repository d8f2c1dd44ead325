import CLinux
import Foundation
import KeyManager
import Logging
#if canImport(Glibc)
import Glibc
#endif

/// What `kmsfs status` shows of a running mount.
public struct MountStatus: Codable, Sendable {
    public var cipherdir: String
    public var mountpoint: String
    public var pid: Int32
    public var startedAt: Double
    public var statistics: FilesystemStatistics
    /// Master keys whose data keys are held by open files right now.
    public var keysInUse: [String]

    public init(cipherdir: String, mountpoint: String, pid: Int32, startedAt: Double, statistics: FilesystemStatistics, keysInUse: [String]) {
        self.cipherdir = cipherdir
        self.mountpoint = mountpoint
        self.pid = pid
        self.startedAt = startedAt
        self.statistics = statistics
        self.keysInUse = keysInUse
    }
}

/// A command line the daemon ran on behalf of a peer, and what it printed.
public struct ForwardedResult: Codable, Sendable {
    public var code: Int32
    public var stdout: String
    public var stderr: String
    public init(code: Int32, stdout: String, stderr: String) {
        self.code = code
        self.stdout = stdout
        self.stderr = stderr
    }
}

/// The daemon's local control socket, `CIPHERDIR/.kmsfs/control.sock`.
/// Callers are authenticated by their peer credentials (SO_PEERCRED), never
/// by anything they send. One JSON request per line, one JSON reply.
///
/// - `status` answers root and the uid the daemon runs as.
/// - `run` executes an admin command line (`kmsfs key …`, `audit …`,
///   `rekey …`) inside the daemon, as the peer: the `admit` closure decides
///   who may use the admin plane at all (and records refusals), and each
///   key operation then checks the key's policy for that principal.
///
/// The socket is world-connectable (mode 0666 inside the traverse-only
/// `.kmsfs`), because admins named by key policy need not be root; the peer
/// credentials are what count. Requests are served one at a time.
public final class ControlServer: @unchecked Sendable {
    public static let socketName = "control.sock"
    private let path: String
    private let listener: Int32
    private let status: @Sendable () -> MountStatus
    private let admit: @Sendable (Principal) -> Bool
    private let execute: @Sendable ([String], Principal) -> ForwardedResult
    private let logger = Logger(label: "kmsfs.control")
    private var thread: Thread?

    struct Request: Codable {
        var command: String
        var arguments: [String]?
    }
    struct Reply: Codable {
        var ok: Bool
        var error: String?
        var status: MountStatus?
        var result: ForwardedResult?
    }

    /// Listens on `directory/control.sock` (replacing a stale socket).
    public init(directory: String, status: @escaping @Sendable () -> MountStatus,
                admit: @escaping @Sendable (Principal) -> Bool = { _ in false },
                execute: @escaping @Sendable ([String], Principal) -> ForwardedResult = { _, _ in ForwardedResult(code: 1, stdout: "", stderr: "not supported\n") }) throws {
        path = directory + "/" + Self.socketName
        self.status = status
        self.admit = admit
        self.execute = execute
        unlink(path)
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw POSIXError(.init(rawValue: errno) ?? .EIO) }
        guard var address = Self.address(path) else { close(fd); throw POSIXError(.ENAMETOOLONG) }
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        // Connectable by anyone who can reach it; who may do what is decided per request.
        guard bound == 0, chmod(path, 0o666) == 0, chmod(directory, 0o711) == 0, listen(fd, 16) == 0 else {
            let error = errno
            close(fd)
            throw POSIXError(.init(rawValue: error) ?? .EIO)
        }
        listener = fd
    }

    /// Serves requests on a background thread until `stop`.
    public func start() {
        let thread = Thread { [self] in serve() }
        thread.name = "kmsfs-control"
        thread.start()
        self.thread = thread
    }

    public func stop() {
        shutdown(listener, Int32(SHUT_RDWR))
        close(listener)
        unlink(path)
    }

    private func serve() {
        while true {
            let client = accept(listener, nil, nil)
            if client < 0 {
                if errno == EINTR { continue }
                return
            }
            handle(client)
            close(client)
        }
    }

    private func handle(_ client: Int32) {
        var uid: UInt32 = 0, gid: UInt32 = 0, pid: Int32 = 0
        guard kmsfs_peer_credentials(client, &uid, &gid, &pid) == 0 else { return }
        let peer = Principal(uid: uid, gid: gid, pid: pid, processName: Self.processName(pid))
        let privileged = uid == 0 || uid == geteuid()
        var line = [UInt8]()
        var byte: UInt8 = 0
        while line.count < 1 << 20, read(client, &byte, 1) == 1, byte != 0x0A { line.append(byte) }
        guard let request = try? JSONDecoder().decode(Request.self, from: Data(line)) else {
            send(client, Reply(ok: false, error: "malformed request"))
            return
        }
        switch request.command {
        case "status" where privileged:
            send(client, Reply(ok: true, status: status()))
        case "run" where privileged || admit(peer):
            send(client, Reply(ok: true, result: execute(request.arguments ?? [], peer)))
        case "status", "run":
            logger.notice("control request refused", metadata: ["uid": "\(uid)", "command": .string(request.command)])
            send(client, Reply(ok: false, error: "uid \(uid) may not administer this filesystem: no key policy grants it administer"))
        default:
            send(client, Reply(ok: false, error: "unknown command \(request.command)"))
        }
    }

    static func processName(_ pid: Int32) -> String? {
        guard let text = try? String(contentsOfFile: "/proc/\(pid)/comm", encoding: .utf8) else { return nil }
        return text.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    private func send(_ client: Int32, _ reply: Reply) {
        guard var data = try? JSONEncoder().encode(reply) else { return }
        data.append(0x0A)
        data.withUnsafeBytes { raw in
            var offset = 0
            while offset < raw.count {
                let n = write(client, raw.baseAddress! + offset, raw.count - offset)
                if n <= 0 { return }
                offset += n
            }
        }
    }

    /// The socket address of `path`, or nil if it is too long for sun_path.
    private static func address(_ path: String) -> sockaddr_un? {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else { return nil }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        return address
    }

    /// A socket connected to the daemon serving `directory`, or nil when none answers.
    private static func connection(_ directory: String) -> Int32? {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return nil }
        guard var address = Self.address(directory + "/" + socketName) else { close(fd); return nil }
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard connected == 0 else { close(fd); return nil }
        return fd
    }

    /// Sends one request to the daemon serving `directory`; nil when none answers.
    static func exchange(directory: String, _ request: Request) throws -> Reply? {
        guard let fd = connection(directory) else { return nil }
        defer { close(fd) }
        var data = try JSONEncoder().encode(request)
        data.append(0x0A)
        _ = data.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        var response = [UInt8]()
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = read(fd, &buffer, buffer.count)
            if n <= 0 { break }
            response.append(contentsOf: buffer[0..<n])
        }
        return try JSONDecoder().decode(Reply.self, from: Data(response))
    }

    /// Asks a running daemon for its status; nil when no daemon answers.
    public static func query(directory: String) throws -> MountStatus? {
        guard let reply = try exchange(directory: directory, Request(command: "status")) else { return nil }
        guard reply.ok else { throw POSIXError(.EACCES) }
        return reply.status
    }

    /// Whether a daemon answers on `directory`'s control socket.
    public static func isServing(directory: String) -> Bool {
        guard let fd = connection(directory) else { return false }
        close(fd)
        return true
    }

    /// Runs `arguments` (a kmsfs command line without the program name) in the
    /// daemon serving `directory`. nil when no daemon answers; throws the
    /// daemon's refusal as `ControlRefusal`.
    public static func forward(directory: String, arguments: [String]) throws -> ForwardedResult? {
        guard let reply = try exchange(directory: directory, Request(command: "run", arguments: arguments)) else { return nil }
        guard reply.ok, let result = reply.result else { throw ControlRefusal(message: reply.error ?? "refused") }
        return result
    }
}

/// The daemon refused a control request.
public struct ControlRefusal: Error, CustomStringConvertible {
    public var message: String
    public var description: String { message }
}

extension EncryptedFileSystem {
    /// Master keys whose data keys open files hold now.
    public var keysInUse: [String] {
        Array(Set(openFileKeys.map(\.rawValue.hex))).sorted()
    }
}
