import ChunkCipher
import CLinux
import Dispatch
import EncryptedFS
import Foundation
import FUSEBridge
import KeyManager
#if canImport(Glibc)
import Glibc
#endif

/// What a foreground `kmsfs mount` serves: the command line parses these,
/// the library does the rest.
public struct MountPlan: Sendable {
    public var cipherdir: String
    public var mountpoint: String
    public var keystore: String
    /// `-o` options as given (comma lists allowed).
    public var options: [String]
    public var threads: Int
    public var metricsFile: String?
    public var metricsInterval: Double
    /// Whether successful opens and creates are audited (off only for benchmarks; itself audited).
    public var auditOpens: Bool
    /// Who runs the mount (for the audit record of `auditOpens` off).
    public var caller: Principal
    public var clock: @Sendable () -> Double
    /// Never park node descriptors (see `DescriptorRelief`).
    public var keepDescriptors: Bool
    /// How long a worker polls for the next request before it sleeps (µs; 0: never).
    public var pollMicroseconds: Int

    public init(cipherdir: String, mountpoint: String, keystore: String, options: [String], threads: Int, metricsFile: String?,
                metricsInterval: Double, auditOpens: Bool, caller: Principal, clock: @escaping @Sendable () -> Double,
                keepDescriptors: Bool = false, pollMicroseconds: Int = 0) {
        self.keepDescriptors = keepDescriptors
        self.pollMicroseconds = pollMicroseconds
        self.cipherdir = cipherdir
        self.mountpoint = mountpoint
        self.keystore = keystore
        self.options = options
        self.threads = threads
        self.metricsFile = metricsFile
        self.metricsInterval = metricsInterval
        self.auditOpens = auditOpens
        self.caller = caller
        self.clock = clock
    }
}

/// A mount that cannot start: what an interrupted rekey left could not be repaired.
public struct MountRefused: Error, CustomStringConvertible {
    public let description: String
}

/// The mount daemon's life, from the keystore to unmount: the filesystem,
/// its FUSE session, the rekey worker, descriptor relief, schedules, signed
/// audit digests, metrics and the control socket, each started in order and
/// stopped in reverse.
public enum MountServer {
    /// Opens the keystore with `passphrase`, mounts and serves until the
    /// filesystem is unmounted or the process signalled. `ready` is called
    /// once the mount is visible, with the warnings to show (a shared mount
    /// whose keys admit only the owner).
    public static func serve(_ plan: MountPlan, passphrase: consuming SecretKey, ready: ([String]) -> Void) throws {
        kmsfs_disable_core_dumps()
        SecureHeap.prepare()
        // One descriptor per inode the kernel caches (as passthrough_ll):
        // a tree of many files needs far more than the usual 1,024.
        let descriptorLimit = kmsfs_raise_open_file_limit(1 << 20)
        let manager = try KeyManager.open(in: plan.keystore, passphrase: passphrase, clock: plan.clock)
        _ = consume passphrase
        _ = try manager.runSchedules()
        if !plan.auditOpens {
            manager.audit(AuditEvent(.mountWithoutOpenAudit, outcome: .warning, principal: plan.caller,
                                     error: "successful file opens and creates are not recorded by this mount (benchmark)"))
            manager.auditsRoutineUse.store(false, ordering: .relaxed)
        }
        try manager.startBatchingUsage()
        defer {
            try? manager.stopBatchingUsage()
            manager.sealAuditDigest()
        }
        // A signed digest of the audit log every minute while mounted.
        let digests = DispatchSource.makeTimerSource(queue: .global(qos: .utility))
        digests.schedule(deadline: .now() + 60, repeating: 60)
        digests.setEventHandler { [manager] in manager.sealAuditDigest() }
        digests.resume()
        defer { digests.cancel() }
        // Rotations, deletion windows and overdue alerts while mounted.
        let schedules = ScheduleRunner(manager: manager)
        schedules.start()
        defer { schedules.stop() }
        let fs = try EncryptedFileSystem(cipherdir: plan.cipherdir, keyManager: manager, parkDescriptors: !plan.keepDescriptors)
        // Finish or roll back what an interrupted rekey left, before anything reads a file.
        let rekey = RekeyService(filesystem: fs)
        let unrepaired = try rekey.rekeyer.recover()
        guard unrepaired.isEmpty else { throw MountRefused(description: "not mounted: " + unrepaired.map(\.description).joined(separator: "\n")) }
        let mountOptions = sessionOptions(plan)
        let session = try FUSESession(fileSystem: fs, mountpoint: plan.mountpoint, options: mountOptions)
        try session.mount()
        // The kernel has already applied the caller's umask to the mode of
        // every create, mkdir and mknod; the daemon's own would mask it a
        // second time (`umask 0; touch f` gave 0644, not 0666). Everything
        // else the daemon creates names its mode (as libfuse's
        // passthrough_ll and gocryptfs do it).
        umask(0)
        let started = Date().timeIntervalSince1970
        let admin = AdminService(manager: manager, rekey: rekey)
        let (cipherdir, mountpoint) = (plan.cipherdir, plan.mountpoint)
        let control = try ControlServer(directory: plan.keystore, status: { [fs, manager] in
            var status = MountStatus(cipherdir: cipherdir, mountpoint: mountpoint, pid: getpid(), startedAt: started,
                                     statistics: fs.statistics, keysInUse: fs.keysInUse)
            status.governingKeys = try? manager.governingKeys()
            return status
        }, admit: { [manager] peer in manager.controlAdmission(peer) },
           execute: { request, peer throws(AdminFailure) in try admin.perform(request, as: peer) })
        rekey.start()
        defer { rekey.stop() }
        // However many inodes the kernel caches, the daemon stays under its descriptor limit.
        let relief = DescriptorRelief(filesystem: fs, limit: descriptorLimit > 0 ? descriptorLimit : 1024) { [session] parent, name in
            session.invalidateEntry(parent: parent, name: name)
        }
        relief.start()
        defer { relief.stop() }
        fs.relief = relief
        fs.attributesChanged = { [session] node in session.invalidateAttributes(node) }
        let metrics = plan.metricsFile.map {
            MetricsWriter(path: URL(fileURLWithPath: $0).standardizedFileURL.path, interval: plan.metricsInterval, filesystem: fs,
                          mountpoint: plan.mountpoint, started: started)
        }
        metrics?.start()
        defer { metrics?.stop() }
        control.start()
        defer { control.stop() }  // first: no admin command reaches a daemon that is going away
        // A shared mount whose keys admit only the owner: say so, with the fix.
        ready(mountOptions.contains("allow_other") ? (try? manager.sharingWarnings(owner: getuid(), mountpoint: plan.mountpoint)) ?? [] : [])
        try session.run(threads: plan.threads, pollMicroseconds: plan.pollMicroseconds)
    }

    /// The session's `-o` options: the filesystem's name and type, the
    /// user's, and `default_permissions` whenever other users can reach the
    /// mount (the kernel then checks mode bits for them). A private mount is
    /// reached only by the user who mounted it (the kernel refuses everyone
    /// else), whose access the backing files already check; without
    /// default_permissions the kernel skips a GETATTR of the parent before
    /// every create and unlink (as gocryptfs does).
    static func sessionOptions(_ plan: MountPlan) -> [String] {
        var options = ["fsname=\(plan.cipherdir)", "subtype=kmsfs"] + plan.options.flatMap { $0.split(separator: ",").map(String.init) }
        if options.contains(where: { $0 == "allow_other" || $0 == "allow_root" }), !options.contains("default_permissions") {
            options.append("default_permissions")
        }
        return options
    }
}
