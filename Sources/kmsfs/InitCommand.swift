import ArgumentParser
import ChunkCipher
import EncryptedFS
import Foundation
import KeyManager

struct Init: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Create an encrypted filesystem in CIPHERDIR, with its keystore and the default key alias/default.")

    @Argument(help: "The directory that will hold the ciphertext (created if missing, must be empty).")
    var cipherdir: String

    @OptionGroup var passphrase: PassphraseOptions

    @Option(help: "Plaintext bytes per chunk: a power of two from 4096 to 1048576.")
    var chunkSize: Int = FilesystemOptions().chunkSize

    @Flag(help: "Store file names unencrypted (debugging and benchmarks only).")
    var plaintextNames = false

    @Flag(help: "Let every uid encrypt and decrypt with the default key, for a mount shared with -o allow_other: POSIX permissions then decide who reads and writes what, as on ext4. Administer stays with the creator and root.")
    var shared = false
    @Option(help: "Unlock through AWS KMS or a PKCS#11 token instead of a passphrase: aws-kms:KEY (ARN, key id or alias ARN), or pkcs11:token=T;object=L?module-path=M&pin-source=file:PIN (RFC 7512; the token key is made if missing); servers then mount with their KMS credentials or token and no passphrase file.")
    var unlock: String?
    @Option(help: "With --unlock: the AWS region (default: AWS_REGION, AWS_DEFAULT_REGION, or the ARN's).") var region: String?
    @Option(help: "With --unlock: the KMS endpoint, as the AWS CLI's --endpoint-url.") var endpointUrl: String?

    @Option(help: ArgumentHelp("log2 of scrypt's cost N (default 16).", visibility: .hidden))
    var kdfLogN: UInt8 = ScryptParameters.strong.logN

    func validate() throws {
        guard ChunkLayout.allowedChunkSizes.contains(chunkSize), chunkSize & (chunkSize - 1) == 0 else {
            throw ValidationError("--chunk-size must be a power of two from 4096 to 1048576")
        }
        guard (10...22).contains(kdfLogN) else { throw ValidationError("--kdf-log-n must be 10…22") }
    }

    func run() throws {
        let fm = FileManager.default
        var isDir: ObjCBool = false
        if fm.fileExists(atPath: cipherdir, isDirectory: &isDir) {
            guard isDir.boolValue else { throw ValidationError("\(cipherdir) is not a directory") }
            let entries = try fm.contentsOfDirectory(atPath: cipherdir)
            guard entries.isEmpty else { throw ValidationError("\(cipherdir) is not empty; kmsfs init needs an empty directory") }
        } else {
            try fm.createDirectory(atPath: cipherdir, withIntermediateDirectories: true)
        }
        let options = FilesystemOptions(chunkSize: chunkSize, plaintextNames: plaintextNames, scrypt: ScryptParameters(logN: kdfLogN))
        let keystore = URL(fileURLWithPath: cipherdir).standardizedFileURL.path + "/.kmsfs"
        let secret: SecretKey
        if let unlock {
            guard passphrase.passphraseFile == nil, passphrase.extpass == nil else {
                throw ValidationError("--unlock replaces the passphrase: give no --passphrase-file or --extpass")
            }
            let config = try KMSUnlock.parse(unlock, region: region, endpoint: endpointUrl)
            try FileManager.default.createDirectory(atPath: keystore, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
            do { secret = try KMSUnlock.enroll(in: keystore, with: config) } catch {
                // Nothing is left behind: a second `init` of the same directory must find it empty.
                try? FileManager.default.removeItem(atPath: keystore)
                throw error
            }
        } else {
            secret = try passphrase.read(prompt: "New passphrase: ", confirm: true)
        }
        let manager = try KeyManager.create(in: keystore, passphrase: secret, options: options, creator: caller, clock: Clock.current)
        try EncryptedFileSystem.initializeRoot(cipherdir: cipherdir, keyManager: manager, principal: caller)
        let key = try manager.resolve("alias/default")
        if shared {
            for op in [KeyOperation.encrypt, .decrypt] { try manager.grant(op, to: .anyone, on: "alias/default", by: caller) }
        }
        Output.line("created kmsfs filesystem \(manager.filesystemID) in \(cipherdir)")
        Output.line("chunk size \(chunkSize) bytes, names \(plaintextNames ? "in plaintext" : "encrypted (AES-256-SIV)")")
        Output.line("default key \(key) (alias/default) bound to /" + (shared ? "; every uid may encrypt and decrypt with it (--shared)" : ""))
    }
}

struct Passwd: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Change the passphrase: rewraps the master-key material only; no file is rewritten.",
        discussion: """
            An old copy of the keystore still opens with the old passphrase. To revoke \
            access for real, rotate the keys and rekey the files.
            """)

    @Argument(help: "The CIPHERDIR.")
    var cipherdir: String

    @OptionGroup var passphrase: PassphraseOptions

    @Option(help: "Read the new passphrase from this file.")
    var newPassphraseFile: String?

    @Option(help: "Unlock through AWS KMS or a PKCS#11 token from now on instead of a passphrase: aws-kms:KEY, or pkcs11:token=T;object=L?module-path=M&pin-source=file:PIN.")
    var unlock: String?
    @Option(help: "With --unlock: the AWS region (default: AWS_REGION, AWS_DEFAULT_REGION, or the ARN's).") var region: String?
    @Option(help: "With --unlock: the KMS endpoint, as the AWS CLI's --endpoint-url.") var endpointUrl: String?

    func run() throws {
        let keystore = try Paths.keystore(of: cipherdir)
        let manager = try KeyManager.open(in: keystore, passphrase: passphrase.read(keystore: keystore), clock: Clock.current)
        if let unlock {
            guard newPassphraseFile == nil else { throw ValidationError("--unlock replaces the new passphrase: give no --new-passphrase-file") }
            let fresh = try KMSUnlock.enroll(in: keystore, with: KMSUnlock.parse(unlock, region: region, endpoint: endpointUrl))
            try manager.changePassphrase(to: fresh, by: caller)
            Output.line("the keystore now unlocks through \(unlock.hasPrefix("pkcs11:") ? "the PKCS#11 token" : "AWS KMS") (\(unlock)); no passphrase opens it")
            return
        }
        let fresh = try PassphraseReader.read(file: newPassphraseFile, command: nil, prompt: "New passphrase: ", confirm: true)
        try manager.changePassphrase(to: fresh, by: caller)
        let wasKMS = KMSUnlock.record(in: keystore) != nil
        KMSUnlock.remove(in: keystore)
        Output.line("passphrase changed; every master key was rewrapped, no file was rewritten"
                    + (wasKMS ? "; the KMS/token unlock is removed" : ""))
    }
}
