import ChunkCipher
import FUSEBridge
import KeyManager
import Logging
import CLinux
import SystemPackage
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Listing directories (READDIR and READDIRPLUS).
extension EncryptedFileSystem {
    public func opendir(_ id: NodeID, _ context: RequestContext) throws(Errno) -> HandleID {
        let node = try nodes.node(id)
        let dir = plaintextNames ? nil : try directoryKeys(node, context)
        var items = [Listing.Item(entry: DirectoryEntry(name: ".", inode: node.key.inode, type: S_IFDIR, nextOffset: 1)),
                     Listing.Item(entry: DirectoryEntry(name: "..", inode: UInt64((try? Syscall.fstatat(node.dirFD, "..").st_ino) ?? 1),
                                                        type: S_IFDIR, nextOffset: 2))]
        var damaged = 0
        let backing = try Syscall.listDirectory(node.dirFD)
        let holdsDevices = backing.contains { $0.name == DeviceNode.marker }
        for raw in backing {
            switch listedName(raw.name, in: node, keys: dir) {
            case .name(let name):
                var type = mode_t(raw.type) << 12
                if holdsDevices, raw.type == DT_REG, let st = try? Syscall.fstatat(node.dirFD, raw.name), DeviceNode.mayBeRecord(st),
                   let device = deviceNode(in: node.dirFD, stored: raw.name, path: nil, context) {
                    type = device.type
                }
                items.append(Listing.Item(entry: DirectoryEntry(name: name, inode: raw.inode, type: type, nextOffset: Int64(items.count + 1)),
                                          stored: raw.name))
            case .internalEntry:
                continue
            case .damaged:
                damaged += 1
            }
        }
        if damaged > 0 {
            // Tampered or foreign names: audited, and the listing ends in EIO
            // after the intact entries, so tools see the damage instead of a
            // directory that silently looks smaller.
            integrityFailure(.integrityFailure(.name), object: dir?.directoryID, what: "\(damaged) name(s) in a directory",
                             key: dir?.keyID, path: nodes.directoryPath(of: id).description, principal: principal(context))
        }
        return openFiles.addListing(Listing(items: items, damaged: damaged))
    }

    public func readdir(_ id: NodeID, handle: HandleID, offset: Int64, _ add: (DirectoryEntry) -> Bool) throws(Errno) {
        for item in try listing(handle, from: offset) { guard add(item.entry) else { return } }
    }

    /// The entries of open directory `handle` from `offset`; past the last
    /// intact entry, a directory with damaged names answers EIO.
    func listing(_ handle: HandleID, from offset: Int64) throws(Errno) -> ArraySlice<Listing.Item> {
        guard let listing = openFiles.listing(handle) else { throw .badFileDescriptor }
        guard Int(offset) < listing.items.count else {
            if listing.damaged > 0 { throw .ioError }
            return []
        }
        return listing.items[Int(offset)...]
    }

    /// What a listed backing name is to the mount, from the directory's name
    /// cache when seen before (the caller has checked the directory's keys).
    func listedName(_ stored: FileName, in node: Node, keys dir: DirectoryKeys?) -> NameMapping.Decoded {
        names.listed(stored, inDirectory: node.dirFD, keys: dir, cache: node.names)
    }

    /// READDIRPLUS: each entry with its lookup, so that `ls -l`, `find`
    /// and `rm -rf` cost no LOOKUP and GETATTR round trip per name. An entry
    /// removed since opendir is listed without attributes (as readdir would
    /// list it); a lookup the full buffer leaves out is taken back.
    public func readdirplus(_ id: NodeID, handle: HandleID, offset: Int64, _ context: RequestContext,
                            _ add: (DirectoryEntry, EntryReply?) -> Bool) throws(Errno) {
        let items = try listing(handle, from: offset)
        let dir = try nodes.node(id)
        for item in items {
            let reply = item.stored.flatMap { try? lookup(stored: $0, name: item.entry.name, in: dir, id, context) }
            guard add(item.entry, reply) else {
                if let reply { nodes.forget(reply.node, 1) }
                return
            }
        }
    }

    /// An open directory: its decrypted entries with their stored names (nil
    /// for "." and ".."), and how many names did not authenticate.
    struct Listing {
        struct Item {
            var entry: DirectoryEntry
            var stored: FileName?
        }
        var items: [Item]
        var damaged: Int
    }

    public func releasedir(_ id: NodeID, handle: HandleID) {
        openFiles.removeListing(handle)
    }
}
