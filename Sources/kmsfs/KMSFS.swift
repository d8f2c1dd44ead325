import ArgumentParser

/// The kmsfs command line: argument parsing and output only; every behaviour
/// lives in a library.
struct KMSFS: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "kmsfs",
        abstract: "An encrypted FUSE filesystem with a built-in key manager.",
        discussion: """
            Files are sealed in chunks with AES-256-GCM under per-file data keys, which \
            versioned, customer-managed master keys wrap. See docs/ for the format and \
            threat model.
            """,
        version: Version.description,
        subcommands: [Init.self, Mount.self, Unmount.self, Status.self, KeyCommand.self, RekeyCommand.self, AuditCommand.self, BackupCommand.self, Fsck.self, Passwd.self])
}
