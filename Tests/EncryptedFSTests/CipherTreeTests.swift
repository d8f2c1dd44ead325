import Testing
import FUSEBridge
@testable import EncryptedFS

/// One rule for what a backing name is, shared by fsck, re-keying, recovery and the progress count.
struct CipherTreeTests {
    @Test("a backing name is the user's entry, the directory's keys or kmsfs's own: hashed long names are entries, sidecars, markers, set-asides and the keystore directory are not, and a plaintext name ending in .name is an entry")
    func backingNameKinds() {
        let cases: [(String, CipherTree.Kind)] = [
            ("l5RLCfBeWdk6vSQ15uG7kQ8", .entry),
            (".kmsfs.L.abcdEFGH", .entry),
            (".kmsfs.L.abcdEFGH.name", .own),
            (".kmsfs.dir", .directoryKeys),
            (".kmsfs.dir.tmp", .own),
            (".kmsfs", .own),
            (".kmsfs.nodes", .own),
            (".kmsfs.rmdir-0123456789abcdef", .own),
            ("notes.name", .entry),
            (".hidden", .entry),
        ]
        for (name, kind) in cases {
            #expect(CipherTree.kind(of: FileName(name)) == kind, "\(name)")
        }
    }
}
