import Administration
import ArgumentParser
import EncryptedFS
import Foundation
import KeyManager

struct Fsck: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Check an unmounted filesystem: every header, chunk, name and key; rebuild the usage index; quarantine damage with --repair.",
        discussion: """
            Exits 1 when it finds damage it did not repair. With --repair each damaged file, directory or \
            name is moved to CIPHERDIR/.kmsfs/quarantine/ (its ciphertext kept for forensics) so the rest \
            mounts and reads cleanly. The usage index is rebuilt from the headers either way.
            """)
    @Argument(help: "The CIPHERDIR.") var cipherdir: String
    @Flag(help: "Move damaged entries to .kmsfs/quarantine/.") var repair = false
    @Flag(help: ArgumentHelp("Accept the keystore's protected rows as they are now, after edits made outside kmsfs (audited).",
                             discussion: "Only for edits you made yourself; otherwise restore a backup."))
    var acceptKeystoreEdits = false
    @OptionGroup var passphrase: PassphraseOptions
    @OptionGroup var output: JSONOption

    func run() throws {
        let path = try Paths.cipherdir(of: cipherdir)
        let keystore = try Paths.keystore(of: path)
        if MountTable.kmsfsMounts().contains(where: { $0.source == path }) || ControlServer.isServing(directory: keystore) {
            throw Failure("\(path) is mounted; unmount it first (`kmsfs umount MOUNTPOINT`)")
        }
        let manager = try KeyManager.open(in: keystore, passphrase: passphrase.read(keystore: keystore), verifyingIntegrity: !acceptKeystoreEdits,
                                          clock: Clock.current)
        if acceptKeystoreEdits {
            let findings = try manager.acceptKeystoreEdits(by: caller)
            for finding in findings { Output.line("accepted: \(finding)") }
            Output.line(findings.isEmpty ? "the keystore had no outside edits" : "accepted \(findings.count) edit(s); recorded as AcceptKeystoreEdits")
        }
        let filesystem = try EncryptedFileSystem(cipherdir: path, keyManager: manager)
        let check = FilesystemCheck(filesystem: filesystem, principal: caller, repair: repair)
        let meter = ProgressMeter("fsck", unit: "files", json: output.json)
        check.progress = { files, total, bytes in meter.update(files, of: total, bytes: bytes) }
        let report = try check.run()
        meter.finish()
        if output.json { try Output.json(report) } else {
            for p in report.problems {
                Output.line("\(p.kind.padding(toLength: 10, withPad: " ", startingAt: 0)) \(p.path)  [\(p.backing)]: \(p.detail)"
                            + (p.quarantined.map { " → moved to \($0)" } ?? ""))
            }
            for l in report.locked {
                Output.line("locked     \(l.path)  [\(l.backing)]: \(l.detail) (not damage; kept in the usage index)")
            }
            Output.line("checked \(report.files) file(s), \(report.directories) director(ies), "
                        + (report.deviceNodes > 0 ? "\(report.deviceNodes) device node(s), " : "") + "\(report.bytes) bytes: "
                        + (report.clean ? "no damage" : "\(report.problems.count) damaged" + (repair ? ", quarantined" : "")))
            if let u = report.usage {
                Output.line("usage index rebuilt: \(u.entries) entries (\(u.added) added, \(u.removed) removed, \(u.changed) changed)")
            }
        }
        if !report.clean && !repair { throw ExitCode(1) }
    }
}
