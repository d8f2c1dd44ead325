import Administration
import ArgumentParser
import Foundation
import KeyManager

struct BackupCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "backup",
        abstract: "Back up the keystore under a separate backup passphrase (encrypted and signed), or restore it.",
        subcommands: [Create.self, Restore.self])

    struct Create: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Write the whole keystore (material, metadata, policies, bindings, audit log) to FILE, encrypted under the backup passphrase and signed.")
        @OptionGroup var fs: FilesystemOption
        @Option(help: "The backup file to write (refused if it exists).") var out: String
        @Option(help: "Read the backup passphrase from this file (first line); it should differ from the keystore's.") var backupPassphraseFile: String

        func run() throws {
            let path = URL(fileURLWithPath: out).standardizedFileURL.path
            // AdminService refuses this too; checked here first so no passphrase is asked and no scrypt run for nothing.
            guard !FileManager.default.fileExists(atPath: path) else { throw Failure("\(out) exists; choose a new file") }
            let meter = ProgressMeter("backup", unit: "", json: false)
            meter.step("deriving the backup key (scrypt), sealing, signing and writing the keystore")
            guard case .backupWritten(let count, let signer, let fingerprint) = try fs.perform(.createBackup(
                out: path, passphraseFile: URL(fileURLWithPath: backupPassphraseFile).standardizedFileURL.path)) else { throw Unexpected() }
            meter.finish()
            Output.line("backup written to \(out) (\(count) bytes)")
            Output.line("signed by key \(signer), fingerprint \(fingerprint)")
            Output.line("keep the fingerprint apart from the backup: restoring into an empty keystore asks for it (--trusted-fingerprint)")
        }
    }

    struct Restore: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Verify a backup and restore it: into an empty CIPHERDIR keystore, or merged into an existing one (adding only what it lacks, refusing any conflict).",
            discussion: "The filesystem must be unmounted. --passphrase-file is the keystore passphrase: the new one for an empty keystore, the current one to merge.")
        @Argument(help: "The backup file.") var file: String
        @Option(help: "The CIPHERDIR.") var fs: String
        @Option(help: "Read the backup passphrase from this file.") var backupPassphraseFile: String
        @Option(help: "The signer you trust: sha256:HEX, as `backup create` printed it. Needed for an empty keystore; a merge trusts the keystore's own digest key.")
        var trustedFingerprint: String?
        @Option(help: "The signer you trust: its public key, PEM or DER (`kmsfs key get-public-key alias/kmsfs-audit-digest --out FILE`).")
        var trustedKey: String?
        @OptionGroup var passphrase: PassphraseOptions
        @OptionGroup var output: JSONOption

        func validate() throws {
            if trustedFingerprint != nil && trustedKey != nil { throw ValidationError("give --trusted-fingerprint or --trusted-key, not both") }
            if let trustedFingerprint {
                let hex = trustedFingerprint.lowercased().hasPrefix("sha256:") ? String(trustedFingerprint.dropFirst(7)) : trustedFingerprint
                guard hex.count == 64, hex.allSatisfy(\.isHexDigit) else { throw ValidationError("--trusted-fingerprint is sha256: and 64 hex digits") }
            }
        }

        /// The trust anchor given on the command line, if any.
        func trust() throws -> BackupTrust? {
            if let trustedFingerprint { return .fingerprint(trustedFingerprint) }
            guard let trustedKey else { return nil }
            guard let data = FileManager.default.contents(atPath: trustedKey) else { throw Failure("cannot read \(trustedKey)") }
            let text = String(decoding: data, as: UTF8.self)
            guard text.hasPrefix("-----BEGIN PUBLIC KEY-----") else { return .publicKey([UInt8](data)) }
            guard let der = PEM.der(text) else { throw Failure("\(trustedKey) is not a PEM public key") }
            return .publicKey(der)
        }

        func run() throws {
            let trust = try trust()
            let cipherdir = try Paths.cipherdir(of: fs)
            let directory = cipherdir + "/.kmsfs"
            if MountTable.kmsfsMounts().contains(where: { $0.source == cipherdir }) || ControlServer.isServing(directory: directory) {
                throw Failure("\(cipherdir) is mounted; unmount it before restoring its keystore")
            }
            guard let data = FileManager.default.contents(atPath: file) else { throw Failure("cannot read \(file)") }
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
            let fresh = !FileManager.default.fileExists(atPath: directory + "/" + KeyManager.databaseName)
            let backup = try PassphraseReader.read(file: backupPassphraseFile, command: nil, prompt: "", confirm: false)
            let secret = try passphrase.read(prompt: fresh ? "New keystore passphrase: " : "Keystore passphrase: ", confirm: fresh)
            let meter = ProgressMeter("restore", unit: "", json: output.json)
            meter.step("verifying the signature, deriving the backup and keystore keys (scrypt), restoring")
            let report = try KeyManager.restoreBackup([UInt8](data), backupPassphrase: backup, into: directory, passphrase: secret,
                                                      trust: trust, by: caller, clock: Clock.current)
            meter.finish()
            if output.json { try Output.json(report); return }
            Output.line("backup of \(Output.date(report.createdAt)), signed by key \(report.signer), restored: \(report.mode)")
            Output.line(report.mode == "merged" ? "added \(report.keysAdded.count) key(s) and \(report.versionsAdded) version(s)"
                                                : "\(report.keysAdded.count) key(s) in the restored keystore")
        }
    }
}
