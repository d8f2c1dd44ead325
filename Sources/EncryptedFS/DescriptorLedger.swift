import CLinux
import FUSEBridge
import Synchronization
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// Reopens backing entries by kernel file handle (`open_by_handle_at`),
/// which is how a node's descriptor can be closed while the kernel still
/// caches the inode and be opened again when a request needs it: a handle
/// names the inode itself, so renames and hard links cannot make it point
/// elsewhere (as a name would). Needs CAP_DAC_READ_SEARCH (a mount by
/// root) and a backing filesystem that gives handles (ext4, xfs, btrfs,
/// tmpfs); `probe` returns nil otherwise, and the daemon then keeps every
/// node's descriptor and relieves the limit by asking the kernel to forget
/// entries, as before.
final class BackingHandles: Sendable {
    /// An ordinary (not `O_PATH`) descriptor of CIPHERDIR: `open_by_handle_at` refuses `O_PATH`.
    private let mount: SharedDescriptor
    let mountID: Int32

    private init(mount: SharedDescriptor, mountID: Int32) {
        self.mount = mount
        self.mountID = mountID
    }

    /// Whether handles work under `cipherdir` for this process: its root's
    /// handle opens back to the root.
    static func probe(cipherdir: String) -> BackingHandles? {
        guard let dir = try? Syscall.open(AT_FDCWD, cipherdir, O_RDONLY | O_DIRECTORY | O_CLOEXEC) else { return nil }
        let mount = SharedDescriptor(dir)
        var handle = kmsfs_file_handle()
        var mountID: Int32 = 0
        guard kmsfs_handle_of(mount.raw, &handle, &mountID) == 0 else { return nil }
        let reopened = kmsfs_open_by_handle(mount.raw, &handle, KMSFS_O_PATH | O_CLOEXEC)
        guard reopened >= 0 else { return nil }
        defer { close(reopened) }
        guard let a = try? Syscall.fstat(mount.raw), let b = try? Syscall.fstat(reopened), InodeKey(a) == InodeKey(b) else { return nil }
        return BackingHandles(mount: mount, mountID: mountID)
    }

    /// The handle of the entry `fd` is open on, if it lies on CIPHERDIR's mount.
    func handle(of fd: Int32) -> ParkedHandle? {
        var handle = kmsfs_file_handle()
        var mountID: Int32 = 0
        guard kmsfs_handle_of(fd, &handle, &mountID) == 0, mountID == self.mountID else { return nil }
        return ParkedHandle(handle)
    }

    func open(_ handle: ParkedHandle, _ flags: Int32) throws(Errno) -> Descriptor {
        var raw = handle.raw
        let fd = kmsfs_open_by_handle(mount.raw, &raw, flags | O_CLOEXEC)
        guard fd >= 0 else { throw Errno(rawValue: errno) }
        return Descriptor(adopting: fd)
    }
}

/// A file handle kept by a node whose descriptor is parked: its type and bytes.
struct ParkedHandle: Sendable {
    let type: Int32
    let bytes: [UInt8]

    init(_ h: kmsfs_file_handle) {
        type = h.handle_type
        var h = h
        bytes = withUnsafeBytes(of: &h.f_handle) { Array($0.prefix(Int(h.handle_bytes))) }
    }

    var raw: kmsfs_file_handle {
        var h = kmsfs_file_handle()
        h.handle_type = type
        h.handle_bytes = UInt32(bytes.count)
        withUnsafeMutableBytes(of: &h.f_handle) { out in out.copyBytes(from: bytes) }
        return h
    }
}

/// How many backing descriptors the nodes hold, and in what order they took
/// them: the relief parks the oldest first. The queue holds node ids, not
/// nodes, so it keeps nothing alive; ids of nodes since forgotten or parked
/// are skipped when they come up, and the queue is compacted when they
/// outnumber the live ones.
final class DescriptorLedger: Sendable {
    /// Nodes holding a descriptor.
    let held = Atomic<Int>(0)
    /// Descriptors parked and reopened so far (statistics).
    let parked = Atomic<Int>(0)
    let reopened = Atomic<Int>(0)
    /// Where parked nodes reopen; nil: nodes keep their descriptors.
    let handles: BackingHandles?
    private let queue = Mutex(NodeQueue())
    /// Called (without locks) when a node takes a descriptor and the count
    /// passes `highWater`, or when the queue wants compacting.
    let highWater = Atomic<Int>(Int.max)
    nonisolated(unsafe) var pressure: (@Sendable () -> Void)?

    init(handles: BackingHandles?) { self.handles = handles }

    /// A node took a descriptor (made, or reopened after parking).
    func took(_ id: NodeID) {
        let count = held.add(1, ordering: .relaxed).newValue
        // Without handles nothing is parked: no queue to keep.
        let long = handles != nil && queue.withLock { q -> Bool in
            q.append(id)
            return q.count > 4 * count + 4096
        }
        if count > highWater.load(ordering: .relaxed) || long { pressure?() }
    }

    /// A node gave its descriptor up (parked, or the node went away holding it).
    func gave() { held.subtract(1, ordering: .relaxed) }

    /// Up to `n` ids from the front of the queue, oldest first.
    func oldest(_ n: Int) -> [NodeID] { queue.withLock { $0.removeFirst(upTo: n) } }

    /// Puts ids back at the end (nodes kept: an open file holds them).
    func requeue(_ ids: [NodeID]) {
        guard !ids.isEmpty else { return }
        queue.withLock { $0.append(contentsOf: ids) }
    }

    /// Once stale ids dominate, keeps only those `keep` accepts. (`keep`
    /// takes the node table's lock: the table never takes this one.)
    func compact(_ keep: (NodeID) -> Bool) {
        queue.withLock { q in
            guard q.count > 4 * held.load(ordering: .relaxed) + 4096 else { return }
            q.compact(keeping: keep)
        }
    }

    var queued: Int { queue.withLock { $0.count } }
}

/// Node ids in the order they were added, taken from the front; an id whose
/// node no longer matters is skipped by the reader when it comes up, and
/// `compact` drops such ids once they pile up. Keeps ids, not nodes, so it
/// holds nothing alive. (The relief's descriptor queue and the node table's
/// queue of directories with loaded keys.)
struct NodeQueue: ~Copyable {
    private var ids: [NodeID] = []
    private var head = 0

    var count: Int { ids.count - head }

    mutating func append(_ id: NodeID) { ids.append(id) }
    mutating func append(contentsOf more: [NodeID]) { ids.append(contentsOf: more) }

    /// Takes up to `n` ids from the front.
    mutating func removeFirst(upTo n: Int) -> [NodeID] {
        let end = min(ids.count, head + n)
        let taken = Array(ids[head..<end])
        head = end
        if head > 4096, head * 2 > ids.count {
            ids.removeFirst(head)
            head = 0
        }
        return taken
    }

    /// The front id, if any.
    mutating func removeFirst() -> NodeID? { removeFirst(upTo: 1).first }

    /// Keeps the ids `keep` accepts, each once (where it was added last), in order.
    mutating func compact(keeping keep: (NodeID) -> Bool) {
        var seen = Set<NodeID>()
        let live = ids[head...].reversed().filter { seen.insert($0).inserted && keep($0) }
        ids = live.reversed()
        head = 0
    }
}
