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

/// The daemon's local control socket, `CIPHERDIR/.kmsfs/control.sock`.
/// Callers are authenticated by their peer credentials (SO_PEERCRED): root
/// and the uid the daemon runs as. One JSON request per line, one JSON reply.
/// Today it answers `status`; the admin plane builds on it.
public final class ControlServer: @unchecked Sendable {
    public static let socketName = "control.sock"
    private let path: String
    private let listener: Int32
    private let status: @Sendable () -> MountStatus
    private let logger = Logger(label: "kmsfs.control")
    private var thread: Thread?

    struct Request: Codable { var command: String }
    struct Reply: Codable {
        var ok: Bool
        var error: String?
        var status: MountStatus?
    }

    /// Listens on `directory/control.sock` (replacing a stale socket).
    public init(directory: String, status: @escaping @Sendable () -> MountStatus) throws {
        path = directory + "/" + Self.socketName
        self.status = status
        unlink(path)
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw POSIXError(.init(rawValue: errno) ?? .EIO) }
        guard var address = Self.address(path) else { close(fd); throw POSIXError(.ENAMETOOLONG) }
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard bound == 0, chmod(path, 0o600) == 0, listen(fd, 16) == 0 else {
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
        guard uid == 0 || uid == geteuid() else {
            logger.notice("control request refused", metadata: ["uid": "\(uid)"])
            send(client, Reply(ok: false, error: "uid \(uid) may not use this mount's control socket"))
            return
        }
        var line = [UInt8]()
        var byte: UInt8 = 0
        while line.count < 65536, read(client, &byte, 1) == 1, byte != 0x0A { line.append(byte) }
        guard let request = try? JSONDecoder().decode(Request.self, from: Data(line)) else {
            send(client, Reply(ok: false, error: "malformed request"))
            return
        }
        switch request.command {
        case "status": send(client, Reply(ok: true, status: status()))
        default: send(client, Reply(ok: false, error: "unknown command \(request.command)"))
        }
    }

    private func send(_ client: Int32, _ reply: Reply) {
        guard var data = try? JSONEncoder().encode(reply) else { return }
        data.append(0x0A)
        _ = data.withUnsafeBytes { write(client, $0.baseAddress, $0.count) }
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

    /// Asks a running daemon for its status; nil when no daemon answers.
    public static func query(directory: String) throws -> MountStatus? {
        let path = directory + "/" + socketName
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        guard var address = Self.address(path) else { return nil }
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard connected == 0 else { return nil }
        var request = try JSONEncoder().encode(Request(command: "status"))
        request.append(0x0A)
        _ = request.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        var response = [UInt8]()
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = read(fd, &buffer, buffer.count)
            if n <= 0 { break }
            response.append(contentsOf: buffer[0..<n])
        }
        let reply = try JSONDecoder().decode(Reply.self, from: Data(response))
        guard reply.ok else { throw POSIXError(.EACCES) }
        return reply.status
    }
}

extension EncryptedFileSystem {
    /// Master keys whose data keys open files hold now.
    public var keysInUse: [String] {
        Array(Set(openFileKeys.map(\.rawValue.hex))).sorted()
    }
}
