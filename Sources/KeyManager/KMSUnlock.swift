import ChunkCipher
import Foundation

/// Unlocking a keystore without a passphrase (Vault's auto-unseal, the habit
/// of systemd-cryptenroll): the "passphrase" is 32 random bytes (written as
/// base64 text, so the usual scrypt → KEK path applies unchanged) that only
/// an AWS KMS key can recover. `CIPHERDIR/.kmsfs/unlock.json` holds the KMS
/// key's coordinates and the bytes encrypted by it (`Encrypt`, with
/// encryption context `kmsfs:purpose=keystore-unlock` and a random unlock
/// id). A machine whose credentials may `kms:Decrypt` with that key mounts
/// with no passphrase file; one that may not, cannot.
///
/// The file is outside the keystore's integrity seal on purpose: changing it
/// cannot open the keystore (a blob that decrypts to other bytes is only a
/// wrong passphrase); deleting it leaves the passphrase route, which
/// `kmsfs passwd` can restore.
public struct KMSUnlock: Codable, Sendable {
    public var provider: String
    public var key: ExternalKeyConfig
    public var unlockID: String
    /// base64 of the KMS ciphertext of the 32 bytes.
    public var blob: String

    public static let fileName = "unlock.json"

    static func context(_ unlockID: String) -> [String: String] {
        ["kmsfs:purpose": "keystore-unlock", "kmsfs:unlock": unlockID]
    }

    /// Parses `aws-kms:KEY` (an ARN, key id or alias ARN).
    public static func parse(_ spec: String, region: String?, endpoint: String?) throws(KeyManagerError) -> ExternalKeyConfig {
        guard spec.hasPrefix("aws-kms:"), spec.count > "aws-kms:".count else {
            throw .invalidArgument("--unlock takes aws-kms:KEY (an ARN, key id or alias ARN); pkcs11 is not built yet")
        }
        let key = String(spec.dropFirst("aws-kms:".count))
        guard let region = AWSKMSClient.region(region, keyID: key) else {
            throw .invalidArgument("--unlock aws-kms:KEY needs --region (or AWS_REGION, or a key ARN)")
        }
        return ExternalKeyConfig(provider: "aws-kms", keyID: key, region: region, endpoint: endpoint)
    }

    /// Makes new unlock bytes under `config`, writes `unlock.json` (0600) in
    /// `directory`, and returns the bytes as the passphrase to use.
    public static func enroll(in directory: String, with config: ExternalKeyConfig) throws(KeyManagerError) -> SecretKey {
        let raw = SecretKey.random()
        let text = raw.withUnsafeBytes { Data($0).base64EncodedString() }
        let unlockID = ID128.random().hex
        let client = AWSKMSClient(config: config)
        let reply = try client.call("Encrypt", ["KeyId": config.keyID, "Plaintext": Data(text.utf8).base64EncodedString(),
                                                "EncryptionContext": context(unlockID)])
        guard let blob = reply["CiphertextBlob"] as? String else {
            throw .provider(provider: "aws-kms", code: "MalformedReply", message: "Encrypt answered without a ciphertext", remedy: "check --endpoint-url")
        }
        let record = KMSUnlock(provider: "aws-kms", key: config, unlockID: unlockID, blob: blob)
        let path = directory + "/" + fileName
        do {
            let data = try JSONEncoder().encode(record)
            let scratch = path + ".new"
            guard FileManager.default.createFile(atPath: scratch, contents: data, attributes: [.posixPermissions: 0o600]) else {
                throw KeyManagerError.database("cannot write \(scratch)")
            }
            guard rename(scratch, path) == 0 else { throw KeyManagerError.database("cannot move \(scratch) to \(path)") }
        } catch let error as KeyManagerError { throw error } catch { throw .database("cannot write \(path): \(error)") }
        return SecretKey(copying: Array(text.utf8))
    }

    /// The passphrase that `unlock.json` in `directory` stands for, from AWS
    /// KMS; nil when the keystore has no KMS unlock.
    public static func unlock(in directory: String) throws(KeyManagerError) -> SecretKey? {
        let path = directory + "/" + fileName
        guard let data = FileManager.default.contents(atPath: path) else { return nil }
        guard let record = try? JSONDecoder().decode(KMSUnlock.self, from: data), record.provider == "aws-kms" else {
            throw .keystoreCorrupt("\(path) is not a kmsfs unlock record; remove it and give the passphrase")
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
