import COpenSSL
#if canImport(Glibc)
import Glibc
#endif

/// Secret key material in its own page: locked in RAM (never swapped when the
/// limit allows), excluded from core dumps, and wiped when released. It cannot
/// be copied; borrow it to use it.
public struct SecretKey: ~Copyable, @unchecked Sendable {
    private let base: UnsafeMutableRawPointer
    private let pageBytes: Int
    /// Length of the key in bytes.
    public let count: Int

    private init(uninitializedCount count: Int) {
        precondition(count > 0 && count <= 4096, "secret keys are 1...4096 bytes")
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        var pointer: UnsafeMutableRawPointer?
        precondition(posix_memalign(&pointer, page, page) == 0, "out of memory for a secret key page")
        guard let pointer else { preconditionFailure("posix_memalign returned no page") }
        // Best effort: without CAP_IPC_LOCK the memlock limit may refuse; the
        // daemon also disables core dumps process-wide.
        _ = mlock(pointer, page)
        _ = madvise(pointer, page, MADV_DONTDUMP)
        memset(pointer, 0, page)
        self.base = pointer
        self.pageBytes = page
        self.count = count
    }

    /// A fresh key of `count` random bytes.
    public static func random(count: Int = 32) -> SecretKey {
        let key = SecretKey(uninitializedCount: count)
        SecureRandom.fill(UnsafeMutableRawBufferPointer(start: key.base, count: count))
        return key
    }

    /// Copies bytes into a new key. The caller wipes its own copy.
    public init(copying bytes: UnsafeRawBufferPointer) {
        self.init(uninitializedCount: bytes.count)
        if let source = bytes.baseAddress { memcpy(base, source, bytes.count) }
    }

    /// Copies an array into a new key (tests and fixtures; real keys come
    /// from `random` or are written in place with `init(count:filling:)`).
    public init(copying bytes: [UInt8]) {
        self.init(uninitializedCount: bytes.count)
        bytes.withUnsafeBytes { if let source = $0.baseAddress { memcpy(base, source, bytes.count) } }
    }

    /// A key whose bytes are written by `body` straight into locked memory,
    /// so they never exist anywhere else (KDF output, unwrapped DEKs).
    public init(count: Int, filling body: (UnsafeMutableRawBufferPointer) throws -> Void) rethrows {
        self.init(uninitializedCount: count)
        do {
            try body(UnsafeMutableRawBufferPointer(start: base, count: count))
        } catch {
            OPENSSL_cleanse(base, pageBytes)
            throw error
        }
    }

    /// Lends the key bytes for the duration of `body`; do not let them escape.
    public func withUnsafeBytes<R: ~Copyable, E: Error>(_ body: (UnsafeRawBufferPointer) throws(E) -> R) throws(E) -> R {
        try body(UnsafeRawBufferPointer(start: base, count: count))
    }

    /// A second, independent copy (for handing a key to another owner).
    public func duplicate() -> SecretKey {
        SecretKey(copying: UnsafeRawBufferPointer(start: base, count: count))
    }

    /// Constant-time equality of two keys (for tests and key checks).
    public func isEqual(to other: borrowing SecretKey) -> Bool {
        guard count == other.count else { return false }
        return other.withUnsafeBytes { CRYPTO_memcmp(base, $0.baseAddress, count) == 0 }
    }

    deinit {
        // Only the first `count` bytes were ever written (the page was zeroed at allocation).
        OPENSSL_cleanse(base, count)
        _ = munlock(base, pageBytes)
        free(base)
    }
}
