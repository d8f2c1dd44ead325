import ChunkCipher
import GRDB
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Directory bindings: a plaintext directory path governs which master key
/// wraps the data keys of new files beneath it (nearest ancestor wins). Paths
/// are stored as an HMAC (for lookup) and sealed (for listing), so the
/// keystore holds no plaintext names. A binding follows the path, not the
/// directory: renaming a bound directory leaves the binding at the old path.
extension KeyManager {
    /// Normalises `/a//b/` to `/a/b`.
    public static func normalize(path: String) -> String {
        "/" + path.split(separator: "/").filter { $0 != "." && !$0.isEmpty }.joined(separator: "/")
    }

    private func pathMAC(_ path: String) -> Data {
        Data(KeyDerivation.hmacSHA256(key: metadataKey, message: Array("kmsfs/v1/binding".utf8) + Array(path.utf8)))
    }

    /// Binds a directory path to a key. Redirecting a path's new files takes
    /// administer rights on both keys: the new one, and the one governing the
    /// path now (its own binding or its nearest bound ancestor's), so a uid
    /// that administers only its own key cannot pull another team's
    /// directories (or the root) onto it.
    public func bind(path: String, to reference: String, by principal: Principal) throws(KeyManagerError) {
        let normalized = Self.normalize(path: path)
        try adminOperation(.bindKey, principal, request: ["path": normalized, "targetKeyId": reference]) { () throws(KeyManagerError) in
            let id = try resolve(reference)
            let rec = try authorizeAdmin(principal, id)
            guard rec.metadata.spec == .aes256 else { throw .invalidArgument("only AES_256 keys can govern files; \(rec.displayName) is \(rec.metadata.spec.rawValue)") }
            try check(.change, rec)
            try check(.generateDataKey, rec)
            let replaced = try governingBinding(normalized)
            if let replaced, replaced != id { _ = try authorizeAdmin(principal, replaced) }
            let sealer = try AESGCM.make(metadataKey)
            let pathBytes = Array(normalized.utf8)
            let sealed = try keepingKeyManagerError {
                try pathBytes.withUnsafeBytes { raw in try KeyWrap.seal(raw, under: sealer, context: Array("kmsfs/v1/binding-path".utf8)) }
            }
            try sealedWrite { db in
                try BindingRow(pathMAC: pathMAC(normalized), pathSealed: Data(sealed), keyID: id.rawValue.hex).upsert(db)
                try AuditTrail.append(db, chain: integrity.hmac, AuditEvent(.bindKey, key: id, principal: principal,
                                                                            request: ["path": normalized, "targetKeyId": id.rawValue.hex,
                                                                                      "previousKeyId": replaced?.rawValue.hex ?? "none"]), at: clock())
            }
            caches.withLock { $0.bindings = nil; $0.boundKeys = [:] }
        }
    }

    /// Removes the binding of a path (the root's binding cannot be removed,
    /// only moved). Needs administer rights on the unbound key and on the key
    /// that governs the path afterwards (its nearest bound ancestor's).
    public func unbind(path: String, by principal: Principal) throws(KeyManagerError) {
        let normalized = Self.normalize(path: path)
        try adminOperation(.unbindKey, principal, request: ["path": normalized]) { () throws(KeyManagerError) in
            guard normalized != "/" else { throw .invalidArgument("the root must stay bound; bind it to another key instead") }
            let mac = pathMAC(normalized)
            let hex = try verifiedRead { db in try BindingRow.key(at: mac, db) }
            guard let hex, let id = KeyID(hex: hex) else { throw .invalidArgument("\(normalized) is not bound; `kmsfs key bind` lists the bindings") }
            _ = try authorizeAdmin(principal, id)
            let parent = String(normalized[..<(normalized.lastIndex(of: "/") ?? normalized.startIndex)])
            let inherited = try bindingOf(parent.isEmpty ? "/" : parent)
            if inherited != id { _ = try authorizeAdmin(principal, inherited) }
            try sealedWrite { db in
                _ = try BindingRow.deleteOne(db, key: mac)
                try AuditTrail.append(db, chain: integrity.hmac, AuditEvent(.unbindKey, key: id, principal: principal,
                                                                            request: ["path": normalized, "inheritedKeyId": inherited.rawValue.hex]),
                                      at: clock())
            }
            caches.withLock { $0.bindings = nil; $0.boundKeys = [:] }
        }
    }

    /// The paths bound to `key`.
    func boundPaths(of key: KeyID) throws(KeyManagerError) -> [String] {
        try listBindings().filter { $0.key == key }.map(\.path)
    }

    /// The key governing new files in directory `path`: its own binding or
    /// its nearest bound ancestor's. Bindings are cached for `recordTTL`.
    /// A deprecated key hands over to its successor (followed a few hops),
    /// so new files under its bindings land on the key replacing it.
    public func boundKey(forDirectory path: String) throws(KeyManagerError) -> KeyID {
        try successorOf(try bindingOf(path))
    }

    /// The key itself, or for a deprecated key the successor that takes its new data.
    public func successorOf(_ key: KeyID) throws(KeyManagerError) -> KeyID {
        var rec = try record(key)
        for _ in 0..<8 {
            // A deprecated key scheduled for deletion still hands over: its
            // directories' new files must not start failing.
            guard rec.state == .deprecated || rec.state == .pendingDeletion, let successor = rec.metadata.successor else { break }
            rec = try record(successor)
        }
        return rec.id
    }

    func bindingOf(_ path: String) throws(KeyManagerError) -> KeyID {
        guard let id = try governingBinding(path) else { throw .keystoreCorrupt("the root directory has no key binding") }
        return id
    }

    /// The key bound to `path` or its nearest bound ancestor; nil only
    /// before the root is first bound (at init).
    func governingBinding(_ path: String) throws(KeyManagerError) -> KeyID? {
        let bindings = try bindingMap()
        if let known = caches.withLock({ $0.boundKeys[path] }) { return known }
        var components = Self.normalize(path: path).split(separator: "/").map(String.init)
        while true {
            if let id = bindings[pathMAC("/" + components.joined(separator: "/"))] {
                caches.withLock { $0.boundKeys[path] = id }
                return id
            }
            guard !components.isEmpty else { return nil }
            components.removeLast()
        }
    }

    private func bindingMap() throws(KeyManagerError) -> [Data: KeyID] {
        let now = clock()
        if let cached = caches.withLock({ $0.bindings }), abs(now - cached.fetchedAt) < Self.recordTTL { return cached.map }
        let map: [Data: KeyID] = try verifiedRead { db in
            var map = [Data: KeyID]()
            for row in try BindingRow.fetchAll(db) {
                if let id = KeyID(hex: row.keyID) { map[row.pathMAC] = id }
            }
            return map
        }
        caches.withLock {
            $0.bindings = (map, now)
            $0.boundKeys = [:]
        }
        return map
    }

    /// All bindings as (path, key), sorted by path.
    public func listBindings() throws(KeyManagerError) -> [(path: String, key: KeyID)] {
        let sealer = try AESGCM.make(metadataKey)
        let rows: [(Data, String)] = try verifiedRead { db in try BindingRow.fetchAll(db).map { ($0.pathSealed, $0.keyID) } }
        var out = [(path: String, key: KeyID)]()
        for (sealed, hex) in rows {
            guard let id = KeyID(hex: hex), let secret = try KeyWrap.open([UInt8](sealed), under: sealer, context: Array("kmsfs/v1/binding-path".utf8)) else { continue }
            let path = secret.withUnsafeBytes { String(decoding: $0, as: UTF8.self) }
            out.append((path, id))
        }
        return out.sorted { $0.path < $1.path }
    }
}
