import Administration
import ArgumentParser
import ChunkCipher
import Foundation
import KeyManager

extension KeySpec: ExpressibleByArgument {
    // Not `self.init(argument:)`: inside this extension that is this initializer itself.
    public init?(argument: String) {
        guard let spec = KeySpec.parse(argument) else { return nil }
        self = spec
    }
    public static var allValueStrings: [String] { allCases.map(\.rawValue) }
}

extension KeyState: ExpressibleByArgument {
    public init?(argument: String) {
        guard let state = KeyState.allCases.first(where: { $0.rawValue.lowercased() == argument.lowercased() }) else { return nil }
        self = state
    }
}

extension KeyOperation: ExpressibleByArgument {}

/// `NAME=VALUE`.
extension KeyTag: ExpressibleByArgument {
    public init?(argument: String) {
        let parts = argument.split(separator: "=", maxSplits: 1)
        guard parts.count == 2 else { return nil }
        self.init(name: String(parts[0]), value: String(parts[1]))
    }
}

struct KeyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "key",
        abstract: "Manage master keys: create, rotate, enable, disable, delete, deprecate, aliases, tags, policy, bindings.",
        subcommands: [Create.self, List.self, Describe.self, Rotate.self, Rotation.self, Enable.self, Disable.self,
                      ScheduleDeletion.self, CancelDeletion.self, Deprecate.self, Usage.self, Alias.self, TagCommand.self,
                      Policy.self, Bind.self, RetireVersion.self, Rotations.self, MinDecryptionVersion.self, Sign.self, Verify.self,
                      GetPublicKey.self, GrantCommand.self, AccessReport.self])

    struct Create: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Create a master key (AES_256 by default).")
        @OptionGroup var fs: FilesystemOption
        @Option(name: .customLong("alias"), help: "An alias such as alias/prod (repeatable).") var aliases: [String] = []
        @Option(help: "What the key is for.") var description = ""
        @Option(name: .customLong("tag"), help: "A tag NAME=VALUE, e.g. env=prod (repeatable).") var tags: [KeyTag] = []
        @Option(help: "AES_256 (default), RSA_2048, RSA_3072, RSA_4096, ECC_NIST_P256, ECC_NIST_P384 or ECC_NIST_P521. With aws-kms, the KMS key's own spec unless given.") var spec: KeySpec?
        @Option(help: "Automatic rotation period in days, 90-2560.") var rotationDays: Int = 365
        @Flag(help: "Create without automatic rotation.") var noRotation = false
        @Option(help: "Where the material lives: local (the keystore), aws-kms or pkcs11.") var provider = "local"
        @Option(help: "With --provider aws-kms: the AWS KMS key (ARN, key id or alias ARN); an Enabled symmetric key, or an RSA/ECC_NIST SIGN_VERIFY key.") var externalKey: String?
        @Option(help: "With --provider aws-kms: the AWS region (default: AWS_REGION, AWS_DEFAULT_REGION).") var region: String?
        @Option(help: "With --provider aws-kms: the KMS endpoint, as the AWS CLI's --endpoint-url.") var endpointUrl: String?
        @Option(help: "With --provider aws-kms: a profile of ~/.aws/credentials (default: the environment's credentials, then AWS_PROFILE).") var profile: String?
        @Flag(help: "With --provider aws-kms or pkcs11: wrap every file's data key in KMS or the token (one call per create and per open) instead of under intermediate keys.") var strict = false
        @Option(help: "With --provider pkcs11: the PKCS#11 module, e.g. /usr/lib/softhsm/libsofthsm2.so.") var module: String?
        @Option(help: "With --provider pkcs11: the token's label.") var token: String?
        @Option(help: "With --provider pkcs11: a file holding the user PIN (read at each login; never give a PIN on the command line).") var pinFile: String?
        @Option(help: "With --provider pkcs11: use the existing token key (or key pair) with this label (default: generate a new non-extractable one of --spec).") var objectLabel: String?
        @OptionGroup var output: JSONOption

        func run() throws {
            let tagMap = Dictionary(tags.map { ($0.name, $0.value) }, uniquingKeysWith: { $1 })
            var creation = KeyCreation(spec: spec, description: description, aliases: aliases, tags: tagMap,
                                       rotationDays: noRotation ? nil : rotationDays)
            switch provider {
            case "local":
                guard externalKey == nil, region == nil, endpointUrl == nil, profile == nil, !strict, module == nil, token == nil, pinFile == nil, objectLabel == nil else {
                    throw ValidationError("--external-key, --region, --endpoint-url, --profile and --strict go with --provider aws-kms (--strict also with pkcs11)")
                }
            case "aws-kms":
                guard let externalKey else { throw ValidationError("--provider aws-kms needs --external-key ARN_OR_ID") }
                guard let region = ExternalKeyConfig.region(region, keyID: externalKey) else {
                    throw ValidationError("--provider aws-kms needs --region (or AWS_REGION, or a key ARN)")
                }
                creation.external = ExternalKeyConfig(provider: "aws-kms", keyID: externalKey, region: region,
                                                      endpoint: endpointUrl, profile: profile, strict: strict)
            case "pkcs11":
                guard let module, let token, let pinFile else { throw ValidationError("--provider pkcs11 needs --module, --token and --pin-file") }
                let pinPath = URL(fileURLWithPath: pinFile).standardizedFileURL.path
                let label = objectLabel ?? "kmsfs-" + ID128.random().hex
                creation.external = ExternalKeyConfig(pkcs11Module: module, token: token, objectLabel: label, pinFile: pinPath, strict: strict)
                creation.createInToken = objectLabel == nil
            default:
                throw ValidationError("--provider is local, aws-kms or pkcs11")
            }
            guard case .key(let key) = try fs.perform(.createKey(creation)) else { throw Unexpected() }
            if output.json { try Output.json(key) } else { Output.line("\(key.keyID)") }
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List master keys.")
        @OptionGroup var fs: FilesystemOption
        @Option(help: "Only keys in this state.") var state: KeyState?
        @Option(help: "Only keys with this tag NAME=VALUE.") var tag: KeyTag?
        @OptionGroup var output: JSONOption

        func run() throws {
            guard case .keys(let keys) = try fs.perform(.listKeys(state: state, tag: tag)) else {
                throw Unexpected()
            }
            if output.json { try Output.json(keys); return }
            Output.table(["KEY ID", "ALIASES", "SPEC", "STATE", "VERSION", "ROTATION", "TAGS"], keys.map { k in
                [k.keyID.rawValue.hex, k.aliases.joined(separator: ","), k.spec.rawValue, k.state.rawValue,
                 String(k.currentVersion.rawValue), k.rotationPeriodDays.map { "\($0)d" } ?? "off",
                 k.tags.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: ",")]
            })
        }
    }

    struct Describe: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show a key: state, versions with their usage, rotation, deletion date, policy.")
        @OptionGroup var fs: FilesystemOption
        @Argument(help: "Key id or alias.") var key: String
        @OptionGroup var output: JSONOption

        func run() throws {
            guard case .keyDescription(let description) = try fs.perform(.describeKey(key: key)) else { throw Unexpected() }
            if output.json { try Output.json(description); return }
            let (metadata, versions, floor, external) = (description.metadata, description.versions, description.minDecryptionVersion, description.externalKey)
            let kmsRotation = description.externalRotation
            let policy = description.policy
            Output.line("key id:        \(metadata.keyID)")
            Output.line("aliases:       \(metadata.aliases.joined(separator: ", "))")
            Output.line("description:   \(metadata.description)")
            Output.line("spec / usage:  \(metadata.spec.rawValue) / \(metadata.usage.rawValue)")
            if let external, external.provider == "pkcs11" {
                Output.line("provider:      pkcs11: key '\(external.objectLabel ?? external.keyID)' in token '\(external.token ?? "")' of \(external.module ?? "")"
                            + (metadata.spec != .aes256 ? "" : external.strict == true ? "; strict: the token wraps every data key" : "; data keys wrapped under intermediate keys"))
            } else if let external {
                Output.line("provider:      \(external.provider): \(external.arn ?? external.keyID) in \(external.region)"
                            + (external.endpoint.map { " via \($0)" } ?? "")
                            + (external.strict == true ? "; strict: KMS wraps every data key" : "; data keys wrapped under intermediate keys"))
            } else {
                Output.line("provider:      local (material in the keystore, wrapped under the passphrase)")
            }
            Output.line("state:         \(metadata.state.rawValue) since \(Output.date(metadata.stateChangedAt))")
            if let successor = metadata.successor { Output.line("successor:     \(successor)") }
            if let deletion = metadata.deletionDate, metadata.state == .pendingDeletion { Output.line("deletion date: \(Output.date(deletion))") }
            Output.line("created:       \(Output.date(metadata.createdAt))")
            Output.line("rotation:      \(metadata.rotationPeriodDays.map { "every \($0) days, next \(Output.date(metadata.nextRotationAt))" } ?? "off")")
            if let kmsRotation {
                Output.line("in AWS KMS:    material rotation " + (kmsRotation.enabled ? "on" + (kmsRotation.periodDays.map { ", every \($0) days" } ?? "") : "off")
                            + " (KMS keeps its old material; files need no rekey for it)")
            }
            if let floor { Output.line("cut off below: version \(floor.rawValue) (min-decryption-version)") }
            Output.line("tags:          \(metadata.tags.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: ", "))")
            for op in KeyOperation.allCases {
                Output.line("may \(op.rawValue):".padding(toLength: 15, withPad: " ", startingAt: 0) + (policy[op.rawValue] ?? []).joined(separator: ", "))
            }
            Output.line("")
            Output.table(["VERSION", "CREATED", "STATUS", "FILES+DIRS"], versions.map { v in
                [String(v.version.rawValue), Output.date(v.createdAt),
                 v.version == metadata.currentVersion ? "current" : (v.retired ? "retired" : (floor.map { v.version < $0 } == true ? "cut-off" : "decrypt-only")), String(v.usageCount)]
            })
        }
    }

    struct Rotate: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Rotate a key now: a new version wraps new data keys; old versions keep decrypting.",
            discussion: "An on-demand rotation does not move the automatic schedule; a key may have at most 25 of them.")
        @OptionGroup var fs: FilesystemOption
        @Argument(help: "Key id or alias.") var key: String
        func run() throws {
            guard case .rotated(let version) = try fs.perform(.rotateKey(key: key)) else { throw Unexpected() }
            Output.line("\(key) rotated; current version is \(version)")
        }
    }

    struct Rotation: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Set or turn off automatic rotation.")
        @OptionGroup var fs: FilesystemOption
        @Argument(help: "Key id or alias.") var key: String
        @Option(help: "Rotate every N days (90-2560).") var days: Int?
        @Flag(help: "Turn automatic rotation off.") var off = false
        func validate() throws {
            guard (days != nil) != off else { throw ValidationError("give exactly one of --days N or --off") }
        }
        func run() throws {
            if let days {
                try fs.perform(.setRotation(key: key, days: days))
                Output.line("\(key) rotates every \(days) days")
            } else if off {
                try fs.perform(.setRotation(key: key, days: nil))
                Output.line("automatic rotation of \(key) is off")
            } else {
                throw ValidationError("give exactly one of --days N or --off")
            }
        }
    }

    struct Enable: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Enable a Disabled key, or undeprecate a Deprecated one.")
        @OptionGroup var fs: FilesystemOption
        @Argument(help: "Key id or alias.") var key: String
        func run() throws { try fs.perform(.enableKey(key: key)); Output.line("\(key) is Enabled") }
    }

    struct Disable: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Disable a key: its files can be neither created nor opened until it is enabled.")
        @OptionGroup var fs: FilesystemOption
        @Argument(help: "Key id or alias.") var key: String
        func run() throws { try fs.perform(.disableKey(key: key)); Output.line("\(key) is Disabled") }
    }

    struct ScheduleDeletion: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Schedule a key's destruction after a 7-30 day window; it is destroyed only when no file needs it.",
            discussion: "A key still bound to a directory is not destroyed until the directory is bound to another key; the command warns about such bindings.")
        @OptionGroup var fs: FilesystemOption
        @Argument(help: "Key id or alias.") var key: String
        @Option(help: "Days before destruction (7-30).") var days: Int = 30
        func run() throws {
            guard case .deletionScheduled(let date, let bound, let successor) = try fs.perform(.scheduleDeletion(key: key, days: days)) else {
                throw Unexpected()
            }
            Output.line("\(key) is PendingDeletion; it will be destroyed after \(Output.date(date)) if no file still uses it")
            if !bound.isEmpty {
                Output.note("warning: \(key) is still bound to \(bound.joined(separator: ", ")): "
                            + (successor.map { "new files there go to its successor \($0.rawValue.hex) meanwhile; " }
                               ?? "new files there fail (EKEYREVOKED) meanwhile; ")
                            + "it is not destroyed until you rebind (`kmsfs key bind \(bound[0]) NEWKEY`)")
            }
        }
    }

    struct CancelDeletion: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Cancel a scheduled deletion; the key is left Disabled.")
        @OptionGroup var fs: FilesystemOption
        @Argument(help: "Key id or alias.") var key: String
        func run() throws { try fs.perform(.cancelDeletion(key: key)); Output.line("deletion of \(key) cancelled; it is Disabled") }
    }

    struct Deprecate: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Deprecate a key in favour of a successor: decrypt-only until its files move.")
        @OptionGroup var fs: FilesystemOption
        @Argument(help: "Key id or alias.") var key: String
        @Option(help: "The key that replaces it.") var successor: String
        @Option(help: "How the queued rekey job moves its files: rewrap or reencrypt.") var mode: RekeyMode = .rewrap
        @Option(help: "Throttle the queued rekey job to this many MB/s.") var rate: Double?
        @Flag(help: "Copy the key's encrypt and decrypt grants to the successor, so no one loses access when the files move.")
        var carryPolicy = false
        func run() throws {
            guard case .deprecated(let outcome) = try fs.perform(.deprecateKey(key: key, successor: successor, mode: mode, rate: rate,
                                                                                 carryPolicy: carryPolicy)) else { throw Unexpected() }
            Output.line("\(key) is Deprecated; new data goes to \(successor)")
            if !outcome.lostGrants.isEmpty {
                Output.note("warning: \(successor)'s policy does not grant " + outcome.lostGrants.joined(separator: ", ")
                            + ", which \(key) grants; once the files move they lose that access. "
                            + "Grant it on \(successor) (`kmsfs key policy \(successor) --grant OPERATION SUBJECT`) or deprecate with --carry-policy")
            }
            if let busy = outcome.busy {
                Output.note("rekey job \(busy.id) is \(busy.state.rawValue); start one for \(key) when it ends: `kmsfs rekey start --key \(key)`")
            } else if let job = outcome.queued {
                Output.line(outcome.live ? "rekey job \(job.id) queued: the mount moves \(key)'s files to \(successor) now"
                                         : "rekey job \(job.id) queued: it runs at the next mount, or now with `kmsfs rekey resume --fs …`")
            }
        }
    }

    struct Usage: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Count the files and directories each version of a key wraps.")
        @OptionGroup var fs: FilesystemOption
        @Argument(help: "Key id or alias.") var key: String
        @Flag(help: "Also list the object ids.") var objects = false
        @OptionGroup var output: JSONOption

        func run() throws {
            guard case .usage(let report) = try fs.perform(.keyUsage(key: key, objects: objects)) else { throw Unexpected() }
            if output.json { try Output.json(report); return }
            Output.line("\(key): \(report.total) file(s) and directories")
            Output.table(["VERSION", "COUNT"], report.versions.sorted { UInt32($0.key) ?? 0 < UInt32($1.key) ?? 0 }.map { [$0.key, String($0.value)] })
            for line in report.objects ?? [] { Output.line(line) }
        }
    }

    struct Alias: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Point an alias at a key, or delete it.")
        @OptionGroup var fs: FilesystemOption
        @Argument(help: "The alias, alias/NAME.") var alias: String
        @Argument(help: "Key id or alias to point it at.") var key: String?
        @Flag(help: "Delete the alias.") var delete = false
        func validate() throws {
            guard (key == nil) == delete else { throw ValidationError("give a KEY to point the alias at, or --delete") }
        }
        func run() throws {
            if delete {
                try fs.perform(.deleteAlias(alias: alias))
                Output.line("deleted \(alias.hasPrefix("alias/") ? alias : "alias/" + alias)")
            } else if let key {
                try fs.perform(.setAlias(alias: alias, key: key))
                Output.line("\(alias) → \(key)")
            } else {
                throw ValidationError("give a KEY to point the alias at, or --delete")
            }
        }
    }

    struct TagCommand: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "tag", abstract: "Set or remove tags on a key.")
        @OptionGroup var fs: FilesystemOption
        @Argument(help: "Key id or alias.") var key: String
        @Argument(help: "Tags NAME=VALUE to set.") var tags: [KeyTag] = []
        @Option(help: "A tag name to remove (repeatable).") var remove: [String] = []
        func run() throws {
            guard case .tags(let now) = try fs.perform(.changeTags(key: key, set: tags, remove: remove)) else {
                throw Unexpected()
            }
            Output.line("tags of \(key): " + now.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: ", "))
        }
    }

    struct Bind: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Make a key govern new files under a directory path (nearest bound ancestor wins); without arguments, list bindings.")
        @OptionGroup var fs: FilesystemOption
        @Argument(help: "Directory path inside the filesystem, e.g. /prod.") var path: String?
        @Argument(help: "Key id or alias.") var key: String?
        @Flag(help: "Remove the binding of PATH.") var unbind = false
        @OptionGroup var output: JSONOption

        func run() throws {
            if output.json, path != nil || unbind { throw ValidationError("--json goes with `key bind` without arguments (the list)") }
            switch (path, key, unbind) {
            case (let path?, let key?, false):
                try fs.perform(.bind(path: path, key: key))
                Output.line("\(KeyManager.normalize(path: path)) → \(key)")
            case (let path?, nil, true):
                try fs.perform(.unbind(path: path))
                Output.line("unbound \(KeyManager.normalize(path: path))")
            case (nil, nil, false):
                guard case .bindings(let bindings) = try fs.perform(.listBindings) else { throw Unexpected() }
                if output.json { try Output.json(bindings); return }
                Output.table(["PATH", "KEY"], bindings.map { [$0.path, $0.keyId] })
            default:
                throw ValidationError("use `key bind PATH KEY`, `key bind PATH --unbind`, or `key bind` to list")
            }
        }
    }

    struct RetireVersion: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Retire an old key version that no file uses any more.")
        @OptionGroup var fs: FilesystemOption
        @Argument(help: "Key id or alias.") var key: String
        @Argument(help: "The version to retire.") var version: UInt32
        func run() throws {
            try fs.perform(.retireVersion(key: key, version: KeyVersion(rawValue: version)))
            Output.line("\(key) version \(version) retired")
        }
    }

    struct Rotations: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List a key's rotations: each version made, when, and whether AUTOMATIC or ON_DEMAND.")
        @OptionGroup var fs: FilesystemOption
        @Argument(help: "Key id or alias.") var key: String
        @OptionGroup var output: JSONOption

        struct Entry: Encodable {
            var keyId: String
            var version: UInt32
            var rotationDate: String
            var rotationType: String
        }

        func run() throws {
            guard case .rotations(let rotations) = try fs.perform(.listRotations(key: key)) else { throw Unexpected() }
            let entries = rotations.map { Entry(keyId: $0.keyID.rawValue.hex, version: $0.version.rawValue,
                                                rotationDate: Output.date($0.rotationDate), rotationType: $0.rotationType.rawValue) }
            if output.json { try Output.json(entries); return }
            if entries.isEmpty { Output.line("\(key) has not been rotated"); return }
            Output.table(["VERSION", "DATE", "TYPE"], entries.map { [String($0.version), $0.rotationDate, $0.rotationType] })
        }
    }

    struct MinDecryptionVersion: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "min-decryption-version",
            abstract: "Cut off old versions at once: versions below N refuse to decrypt until the floor is lifted.",
            discussion: "Reversible (unlike retire-version, the material stays): --clear lifts it. Files under cut-off versions read as EKEYREVOKED; `kmsfs rekey start --key KEY:V` still moves them onto the current version.")
        @OptionGroup var fs: FilesystemOption
        @Argument(help: "Key id or alias.") var key: String
        @Argument(help: "The lowest version that may decrypt.") var version: UInt32?
        @Flag(help: "Lift the floor: every version decrypts again.") var clear = false
        func validate() throws {
            guard (version != nil) != clear else { throw ValidationError("give a VERSION or --clear") }
        }
        func run() throws {
            if let version {
                try fs.perform(.setMinDecryptionVersion(key: key, version: KeyVersion(rawValue: version)))
                Output.line("versions of \(key) below \(version) no longer decrypt")
            } else {
                try fs.perform(.setMinDecryptionVersion(key: key, version: nil))
                Output.line("every version of \(key) decrypts again")
            }
        }
    }
}
