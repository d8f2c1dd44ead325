import Testing
import ChunkCipher
import FUSEBridge
import SystemPackage
@testable import EncryptedFS

/// The open-file table without a mount: one state per inode, holds counted,
/// handle ids never reused.
struct OpenFileTableTests {
    /// An empty open file in memory that claims to be backing inode `inode`.
    static func file(inode: UInt64) throws -> OpenFile {
        let store = MemoryStore()
        let layout = OpenFileTests.layout
        let fileID = FileID.random()
        var header = FileHeader(chunkSizeLog2: layout.chunkSizeLog2, fileID: fileID, keyID: .random(), keyVersion: KeyVersion(rawValue: 1),
                                wrappedKey: [UInt8](repeating: 7, count: 60))
        let cipher = try FileCipher(key: .random(), fileID: fileID, layout: layout)
        try cipher.seal(header: &header, plaintextSize: 0)
        try store.write(try header.encoded(), at: 0)
        var st = try store.attributes()
        st.st_ino = numericCast(inode)
        return try OpenFile(store: store, writable: true, header: header, cipher: cipher, stat: st, sealedHere: 0, onIntegrityFailure: { _, _ in })
    }

    @Test("one state per inode: a second state of the same inode is not kept, holds are counted, the last unpin takes it out; handles and listings never share an id")
    func sharingAndHandles() throws {
        let table = OpenFileTable()
        let a = try Self.file(inode: 1), twin = try Self.file(inode: 1), other = try Self.file(inode: 2)
        let h1 = table.shareWithHandle(a)
        #expect(table.share(twin) === a, "a second state of inode 1 would overwrite the first's chunks")
        let h2 = table.handle(for: a)
        let h3 = table.shareWithHandle(other)
        let listing = table.addListing(EncryptedFileSystem.Listing(items: [], damaged: 0))
        #expect(Set([h1, h2, h3, listing].map(\.rawValue)).count == 4)
        #expect(table.count == 2 && table.file(h2) === a && table.listing(listing) != nil)

        #expect(table.removeHandle(h1) === a && table.file(h1) == nil)
        #expect(table.unpin(a) == false, "two holds remain: the twin's share and the pin below")
        let pinned = table.pin(a.inode)
        #expect(pinned === a)
        #expect(table.unpin(a) == false)
        #expect(table.unpin(a) == true)
        #expect(table.pin(a.inode) == nil && table.count == 1)
        table.removeListing(listing)
        #expect(table.listing(listing) == nil)
        // After everything closed, a new handle still gets a fresh id.
        #expect(!Set([h1, h2, h3, listing].map(\.rawValue)).contains(table.handle(for: other).rawValue))
    }

    @Test("shared(): make runs only when the inode has no state, and a make that fails leaves nothing in the table")
    func makeOnlyWhenMissing() throws {
        let table = OpenFileTable()
        let a = try Self.file(inode: 7)
        var made = 0
        let first = try table.shared(a.inode) { table.pin(a.inode) } make: { () throws(Errno) -> OpenFile in made += 1; return a }
        let second = try table.shared(a.inode) { table.pin(a.inode) } make: { () throws(Errno) -> OpenFile in made += 1; return a }
        #expect(first === a && second === a && made == 1)
        let b = try Self.file(inode: 8)
        #expect(throws: Errno.ioError) {
            _ = try table.shared(b.inode) { table.pin(b.inode) } make: { () throws(Errno) -> OpenFile in throw .ioError }
        }
        #expect(table.pin(b.inode) == nil && table.count == 1)
    }
}
