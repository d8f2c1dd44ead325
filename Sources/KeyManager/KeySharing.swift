import ChunkCipher
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// A key that governs new files under some directory, with who may use it:
/// what a shared mount (`-o allow_other`) needs to know.
public struct GoverningKey: Codable, Sendable, Equatable {
    public var key: String
    public var keyID: String
    /// The directory paths bound to it.
    public var paths: [String]
    /// Subjects that may create files (policy, then unexpired grants as "uid:N (grant)").
    public var encrypt: [String]
    /// Subjects that may open files.
    public var decrypt: [String]
}

extension KeyManager {
    /// Every bound key with its paths and its encrypt and decrypt subjects.
    public func governingKeys() throws(KeyManagerError) -> [GoverningKey] {
        let now = clock()
        var paths: [KeyID: [String]] = [:]
        for binding in try listBindings() { paths[binding.key, default: []].append(binding.path) }
        var out: [GoverningKey] = []
        for (id, bound) in paths.sorted(by: { $0.value.min() ?? "" < $1.value.min() ?? "" }) {
            let rec = try record(id)
            func subjects(_ op: KeyOperation) -> [String] {
                let byPolicy: [String] = (rec.policy[op] ?? []).map { $0.description }.sorted()
                let live = rec.grants.filter { $0.operations.contains(op) && $0.isLive(at: now) }
                return byPolicy + live.map { $0.grantee + " (grant)" }
            }
            out.append(GoverningKey(key: rec.displayName, keyID: id.rawValue.hex, paths: bound.sorted(),
                                    encrypt: subjects(.encrypt), decrypt: subjects(.decrypt)))
        }
        return out
    }

    /// For a mount with `allow_other`: one warning per governing key that
    /// admits no one but root and `owner` (the mounting uid) to encrypt or
    /// decrypt, naming the command that would admit others.
    public func sharingWarnings(owner: UInt32, mountpoint: String) throws(KeyManagerError) -> [String] {
        let ownerOnly: Set<String> = ["uid:0", "uid:\(owner)"]
        return try governingKeys().compactMap { key in
            let users = Set(key.encrypt + key.decrypt)
            guard users.isSubset(of: ownerOnly) else { return nil }
            return "-o allow_other, but only \(users.isEmpty ? "nobody" : users.sorted().joined(separator: " and ")) "
                + "may encrypt or decrypt with \(key.key) (governing \(key.paths.joined(separator: ", "))): other users get EACCES there. "
                + "To share it: kmsfs key policy \(key.key) --grant encrypt,decrypt '*' --fs \(mountpoint)"
        }
    }
}
