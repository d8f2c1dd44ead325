import ChunkCipher
import Foundation
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif
import Synchronization

/// Where an external master key lives (the `external_keys` row of a kmsfs
/// key, integrity-protected like the key itself).
public struct ExternalKeyConfig: Codable, Sendable, Equatable {
    /// "aws-kms".
    public var provider: String
    /// The key as given (`--external-key`: ARN, key id or alias ARN).
    public var keyID: String
    /// The key's ARN, as DescribeKey answered when the kmsfs key was created.
    public var arn: String?
    public var region: String
    /// `--endpoint-url`; nil for the region's public endpoint.
    public var endpoint: String?
    /// An `~/.aws/credentials` profile named at creation; nil: the environment, then AWS_PROFILE, then "default".
    public var profile: String?
    /// Strict mode: every data key is wrapped by KMS itself (Encrypt/Decrypt
    /// per file, the object id in the encryption context) instead of under an
    /// intermediate key — a KMS round trip per create and per open.
    public var strict: Bool?
    /// pkcs11: the module's path, the token's label, the key object's label, and the file holding the user PIN.
    public var module: String?
    public var token: String?
    public var objectLabel: String?
    public var pinFile: String?

    /// A PKCS#11 key: `objectLabel` in token `token` of `module`, the PIN read from `pinFile` at each login.
    public init(pkcs11Module module: String, token: String, objectLabel: String, pinFile: String, strict: Bool = false) {
        self.provider = "pkcs11"
        self.strict = strict ? true : nil
        self.keyID = objectLabel
        self.region = ""
        self.module = module
        self.token = token
        self.objectLabel = objectLabel
        self.pinFile = pinFile
    }

    /// The region of AWS KMS key `keyID`: `given`, else its ARN's, else AWS_REGION or AWS_DEFAULT_REGION.
    public static func region(_ given: String?, keyID: String) -> String? { AWSKMSClient.region(given, keyID: keyID) }

    /// Where the key is, for messages.
    public var location: String {
        provider == "pkcs11" ? "PKCS#11 key '\(objectLabel ?? keyID)' in token '\(token ?? "?")'" : "AWS KMS key \(arn ?? keyID)"
    }

    public init(provider: String, keyID: String, arn: String? = nil, region: String, endpoint: String? = nil, profile: String? = nil,
                strict: Bool = false) {
        self.strict = strict ? true : nil
        self.provider = provider
        self.keyID = keyID
        self.arn = arn
        self.region = region
        self.endpoint = endpoint
        self.profile = profile
    }

    /// The HTTPS endpoint requests go to.
    var endpointURL: String { endpoint ?? "https://kms.\(region).amazonaws.com" }
}

/// AWS credentials from the standard places, in the AWS CLI's order:
/// `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_SESSION_TOKEN`, then the
/// profile (`profile`, else `AWS_PROFILE`, else "default") in
/// `AWS_SHARED_CREDENTIALS_FILE` or `~/.aws/credentials`. Instance-role
/// (IMDS) and SSO credentials are not read yet.
enum AWSCredentials {
    static func resolve(profile: String?, environment: [String: String] = ProcessInfo.processInfo.environment) throws(KeyManagerError) -> SigV4Signer.Credentials {
        if profile == nil, let id = environment["AWS_ACCESS_KEY_ID"], let secret = environment["AWS_SECRET_ACCESS_KEY"], !id.isEmpty, !secret.isEmpty {
            return .init(accessKeyID: id, secretAccessKey: secret, sessionToken: environment["AWS_SESSION_TOKEN"].flatMap { $0.isEmpty ? nil : $0 })
        }
        let name = profile ?? environment["AWS_PROFILE"] ?? "default"
        let home = environment["HOME"] ?? NSHomeDirectory()
        let file = environment["AWS_SHARED_CREDENTIALS_FILE"] ?? home + "/.aws/credentials"
        guard let text = try? String(contentsOfFile: file, encoding: .utf8) else {
            throw .provider(provider: "aws-kms", code: "NoCredentials",
                            message: "no AWS credentials: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY are not set and \(file) cannot be read",
                            remedy: "export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or set AWS_PROFILE to a profile in ~/.aws/credentials")
        }
        var section: String?
        var values: [String: String] = [:]
        for raw in text.split(whereSeparator: \.isNewline) {
            let line = raw.trimmingCharacters(in: .whitespaces)
            if line.isEmpty || line.hasPrefix("#") || line.hasPrefix(";") { continue }
            if line.hasPrefix("["), line.hasSuffix("]") {
                section = String(line.dropFirst().dropLast()).trimmingCharacters(in: .whitespaces)
                continue
            }
            guard section == name, let eq = line.firstIndex(of: "=") else { continue }
            values[line[..<eq].trimmingCharacters(in: .whitespaces)] = line[line.index(after: eq)...].trimmingCharacters(in: .whitespaces)
        }
        guard let id = values["aws_access_key_id"], let secret = values["aws_secret_access_key"] else {
            throw .provider(provider: "aws-kms", code: "NoCredentials", message: "profile \(name) in \(file) has no aws_access_key_id/aws_secret_access_key",
                            remedy: "add the keys to the profile, or export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
        }
        return .init(accessKeyID: id, secretAccessKey: secret, sessionToken: values["aws_session_token"])
    }
}
