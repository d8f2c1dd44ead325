import ChunkCipher
import KeyManager
import CLinux
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

extension Errno {
    /// EKEYREVOKED: the key is disabled, pending deletion or destroyed (DESIGN.md §10).
    static let keyRevoked = Errno(rawValue: Glibc.EKEYREVOKED)
    static let noData = Errno(rawValue: Glibc.ENODATA)

    /// The errno an application sees for a key-manager refusal.
    init(_ error: KeyManagerError) {
        switch error {
        case .accessDenied: self = .permissionDenied
        case .invalidState, .versionCutOff: self = .keyRevoked
        default: self = .ioError
        }
    }
}
