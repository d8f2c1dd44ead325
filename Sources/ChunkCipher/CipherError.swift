/// Where in a file an integrity failure was found.
public enum IntegrityLocation: Hashable, Sendable, CustomStringConvertible {
    case header
    case chunk(ChunkIndex)
    case name

    public var description: String {
        switch self {
        case .header: "header"
        case .chunk(let index): "chunk \(index)"
        case .name: "file name"
        }
    }
}

/// Errors of the cryptographic core. They tell apart data that was changed
/// (integrity), data that cannot be parsed (malformed), and a key that does
/// not belong to the data (wrong key). No case ever carries key material.
public enum CipherError: Error, Hashable, Sendable, CustomStringConvertible {
    /// Authentication failed: the bytes were changed, moved, or are not ours.
    case integrityFailure(IntegrityLocation)
    /// The key offered is not the one the header commits to.
    case wrongKey
    /// The file is shorter than its authenticated length.
    case truncated(expectedPlaintextSize: Int, actualPlaintextSize: Int)
    /// The bytes do not have the shape of the format.
    case malformed(String)
    /// The header is of a format version this build does not read.
    case unsupportedFormatVersion(UInt16)
    /// A caller passed a buffer or size outside the contract.
    case invalidArgument(String)
    /// OpenSSL refused an operation that should not fail.
    case openssl(String)

    public var description: String {
        switch self {
        case .integrityFailure(let where_):
            "integrity check failed in the \(where_): the data was modified, moved or replaced"
        case .wrongKey:
            "the data key does not match this file's header (wrong key)"
        case .truncated(let expected, let actual):
            "file is truncated: authenticated length \(expected) bytes, only \(actual) present"
        case .malformed(let why):
            "malformed ciphertext: \(why)"
        case .unsupportedFormatVersion(let version):
            "unsupported format version \(version); this build reads version \(FormatV1.version)"
        case .invalidArgument(let why):
            "invalid argument: \(why)"
        case .openssl(let what):
            "OpenSSL failure: \(what)"
        }
    }
}
