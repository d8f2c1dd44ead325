import ChunkCipher
import COpenSSL
import Foundation

/// AWS Signature Version 4 for one HTTP request (docs.aws.amazon.com,
/// "Create a signed AWS API request"). Written by hand because no Swift AWS
/// SDK is available here; it is small and checked against AWS's published
/// SigV4 test suite (Tests/KeyManagerTests/SigV4Tests.swift). HMAC-SHA256
/// and SHA-256 come from OpenSSL.
///
/// Scope: what the AWS KMS JSON API needs — header signing (not presigned
/// URLs), paths already in canonical form or normalized here, query
/// parameters sorted and encoded, the payload hashed (`UNSIGNED-PAYLOAD` is
/// never used).
public struct SigV4Signer: Sendable {
    public struct Credentials: Sendable {
        public var accessKeyID: String
        public var secretAccessKey: String
        public var sessionToken: String?
        public init(accessKeyID: String, secretAccessKey: String, sessionToken: String? = nil) {
            self.accessKeyID = accessKeyID
            self.secretAccessKey = secretAccessKey
            self.sessionToken = sessionToken
        }
    }

    /// A request to sign: method, path, query, headers (any case; signed all) and body.
    public struct Request: Sendable {
        public var method: String
        public var path: String
        public var query: [(String, String)]
        public var headers: [(String, String)]
        public var body: [UInt8]
        public init(method: String, path: String, query: [(String, String)] = [], headers: [(String, String)], body: [UInt8] = []) {
            self.method = method
            self.path = path
            self.query = query
            self.headers = headers
            self.body = body
        }
    }

    public var credentials: Credentials
    public var region: String
    public var service: String

    public init(credentials: Credentials, region: String, service: String) {
        self.credentials = credentials
        self.region = region
        self.service = service
    }

    /// The headers to add to `request` at `date`: X-Amz-Date, X-Amz-Security-Token (with a
    /// session token), X-Amz-Content-Sha256 if asked for, and Authorization.
    public func sign(_ request: Request, at date: Date, contentHashHeader: Bool = false) -> [(String, String)] {
        let parts = canonicalParts(request, at: date, contentHashHeader: contentHashHeader)
        let signature = hex(Self.hmac(signingKey(date), Array(stringToSign(parts.canonical, at: date).utf8)))
        let authorization = "AWS4-HMAC-SHA256 Credential=\(credentials.accessKeyID)/\(scope(date)), "
            + "SignedHeaders=\(parts.signedHeaders), Signature=\(signature)"
        return parts.added + [("Authorization", authorization)]
    }

    /// The canonical request (exposed for the test vectors).
    public func canonicalRequest(_ request: Request, at date: Date, contentHashHeader: Bool = false) -> String {
        canonicalParts(request, at: date, contentHashHeader: contentHashHeader).canonical
    }

    /// The string to sign for a canonical request.
    public func stringToSign(_ canonical: String, at date: Date) -> String {
        "AWS4-HMAC-SHA256\n\(Self.amzDate(date))\n\(scope(date))\n\(hex(Self.sha256(Array(canonical.utf8))))"
    }

    private func canonicalParts(_ request: Request, at date: Date, contentHashHeader: Bool)
        -> (canonical: String, signedHeaders: String, added: [(String, String)]) {
        let payloadHash = hex(Self.sha256(request.body))
        var added: [(String, String)] = [("X-Amz-Date", Self.amzDate(date))]
        if let token = credentials.sessionToken { added.append(("X-Amz-Security-Token", token)) }
        if contentHashHeader { added.append(("X-Amz-Content-Sha256", payloadHash)) }
        // Header names lower-cased, values trimmed with inner runs of spaces folded; repeated names joined by commas.
        var headers: [String: [String]] = [:]
        for (name, value) in request.headers + added {
            let folded = value.split(whereSeparator: { $0 == " " || $0 == "\t" || $0 == "\n" }).joined(separator: " ")
            headers[name.lowercased(), default: []].append(folded)
        }
        let names = headers.keys.sorted()
        let canonicalHeaders = names.map { "\($0):\(headers[$0]!.joined(separator: ","))\n" }.joined()
        let signedHeaders = names.joined(separator: ";")
        let encoded: [(name: String, value: String)] = request.query.map { (Self.uriEncode($0.0), Self.uriEncode($0.1)) }
        let sorted = encoded.sorted { (a, b) -> Bool in a.name == b.name ? a.value < b.value : a.name < b.name }
        let query = sorted.map { $0.name + "=" + $0.value }.joined(separator: "&")
        let canonical = [request.method, Self.canonicalPath(request.path), query, canonicalHeaders, signedHeaders, payloadHash]
            .joined(separator: "\n")
        return (canonical, signedHeaders, added)
    }

    private func scope(_ date: Date) -> String { "\(Self.amzDate(date).prefix(8))/\(region)/\(service)/aws4_request" }

    private func signingKey(_ date: Date) -> [UInt8] {
        let day = Self.hmac(Array(("AWS4" + credentials.secretAccessKey).utf8), Array(Self.amzDate(date).prefix(8).utf8))
        let regional = Self.hmac(day, Array(region.utf8))
        let service = Self.hmac(regional, Array(self.service.utf8))
        return Self.hmac(service, Array("aws4_request".utf8))
    }

    /// `YYYYMMDD'T'HHMMSS'Z'` in UTC.
    public static func amzDate(_ date: Date) -> String {
        var t = time_t(date.timeIntervalSince1970.rounded(.down))
        var parts = tm()
        gmtime_r(&t, &parts)
        return String(format: "%04d%02d%02dT%02d%02d%02dZ", parts.tm_year + 1900, parts.tm_mon + 1, parts.tm_mday,
                      parts.tm_hour, parts.tm_min, parts.tm_sec)
    }

    /// The path with dot segments and repeated slashes removed, each segment URI-encoded (S3 excepted, which kmsfs does not call).
    static func canonicalPath(_ path: String) -> String {
        var segments: [Substring] = []
        for segment in path.split(separator: "/", omittingEmptySubsequences: true) {
            if segment == "." { continue }
            if segment == ".." { _ = segments.popLast(); continue }
            segments.append(segment)
        }
        let trailing = path.hasSuffix("/") && !segments.isEmpty
        return "/" + segments.map { uriEncode(String($0)) }.joined(separator: "/") + (trailing ? "/" : "")
    }

    /// RFC 3986 encoding as SigV4 wants it: unreserved characters kept, every other byte %XX upper-case.
    static func uriEncode(_ text: String) -> String {
        var out = ""
        for byte in text.utf8 {
            switch byte {
            case UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "0")...UInt8(ascii: "9"),
                 UInt8(ascii: "-"), UInt8(ascii: "_"), UInt8(ascii: "."), UInt8(ascii: "~"):
                out.unicodeScalars.append(UnicodeScalar(byte))
            default:
                out += String(format: "%%%02X", byte)
            }
        }
        return out
    }

    static func sha256(_ data: [UInt8]) -> [UInt8] { KeyDerivation.sha256(data) }

    static func hmac(_ key: [UInt8], _ message: [UInt8]) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: 32)
        var length = 0
        guard EVP_Q_mac(nil, "HMAC", nil, "SHA256", nil, key, key.count, message, message.count, &out, out.count, &length) != nil
        else { preconditionFailure("HMAC-SHA256") }
        return out
    }

    private func hex(_ bytes: [UInt8]) -> String { bytes.map { String(format: "%02x", $0) }.joined() }
}
