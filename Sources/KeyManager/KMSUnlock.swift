import ChunkCipher
import Foundation

/// Unlocking a keystore without a passphrase (Vault's auto-unseal, the habit
/// of systemd-cryptenroll): the "passphrase" is 32 random bytes (written as
/// base64 text, so the usual scrypt → KEK path applies unchanged) that only
/// an AWS KMS key or a PKCS#11 token key can recover. `CIPHERDIR/.kmsfs/unlock.json`
/// holds the key's coordinates and the bytes encrypted by it: by KMS
/// (`Encrypt`, encryption context `kmsfs:purpose=keystore-unlock` and a
/// random unlock id), or inside the token (AES-GCM, the unlock id in the
/// additional data; the token key is generated there, non-extractable, if
/// the label names none). A machine whose credentials may `kms:Decrypt`
/// with that key — or that holds the token and its PIN file — mounts with no
/// passphrase file; one that may not, cannot.
///
/// The file is outside the keystore's integrity seal on purpose: changing it
/// cannot open the keystore (a blob that decrypts to other bytes is only a
/// wrong passphrase); deleting it leaves the passphrase route, which
/// `kmsfs passwd` can restore.
public struct KMSUnlock: Codable, Sendable {
    public var provider: String
    public var key: ExternalKeyConfig
    public var unlockID: String
    /// base64 of the KMS ciphertext of the 32 bytes (pkcs11: nonce ‖ ciphertext ‖ tag).
    public var blob: String

    public static let fileName = "unlock.json"

    static func context(_ unlockID: String) -> [String: String] {
        ["kmsfs:purpose": "keystore-unlock", "kmsfs:unlock": unlockID]
    }

    /// The additional data of a token-sealed unlock.
    static func tokenContext(_ unlockID: String) -> [UInt8] { Array("kmsfs/v1/keystore-unlock/\(unlockID)".utf8) }

    static let usage = "--unlock takes aws-kms:KEY (an ARN, key id or alias ARN) or a PKCS#11 URI, "
        + "pkcs11:token=LABEL;object=LABEL?module-path=PATH&pin-source=file:PATH (RFC 7512)"

    /// Parses `aws-kms:KEY` or an RFC 7512 PKCS#11 URI naming the token, the
    /// key object (default "kmsfs-unlock"), the module and the PIN file.
    public static func parse(_ spec: String, region: String?, endpoint: String?) throws(KeyManagerError) -> ExternalKeyConfig {
        if spec.hasPrefix("pkcs11:") { return try parsePKCS11(String(spec.dropFirst("pkcs11:".count))) }
        guard spec.hasPrefix("aws-kms:"), spec.count > "aws-kms:".count else { throw .invalidArgument(usage) }
        let key = String(spec.dropFirst("aws-kms:".count))
        guard let region = AWSKMSClient.region(region, keyID: key) else {
            throw .invalidArgument("--unlock aws-kms:KEY needs --region (or AWS_REGION, or a key ARN)")
        }
        return ExternalKeyConfig(provider: "aws-kms", keyID: key, region: region, endpoint: endpoint)
    }

    static func parsePKCS11(_ rest: String) throws(KeyManagerError) -> ExternalKeyConfig {
        var attributes: [String: String] = [:]
        let parts = rest.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false)
        let pairs = parts[0].split(separator: ";") + (parts.count > 1 ? parts[1].split(separator: "&") : [])
        for pair in pairs {
            guard let eq = pair.firstIndex(of: "="), let value = String(pair[pair.index(after: eq)...]).removingPercentEncoding else {
                throw .invalidArgument("\(usage): '\(pair)' is not NAME=VALUE")
            }
            attributes[String(pair[..<eq])] = value
        }
        guard attributes["pin-value"] == nil else {
            throw .invalidArgument("a PIN is never given on the command line: put it in a file (mode 0600) and name it with pin-source=file:PATH")
        }
        guard let token = attributes["token"], let module = attributes["module-path"], let pinSource = attributes["pin-source"] else {
            throw .invalidArgument("\(usage): token, module-path and pin-source are needed")
        }
        let pinFile = pinSource.hasPrefix("file:") ? String(pinSource.dropFirst("file:".count)) : pinSource
        guard pinFile.hasPrefix("/") else { throw .invalidArgument("pin-source must be an absolute path (file:/…) so the mount finds it at boot") }
        return ExternalKeyConfig(pkcs11Module: module, token: token, objectLabel: attributes["object"] ?? "kmsfs-unlock", pinFile: pinFile)
    }

    /// Makes new unlock bytes under `config`, writes `unlock.json` (0600) in
    /// `directory`, and returns the bytes as the passphrase to use.
    public static func enroll(in directory: String, with config: ExternalKeyConfig) throws(KeyManagerError) -> SecretKey {
        let raw = SecretKey.random()
        var text = raw.withUnsafeBytes { Array(Data($0).base64EncodedString().utf8) }
        defer { for i in text.indices { text[i] = 0 } }
        let unlockID = ID128.random().hex
        let blob: String
        if config.provider == "pkcs11" {
            let token = PKCS11Provider(config: config, clock: { Date().timeIntervalSince1970 })
            try token.prepare(create: false, orCreate: true)
            let textKey = SecretKey(copying: text)
            blob = Data(try textKey.withUnsafeBytes { (raw) throws(KeyManagerError) in try token.seal(raw, aad: tokenContext(unlockID)) }).base64EncodedString()
        } else {
            let client = AWSKMSClient(config: config)
            let reply = try client.call("Encrypt", ["KeyId": config.keyID, "Plaintext": Data(text).base64EncodedString(),
                                                    "EncryptionContext": context(unlockID)])
            guard let sealed = reply["CiphertextBlob"] as? String else {
                throw .provider(provider: "aws-kms", code: "MalformedReply", message: "Encrypt answered without a ciphertext", remedy: "check --endpoint-url")
            }
            blob = sealed
        }
        let record = KMSUnlock(provider: config.provider, key: config, unlockID: unlockID, blob: blob)
        let path = directory + "/" + fileName
        do {
            let data = try JSONEncoder().encode(record)
            let scratch = path + ".new"
            guard FileManager.default.createFile(atPath: scratch, contents: data, attributes: [.posixPermissions: 0o600]) else {
                throw KeyManagerError.database("cannot write \(scratch)")
            }
            guard rename(scratch, path) == 0 else { throw KeyManagerError.database("cannot move \(scratch) to \(path)") }
        } catch let error as KeyManagerError { throw error } catch { throw .database("cannot write \(path): \(error)") }
        return SecretKey(copying: text)
    }

    /// The passphrase that `unlock.json` in `directory` stands for, from AWS
    /// KMS or the token; nil when the keystore has no such unlock.
    public static func unlock(in directory: String) throws(KeyManagerError) -> SecretKey? {
        let path = directory + "/" + fileName
        guard let data = FileManager.default.contents(atPath: path) else { return nil }
        guard let record = try? JSONDecoder().decode(KMSUnlock.self, from: data), ["aws-kms", "pkcs11"].contains(record.provider),
              record.key.provider == record.provider else {
            throw .keystoreCorrupt("\(path) is not a kmsfs unlock record; remove it and give the passphrase")
        }
        if record.provider == "pkcs11" {
            let token = PKCS11Provider(config: record.key, clock: { Date().timeIntervalSince1970 })
            guard let sealed = Data(base64Encoded: record.blob), let secret = try token.open([UInt8](sealed), aad: tokenContext(record.unlockID)) else {
                throw .provider(provider: "pkcs11", code: "InvalidCiphertextException",
                                message: "the unlock record does not open under \(record.key.location)",
                                remedy: "check that this is the token the filesystem was enrolled with, or give the passphrase set with `kmsfs passwd`")
            }
            return secret
        }
        let client = AWSKMSClient(config: record.key)
        // KMS's key state decides, checked here too (not every KMS refuses a Decrypt under a disabled key).
        let metadata = try client.call("DescribeKey", ["KeyId": record.key.keyID])["KeyMetadata"] as? [String: Any] ?? [:]
        let state = metadata["KeyState"] as? String ?? "Enabled"
        guard state == "Enabled" else {
            throw .provider(provider: "aws-kms", code: "DisabledException",
                            message: "the keystore unlocks through AWS KMS key \(record.key.arn ?? record.key.keyID), which is \(state)",
                            remedy: "enable it in AWS KMS, or give the passphrase set with `kmsfs passwd` if there is one")
        }
        let reply = try client.call("Decrypt", ["KeyId": record.key.keyID, "CiphertextBlob": record.blob,
                                                "EncryptionContext": context(record.unlockID)])
        guard let secret = AWSKMSClient.secret(reply, count: nil) else {
            throw .provider(provider: "aws-kms", code: "MalformedReply", message: "Decrypt answered without a plaintext", remedy: "check the unlock key")
        }
        return secret
    }

    /// Where `directory`'s keystore is unlocked from, if from KMS.
    public static func record(in directory: String) -> KMSUnlock? {
        FileManager.default.contents(atPath: directory + "/" + fileName).flatMap { try? JSONDecoder().decode(KMSUnlock.self, from: $0) }
    }

    /// Removes the KMS unlock (the passphrase route stays).
    public static func remove(in directory: String) {
        unlink(directory + "/" + fileName)
    }
}
