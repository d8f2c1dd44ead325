import Administration
import ArgumentParser
import ChunkCipher
import Foundation
import KeyManager

struct AuditCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "audit",
        abstract: "Read the audit log of key operations, denials and integrity failures.",
        subcommands: [List.self, Verify.self, Export.self, Alerts.self, Paths.self])

    struct Verify: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Check the audit log's hash chain; names the first edited, removed or reordered record and exits 1.")
        @OptionGroup var fs: FilesystemOption
        @OptionGroup var output: JSONOption

        func run() throws {
            guard case .auditVerification(let result) = try fs.perform(.verifyAudit, verifyingIntegrity: false) else { throw Unexpected() }
            if output.json { try Output.json(result) } else if let problem = result.problem {
                Output.note("kmsfs: audit log does not verify: \(problem)")
            } else {
                Output.line("audit log verifies: \(result.records) records, chain intact, \(result.digests) signed digest(s) valid")
            }
            if result.problem != nil { throw ExitCode(1) }
        }
    }

    struct Filters: ParsableArguments {
        @Option(help: "Only records at or after this time (ISO 8601, or seconds since 1970).") var since: String?
        @Option(help: "Only records before this time.") var until: String?
        @Option(help: "Only records of this key (id or alias).") var key: String?
        @Option(help: "Only this event, e.g. Decrypt, DisableKey, IntegrityFailure.") var event: String?
        @Option(help: "Only records of this uid.") var uid: UInt32?
        @Option(help: "Only this outcome: success, denied, refused, invalid, failure, integrity-failure or warning.") var outcome: String?

        /// The filter as given; a peer of a live mount other than root and
        /// the mounting user sees only its keys' records and its own.
        func validate() throws {
            if let outcome, AuditOutcome(rawValue: outcome) == nil {
                throw ValidationError("--outcome is one of " + AuditOutcome.allCases.map(\.rawValue).joined(separator: ", "))
            }
            // A misspelt event would match nothing and look like "no such records".
            if let event, AuditAction(rawValue: event) == nil, !AuditAction.retiredNames.contains(event) {
                throw ValidationError("--event \(event) is not an event kmsfs records; one of " + AuditAction.allCases.map(\.rawValue).joined(separator: ", "))
            }
        }

        func filter() throws -> AuditFilter {
            AuditFilter(since: try since.map(Self.time), until: try until.map(Self.time), key: key, event: event, uid: uid, outcome: outcome)
        }

        static func time(_ text: String) throws -> Double {
            if let seconds = Double(text) { return seconds }
            if let date = try? Date(text, strategy: .iso8601) { return date.timeIntervalSince1970 }
            throw ValidationError("cannot read the time \(text); use ISO 8601 (2026-11-29T12:00:00Z) or seconds since 1970")
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show the newest audit records matching the filters, oldest first.")
        @OptionGroup var fs: FilesystemOption
        @OptionGroup var filters: Filters
        @Option(help: "How many records.") var limit = 20
        @OptionGroup var output: JSONOption

        func run() throws {
            guard case .auditRecords(let records, _) = try fs.perform(.auditRecords(filter: try filters.filter(), limit: limit)) else { throw Unexpected() }
            if output.json { try Output.json(records); return }
            Output.table(["#", "TIME", "EVENT", "OUTCOME", "KEY", "VER", "UID", "OBJECT", "PATH"], records.map { r in
                [String(r.seq), Output.date(r.time), r.event, r.outcome, r.keyID.map { String($0.prefix(12)) } ?? "-",
                 r.keyVersion.map(String.init) ?? "-", r.uid.map(String.init) ?? "-", r.objectID.map { String($0.prefix(12)) } ?? "-",
                 r.path ?? "-"]
            })
        }
    }

    struct Export: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Write audit records as JSON lines for a SIEM: CloudTrail-shaped events (jsonl) or OCSF API Activity events (ocsf).",
            discussion: "jsonl field names follow CloudTrail (eventTime, eventSource, eventName, userIdentity, resources, errorCode, ...), kmsfs-specific values under additionalEventData; ocsf writes OCSF 1.1 API Activity (class 6003) events, kmsfs-specific values under unmapped.")
        @OptionGroup var fs: FilesystemOption
        @OptionGroup var filters: Filters
        @Option(help: "The export format: jsonl (CloudTrail-shaped) or ocsf.") var format = "jsonl"
        @Option(help: "Only the newest N records.") var limit: Int?

        func validate() throws {
            guard format == "jsonl" || format == "ocsf" else { throw ValidationError("the export formats are jsonl and ocsf") }
        }

        func run() throws {
            guard case .auditRecords(let records, let filesystem) = try fs.perform(.auditRecords(filter: try filters.filter(), limit: limit)),
                  let filesystemID = ID128(hex: filesystem) else { throw Unexpected() }
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
            let host = ProcessInfo.processInfo.hostName
            for record in records {
                if format == "ocsf" {
                    Output.line(SecurityFindings.line(SecurityFindings.ocsf(record, filesystem: filesystemID, hostname: host)))
                } else {
                    Output.line(String(decoding: try encoder.encode(CloudTrailEvent(record, filesystem: filesystem)), as: UTF8.self))
                }
            }
        }
    }
}

enum Toggle: String, ExpressibleByArgument {
    case on, off
}

extension AuditPathMode: ExpressibleByArgument {}

extension AuditCommand {
    struct Paths: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Show or set how records name the file of an open or create: hashed (default), plain, or off; or hash a path to search for.",
            discussion: "hashed stores hmac:<hash> keyed with the keystore's metadata key, so records on one path correlate without revealing it; `--hash PATH` prints the value to look for.")
        @OptionGroup var fs: FilesystemOption
        @Argument(help: "hashed, plain or off.") var mode: AuditPathMode?
        @Option(help: "Print the hashed form of this path inside the filesystem, e.g. /projects/report.txt.") var hash: String?

        func run() throws {
            guard case .auditPaths(let current, let hashed) = try fs.perform(.auditPaths(mode: mode, hash: hash)) else { throw Unexpected() }
            if let hashed {
                Output.line(hashed)
                return
            }
            Output.line("paths in audit records: \(current.rawValue)")
        }
    }

    struct Alerts: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Show or set where alerts go (syslog, a JSON-lines file, a command) and when the rules fire.",
            discussion: """
                Rules: a burst of access denials by one uid; any use of a Disabled, PendingDeletion or Destroyed key; \
                any integrity failure; a refused key deletion; a key without automatic rotation not rotated for too long. \
                The command gets each alert as one JSON object on stdin.
                """)
        @OptionGroup var fs: FilesystemOption
        @Option(help: "Syslog: on or off.") var syslog: Toggle?
        @Option(help: "Append alerts as JSON lines to this file (\"\" for none).") var jsonl: String?
        @Option(help: "Run this shell command per alert, JSON on stdin (\"\" for none).") var command: String?
        @Option(help: "Denials by one uid that make a burst.") var denialBurst: Int?
        @Option(help: "The burst window in seconds.") var denialWindow: Double?
        @Option(help: "Days after which a key without automatic rotation is overdue.") var rotationOverdueDays: Int?
        @Option(help: "What the file and command receive: kmsfs (default), asff (AWS Security Finding Format, for aws securityhub batch-import-findings) or ocsf (OCSF Detection Finding).")
        var format: String?
        @Option(help: "With --format asff: the AWS account id findings name.") var asffAccount: String?
        @Option(help: "With --format asff: the AWS region findings name.") var asffRegion: String?
        @OptionGroup var output: JSONOption

        func run() throws {
            var change = AlertChange()
            change.syslog = syslog.map { $0 == .on }
            change.jsonl = jsonl.map { $0.isEmpty ? $0 : URL(fileURLWithPath: $0).standardizedFileURL.path }
            change.command = command
            change.denialBurst = denialBurst
            change.denialWindow = denialWindow
            change.rotationOverdueDays = rotationOverdueDays
            change.format = format
            change.asffAccount = asffAccount
            change.asffRegion = asffRegion
            guard case .alerts(let config) = try fs.perform(.alerts(change: change)) else { throw Unexpected() }
            if output.json { try Output.json(config); return }
            Output.line("syslog:              \(config.syslog ? "on" : "off")")
            Output.line("json-lines file:     \(config.jsonl ?? "-")")
            Output.line("command:             \(config.command ?? "-")")
            Output.line("denial burst:        \(config.denialBurst) within \(Int(config.denialWindow)) s")
            Output.line("rotation overdue:    after \(config.rotationOverdueDays) days")
            Output.line("format:              \(config.format ?? "kmsfs")" + (config.asffAccount.map { " (ASFF account \($0.accountID), \($0.region))" } ?? ""))
        }
    }
}

/// One audit record in CloudTrail's shape.
struct CloudTrailEvent: Encodable {
    struct Identity: Encodable {
        var type = "LocalUser"
        var principalId: String?
        var uid: Int?
        var gid: Int?
        var pid: Int?
        var processName: String?
    }
    struct Resource: Encodable {
        var type: String
        var ARN: String
    }
    struct Extra: Encodable {
        var outcome: String
        var keyVersion: Int?
        var objectId: String?
        var path: String?
        var sequence: Int64
    }
    var eventVersion = "1.08"
    var eventTime: String
    var eventSource = "kmsfs.amazonaws.com"
    var eventName: String
    var eventID: String
    var eventType = "AwsApiCall"
    var awsRegion = "local"
    var recipientAccountId: String
    var userIdentity: Identity
    var resources: [Resource]
    var errorCode: String?
    var errorMessage: String?
    var readOnly: Bool
    var requestParameters: [String: String]?
    var additionalEventData: Extra

    init(_ r: AuditRecord, filesystem: String) {
        eventTime = Date(timeIntervalSince1970: r.time).formatted(.iso8601)
        eventName = r.event
        eventID = "\(filesystem)-\(r.seq)"
        recipientAccountId = filesystem
        userIdentity = Identity(principalId: r.uid.map { "uid:\($0)" }, uid: r.uid, gid: r.gid, pid: r.pid, processName: r.process)
        resources = r.keyID.map { [Resource(type: "AWS::KMS::Key", ARN: "arn:kmsfs:kms:local:\(filesystem):key/\($0)")] } ?? []
        if r.outcome != "success" {
            errorCode = ["denied": "AccessDeniedException", "refused": "KMSInvalidStateException", "invalid": "ValidationException",
                         "integrity-failure": "InvalidCiphertextException", "failure": "KMSInternalException"][r.outcome] ?? r.outcome
            errorMessage = r.error
        }
        readOnly = [AuditAction.decrypt, .describeKey].map(\.rawValue).contains(r.event)
        requestParameters = r.request.flatMap { try? JSONDecoder().decode([String: String].self, from: Data($0.utf8)) }
        additionalEventData = Extra(outcome: r.outcome, keyVersion: r.keyVersion, objectId: r.objectID, path: r.path, sequence: r.seq)
    }
}
