import ArgumentParser

/// The kmsfs command line: argument parsing and output only.
struct KMSFS: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "kmsfs",
        abstract: "An encrypted FUSE filesystem with a built-in key manager.",
        subcommands: [])
}
