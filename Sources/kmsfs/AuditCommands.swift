import ArgumentParser
import Foundation
import KeyManager

struct AuditCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "audit",
        abstract: "Read the audit log of key operations, denials and integrity failures.",
        subcommands: [List.self, Verify.self])

    struct Verify: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Check the audit log's hash chain; names the first edited, removed or reordered record and exits 1.")
        @OptionGroup var fs: FilesystemOption
        @OptionGroup var output: JSONOption

        func run() throws {
            let result = try fs.open().verifyAudit()
            if output.json { try Output.json(result) } else if let problem = result.problem {
                Output.note("kmsfs: audit log does not verify: \(problem)")
            } else {
                Output.line("audit log verifies: \(result.records) records, chain intact")
            }
            if result.firstBad != nil { throw ExitCode(1) }
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show the newest audit records, oldest first.")
        @OptionGroup var fs: FilesystemOption
        @Option(help: "How many records.") var limit = 20
        @OptionGroup var output: JSONOption

        func run() throws {
            let records = try fs.open().recentAudit(limit: limit)
            if output.json { try Output.json(records); return }
            Output.table(["#", "TIME", "EVENT", "OUTCOME", "KEY", "VER", "UID", "OBJECT"], records.map { r in
                [String(r.seq), Output.date(r.time), r.event, r.outcome, r.keyID.map { String($0.prefix(12)) } ?? "-",
                 r.keyVersion.map(String.init) ?? "-", r.uid.map(String.init) ?? "-", r.objectID.map { String($0.prefix(12)) } ?? "-"]
            })
        }
    }
}
