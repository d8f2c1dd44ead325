import CLinux
import EncryptedFS
import Foundation
import KeyManager
import Logging
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// The daemon's local control socket, `CIPHERDIR/.kmsfs/control.sock`.
/// Callers are authenticated by their peer credentials (SO_PEERCRED), never
/// by anything they send. One JSON request per line, one JSON reply
/// (docs/JSON.md, "The control socket").
///
/// - `status` answers root and the uid the daemon runs as.
/// - `admin` carries one typed `AdminRequest`, carried out inside the
///   daemon as the peer: the `admit` closure decides who may talk at all
///   (and records refusals) — administrators of some key may ask anything,
///   holders of encrypt or decrypt only the key-use requests — and each key
///   operation then checks its key's policy.
///
/// The socket is world-connectable (mode 0666 inside the traverse-only
/// `.kmsfs`), because admins named by key policy need not be root; the peer
/// credentials are what count, and they are checked before a byte of the
/// request is read. Each connection has its own thread (at most
/// `maxConnections`, `connectionsPerUser` per uid other than root and the
/// mounting user, who are never turned away), a request is at most `maxRequest` bytes and must
/// arrive within `readTimeout`, so a stalled or flooding client holds only
/// its own connection; requests run concurrently (the keystore serialises
/// its writes), so a slow one (a KMS call, a backup's scrypt) does not hold
/// up a root `key disable`.
public final class ControlServer: Sendable {
    public static let socketName = "control.sock"
    private let path: String
    private let listener: Int32
    private let status: @Sendable () -> MountStatus
    private let admit: @Sendable (Principal) -> ControlAdmission
    private let execute: @Sendable (AdminRequest, Principal) throws(AdminFailure) -> AdminReply
    private let logger = Logger(label: "kmsfs.control")
    /// Connections open per uid.
    private let connections = Mutex<[UInt32: Int]>([:])

    public static let maxConnections = 32
    public static let connectionsPerUser = 4
    public static let maxRequest = 1 << 20
    public static let readTimeout: Int = 5

    struct Request: Codable {
        var command: String
        var request: AdminRequest?
    }
    struct Reply: Codable {
        var ok: Bool
        var error: String?
        /// With `error`: the failure's code (docs/JSON.md); absent for a refusal by the socket itself.
        var code: String?
        var status: MountStatus?
        var reply: AdminReply?
    }

    /// Listens on `directory/control.sock` (replacing a stale socket).
    public init(directory: String, status: @escaping @Sendable () -> MountStatus,
                admit: @escaping @Sendable (Principal) -> ControlAdmission = { _ in .refused },
                execute: @escaping @Sendable (AdminRequest, Principal) throws(AdminFailure) -> AdminReply = { _, _ throws(AdminFailure) in
                    throw AdminFailure("this mount serves no admin requests")
                }) throws {
        path = directory + "/" + Self.socketName
        self.status = status
        self.admit = admit
        self.execute = execute
        unlink(path)
        let made = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard made >= 0 else { throw POSIXError(.init(rawValue: errno) ?? .EIO) }
        let socket = Descriptor(adopting: made)  // closed here on any failure below
        guard var address = Self.address(path) else { throw POSIXError(.ENAMETOOLONG) }
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(socket.raw, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        // Connectable by anyone who can reach it; who may do what is decided per request.
        guard bound == 0, chmod(path, 0o666) == 0, chmod(directory, 0o711) == 0, listen(socket.raw, 16) == 0 else {
            throw POSIXError(.init(rawValue: errno) ?? .EIO)
        }
        // From here `stop` closes it (the accepting thread is woken by its shutdown first).
        listener = socket.take()
    }

    /// Serves requests on a background thread until `stop`.
    public func start() {
        let thread = Thread { [self] in serve() }
        thread.name = "kmsfs-control"
        thread.start()
    }

    public func stop() {
        shutdown(listener, Int32(SHUT_RDWR))
        close(listener)
        unlink(path)
    }

    private func serve() {
        while true {
            let accepted = accept(listener, nil, nil)
            if accepted < 0 {
                if errno == EINTR || errno == ECONNABORTED { continue }
                return
            }
            let client = Descriptor(adopting: accepted)  // closed at the end of this turn unless handed to a worker
            var uid: UInt32 = 0, gid: UInt32 = 0, pid: Int32 = 0
            guard kmsfs_peer_credentials(client.raw, &uid, &gid, &pid) == 0 else { continue }
            let peer = Principal(uid: uid, gid: gid, pid: pid, processName: Self.processName(pid))
            // Root and the mounting user are never turned away for capacity;
            // any other uid holds at most `connectionsPerUser` at a time.
            let privileged = peer.hasDaemonStanding()
            let admitted = connections.withLock { open -> Bool in
                guard open.values.reduce(0, +) < Self.maxConnections || privileged,
                      privileged || open[uid, default: 0] < Self.connectionsPerUser else { return false }
                open[uid, default: 0] += 1
                return true
            }
            guard admitted else {
                send(client.raw, Reply(ok: false, error: "too many connections from uid \(uid); try again"))
                continue
            }
            let handed = client.take()
            let worker = Thread { [self] in
                let client = Descriptor(adopting: handed)
                handle(client.raw, peer: peer, privileged: privileged)
                connections.withLock { $0[peer.uid, default: 1] -= 1 }
            }
            worker.name = "kmsfs-control-client"
            worker.start()
        }
    }

    private func handle(_ client: Int32, peer: Principal, privileged: Bool) {
        let uid = peer.uid
        var timeout = timeval(tv_sec: Self.readTimeout, tv_usec: 0)
        setsockopt(client, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(client, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        // Who may talk at all is decided before reading what they say.
        let admission = privileged ? .administrator : admit(peer)
        guard admission != .refused else {
            logger.notice("control connection refused", metadata: ["uid": "\(uid)"])
            send(client, Reply(ok: false, error: "uid \(uid) may not use this filesystem's keys: no key policy or grant names it"))
            return
        }
        let line: [UInt8]
        switch Self.readLine(client) {
        case .line(let bytes): line = bytes
        case .tooLong:
            send(client, Reply(ok: false, error: "request longer than \(Self.maxRequest) bytes"))
            return
        case .timedOut:
            send(client, Reply(ok: false, error: "no complete request within \(Self.readTimeout) s"))
            return
        case .closed:
            return
        }
        let request: Request
        do {
            request = try JSONDecoder().decode(Request.self, from: Data(line))
        } catch {
            send(client, Reply(ok: false, error: "malformed request: expected one JSON object {\"command\": \"status\"} or "
                                               + "{\"command\": \"admin\", \"request\": {…}} on one line (\(Self.decodingProblem(error)))"))
            return
        }
        switch (request.command, request.request) {
        case ("status", _) where privileged:
            send(client, Reply(ok: true, status: status()))
        case ("admin", let admin?) where admission == .keyUser && !admin.isKeyUse:
            send(client, Reply(ok: false, error: "uid \(uid) may not administer this filesystem: no key policy grants it administer "
                                                + "(with encrypt or decrypt alone, only key sign, verify, get-public-key and retiring its own grant)"))
        case ("admin", let admin?):
            do {
                send(client, Reply(ok: true, reply: try execute(admin, peer)))
            } catch {
                send(client, Reply(ok: false, error: error.message, code: error.code))
            }
        case ("admin", nil):
            send(client, Reply(ok: false, error: "malformed request: \"admin\" needs a \"request\""))
        case ("status", _):
            send(client, Reply(ok: false, error: "uid \(uid) may not read the status of this mount (root or the mounting user)"))
        default:
            send(client, Reply(ok: false, error: "unknown command \(request.command.prefix(64))"))
        }
    }

    /// Where a request failed to decode, for its sender (never echoing what it sent).
    static func decodingProblem(_ error: Error) -> String {
        switch error as? DecodingError {
        case .keyNotFound(let key, let context)?: "no \(key.stringValue) at \(path(context))"
        case .typeMismatch(_, let context)?, .valueNotFound(_, let context)?: "wrong type at \(path(context))"
        case .dataCorrupted(let context)?: context.codingPath.isEmpty ? "not JSON" : "unreadable value at \(path(context))"
        default: "not JSON"
        }
    }

    private static func path(_ context: DecodingError.Context) -> String {
        context.codingPath.isEmpty ? "the top" : context.codingPath.map(\.stringValue).joined(separator: ".")
    }

    enum LineRead { case line([UInt8]), tooLong, timedOut, closed }

    /// Reads up to the first newline, in blocks, within the size and time bounds.
    static func readLine(_ fd: Int32) -> LineRead {
        var line = [UInt8]()
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = read(fd, &buffer, buffer.count)
            if n < 0 {
                if errno == EINTR { continue }
                return errno == EAGAIN || errno == EWOULDBLOCK ? .timedOut : .closed
            }
            // End of stream: what came is the request (a client may omit the newline).
            if n == 0 { return line.isEmpty ? .closed : .line(line) }
            if let newline = buffer[0..<n].firstIndex(of: 0x0A) {
                line.append(contentsOf: buffer[0..<newline])
                return line.count > maxRequest ? .tooLong : .line(line)
            }
            line.append(contentsOf: buffer[0..<n])
            if line.count > maxRequest { return .tooLong }
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
                let n = Glibc.send(client, raw.baseAddress! + offset, raw.count - offset, Int32(MSG_NOSIGNAL))
                if n < 0, errno == EINTR { continue }
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
    /// The caller owns (closes) what this returns.
    private static func connection(_ directory: String) -> Int32? {
        let made = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard made >= 0 else { return nil }
        let socket = Descriptor(adopting: made)
        guard var address = Self.address(directory + "/" + socketName) else { return nil }
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(socket.raw, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard connected == 0 else { return nil }
        return socket.take()
    }

    /// Sends one request to the daemon serving `directory`; nil when none answers.
    static func exchange(directory: String, _ request: Request) throws -> Reply? {
        guard let raw = connection(directory) else { return nil }
        let socket = Descriptor(adopting: raw)
        let fd = socket.raw
        var data = try JSONEncoder().encode(request)
        data.append(0x0A)
        let sent = data.withUnsafeBytes { raw -> Bool in
            var offset = 0
            while offset < raw.count {
                // MSG_NOSIGNAL: a daemon that refused us before reading (and closed)
                // must not kill this process with SIGPIPE; its reply is still there to read.
                let n = Glibc.send(fd, raw.baseAddress! + offset, raw.count - offset, Int32(MSG_NOSIGNAL))
                if n < 0, errno == EINTR { continue }
                if n <= 0 { return false }
                offset += n
            }
            return true
        }
        var response = [UInt8]()
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = read(fd, &buffer, buffer.count)
            if n <= 0 { break }
            response.append(contentsOf: buffer[0..<n])
        }
        guard let reply = try? JSONDecoder().decode(Reply.self, from: Data(response)) else {
            throw ControlRefusal(message: response.isEmpty
                ? "the mount's daemon closed the connection without answering" + (sent ? "" : " (the request could not be sent)")
                : "the mount's daemon answered something that is not a reply")
        }
        return reply
    }

    /// Asks a running daemon for its status; nil when no daemon answers.
    public static func query(directory: String) throws -> MountStatus? {
        guard let reply = try exchange(directory: directory, Request(command: "status")) else { return nil }
        guard reply.ok else { throw POSIXError(.EACCES) }
        return reply.status
    }

    /// Whether a daemon answers on `directory`'s control socket.
    public static func isServing(directory: String) -> Bool {
        guard let raw = connection(directory) else { return false }
        _ = Descriptor(adopting: raw)
        return true
    }

    /// Carries out `request` in the daemon serving `directory`: nil when no
    /// daemon answers; a refusal or failure is thrown as `AdminFailure` (a
    /// refusal by the socket itself with the code "ControlRefused").
    public static func perform(_ request: AdminRequest, directory: String) throws(AdminFailure) -> AdminReply? {
        let answer: Reply?
        do {
            answer = try exchange(directory: directory, Request(command: "admin", request: request))
        } catch let error as ControlRefusal {
            throw AdminFailure(code: "ControlRefused", error.message)
        } catch {
            throw AdminFailure("cannot send the request to the mount's daemon: \(error)")
        }
        guard let answer else { return nil }
        guard answer.ok, let reply = answer.reply else {
            throw AdminFailure(code: answer.code ?? "ControlRefused", answer.error ?? "refused")
        }
        return reply
    }
}

/// The daemon refused a control request.
public struct ControlRefusal: Error, CustomStringConvertible {
    public var message: String
    public var description: String { message }
}

/// The kernel's list of kmsfs mounts.
public enum MountTable {
    public static func kmsfsMounts() -> [(source: String, mountpoint: String)] {
        guard let text = try? String(contentsOfFile: "/proc/self/mounts", encoding: .utf8) else { return [] }
        return text.split(separator: "\n").compactMap { line in
            let f = line.split(separator: " ")
            guard f.count >= 3, f[2] == "fuse.kmsfs" else { return nil }
            // /proc/mounts escapes space, tab, newline and backslash as octal.
            return (unescape(f[0]), unescape(f[1]))
        }
    }

    static func unescape(_ field: Substring) -> String {
        var out = [UInt8]()
        let bytes = Array(field.utf8)
        var i = 0
        while i < bytes.count {
            if bytes[i] == 0x5C, i + 3 < bytes.count {
                let digits = bytes[(i + 1)...(i + 3)].map { Int($0) - 0x30 }
                if digits.allSatisfy({ (0...7).contains($0) }), digits[0] <= 3 {
                    out.append(UInt8(digits[0] * 64 + digits[1] * 8 + digits[2]))
                    i += 4
                    continue
                }
            }
            out.append(bytes[i])
            i += 1
        }
        return String(decoding: out, as: UTF8.self)
    }
}
