import COpenSSL
#if canImport(Glibc)
import Glibc
#endif

/// Random bytes for public values — nonces, file and directory ids, salts —
/// from OpenSSL's CSPRNG (its public DRBG, seeded by the kernel).
///
/// Small requests are served from a 4 KiB buffer refilled with one
/// `RAND_bytes` call: creating a file needs four small values, and each
/// `RAND_bytes` call costs about a microsecond of fixed overhead (parameter
/// lookups and a fork check) whatever its size. Bytes are handed out once
/// each under a lock, so no two callers ever get the same bytes; a forked
/// child starts with an empty buffer (pthread_atfork), so parent and child
/// never share any either. Secret keys do not come from here: `SecretKey`
/// draws them from OpenSSL's private DRBG straight into locked memory.
public enum SecureRandom {
    /// Fills a buffer; traps if the CSPRNG fails, since continuing would
    /// produce predictable nonces or ids.
    public static func fill(_ buffer: UnsafeMutableRawBufferPointer) {
        guard let base = buffer.baseAddress, buffer.count > 0 else { return }
        if buffer.count > Pool.capacity / 4 {
            generate(base, buffer.count)
            return
        }
        Pool.shared.take(into: base, count: buffer.count)
    }

    /// Fills an array in place.
    public static func fill(_ bytes: inout [UInt8]) {
        bytes.withUnsafeMutableBytes { fill($0) }
    }

    /// A fresh array of `count` random bytes (for public values such as
    /// salts and ids; secrets go into `SecretKey`).
    public static func bytes(_ count: Int) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        fill(&out)
        return out
    }

    static func generate(_ base: UnsafeMutableRawPointer, _ count: Int) {
        precondition(RAND_bytes(base.assumingMemoryBound(to: UInt8.self), Int32(count)) == 1, "OpenSSL RAND_bytes failed")
    }

    /// The buffer of not yet used random bytes, behind a pthread mutex that
    /// is held across fork() so a child never inherits it locked.
    final class Pool: @unchecked Sendable {
        static let capacity = 4096
        private let storage = UnsafeMutableRawPointer.allocate(byteCount: capacity, alignment: 16)
        private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
        /// Bytes before `used` have been handed out (and wiped).
        private var used = capacity

        static let shared: Pool = {
            let pool = Pool()
            pthread_atfork({ SecureRandom.Pool.shared.lock() },
                           { SecureRandom.Pool.shared.unlock() },
                           { SecureRandom.Pool.shared.discard(); SecureRandom.Pool.shared.unlock() })
            return pool
        }()

        private init() { pthread_mutex_init(mutex, nil) }

        func lock() { pthread_mutex_lock(mutex) }
        func unlock() { pthread_mutex_unlock(mutex) }

        func take(into out: UnsafeMutableRawPointer, count: Int) {
            lock()
            defer { unlock() }
            if Self.capacity - used < count {
                SecureRandom.generate(storage, Self.capacity)
                used = 0
            }
            out.copyMemory(from: storage + used, byteCount: count)
            memset(storage + used, 0, count)
            used += count
        }

        /// Forgets the buffered bytes (in a forked child, which must not reuse its parent's).
        private func discard() {
            memset(storage, 0, Self.capacity)
            used = Self.capacity
        }
    }
}
