import CFUSE
import CFUSEIO
import Logging
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// Errors of mounting and serving.
public enum MountError: Error, CustomStringConvertible {
    case sessionCreation
    case mountFailed(String)
    case loopFailed(Int32)

    public var description: String {
        switch self {
        case .sessionCreation: "libfuse could not create a session (bad mount options?)"
        case .mountFailed(let mountpoint): "could not mount on \(mountpoint): is it an existing, empty directory you may write, and is /dev/fuse available?"
        case .loopFailed(let code): "the FUSE session ended with error \(-code)"
        }
    }
}

/// A mounted FUSE filesystem served by a multi-threaded session loop.
/// SIGINT, SIGTERM and SIGHUP end the loop and unmount cleanly.
public final class FUSESession: @unchecked Sendable {
    private let box: FileSystemBox
    private var session: OpaquePointer?
    private let mountpoint: String
    private let logger = Logger(label: "kmsfs.fuse")

    /// Creates a session for `fileSystem` with `-o` mount options
    /// (e.g. `allow_other`, `ro`, `default_permissions`, `fsname=…`).
    public init(fileSystem: any FileSystem, mountpoint: String, options: [String], maxWrite: UInt32 = 1 << 20) throws {
        self.box = FileSystemBox(fileSystem, maxWrite: maxWrite)
        self.mountpoint = mountpoint
        var arguments = ["kmsfs"]
        if !options.isEmpty { arguments += ["-o", options.joined(separator: ",")] }
        var cArguments = arguments.map { strdup($0) }
        defer { cArguments.forEach { free($0) } }
        var args = kmsfs_fuse_args_init(Int32(cArguments.count), &cArguments)
        defer { fuse_opt_free_args(&args) }
        var ops = Operations.make()
        let userdata = Unmanaged.passUnretained(box).toOpaque()
        guard let se = fuse_session_new(&args, &ops, MemoryLayout<fuse_lowlevel_ops>.size, userdata) else {
            throw MountError.sessionCreation
        }
        session = se
    }

    /// Mounts; on return the filesystem is visible at the mountpoint.
    public func mount() throws {
        guard let session else { throw MountError.sessionCreation }
        guard fuse_set_signal_handlers(session) == 0 else { throw MountError.mountFailed(mountpoint) }
        guard fuse_session_mount(session, mountpoint) == 0 else {
            fuse_remove_signal_handlers(session)
            throw MountError.mountFailed(mountpoint)
        }
        // Before the loop reads the kernel's INIT: offer to clear set-ID bits ourselves.
        let hooked = kmsfs_fuseio_install(session)
        if hooked != 0 { logger.warning("raw FUSE I/O hooks not installed (error \(-hooked)); the kernel keeps asking for security.capability before writes") }
    }

    /// Serves requests on up to `threads` threads until unmounted or signalled, then unmounts.
    /// After each request one worker polls for the next for up to
    /// `pollMicroseconds` before it sleeps (0: never; see CFUSEIO's fuseio.c).
    public func run(threads: Int = 4, pollMicroseconds: Int = 0) throws {
        guard let session else { return }
        kmsfs_fuseio_set_poll(pollMicroseconds)
        let config = fuse_loop_cfg_create()
        defer { fuse_loop_cfg_destroy(config) }
        fuse_loop_cfg_set_max_threads(config, UInt32(threads))
        // Keep every worker: with fewer idle threads allowed, libfuse starts and
        // ends a thread for nearly every request under load (13,000 thread
        // creations in one untar of 11,000 files).
        fuse_loop_cfg_set_idle_threads(config, UInt32(threads))
        let result = kmsfs_session_loop_mt(session, config)
        fuse_session_unmount(session)
        fuse_remove_signal_handlers(session)
        if result < 0 { throw MountError.loopFailed(result) }
    }

    /// Asks the kernel to drop its cached entry `name` in directory `parent`
    /// (and with it, once unused, the inode: a FORGET follows). Never call it
    /// from a request of the same directory: it waits for the directory's lock.
    /// 0, or -ENOENT when the kernel had no such entry cached.
    public func invalidateEntry(parent: NodeID, name: FileName) -> Int32 {
        guard let session else { return -ENODEV }
        return name.withCString { fuse_lowlevel_notify_inval_entry(session, parent.rawValue, $0, name.count) }
    }

    /// Asks the kernel to drop its cached attributes of `node` (not its
    /// cached data), so the next stat asks the filesystem. Safe inside a
    /// request of the same node: it takes no inode lock.
    @discardableResult
    public func invalidateAttributes(_ node: NodeID) -> Int32 {
        guard let session else { return -ENODEV }
        return fuse_lowlevel_notify_inval_inode(session, node.rawValue, -1, 0)
    }

    /// Asks the loop to end (as a signal would).
    public func exit() {
        if let session { fuse_session_exit(session) }
    }

    deinit {
        if let session { fuse_session_destroy(session) }
    }
}

/// The libfuse this process runs with.
public enum FUSELibrary {
    /// libfuse's package version ("3.14.0"), from the loaded library, not the headers.
    public static var version: String { String(cString: fuse_pkgversion()) }
}
