import KeyManager

/// What `kmsfs status` shows of a running mount.
public struct MountStatus: Codable, Sendable {
    public var cipherdir: String
    public var mountpoint: String
    public var pid: Int32
    public var startedAt: Double
    public var statistics: FilesystemStatistics
    /// Master keys whose data keys are held by open files right now.
    public var keysInUse: [String]
    /// The bound keys and who may encrypt and decrypt with them.
    public var governingKeys: [GoverningKey]?

    public init(cipherdir: String, mountpoint: String, pid: Int32, startedAt: Double, statistics: FilesystemStatistics, keysInUse: [String]) {
        self.cipherdir = cipherdir
        self.mountpoint = mountpoint
        self.pid = pid
        self.startedAt = startedAt
        self.statistics = statistics
        self.keysInUse = keysInUse
    }
}

extension EncryptedFileSystem {
    /// Master keys whose data keys open files hold now.
    public var keysInUse: [String] {
        Array(Set(openFiles.keys.map(\.rawValue.hex))).sorted()
    }
}
