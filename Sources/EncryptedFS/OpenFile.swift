import ChunkCipher
import Synchronization
import KeyManager
import CLinux
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// One open regular file, shared by every handle open on its inode: the
/// backing descriptor, the data key's cipher and the authenticated header.
/// Chunks are read and written through the parallel pipeline. The header's
/// length seal follows size changes with the crash ordering of
/// docs/FORMAT.md §4: growth is sealed when the file is flushed, synced or
/// released (after its chunks are on disk), shrinking is sealed at once,
/// before the cut.
final class OpenFile: @unchecked Sendable {
    /// Where the ciphertext lives (the backing file; memory in unit tests).
    let store: any CiphertextStore
    /// The backing inode, the key of the filesystem's open-file table.
    let inode: InodeKey
    let writable: Bool
    /// Replaced only by a reencrypt, under the write lock.
    private(set) var cipher: FileCipher
    let layout: ChunkLayout
    private(set) var header: FileHeader
    /// Plaintext size; guarded by `lock`.
    private(set) var size: Int
    private var sealedLength: Int
    /// The plaintext of the file's partial last chunk, kept while writing so
    /// that appends in pieces smaller than a chunk do not read and open it
    /// again each time. Guarded by `lock`.
    private var tail: (index: ChunkIndex, bytes: [UInt8])?
    /// Every use takes it through `exclusive` or `shared`, which first let
    /// the file's writes in flight land (`WriteBehind`).
    private let lock = ReadWriteLock()
    /// This file's streaming appends handed to `WriteBehind`.
    private let behind = WriteBehind.Ledger()
    /// False once the backing file refused to reserve space (`fallocate`
    /// unsupported): its appends are written in the request. Guarded by `lock`.
    private var reservable = true
    /// Handles open on it; guarded by the filesystem's open-file table.
    var handles = 0
    /// Called with the error, and the reader when known, when a chunk fails authentication (audit, counters).
    let onIntegrityFailure: @Sendable (CipherError, Principal?) -> Void

    var fileID: FileID { cipher.fileID }
    var keyID: KeyID { header.keyID }
    var keyVersion: KeyVersion { header.keyVersion }

    /// Authenticates `header` against the key and the size on disk.
    /// `taken` is the backing file's current stat if the caller just took
    /// it; `sealedHere` the length the caller itself just sealed into
    /// `header` (a file it created), which is not authenticated again.
    /// Holds `descriptor` (shared with the file's node).
    convenience init(_ descriptor: SharedDescriptor, writable: Bool, header: FileHeader, cipher: FileCipher, stat taken: stat? = nil, sealedHere: Int? = nil,
                     onIntegrityFailure: @escaping @Sendable (CipherError, Principal?) -> Void) throws(Errno) {
        try self.init(store: DescriptorStore(descriptor), writable: writable, header: header, cipher: cipher, stat: taken, sealedHere: sealedHere,
                      onIntegrityFailure: onIntegrityFailure)
    }

    init(store: any CiphertextStore, writable: Bool, header: FileHeader, cipher: FileCipher, stat taken: stat? = nil, sealedHere: Int? = nil,
         onIntegrityFailure: @escaping @Sendable (CipherError, Principal?) -> Void) throws(Errno) {
        let st: stat
        if let taken { st = taken } else { st = try store.attributes() }
        self.store = store
        self.inode = InodeKey(st)
        self.writable = writable
        self.cipher = cipher
        self.layout = cipher.layout
        self.header = header
        self.onIntegrityFailure = onIntegrityFailure
        let diskSize = Int(st.st_size)
        do throws(CipherError) {
            if let sealedHere { sealedLength = sealedHere } else { sealedLength = try cipher.verify(header: header) }
            size = try cipher.checkLength(ciphertextSize: diskSize, sealedLength: sealedLength)
        } catch {
            onIntegrityFailure(error, nil)
            throw .ioError
        }
    }

    // MARK: Locking

    /// Runs `body` alone on the file, after its writes in flight landed; a
    /// write that failed after its reply is reported here (once).
    private func exclusive<T>(_ body: () throws(Errno) -> T) throws(Errno) -> T {
        try lock.writing { () throws(Errno) -> T in
            try land()
            return try body()
        }
    }

    /// Runs `body` beside other readers, after the file's writes in flight
    /// landed. A failed one, unreported, is left to the next exclusive use
    /// (which cuts the file back); readers meanwhile get EIO.
    private func shared<T>(_ body: () throws(Errno) -> T) throws(Errno) -> T {
        try lock.reading { () throws(Errno) -> T in
            if behind.busy, behind.waitLanded() { throw .ioError }
            return try body()
        }
    }

    /// Waits for the file's writes in flight. If one failed (an I/O error:
    /// its space was reserved), the file is cut back to where that write
    /// began, the chunks after it being missing or partial, and the error
    /// is thrown. Under the write lock.
    private func land() throws(Errno) {
        guard let failure = behind.settle() else { return }
        if failure.offset < size {
            size = failure.offset
            tail = nil
            _ = try? store.truncate(to: layout.ciphertextSize(plaintextSize: size))
            behind.reservedEnd = 0
        }
        throw failure.error
    }

    /// True if this file has writes in flight (attribute replies wait for them).
    var writesInFlight: Bool { behind.busy }

    /// Waits for this file's writes in flight (an attribute reply is about
    /// to stat the backing file).
    func waitForWrites() {
        lock.reading { _ = behind.waitLanded() }
    }

    // MARK: Reading

    /// Reads up to `count` bytes at `offset` and passes them to `reply`.
    func read(offset: Int, count: Int, by reader: Principal? = nil, _ reply: (UnsafeRawBufferPointer) -> Void) throws(Errno) {
        try shared { () throws(Errno) in
            guard offset < size, count > 0 else { reply(UnsafeRawBufferPointer(start: nil, count: 0)); return }
            let end = min(size, offset + count)
            let chunks = layout.chunks(covering: offset..<end)
            let base = layout.plaintextOffset(of: chunks.lowerBound)
            let plainCount = min(size, layout.plaintextOffset(of: chunks.upperBound)) - base
            let plain = UnsafeMutableRawBufferPointer.allocate(byteCount: plainCount, alignment: 16)
            defer { plain.deallocate() }
            try readChunks(chunks.lowerBound, plaintextCount: plainCount, into: plain, by: reader)
            reply(UnsafeRawBufferPointer(rebasing: plain[(offset - base)..<(end - base)]))
        }
    }

    /// Reads and opens the chunks from `first` holding `plaintextCount` bytes.
    private func readChunks(_ first: ChunkIndex, plaintextCount: Int, into plain: UnsafeMutableRawBufferPointer,
                            by reader: Principal? = nil) throws(Errno) {
        let sealedCount = ChunkPipeline.ciphertextBytes(layout, plaintextSize: plaintextCount)
        try BufferPool.shared.withBuffer(sealedCount) { sealed throws(Errno) in
            let got = try store.read(into: sealed, at: layout.ciphertextOffset(of: first))
            guard got == sealedCount else {
                // The file shrank under us: cut outside the mount.
                onIntegrityFailure(.truncated(expectedPlaintextSize: size, actualPlaintextSize: layout.plaintextOffset(of: first) + got), reader)
                throw .ioError
            }
            do throws(CipherError) {
                try ChunkPipeline.open(cipher, first: first, sealed: UnsafeRawBufferPointer(sealed), into: plain)
            } catch {
                onIntegrityFailure(error, reader)
                throw .ioError
            }
        }
    }

    // MARK: Writing

    /// Writes `data` at `offset`, filling any gap after the end with sealed zeros.
    func write(_ data: UnsafeRawBufferPointer, at offset: Int) throws(Errno) -> Int {
        guard writable else { throw .badFileDescriptor }
        return try lock.writing { () throws(Errno) in
            if try handOver(data, at: offset) { return data.count }
            try land()
            if offset > size { try extend(to: offset) }
            try writeRange(data, at: offset)
            return data.count
        }
    }

    /// Hands a streaming append (at the end, from a chunk boundary, at least
    /// `WriteBehind.minimum` bytes) to the writer thread, sealed here into a
    /// buffer of its own, once its space is reserved. False if this write is
    /// not one, an earlier one failed, or the space cannot be reserved: the
    /// caller then writes it itself (meeting a full disk there). Under the write lock.
    private func handOver(_ data: UnsafeRawBufferPointer, at offset: Int) throws(Errno) -> Bool {
        guard WriteBehind.enabled, reservable, offset == size, offset % layout.chunkSize == 0,
              data.count >= WriteBehind.minimum, !behind.failed else { return false }
        let first = ChunkIndex(offset / layout.chunkSize)
        let start = layout.ciphertextOffset(of: first)
        let count = ChunkPipeline.ciphertextBytes(layout, plaintextSize: data.count)
        behind.learnReservation(from: store)
        guard reserve(through: start + count) else { return false }
        let lease = BufferPool.shared.lease(count)
        do throws(CipherError) {
            // On this core alone: the other one is the writer's.
            try ChunkPipeline.seal(cipher, first: first, plaintext: data, into: UnsafeMutableRawBufferPointer(rebasing: lease.memory[0..<count]),
                                   workers: 1)
        } catch {
            lease.give()
            throw .ioError
        }
        WriteBehind.shared.submit(.init(store: store, ledger: behind, buffer: lease, count: count, offset: start, plaintextOffset: offset))
        size = offset + data.count
        rememberTail(data, first: first)
        return true
    }

    /// Makes sure space is reserved up to ciphertext offset `end`: the
    /// writer thread reserves ahead of a stream (`WriteBehind`); what it
    /// has not is reserved here. False if the disk is full or cannot reserve.
    private func reserve(through end: Int) -> Bool {
        let have = behind.reservedEnd
        if end <= have { return true }
        let from = max(have, layout.ciphertextSize(plaintextSize: size))
        do throws(Errno) {
            try store.reserve(at: from, count: end - from)
            behind.reserved(through: end)
            return true
        } catch .noSpace, .diskQuotaExceeded {
            return false
        } catch {
            reservable = false
            return false
        }
    }

    /// Sets the size: shrinking re-seals the length first, growing appends sealed zeros.
    func truncate(to newSize: Int) throws(Errno) {
        guard writable else { throw .badFileDescriptor }
        try exclusive { () throws(Errno) in
            if newSize > size {
                try extend(to: newSize)
            } else if newSize < size {
                try shrink(to: newSize)
            } else {
                // truncate(2) to the size a file already has still changes
                // its mtime and ctime (the kernel leaves that to us).
                try store.touch()
            }
        }
    }

    /// Extends with zeros to `newSize`, a megabyte at a time (sparse files
    /// are stored as sealed zero chunks, never as holes).
    private func extend(to newSize: Int) throws(Errno) {
        let step = max(layout.chunkSize, 1 << 20)
        let zeros = UnsafeMutableRawBufferPointer.allocate(byteCount: step, alignment: 16)
        defer { zeros.deallocate() }
        zeros.initializeMemory(as: UInt8.self, repeating: 0)
        while size < newSize {
            // Align segments to chunk boundaries after the first.
            let n = min(newSize - size, step - size % layout.chunkSize)
            try writeRange(UnsafeRawBufferPointer(rebasing: zeros[0..<n]), at: size)
        }
    }

    /// Re-seals the chunks that `[offset, offset + data.count)` touches
    /// (reading back the old bytes of a partly covered first and last
    /// chunk), writes them in one pwrite, then re-seals the length if the
    /// file grew. `offset` is at most `size`.
    private func writeRange(_ data: UnsafeRawBufferPointer, at offset: Int) throws(Errno) {
        guard !data.isEmpty else { return }
        let end = offset + data.count
        let newSize = max(size, end)
        let chunks = layout.chunks(covering: offset..<end)
        let base = layout.plaintextOffset(of: chunks.lowerBound)
        let plainCount = min(newSize, layout.plaintextOffset(of: chunks.upperBound)) - base
        // A write that covers its chunks exactly (a streaming append or an
        // aligned overwrite) is sealed straight from the request's buffer.
        if offset == base, data.count == plainCount {
            try sealAndWrite(data, first: chunks.lowerBound, newSize: newSize)
            return
        }
        try BufferPool.shared.withBuffer(plainCount) { plain throws(Errno) in
            try mergeAndWrite(data, at: offset, into: plain, chunks: chunks, newSize: newSize)
        }
    }

    /// `writeRange` of a write that covers its chunks only in part: the old
    /// bytes around it and the write itself, merged in `plain` (its chunks' plaintext), sealed and written.
    private func mergeAndWrite(_ data: UnsafeRawBufferPointer, at offset: Int, into plain: UnsafeMutableRawBufferPointer,
                               chunks: Range<ChunkIndex>, newSize: Int) throws(Errno) {
        let end = offset + data.count
        let base = layout.plaintextOffset(of: chunks.lowerBound)
        // Old bytes before the write in the first chunk.
        if offset > base {
            let n = layout.plaintextCount(of: chunks.lowerBound, plaintextSize: size)
            try oldChunk(chunks.lowerBound, count: n, into: UnsafeMutableRawBufferPointer(rebasing: plain[0..<n]))
        }
        // Old bytes after the write in the last chunk.
        let last = chunks.upperBound.advanced(by: -1)
        let lastStart = layout.plaintextOffset(of: last)
        if end < min(size, lastStart + layout.chunkSize), last != chunks.lowerBound || offset == base {
            let n = layout.plaintextCount(of: last, plaintextSize: size)
            try oldChunk(last, count: n, into: UnsafeMutableRawBufferPointer(rebasing: plain[(lastStart - base)..<(lastStart - base + n)]))
        }
        UnsafeMutableRawBufferPointer(rebasing: plain[(offset - base)..<(end - base)]).copyMemory(from: data)
        try sealAndWrite(UnsafeRawBufferPointer(plain), first: chunks.lowerBound, newSize: newSize)
    }

    /// Seals `plain` (whole chunks from `first`, the last one possibly the
    /// file's partial end), writes it, and sets the size to `newSize`.
    private func sealAndWrite(_ plain: UnsafeRawBufferPointer, first: ChunkIndex, newSize: Int) throws(Errno) {
        let sealedCount = ChunkPipeline.ciphertextBytes(layout, plaintextSize: plain.count)
        try BufferPool.shared.withBuffer(sealedCount) { sealed throws(Errno) in
            // Written out piece by piece, in order, while the rest is sealed:
            // a failed write leaves a prefix written, as a short write would.
            let base = layout.ciphertextOffset(of: first)
            let store = self.store
            let failed = Mutex<Errno?>(nil)
            do throws(CipherError) {
                try ChunkPipeline.sealInOrder(cipher, first: first, plaintext: plain, into: sealed) { range in
                    do throws(Errno) {
                        try store.write(UnsafeRawBufferPointer(rebasing: sealed[range]), at: base + range.lowerBound)
                        return true
                    } catch {
                        failed.withLock { $0 = error }
                        return false
                    }
                }
            } catch { throw .ioError }
            if let error = failed.withLock({ $0 }) {
                if newSize > size { restoreEnd(plain, first: first) }
                throw error
            }
        }
        size = newSize
        rememberTail(plain, first: first)
    }

    /// Keeps the plaintext of the file's new partial last chunk, if `plain`
    /// (the plaintext just written from chunk `first`) holds it, for the next append.
    private func rememberTail(_ plain: UnsafeRawBufferPointer, first: ChunkIndex) {
        let base = layout.plaintextOffset(of: first)
        let endChunk = ChunkIndex(size / layout.chunkSize)
        let endCount = size % layout.chunkSize
        let last = first.advanced(by: (plain.count + layout.chunkSize - 1) / layout.chunkSize)
        if endCount > 0, endChunk >= first, endChunk < last {
            let start = layout.plaintextOffset(of: endChunk) - base
            tail = (endChunk, Array(UnsafeRawBufferPointer(rebasing: plain[start..<(start + endCount)])))
        } else if endCount == 0 || tail?.index != endChunk {
            tail = nil
        }
    }

    /// After a growing write failed part-way (a full disk: only the part
    /// past the old end can fail for want of space), puts the file back to
    /// its old length: cuts what was added and seals again the chunk the old
    /// end falls in, from `plain` (the write's plaintext from chunk `first`),
    /// since its bytes were overwritten with a longer, now cut, chunk. Bytes
    /// the write changed before the old end keep their new values, as after
    /// a short write. Best effort: if even that fails, that chunk reads as
    /// EIO, as a crash in the middle of the write would have left it.
    private func restoreEnd(_ plain: UnsafeRawBufferPointer, first: ChunkIndex) {
        tail = nil
        behind.reservedEnd = 0  // the cut frees space reserved past the end too
        guard (try? store.truncate(to: layout.ciphertextSize(plaintextSize: size))) != nil else { return }
        let index = ChunkIndex(size / layout.chunkSize)
        let keep = size % layout.chunkSize
        let start = layout.plaintextOffset(of: index) - layout.plaintextOffset(of: first)
        guard keep > 0, index >= first, start + keep <= plain.count else { return }
        let sealed = UnsafeMutableRawBufferPointer.allocate(byteCount: keep + ChunkLayout.overhead, alignment: 16)
        defer { sealed.deallocate() }
        do throws(CipherError) {
            try cipher.sealChunk(index, plaintext: UnsafeRawBufferPointer(rebasing: plain[start..<(start + keep)]), into: sealed)
        } catch { return }
        _ = try? store.write(UnsafeRawBufferPointer(sealed), at: layout.ciphertextOffset(of: index))
    }

    /// The old plaintext of chunk `index` (`count` bytes): from the cached
    /// tail when it is that chunk, else read and opened from disk.
    private func oldChunk(_ index: ChunkIndex, count: Int, into out: UnsafeMutableRawBufferPointer) throws(Errno) {
        if let tail, tail.index == index, tail.bytes.count == count {
            tail.bytes.withUnsafeBytes { out.copyMemory(from: $0) }
            return
        }
        try readChunks(index, plaintextCount: count, into: out)
    }

    /// Seals the current length into the header if the file grew since the
    /// last seal (on flush, fsync and release: the chunks are already written).
    func sealLength() throws(Errno) {
        guard writable else { return }
        try exclusive { () throws(Errno) in
            if size > sealedLength { try persistLength(size) }
            // Space reserved for appends past the end goes back.
            let end = layout.ciphertextSize(plaintextSize: size)
            let reserved = behind.reservedEnd
            if reserved > end { store.unreserve(from: end, count: reserved - end) }
            behind.reservedEnd = 0
        }
    }

    private func shrink(to newSize: Int) throws(Errno) {
        tail = nil
        // Seal the smaller length first: a crash before the cut reads as the old, longer file.
        try persistLength(newSize)
        behind.reservedEnd = 0  // the cut frees space reserved past the end too
        let keep = newSize % layout.chunkSize
        if keep == 0 {
            try store.truncate(to: layout.ciphertextSize(plaintextSize: newSize))
        } else {
            let index = ChunkIndex(newSize / layout.chunkSize)
            let plain = UnsafeMutableRawBufferPointer.allocate(byteCount: layout.chunkSize, alignment: 16)
            defer { plain.deallocate() }
            let old = layout.plaintextCount(of: index, plaintextSize: size)
            try readChunks(index, plaintextCount: old, into: UnsafeMutableRawBufferPointer(rebasing: plain[0..<old]))
            let sealed = UnsafeMutableRawBufferPointer.allocate(byteCount: keep + ChunkLayout.overhead, alignment: 16)
            defer { sealed.deallocate() }
            do throws(CipherError) {
                try cipher.sealChunk(index, plaintext: UnsafeRawBufferPointer(rebasing: plain[0..<keep]), into: sealed)
            } catch { throw .ioError }
            try store.truncate(to: layout.ciphertextSize(plaintextSize: newSize))
            try store.write(UnsafeRawBufferPointer(sealed), at: layout.ciphertextOffset(of: index))
        }
        size = newSize
    }

    /// Re-seals the header with plaintext length `length` and writes it.
    private func persistLength(_ length: Int) throws(Errno) {
        let bytes: [UInt8]
        do throws(CipherError) {
            try cipher.seal(header: &header, plaintextSize: length)
            bytes = try header.encoded()
        } catch { throw .ioError }
        try store.write(bytes, at: 0)
        sealedLength = length
    }

    // MARK: Rekeying (docs/FILESYSTEM.md, "Re-keying")

    /// Rewraps this file's data key: under the write lock, if the header is
    /// still one `selects` picks, `wrap` gives the new key fields, the header
    /// is resealed at the sealed length, `intent` records old and new header
    /// bytes, and the new header is written through `writeFD` in one pwrite.
    /// Returns the key and version now in the header, or nil (changing
    /// nothing) if the file no longer needs it.
    func rewrap(writeFD: Int32, selects: (FileHeader) -> Bool,
                wrap: (FileHeader) throws(Errno) -> (KeyID, KeyVersion, [UInt8]),
                intent: (_ old: [UInt8], _ new: [UInt8]) throws(Errno) -> Void) throws(Errno) -> (key: KeyID, version: KeyVersion)? {
        try exclusive { () throws(Errno) -> (key: KeyID, version: KeyVersion)? in
            guard selects(header) else { return nil }
            let (key, version, wrapped) = try wrap(header)
            var next = header
            next.keyID = key
            next.keyVersion = version
            next.wrappedKey = wrapped
            let old: [UInt8], new: [UInt8]
            do throws(CipherError) {
                try cipher.seal(header: &next, plaintextSize: sealedLength)
                old = try header.encoded()
                new = try next.encoded()
            } catch { throw .ioError }
            try intent(old, new)
            try Syscall.pwrite(writeFD, new, at: 0)
            header = next
            return (key, version)
        }
    }

    /// Re-encrypts this file under a new data key, in place (same inode, so
    /// hard links, owner, mode and xattrs stay; times are put back). Under
    /// the write lock: `backup` copies the old ciphertext aside, `intent`
    /// records it with both headers, every chunk is opened under the old key
    /// and sealed under the new, then the new header is written and synced.
    /// A crash in between is rolled back from the backup at the next start.
    func reencrypt(writeFD: Int32, selects: (FileHeader) -> Bool,
                   newKey: (FileHeader) throws(Errno) -> (cipher: FileCipher, key: KeyID, version: KeyVersion, wrapped: [UInt8]),
                   backup: (_ st: stat) throws(Errno) -> String,
                   intent: (_ old: [UInt8], _ new: [UInt8], _ backup: String) throws(Errno) -> Void)
        throws(Errno) -> (bytes: Int, key: KeyID, version: KeyVersion)? {
        try exclusive { () throws(Errno) -> (bytes: Int, key: KeyID, version: KeyVersion)? in
            guard selects(header) else { return nil }
            let st = try Syscall.fstat(writeFD)
            let fresh = try newKey(header)
            var next = header
            next.keyID = fresh.key
            next.keyVersion = fresh.version
            next.wrappedKey = fresh.wrapped
            let old: [UInt8], new: [UInt8]
            do throws(CipherError) {
                try fresh.cipher.seal(header: &next, plaintextSize: sealedLength)
                old = try header.encoded()
                new = try next.encoded()
            } catch { throw .ioError }
            let copy = try backup(st)
            try intent(old, new, copy)
            // One megabyte of plaintext at a time, chunk-aligned.
            let step = max(layout.chunkSize, 1 << 20)
            let plain = UnsafeMutableRawBufferPointer.allocate(byteCount: step, alignment: 16)
            defer { plain.deallocate() }
            let sealed = UnsafeMutableRawBufferPointer.allocate(byteCount: ChunkPipeline.ciphertextBytes(layout, plaintextSize: step), alignment: 16)
            defer { sealed.deallocate() }
            var offset = 0
            while offset < size {
                let n = min(step, size - offset)
                let first = ChunkIndex(offset / layout.chunkSize)
                try readChunks(first, plaintextCount: n, into: UnsafeMutableRawBufferPointer(rebasing: plain[0..<n]))
                let count = ChunkPipeline.ciphertextBytes(layout, plaintextSize: n)
                do throws(CipherError) {
                    try ChunkPipeline.seal(fresh.cipher, first: first, plaintext: UnsafeRawBufferPointer(rebasing: plain[0..<n]),
                                           into: UnsafeMutableRawBufferPointer(rebasing: sealed[0..<count]))
                } catch { throw .ioError }
                try Syscall.pwrite(writeFD, UnsafeRawBufferPointer(rebasing: sealed[0..<count]), at: layout.ciphertextOffset(of: first))
                offset += n
            }
            try Syscall.pwrite(writeFD, new, at: 0)
            try Syscall.call { fdatasync(writeFD) }
            cipher = fresh.cipher
            header = next
            var times = [st.st_atim, st.st_mtim]
            _ = futimens(writeFD, &times)
            return (Int(st.st_size), fresh.key, fresh.version)
        }
    }

    /// Flushes to stable storage.
    func sync(dataOnly: Bool) throws(Errno) {
        try sealLength()
        try store.sync(dataOnly: dataOnly)
    }
}
