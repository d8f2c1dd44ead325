import Administration
import ArgumentParser
import ChunkCipher
import Foundation
import KeyManager

// Who may use a key and how: policy, grants, the access review, and using
// a signing key (sign, verify, get-public-key).
extension KeyCommand {
    struct Policy: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Show or change which uids/gids may encrypt, decrypt or administer with a key.",
            discussion: "SUBJECT is uid:N, gid:N or * (anyone). Example: kmsfs key policy alias/prod --grant decrypt gid:100 --fs DIR")
        @OptionGroup var fs: FilesystemOption
        @Argument(help: "Key id or alias.") var key: String
        @Option(parsing: .upToNextOption, help: "OPERATION[,OPERATION] SUBJECT to grant; repeat for more.") var grant: [String] = []
        @Option(parsing: .upToNextOption, help: "OPERATION[,OPERATION] SUBJECT to revoke; repeat for more.") var revoke: [String] = []
        @OptionGroup var output: JSONOption

        /// `--grant encrypt,decrypt uid:7 --grant decrypt gid:100` arrives as one list: read it in pairs.
        static func pairs(_ values: [String]) throws -> [(KeyOperation, PolicySubject)] {
            guard values.count % 2 == 0 else {
                throw ValidationError("expected OPERATION SUBJECT pairs, e.g. `--grant decrypt uid:1000 --grant encrypt,decrypt gid:100` (operations: encrypt, decrypt, administer)")
            }
            return try stride(from: 0, to: values.count, by: 2).flatMap { i -> [(KeyOperation, PolicySubject)] in
                guard let subject = PolicySubject(argument: values[i + 1]) else { throw ValidationError("expected OPERATION SUBJECT: \(values[i + 1]) is not uid:N, gid:N or *") }
                return try values[i].split(separator: ",").map { name in
                    guard let op = KeyOperation(rawValue: String(name)) else { throw ValidationError("expected OPERATION SUBJECT: unknown operation \(name) (encrypt, decrypt, administer)") }
                    return (op, subject)
                }
            }
        }

        func validate() throws {
            _ = try Self.pairs(grant)
            _ = try Self.pairs(revoke)
        }

        func run() throws {
            guard case .policy(let policy) = try fs.perform(.changePolicy(key: key, grant: try Self.pairs(grant).map(PolicyChange.init),
                                                                          revoke: try Self.pairs(revoke).map(PolicyChange.init))) else {
                throw Unexpected()
            }
            if output.json { try Output.json(policy); return }
            for op in KeyOperation.allCases { Output.line("\(op.rawValue): \((policy[op.rawValue] ?? []).joined(separator: " "))") }
        }
    }

    struct Sign: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Sign a message with a SIGN_VERIFY key (RSA PKCS#1 v1.5 with SHA-256, or ECDSA).")
        @OptionGroup var fs: FilesystemOption
        @Argument(help: "Key id or alias.") var key: String
        @Option(help: "The message (at most 256 KiB).") var messageFile: String
        @Option(help: "Where to write the signature (DER for ECDSA, raw for RSA), as `openssl dgst -verify` reads it.") var out: String
        func run() throws {
            let message = try CallerFile.read(messageFile)
            guard case .signature(let signature) = try fs.perform(.sign(key: key, message: Data(message))) else { throw Unexpected() }
            try CallerFile.write(out, [UInt8](signature))
            Output.line("signed \(message.count) bytes with \(key); signature in \(out)")
        }
    }

    struct Verify: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Verify a signature made with a SIGN_VERIFY key; exits 0 only when it is valid.")
        @OptionGroup var fs: FilesystemOption
        @Argument(help: "Key id or alias.") var key: String
        @Option(help: "The message.") var messageFile: String
        @Option(help: "The signature.") var signatureFile: String
        func run() throws {
            let message = try CallerFile.read(messageFile)
            let signature = try CallerFile.read(signatureFile)
            guard case .verified(let valid) = try fs.perform(.verify(key: key, message: Data(message), signature: Data(signature))) else { throw Unexpected() }
            guard valid else {
                Output.note("kmsfs: the signature is not valid for this message and key")
                throw ExitCode(1)
            }
            Output.line("valid signature")
        }
    }

    struct GetPublicKey: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Write the public key of a SIGN_VERIFY key (SubjectPublicKeyInfo, PEM or DER).")
        @OptionGroup var fs: FilesystemOption
        @Argument(help: "Key id or alias.") var key: String
        @Option(help: "Where to write it; without it, print it (PEM only).") var out: String?
        @Option(help: "pem (default) or der.") var format: String = "pem"
        func validate() throws {
            guard format == "pem" || format == "der" else { throw ValidationError("--format is pem or der") }
            if format == "der" && out == nil { throw ValidationError("--format der needs --out FILE") }
        }
        func run() throws {
            guard case .publicKey(let pem) = try fs.perform(.getPublicKey(key: key)) else { throw Unexpected() }
            guard let out else { Output.line(pem); return }
            var bytes = Array(pem.utf8)
            if format == "der" {
                // The PEM body is the DER, base64 between the BEGIN and END lines.
                guard let der = PEM.der(pem) else { throw ValidationError("the public key's PEM did not decode") }
                bytes = der
            }
            try CallerFile.write(out, bytes)
            Output.line("public key of \(key) in \(out) (\(format.uppercased()))")
        }
    }

    struct GrantCommand: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "grant",
            abstract: "Scoped, optionally expiring permissions on one key for one uid or gid (as AWS KMS grants).",
            subcommands: [Create.self, List.self, Revoke.self])

        struct Create: ParsableCommand {
            static let configuration = CommandConfiguration(abstract: "Give a subject some of a key's operations (encrypt, decrypt), optionally until a time.")
            @OptionGroup var fs: FilesystemOption
            @Argument(help: "Key id or alias.") var key: String
            @Option(help: "uid:N, gid:N or *.") var grantee: String
            @Option(help: "Comma-separated: encrypt, decrypt.") var operations: String
            @Option(help: "When it stops working, ISO 8601 (e.g. 2027-01-31T00:00:00Z).") var expires: String?
            @OptionGroup var output: JSONOption
            func run() throws {
                guard let subject = PolicySubject(argument: grantee) else { throw ValidationError("--grantee is uid:N, gid:N or *") }
                var ops = [KeyOperation]()
                for name in operations.split(separator: ",") {
                    guard let op = KeyOperation(rawValue: name.trimmingCharacters(in: .whitespaces)) else {
                        throw ValidationError("unknown operation \(name); grants give encrypt and/or decrypt")
                    }
                    ops.append(op)
                }
                var expiry: Double?
                if let expires {
                    guard let date = try? Date(expires, strategy: .iso8601) else { throw ValidationError("--expires must be ISO 8601, e.g. 2027-01-31T00:00:00Z") }
                    expiry = date.timeIntervalSince1970
                }
                guard case .grant(let grant) = try fs.perform(.createGrant(key: key, grantee: subject, operations: ops, expiresAt: expiry)) else {
                    throw Unexpected()
                }
                if output.json { try Output.json(GrantView(grant)) } else { Output.line(grant.grantID) }
            }
        }

        struct List: ParsableCommand {
            static let configuration = CommandConfiguration(abstract: "List a key's grants.")
            @OptionGroup var fs: FilesystemOption
            @Argument(help: "Key id or alias.") var key: String
            @OptionGroup var output: JSONOption
            func run() throws {
                guard case .grants(let list) = try fs.perform(.listGrants(key: key)) else { throw Unexpected() }
                let grants = list.map(GrantView.init)
                if output.json { try Output.json(grants); return }
                Output.table(["GRANT ID", "GRANTEE", "OPERATIONS", "CREATED", "EXPIRES"], grants.map {
                    [$0.grantId, $0.grantee, $0.operations.joined(separator: ","), $0.creationDate, $0.expirationDate ?? "never"]
                })
            }
        }

        struct Revoke: ParsableCommand {
            static let configuration = CommandConfiguration(abstract: "Remove a grant (an administrator of the key, or the grantee giving it up).")
            @OptionGroup var fs: FilesystemOption
            @Argument(help: "Key id or alias.") var key: String
            @Argument(help: "The grant id.") var grantID: String
            func run() throws {
                try fs.perform(.revokeGrant(key: key, grantID: grantID))
                Output.line("grant \(grantID) on \(key) removed")
            }
        }

        struct GrantView: Encodable {
            var grantId: String
            var keyId: String
            var grantee: String
            var operations: [String]
            var creationDate: String
            var expirationDate: String?
            var createdBy: UInt32
            init(_ g: KeyGrant) {
                grantId = g.grantID
                keyId = g.keyID.rawValue.hex
                grantee = g.grantee
                operations = g.operations.map(\.rawValue)
                creationDate = Output.date(g.createdAt)
                expirationDate = g.expiresAt.map { Output.date($0) }
                createdBy = g.createdBy
            }
        }
    }

    struct AccessReport: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "access-report",
            abstract: "Who may do what with each key (policy and grants), when each last used it, and who has not for N days.",
            discussion: "Lists the keys the caller administers (all of them for root). Exit status 0; unused access is flagged, not removed.")
        @OptionGroup var fs: FilesystemOption
        @Option(help: "Flag subjects that have not used a key for this many days.") var unusedDays: Int = 90
        @OptionGroup var output: JSONOption

        struct Entry: Encodable {
            var keyId: String
            var aliases: [String]
            var state: String
            var subject: String
            var operations: [String]
            var sources: [String]
            var lastUsed: String?
            var unused: Bool
        }

        func validate() throws {
            guard unusedDays > 0 else { throw ValidationError("--unused-days must be at least 1") }
        }

        func run() throws {
            guard case .access(let findings) = try fs.perform(.accessReport(unusedDays: unusedDays)) else { throw Unexpected() }
            let entries = findings.map {
                Entry(keyId: $0.keyID.rawValue.hex, aliases: $0.aliases, state: $0.state.rawValue, subject: $0.subject,
                      operations: $0.operations, sources: $0.sources, lastUsed: $0.lastUsedAt.map { Output.date($0) }, unused: $0.unused)
            }
            if output.json { try Output.json(entries); return }
            Output.table(["KEY", "SUBJECT", "MAY", "VIA", "LAST USED", "FINDING"], entries.map {
                [$0.aliases.first ?? $0.keyId, $0.subject, $0.operations.joined(separator: ","), $0.sources.joined(separator: "; "),
                 $0.lastUsed ?? "never", $0.unused ? "unused \(unusedDays)+ days" : ""]
            })
        }
    }
}
