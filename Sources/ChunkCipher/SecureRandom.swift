import COpenSSL

/// Random bytes from OpenSSL's CSPRNG (per-thread DRBG seeded by the kernel).
public enum SecureRandom {
    /// Fills a buffer; traps if the CSPRNG fails, since continuing would
    /// produce predictable keys or nonces.
    public static func fill(_ buffer: UnsafeMutableRawBufferPointer) {
        guard let base = buffer.baseAddress, buffer.count > 0 else { return }
        precondition(RAND_bytes(base.assumingMemoryBound(to: UInt8.self), Int32(buffer.count)) == 1,
                     "OpenSSL RAND_bytes failed")
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
}
