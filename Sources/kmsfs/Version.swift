import ChunkCipher
import FUSEBridge
import KeyManager

/// What `kmsfs --version` prints: this build, the on-disk formats it writes,
/// and the libraries it runs with (as loaded, not as compiled against).
enum Version {
    /// kmsfs's own version (bumped with each release).
    static let release = SecurityFindings.productVersion

    static var description: String {
        """
        kmsfs \(release)
        file format \(FormatV1.version), keystore schema \(KeyManager.knownSchema)
        \(CryptoLibrary.version)
        SQLite \(KeyManager.sqliteVersion)
        libfuse \(FUSELibrary.version)
        """
    }
}
