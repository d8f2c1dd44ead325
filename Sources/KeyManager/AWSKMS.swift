import ChunkCipher
import Foundation
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif
import Synchronization

/// The AWS KMS JSON API (`TrentService.*`) over HTTPS or HTTP, signed with
/// SigV4, through Foundation's URLSession. Each call has a bounded time-out
/// and is retried with exponential backoff and full jitter when a retry can
/// help (throttling, 5xx, a dropped connection), so no FUSE request waits
/// on it for more than about `budget` seconds.
final class AWSKMSClient: Sendable {
    let config: ExternalKeyConfig
    /// Seconds one attempt may take.
    let attemptTimeout: Double
    /// Attempts at most (the first and its retries).
    let attempts: Int
    private let session: URLSession

    init(config: ExternalKeyConfig, attemptTimeout: Double = 5, attempts: Int = 4) {
        self.config = config
        self.attemptTimeout = attemptTimeout
        self.attempts = attempts
        let configuration = URLSessionConfiguration.ephemeral
        configuration.timeoutIntervalForRequest = attemptTimeout
        configuration.timeoutIntervalForResource = attemptTimeout
        configuration.httpMaximumConnectionsPerHost = 4
        session = URLSession(configuration: configuration)
    }

    /// Calls `TrentService.<operation>` with a JSON body; the decoded JSON reply.
    func call(_ operation: String, _ body: [String: Any]) throws(KeyManagerError) -> [String: Any] {
        let payload: Data
        do { payload = try JSONSerialization.data(withJSONObject: body, options: [.sortedKeys]) } catch {
            throw .invalidArgument("cannot encode a \(operation) request")
        }
        var lastError = KeyManagerError.provider(provider: "aws-kms", code: "Unreachable", message: "no attempt was made", remedy: "")
        for attempt in 0..<attempts {
            if attempt > 0 {
                // Full jitter (AWS Architecture Blog, "Exponential Backoff And Jitter"): 0…min(2 s, 0.1 s × 2^n).
                let cap = min(2.0, 0.1 * Double(1 << attempt))
                Thread.sleep(forTimeInterval: Double.random(in: 0...cap))
            }
            do throws(KeyManagerError) {
                return try once(operation, payload)
            } catch {
                lastError = error
                guard case .provider(_, let code, _, _) = error, Self.retryable.contains(code) else { throw error }
            }
        }
        throw lastError
    }

    /// Error codes a retry can help with.
    static let retryable: Set<String> = ["ThrottlingException", "RequestLimitExceeded", "LimitExceededException", "Unreachable",
                                         "InternalFailure", "KMSInternalException", "ServiceUnavailable", "DependencyTimeoutException"]

    private final class Reply: @unchecked Sendable {
        var data: Data?
        var response: URLResponse?
        var error: Error?
    }

    private func once(_ operation: String, _ payload: Data) throws(KeyManagerError) -> [String: Any] {
        guard let url = URL(string: config.endpointURL), let host = url.host else {
            throw .invalidArgument("the endpoint \(config.endpointURL) is not a URL")
        }
        let credentials = try AWSCredentials.resolve(profile: config.profile)
        let signer = SigV4Signer(credentials: credentials, region: config.region, service: "kms")
        let hostHeader = url.port.map { "\(host):\($0)" } ?? host
        let headers = [("Host", hostHeader), ("Content-Type", "application/x-amz-json-1.1"), ("X-Amz-Target", "TrentService.\(operation)")]
        let signed = signer.sign(.init(method: "POST", path: url.path.isEmpty ? "/" : url.path, headers: headers, body: [UInt8](payload)), at: Date())
        var request = URLRequest(url: url, timeoutInterval: attemptTimeout)
        request.httpMethod = "POST"
        for (name, value) in headers + signed where name != "Host" { request.setValue(value, forHTTPHeaderField: name) }
        request.httpBody = payload
        let reply = Reply()
        let done = DispatchSemaphore(value: 0)
        let task = session.dataTask(with: request) { data, response, error in
            reply.data = data
            reply.response = response
            reply.error = error
            done.signal()
        }
        task.resume()
        if done.wait(timeout: .now() + attemptTimeout + 1) == .timedOut {
            task.cancel()
            throw .provider(provider: "aws-kms", code: "Unreachable", message: "\(operation) to \(config.endpointURL) timed out after \(Int(attemptTimeout)) s",
                            remedy: Self.networkRemedy)
        }
        if let error = reply.error {
            throw .provider(provider: "aws-kms", code: "Unreachable", message: "\(operation) to \(config.endpointURL) failed: \(error.localizedDescription)",
                            remedy: Self.networkRemedy)
        }
        let status = (reply.response as? HTTPURLResponse)?.statusCode ?? 0
        let object = (reply.data.flatMap { try? JSONSerialization.jsonObject(with: $0) } as? [String: Any]) ?? [:]
        guard status == 200 else {
            // "__type" is "ExceptionName" or "namespace#ExceptionName".
            let type = (object["__type"] as? String).map { String($0.split(separator: "#").last ?? "") } ?? (status >= 500 ? "InternalFailure" : "HTTP\(status)")
            let message = (object["message"] ?? object["Message"]) as? String ?? "HTTP \(status)"
            throw .provider(provider: "aws-kms", code: type, message: "\(operation) on \(config.keyID): \(message)", remedy: Self.remedy(type, operation))
        }
        return object
    }

    /// The base64 field `name` of a KMS reply as a secret in locked memory
    /// (its decoded copy zeroed); nil if absent or not `count` bytes (any length when nil).
    static func secret(_ reply: [String: Any], _ name: String = "Plaintext", count: Int? = 32) -> SecretKey? {
        guard var plain = (reply[name] as? String).flatMap({ Data(base64Encoded: $0) }), count.map({ plain.count == $0 }) ?? true else { return nil }
        defer { plain.resetBytes(in: 0..<plain.count) }
        return SecretKey(count: plain.count) { plain.copyBytes(to: $0) }
    }

    /// Where the region of a key comes from when not given: its ARN
    /// (arn:aws:kms:REGION:…), then AWS_REGION, then AWS_DEFAULT_REGION.
    static func region(_ given: String?, keyID: String, environment: [String: String] = ProcessInfo.processInfo.environment) -> String? {
        let fromARN = keyID.hasPrefix("arn:") ? keyID.split(separator: ":", omittingEmptySubsequences: false).dropFirst(3).first.map(String.init) : nil
        let region = given ?? fromARN ?? environment["AWS_REGION"] ?? environment["AWS_DEFAULT_REGION"]
        return region?.isEmpty == false ? region : nil
    }

    static let networkRemedy = "check the network and --endpoint-url; files already open keep working from cached keys"

    static func remedy(_ code: String, _ operation: String) -> String {
        switch code {
        case "UnrecognizedClientException", "InvalidSignatureException", "IncompleteSignature", "MissingAuthenticationToken", "ExpiredTokenException":
            return "check the AWS credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and this machine's clock (a signed request is valid for 5 minutes)"
        case "AccessDeniedException":
            return "the credentials' IAM or key policy must allow kms:\(operation) on the key"
        case "DisabledException":
            return "enable the key in AWS KMS (aws kms enable-key)"
        case "KMSInvalidStateException":
            return "the key is pending deletion or otherwise unusable in AWS KMS; cancel the deletion there (aws kms cancel-key-deletion)"
        case "NotFoundException":
            return "check --external-key and --region"
        case "ThrottlingException", "RequestLimitExceeded", "LimitExceededException":
            return "AWS KMS is throttling this account; retried with backoff — raise the quota or lower the load"
        default:
            return "see the AWS KMS error \(code)"
        }
    }
}

/// A kmsfs master key whose material stays in AWS KMS. Per-file cost stays
/// local: data keys are wrapped under intermediate keys KMS generates
/// (`GenerateDataKey`, see IntermediateKeyCache), or with `--strict` by KMS
/// itself, one `Encrypt`/`Decrypt` per file.
///
/// KMS's own key state is enforced here, not trusted to KMS alone (moto,
/// for one, decrypts under a disabled key): it is read with DescribeKey at
/// first use and every `pollInterval` seconds after (the daemon's schedule
/// thread does it while mounted), and a key that is not Enabled there
/// refuses like a Disabled kmsfs key — and its cached intermediate keys are
/// dropped at once.
/// A provider whose key lives outside the keystore and has a state of its own there.
protocol ExternalProvider: KeyProvider {
    var config: ExternalKeyConfig { get }
    /// The key's state at the provider ("Enabled", "Disabled", "Unavailable", …), re-read when older than the poll interval.
    func externalState() throws(KeyManagerError) -> String
    /// Re-reads the state now.
    @discardableResult func refreshState() throws(KeyManagerError) -> String
    var lastKnownState: String? { get }
}

final class AWSKMSProvider: ExternalProvider, @unchecked Sendable {
    let name = "aws-kms"
    let config: ExternalKeyConfig
    let client: AWSKMSClient
    let filesystemID: ID128
    let pollInterval: Double
    let clock: @Sendable () -> Double

    struct State: ~Copyable {
        /// KMS's KeyState ("Enabled", "Disabled", "PendingDeletion", …) and when it was read.
        var external: (state: String, checkedAt: Double)?
    }
    let state = Mutex(State())
    let intermediates: IntermediateKeyCache

    init(config: ExternalKeyConfig, filesystemID: ID128, store: IntermediateStore, clock: @escaping @Sendable () -> Double,
         maxAge: Double = 300, maxFiles: Int = 100_000, pollInterval: Double = 60) {
        self.config = config
        self.client = AWSKMSClient(config: config)
        self.filesystemID = filesystemID
        self.clock = clock
        self.pollInterval = pollInterval
        intermediates = IntermediateKeyCache(store: store, clock: clock, maxAge: maxAge, maxFiles: maxFiles)
    }

    /// The encryption context of an intermediate key: what CloudTrail shows each call was for.
    func encryptionContext(_ key: KeyID, _ version: KeyVersion, _ id: ID128) -> [String: String] {
        ["kmsfs:filesystem": filesystemID.hex, "kmsfs:key": key.rawValue.hex, "kmsfs:version": String(version.rawValue), "kmsfs:intermediate": id.hex]
    }

    // MARK: External state

    /// Reads the key's state in KMS (DescribeKey) and drops cached keys if it is not Enabled.
    @discardableResult
    func refreshState() throws(KeyManagerError) -> String {
        let reply = try client.call("DescribeKey", ["KeyId": config.keyID])
        let metadata = reply["KeyMetadata"] as? [String: Any] ?? [:]
        let keyState = metadata["KeyState"] as? String ?? ((metadata["Enabled"] as? Bool) == false ? "Disabled" : "Enabled")
        state.withLock { $0.external = (keyState, clock()) }
        if keyState != "Enabled" { intermediates.clear() }
        return keyState
    }

    /// The last state read from KMS, reading it if never read or older than `pollInterval`.
    func externalState() throws(KeyManagerError) -> String {
        if let known = state.withLock({ $0.external }), clock() - known.checkedAt < pollInterval { return known.state }
        return try refreshState()
    }

    /// The last state read, without calling KMS (nil if never read).
    var lastKnownState: String? { state.withLock { $0.external?.state } }

    // MARK: KeyProvider

    func createVersion(spec: KeySpec, key: KeyID, version: KeyVersion) throws(KeyManagerError) -> ProviderMaterial {
        // The version's material is only a reference: the key stays in KMS.
        // A SIGN_VERIFY key's public key is kept too (GetPublicKey), for
        // `get-public-key` and for verifiers who hold no AWS credentials.
        let reference = Array((config.arn ?? config.keyID).utf8)
        guard spec != .aes256 else { return ProviderMaterial(stored: reference, publicKey: nil) }
        let reply = try client.call("GetPublicKey", ["KeyId": config.keyID])
        guard (reply["KeySpec"] as? String ?? reply["CustomerMasterKeySpec"] as? String) == spec.rawValue,
              (reply["KeyUsage"] as? String) == "SIGN_VERIFY",
              let der = (reply["PublicKey"] as? String).flatMap({ Data(base64Encoded: $0) }), AsymmetricKeys.isPublicKey([UInt8](der)) else {
            throw .invalidArgument("AWS KMS key \(config.keyID) is not a \(spec.rawValue) SIGN_VERIFY key with a readable public key")
        }
        return ProviderMaterial(stored: reference, publicKey: [UInt8](der))
    }

    /// AWS KMS signs messages of up to 4,096 bytes whole; longer ones are hashed here and sent as a digest.
    private func messageFields(_ message: [UInt8], spec: KeySpec) throws(KeyManagerError) -> [String: Any] {
        message.count <= 4096 ? ["Message": Data(message).base64EncodedString(), "MessageType": "RAW"]
                              : ["Message": Data(try AsymmetricKeys.hash(message, for: spec)).base64EncodedString(), "MessageType": "DIGEST"]
    }

    static let strictMagic: [UInt8] = [UInt8(ascii: "K"), UInt8(ascii: "S"), 1]

    /// The encryption context of a strictly wrapped data key: filesystem, object, key and version, as AWS recommends.
    func strictContext(_ key: KeyID, _ version: KeyVersion, _ context: [UInt8]) -> [String: String] {
        // `context` is the data-key context: "kmsfs/v1/dek" ‖ filesystem ‖ object ‖ key ‖ version.
        let prefix = Array("kmsfs/v1/dek".utf8).count
        let object = context.count >= prefix + 32 ? ID128(bytes: context[(prefix + 16)..<(prefix + 32)])?.hex ?? "" : ""
        return ["kmsfs:filesystem": filesystemID.hex, "kmsfs:object": object, "kmsfs:key": key.rawValue.hex, "kmsfs:version": String(version.rawValue)]
    }

    func wrapDataKey(_ dataKey: borrowing SecretKey, key: KeyID, version: KeyVersion, context: [UInt8],
                     stored: () throws(KeyManagerError) -> [UInt8]) throws(KeyManagerError) -> [UInt8] {
        if config.strict == true {
            let plaintext = dataKey.withUnsafeBytes { Data($0).base64EncodedString() }
            let reply = try client.call("Encrypt", ["KeyId": config.keyID, "Plaintext": plaintext, "EncryptionContext": strictContext(key, version, context)])
            guard let blob = (reply["CiphertextBlob"] as? String).flatMap({ Data(base64Encoded: $0) }), blob.count + Self.strictMagic.count <= 256 else {
                throw .provider(provider: name, code: "MalformedReply", message: "Encrypt answered without a ciphertext that fits a header (256 bytes)",
                                remedy: "check --endpoint-url")
            }
            return Self.strictMagic + [UInt8](blob)
        }
        return try intermediates.wrap(dataKey, key: key, version: version, context: context) { (id) throws(KeyManagerError) in
            let reply = try client.call("GenerateDataKey", ["KeyId": config.keyID, "KeySpec": "AES_256",
                                                      "EncryptionContext": encryptionContext(key, version, id)])
            guard let blob = (reply["CiphertextBlob"] as? String).flatMap({ Data(base64Encoded: $0) }), let secret = AWSKMSClient.secret(reply) else {
                throw .provider(provider: name, code: "MalformedReply", message: "GenerateDataKey answered without a 32-byte key", remedy: "check --endpoint-url")
            }
            return (try AESGCM.make(secret), [UInt8](blob))
        }
    }

    func unwrapDataKey(_ wrapped: [UInt8], key: KeyID, version: KeyVersion, context: [UInt8],
                       stored: () throws(KeyManagerError) -> [UInt8]) throws(KeyManagerError) -> SecretKey? {
        if wrapped.starts(with: Self.strictMagic) {
            let blob = Data(wrapped[Self.strictMagic.count...]).base64EncodedString()
            let reply: [String: Any]
            do throws(KeyManagerError) {
                reply = try client.call("Decrypt", ["KeyId": config.keyID, "CiphertextBlob": blob, "EncryptionContext": strictContext(key, version, context)])
            } catch {
                if case .provider(_, "InvalidCiphertextException", _, _) = error { return nil }
                throw error
            }
            return AWSKMSClient.secret(reply)
        }
        return try intermediates.unwrap(wrapped, key: key, version: version, context: context) { (id, blob) throws(KeyManagerError) in
            let reply = try client.call("Decrypt", ["KeyId": config.keyID, "CiphertextBlob": Data(blob).base64EncodedString(),
                                              "EncryptionContext": encryptionContext(key, version, id)])
            return AWSKMSClient.secret(reply)
        }
    }

    /// Signs in KMS (`Sign`); the signature is DER for ECDSA, as OpenSSL writes it.
    func sign(_ message: [UInt8], spec: KeySpec, key: KeyID, version: KeyVersion, stored: [UInt8]) throws(KeyManagerError) -> [UInt8] {
        var body = try messageFields(message, spec: spec)
        body["KeyId"] = config.keyID
        body["SigningAlgorithm"] = spec.signingAlgorithm
        let reply = try client.call("Sign", body)
        guard let signature = (reply["Signature"] as? String).flatMap({ Data(base64Encoded: $0) }) else {
            throw .provider(provider: name, code: "MalformedReply", message: "Sign answered without a signature", remedy: "check --endpoint-url")
        }
        return [UInt8](signature)
    }

    /// Verifies in KMS (`Verify`), so CloudTrail records it and KMS's key state decides.
    func verify(_ message: [UInt8], signature: [UInt8], spec: KeySpec, key: KeyID, version: KeyVersion) throws(KeyManagerError) -> Bool? {
        var body = try messageFields(message, spec: spec)
        body["KeyId"] = config.keyID
        body["SigningAlgorithm"] = spec.signingAlgorithm
        body["Signature"] = Data(signature).base64EncodedString()
        do throws(KeyManagerError) {
            return try client.call("Verify", body)["SignatureValid"] as? Bool == true
        } catch {
            if case .provider(_, "KMSInvalidSignatureException", _, _) = error { return false }
            throw error
        }
    }

    /// Strict to strict on the same KMS endpoint and credentials: `ReEncrypt`
    /// moves the data key between the two encryption contexts (and keys)
    /// inside KMS, its plaintext never leaving it.
    func reencrypt(_ wrapped: [UInt8], key: KeyID, version: KeyVersion, context: [UInt8],
                   to target: any KeyProvider, key targetKey: KeyID, version targetVersion: KeyVersion, context targetContext: [UInt8]) throws(KeyManagerError) -> [UInt8]? {
        guard config.strict == true, wrapped.starts(with: Self.strictMagic), let other = target as? AWSKMSProvider, other.config.strict == true,
              other.config.endpointURL == config.endpointURL, other.config.region == config.region, other.config.profile == config.profile else { return nil }
        let reply = try client.call("ReEncrypt", ["CiphertextBlob": Data(wrapped[Self.strictMagic.count...]).base64EncodedString(),
                                           "SourceKeyId": config.keyID, "SourceEncryptionContext": strictContext(key, version, context),
                                           "DestinationKeyId": other.config.keyID,
                                           "DestinationEncryptionContext": other.strictContext(targetKey, targetVersion, targetContext)])
        guard let blob = (reply["CiphertextBlob"] as? String).flatMap({ Data(base64Encoded: $0) }), blob.count + Self.strictMagic.count <= 256 else {
            throw .provider(provider: name, code: "MalformedReply", message: "ReEncrypt answered without a ciphertext that fits a header (256 bytes)",
                            remedy: "check --endpoint-url")
        }
        return Self.strictMagic + [UInt8](blob)
    }

    /// Whether KMS rotates the key's own material (`GetKeyRotationStatus`) and
    /// how often; nil for keys KMS cannot rotate (asymmetric ones).
    func rotationStatus() throws(KeyManagerError) -> (enabled: Bool, periodDays: Int?)? {
        let reply: [String: Any]
        do throws(KeyManagerError) { reply = try client.call("GetKeyRotationStatus", ["KeyId": config.keyID]) } catch {
            if case .provider(_, "UnsupportedOperationException", _, _) = error { return nil }
            throw error
        }
        return (reply["KeyRotationEnabled"] as? Bool == true, reply["RotationPeriodInDays"] as? Int)
    }

    func forget(key: KeyID) { intermediates.clear() }
}

/// Where a provider keeps the KMS-encrypted blobs of its intermediate keys.
protocol IntermediateStore: AnyObject, Sendable {
    func saveIntermediate(_ id: ID128, key: KeyID, version: KeyVersion, blob: [UInt8]) throws(KeyManagerError)
    func loadIntermediate(_ id: ID128, key: KeyID, version: KeyVersion) throws(KeyManagerError) -> [UInt8]?
}
