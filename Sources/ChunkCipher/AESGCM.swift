import COpenSSL
import Synchronization

/// AES-256-GCM under one key through OpenSSL's EVP interface (AES-NI).
///
/// The key schedule is computed once, into one template context; each seal
/// or open borrows a copy of it from a small pool and only sets the
/// direction and nonce, so the hot path neither allocates nor re-keys
/// (STYLE.md: reused contexts run at `openssl speed`). One pool serves both
/// directions: `EVP_EncryptInit_ex`/`EVP_DecryptInit_ex` with only a nonce
/// switch a keyed context's direction.
public final class AESGCM: @unchecked Sendable {
    /// Key bytes.
    public static let keySize = 32

    /// Fetched once: passing EVP_aes_256_gcm() makes OpenSSL 3 look the
    /// algorithm up by name on every init.
    nonisolated(unsafe) private static let cipher: OpaquePointer? = EVP_CIPHER_fetch(nil, "AES-256-GCM", nil)

    private let template: OpaquePointer
    private let pool = Mutex(ContextStack())

    /// Prepares contexts for `key` (32 bytes); the key bytes are not kept.
    public init(key: borrowing SecretKey) throws(CipherError) {
        guard key.count == Self.keySize else { throw .invalidArgument("AES-256-GCM needs a 32-byte key, got \(key.count)") }
        guard let ctx = KeyMemory.scope({ EVP_CIPHER_CTX_new() }) else { throw .openssl("EVP_CIPHER_CTX_new") }
        template = ctx
        guard let cipher = Self.cipher else { throw .openssl("AES-256-GCM is not available") }
        let ok = KeyMemory.scope {
            key.withUnsafeBytes { raw -> Bool in
                EVP_EncryptInit_ex(ctx, cipher, nil, raw.baseAddress!.assumingMemoryBound(to: UInt8.self), nil) == 1
            }
        }
        guard ok else { throw .openssl("EVP_CipherInit_ex(aes-256-gcm)") }
    }

    deinit {
        // EVP_CIPHER_CTX_free cleanses the key schedule.
        for ctx in pool.withLock({ $0.drain() }) { EVP_CIPHER_CTX_free(ctx) }
        EVP_CIPHER_CTX_free(template)
    }

    /// Encrypts `plaintext` into `ciphertext` (same length) and writes the
    /// 16-byte tag into `tag`. `nonce` is 12 bytes and must never repeat
    /// under this key.
    public func seal(_ plaintext: UnsafeRawBufferPointer, nonce: UnsafeRawBufferPointer,
                     additionalData: UnsafeRawBufferPointer,
                     ciphertext: UnsafeMutableRawBufferPointer, tag: UnsafeMutableRawBufferPointer) throws(CipherError) {
        guard nonce.count == ChunkLayout.nonceSize, tag.count == ChunkLayout.tagSize,
              ciphertext.count >= plaintext.count else { throw .invalidArgument("seal buffer sizes") }
        let ctx = try borrow()
        defer { pool.withLock { $0.push(ctx) } }
        var outLength: Int32 = 0
        guard EVP_EncryptInit_ex(ctx, nil, nil, nil, nonce.baseAddress?.assumingMemoryBound(to: UInt8.self)) == 1,
              additionalData.isEmpty || EVP_EncryptUpdate(ctx, nil, &outLength, bytes(additionalData), Int32(additionalData.count)) == 1,
              plaintext.isEmpty || EVP_EncryptUpdate(ctx, mutableBytes(ciphertext), &outLength, bytes(plaintext), Int32(plaintext.count)) == 1,
              EVP_EncryptFinal_ex(ctx, mutableBytes(ciphertext).map { $0 + plaintext.count }, &outLength) == 1,
              EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, Int32(ChunkLayout.tagSize), tag.baseAddress) == 1
        else { throw .openssl("AES-256-GCM seal") }
    }

    /// Decrypts and authenticates. Returns false (and wipes `plaintext`)
    /// when the tag does not match: the bytes were changed or the key is
    /// not theirs.
    public func open(_ ciphertext: UnsafeRawBufferPointer, tag: UnsafeRawBufferPointer,
                     nonce: UnsafeRawBufferPointer, additionalData: UnsafeRawBufferPointer,
                     plaintext: UnsafeMutableRawBufferPointer) throws(CipherError) -> Bool {
        guard nonce.count == ChunkLayout.nonceSize, tag.count == ChunkLayout.tagSize,
              plaintext.count >= ciphertext.count else { throw .invalidArgument("open buffer sizes") }
        let ctx = try borrow()
        defer { pool.withLock { $0.push(ctx) } }
        var outLength: Int32 = 0
        guard EVP_DecryptInit_ex(ctx, nil, nil, nil, nonce.baseAddress?.assumingMemoryBound(to: UInt8.self)) == 1,
              additionalData.isEmpty || EVP_DecryptUpdate(ctx, nil, &outLength, bytes(additionalData), Int32(additionalData.count)) == 1,
              ciphertext.isEmpty || EVP_DecryptUpdate(ctx, mutableBytes(plaintext), &outLength, bytes(ciphertext), Int32(ciphertext.count)) == 1,
              EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, Int32(ChunkLayout.tagSize), UnsafeMutableRawPointer(mutating: tag.baseAddress)) == 1
        else { throw .openssl("AES-256-GCM open") }
        if EVP_DecryptFinal_ex(ctx, mutableBytes(plaintext).map { $0 + ciphertext.count }, &outLength) == 1 { return true }
        if let base = plaintext.baseAddress { OPENSSL_cleanse(base, ciphertext.count) }
        return false
    }

    /// Bytes a box adds to its plaintext: the nonce before it and the tag after.
    public static let boxOverhead = ChunkLayout.nonceSize + ChunkLayout.tagSize

    /// Seals `plaintext` into `box` as `nonce(12, fresh random) ‖ ciphertext ‖
    /// tag(16)` — the one layout of every sealed thing kmsfs stores (chunks,
    /// the header's length seal, wrapped keys, names' companions).
    public func sealBox(_ plaintext: UnsafeRawBufferPointer, additionalData: UnsafeRawBufferPointer,
                        into box: UnsafeMutableRawBufferPointer) throws(CipherError) {
        let n = plaintext.count, nonceEnd = ChunkLayout.nonceSize
        guard box.count == n + Self.boxOverhead else { throw .invalidArgument("box of \(box.count) bytes for \(n)") }
        let nonce = UnsafeMutableRawBufferPointer(rebasing: box[0..<nonceEnd])
        SecureRandom.fill(nonce)
        try seal(plaintext, nonce: UnsafeRawBufferPointer(nonce), additionalData: additionalData,
                 ciphertext: UnsafeMutableRawBufferPointer(rebasing: box[nonceEnd..<(nonceEnd + n)]),
                 tag: UnsafeMutableRawBufferPointer(rebasing: box[(nonceEnd + n)...]))
    }

    /// Opens a box made by `sealBox` into `plaintext` (at least
    /// `box.count - 28` bytes). False when it does not authenticate.
    public func openBox(_ box: UnsafeRawBufferPointer, additionalData: UnsafeRawBufferPointer,
                        into plaintext: UnsafeMutableRawBufferPointer) throws(CipherError) -> Bool {
        let nonceEnd = ChunkLayout.nonceSize, n = box.count - Self.boxOverhead
        guard n >= 0 else { throw .malformed("sealed box of \(box.count) bytes") }
        return try open(UnsafeRawBufferPointer(rebasing: box[nonceEnd..<(nonceEnd + n)]),
                        tag: UnsafeRawBufferPointer(rebasing: box[(nonceEnd + n)...]),
                        nonce: UnsafeRawBufferPointer(rebasing: box[0..<nonceEnd]), additionalData: additionalData,
                        plaintext: plaintext)
    }

    private func borrow() throws(CipherError) -> OpaquePointer {
        if let ctx = pool.withLock({ $0.pop() }) { return ctx }
        guard let ctx = KeyMemory.scope({ EVP_CIPHER_CTX_new() }) else { throw .openssl("EVP_CIPHER_CTX_new") }
        guard KeyMemory.scope({ EVP_CIPHER_CTX_copy(ctx, template) }) == 1 else {
            EVP_CIPHER_CTX_free(ctx)
            throw .openssl("EVP_CIPHER_CTX_copy")
        }
        return ctx
    }
}

/// Keyed OpenSSL contexts of one key: a template and idle copies of it, each
/// taken by one operation at a time (for MACs restarted with EVP_MAC_init
/// and no key; for ciphers re-initialised with a new IV). The copies hold
/// key schedules and live in the secure heap; all are freed (cleansed) with
/// the pool. Used by NameCipher's CMAC and CTR and by KeyedHMAC.
final class ContextPool: @unchecked Sendable {
    enum Kind { case mac, cipher }
    private let template: OpaquePointer
    private let kind: Kind
    private let idle = Mutex(ContextStack())

    init(template: OpaquePointer, kind: Kind) {
        self.template = template
        self.kind = kind
    }

    deinit {
        for ctx in idle.withLock({ $0.drain() }) + [template] { free(ctx) }
    }

    private func free(_ ctx: OpaquePointer) {
        switch kind {
        case .mac: EVP_MAC_CTX_free(ctx)
        case .cipher: EVP_CIPHER_CTX_free(ctx)
        }
    }

    func with<R>(_ body: (OpaquePointer) throws(CipherError) -> R) throws(CipherError) -> R {
        let ctx: OpaquePointer
        if let taken = idle.withLock({ $0.pop() }) { ctx = taken } else {
            let copy: OpaquePointer? = KeyMemory.scope {
                switch kind {
                case .mac: return EVP_MAC_CTX_dup(template)
                case .cipher:
                    guard let c = EVP_CIPHER_CTX_new() else { return nil }
                    if EVP_CIPHER_CTX_copy(c, template) == 1 { return c }
                    EVP_CIPHER_CTX_free(c)
                    return nil
                }
            }
            guard let copy else { throw .openssl("context copy") }
            ctx = copy
        }
        defer { idle.withLock { $0.push(ctx) } }
        return try body(ctx)
    }
}

/// The idle contexts of one key.
struct ContextStack: ~Copyable, @unchecked Sendable {
    private var contexts: [OpaquePointer] = []
    mutating func pop() -> OpaquePointer? { contexts.popLast() }
    mutating func push(_ ctx: OpaquePointer) { contexts.append(ctx) }
    mutating func drain() -> [OpaquePointer] { defer { contexts = [] }; return contexts }
}

@inline(__always) func bytes(_ buffer: UnsafeRawBufferPointer) -> UnsafePointer<UInt8>? {
    buffer.baseAddress?.assumingMemoryBound(to: UInt8.self)
}

@inline(__always) func mutableBytes(_ buffer: UnsafeMutableRawBufferPointer) -> UnsafeMutablePointer<UInt8>? {
    buffer.baseAddress?.assumingMemoryBound(to: UInt8.self)
}

/// Runs `body`, which throws only `CipherError`, through standard-library
/// helpers that rethrow untyped errors, and restores the type.
@inline(__always) func keepingCipherError<R>(_ body: () throws -> R) throws(CipherError) -> R {
    do { return try body() } catch let error as CipherError { throw error } catch { throw .invalidArgument("\(error)") }
}
