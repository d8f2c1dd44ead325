import COpenSSL
import CKeyMemory
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Secret key material in locked memory excluded from core dumps, wiped when
/// released. It cannot be copied; borrow it to use it.
///
/// Keys live in OpenSSL's secure heap (an mlock'ed, MADV_DONTDUMP arena with
/// guard pages, set up once per process by `SecureHeap`); when that heap is
/// full or could not be made, a key gets a page of its own, locked and
/// excluded from dumps the same way.
public struct SecretKey: ~Copyable, @unchecked Sendable {
    private let base: UnsafeMutableRawPointer
    /// 0 for a key in the secure heap, else the size of its own page.
    private let pageBytes: Int
    /// Length of the key in bytes.
    public let count: Int

    private init(uninitializedCount count: Int) {
        precondition(count > 0 && count <= 4096, "secret keys are 1...4096 bytes")
        self.count = count
        if SecureHeap.ready, kmsfs_keymem_has_room(count) != 0, let pointer = kmsfs_secure_zalloc(count) {
            self.base = pointer
            self.pageBytes = 0
            return
        }
        let (pointer, page) = KeyPages.take()
        self.base = pointer
        self.pageBytes = page
    }

    /// A fresh key of `count` random bytes.
    /// (From OpenSSL's private DRBG, straight into the key's memory: key
    /// bytes never pass through the buffered generator of public values.)
    public static func random(count: Int = 32) -> SecretKey {
        let key = SecretKey(uninitializedCount: count)
        precondition(RAND_priv_bytes(key.base.assumingMemoryBound(to: UInt8.self), Int32(count)) == 1,
                     "OpenSSL RAND_priv_bytes failed")
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
            OPENSSL_cleanse(base, count)
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

    /// Whether the key is in OpenSSL's secure heap (not a page of its own).
    public var isInSecureHeap: Bool { pageBytes == 0 }

    /// Constant-time equality of two keys (for tests and key checks).
    public func isEqual(to other: borrowing SecretKey) -> Bool {
        guard count == other.count else { return false }
        return other.withUnsafeBytes { CRYPTO_memcmp(base, $0.baseAddress, count) == 0 }
    }

    deinit {
        if pageBytes == 0 {
            kmsfs_secure_clear_free(base, count)
            return
        }
        // Only the first `count` bytes were ever written (the page was zeroed at allocation).
        OPENSSL_cleanse(base, count)
        KeyPages.give(base)
    }
}

/// OpenSSL's secure heap for every `SecretKey` of the process and for the
/// key schedules of the contexts keyed with them (`KeyMemory`): 8 MiB in
/// 32-byte units, locked in RAM (when the memlock limit allows) and left out
/// of core dumps by OpenSSL. Made on first use; `prepare()` makes it early,
/// before other threads use OpenSSL.
public enum SecureHeap {
    public static let size = 8 << 20
    /// Left free for OpenSSL itself: its private DRBG reseeds from the secure
    /// heap and fails when it is full, which would leave no random keys at all.
    public static let reserve = 512 << 10
    static let ready: Bool = {
        kmsfs_keymem_set_limit(size - reserve)
        // 1: fully locked; 2: made, but mlock was refused (memlock limit).
        return CRYPTO_secure_malloc_initialized() == 1 || CRYPTO_secure_malloc_init(size, 32) != 0
    }()

    /// Makes the heap now; false if OpenSSL could not (keys then get pages).
    @discardableResult
    public static func prepare() -> Bool { ready }

    /// Bytes of the heap in use now (keys and key schedules).
    public static var used: Int { CRYPTO_secure_malloc_initialized() == 1 ? Int(CRYPTO_secure_used()) : 0 }
}

/// Where OpenSSL puts the state derived from a key. Code that keys or copies
/// a cipher or MAC context, or decodes a private key, runs inside `scope`:
/// what OpenSSL allocates meanwhile (the key schedule, GCM tables, HMAC pads,
/// private BIGNUMs) comes from the secure heap, while it has room, instead of
/// the ordinary heap (CKeyMemory's allocator).
public enum KeyMemory {
    @inline(__always)
    public static func scope<T: ~Copyable, E: Error>(_ body: () throws(E) -> T) throws(E) -> T {
        SecureHeap.prepare()
        kmsfs_keymem_begin()
        defer { kmsfs_keymem_end() }
        return try body()
    }

    /// Whether the allocator is in place (it must be before OpenSSL's first allocation).
    public static var installed: Bool { kmsfs_keymem_installed() == 1 }

    /// Live bytes OpenSSL holds in the secure heap through `scope`.
    public static var secureBytes: Int { kmsfs_keymem_secure_bytes() }

    /// Whether `pointer` is a block of the secure heap handed out through `scope`.
    public static func isSecure(_ pointer: UnsafeRawPointer?) -> Bool { kmsfs_keymem_is_secure(pointer) == 1 }

    /// No core file and no ptrace by other non-root users for this process;
    /// what keys remain in ordinary memory cannot leave through a dump.
    @discardableResult
    public static func forbidCoreDumps() -> Bool { kmsfs_keymem_forbid_core_dumps() == 0 }
}

/// Pages for keys the secure heap has no room for: locked (best effort:
/// without CAP_IPC_LOCK the memlock limit may refuse; the daemon also
/// disables core dumps process-wide) and left out of dumps, a page per key,
/// carved from mappings of 256 pages and reused, never returned. A page of
/// its own from malloc's heap, as before, split the heap's mapping in three
/// per key (locked and excluded pages amid ordinary ones): ~30,000 such keys
/// reached the kernel's limit of 65,530 mappings, malloc failed and the
/// daemon stopped. Separate mappings do not merge either (each gets its
/// own anon_vma when locked). Returned pages are zero but for what the
/// key's deinit already wiped.
enum KeyPages {
    static let pageSize = Int(sysconf(Int32(_SC_PAGESIZE)))
    static let perMapping = 256
    private static let free = Mutex<[UInt]>([])

    static func take() -> (UnsafeMutableRawPointer, Int) {
        let address = free.withLock { pages -> UInt in
            if pages.isEmpty {
                let bytes = pageSize * perMapping
                guard let base = mmap(nil, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0),
                      base != UnsafeMutableRawPointer(bitPattern: -1) else { preconditionFailure("out of memory for secret key pages") }
                _ = mlock(base, bytes)
                _ = madvise(base, bytes, MADV_DONTDUMP)
                let start = UInt(bitPattern: base)
                pages = (0..<perMapping).reversed().map { start + UInt($0 * pageSize) }
            }
            return pages.removeLast()
        }
        let pointer = UnsafeMutableRawPointer(bitPattern: address)!
        memset(pointer, 0, pageSize)
        return (pointer, pageSize)
    }

    static func give(_ pointer: UnsafeMutableRawPointer) {
        free.withLock { $0.append(UInt(bitPattern: pointer)) }
    }
}
