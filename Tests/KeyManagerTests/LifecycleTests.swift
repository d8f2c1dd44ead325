import Testing
import ChunkCipher
@testable import KeyManager

/// DESIGN.md §5, written out independently of `KeyLifecycle` so the two
/// must agree: for each action and starting state, the resulting state, or
/// nil for a refusal.
let expectedTable: [String: [KeyState: KeyState?]] = [
    "generateDataKey": [.enabled: .enabled, .disabled: nil, .deprecated: nil, .pendingDeletion: nil, .destroyed: nil],
    "decrypt": [.enabled: .enabled, .disabled: nil, .deprecated: .deprecated, .pendingDeletion: nil, .destroyed: nil],
    "rotate": [.enabled: .enabled, .disabled: nil, .deprecated: nil, .pendingDeletion: nil, .destroyed: nil],
    "enable": [.enabled: .enabled, .disabled: .enabled, .deprecated: .enabled, .pendingDeletion: nil, .destroyed: nil],
    "disable": [.enabled: .disabled, .disabled: .disabled, .deprecated: .disabled, .pendingDeletion: nil, .destroyed: nil],
    "scheduleDeletion": [.enabled: .pendingDeletion, .disabled: .pendingDeletion, .deprecated: .pendingDeletion, .pendingDeletion: nil, .destroyed: nil],
    "cancelDeletion": [.enabled: nil, .disabled: nil, .deprecated: nil, .pendingDeletion: .disabled, .destroyed: nil],
    "deprecate": [.enabled: .deprecated, .disabled: .deprecated, .deprecated: nil, .pendingDeletion: nil, .destroyed: nil],
    // Tags, aliases, policy, grants, rotation settings: any state but Destroyed, which accepts only describe.
    "change": [.enabled: .enabled, .disabled: .disabled, .deprecated: .deprecated, .pendingDeletion: .pendingDeletion, .destroyed: nil],
]

struct TransitionCase: Sendable, CustomTestStringConvertible {
    let action: String
    let state: KeyState
    var testDescription: String { "\(action) in \(state.rawValue)" }
}

let transitionCases = expectedTable.keys.sorted().flatMap { action in KeyState.allCases.map { TransitionCase(action: action, state: $0) } }

@Suite struct LifecycleTests {
    /// A key named alias/subject in `state`, with a data key wrapped while it was Enabled.
    func keyIn(_ state: KeyState, _ scratch: Scratch, _ km: KeyManager) throws -> (KeyID, [UInt8], ID128) {
        let key = try km.createKey(aliases: ["alias/subject"], by: owner)
        let object = ID128.random()
        let dek = try km.generateDataKey(for: object, kind: .file, key: key.keyID, principal: owner)
        let wrapped = dek.wrapped
        switch state {
        case .enabled: break
        case .disabled: try km.disable("alias/subject", by: owner)
        case .deprecated: try km.deprecate("alias/subject", successor: "alias/default", by: owner)
        case .pendingDeletion: _ = try km.scheduleDeletion("alias/subject", days: 7, by: owner)
        case .destroyed:
            try km.forgetUsage(object)
            _ = try km.scheduleDeletion("alias/subject", days: 7, by: owner)
            scratch.clock.advance(days: 8)
            _ = try km.runSchedules()
        }
        #expect(try km.describe(key.keyID.rawValue.hex).metadata.state == state)
        return (key.keyID, wrapped, object)
    }

    @Test("every transition of DESIGN.md §5 is allowed or refused as specified", arguments: transitionCases)
    func transition(_ c: TransitionCase) throws {
        let scratch = Scratch()
        let km = try scratch.create()
        let (id, wrapped, object) = try keyIn(c.state, scratch, km)
        let ref = id.rawValue.hex
        let error = keyError {
            switch c.action {
            case "generateDataKey": _ = try km.generateDataKey(for: .random(), kind: .file, key: id, principal: owner)
            case "decrypt": _ = try km.decryptDataKey(wrapped, for: object, key: id, version: KeyVersion(rawValue: 1), principal: owner)
            case "rotate": try km.rotate(ref, by: owner)
            case "enable": try km.enable(ref, by: owner)
            case "disable": try km.disable(ref, by: owner)
            case "scheduleDeletion": _ = try km.scheduleDeletion(ref, by: owner)
            case "cancelDeletion": try km.cancelDeletion(ref, by: owner)
            case "deprecate": try km.deprecate(ref, successor: "alias/default", by: owner)
            case "change": try km.setTag(ref, name: "team", value: "x", by: owner)
            default: Issue.record("unknown action")
            }
        }
        let expected = expectedTable[c.action]![c.state]!
        if let expected {
            #expect(error == nil, "\(c.action) in \(c.state) should be allowed: \(String(describing: error))")
            km.invalidate(id)
            #expect(try km.describe(ref).metadata.state == expected)
        } else {
            guard case .invalidState(let key, let state, _, _, let remedy) = error else {
                Issue.record("\(c.action) in \(c.state) should be refused with invalidState, got \(String(describing: error))"); return
            }
            #expect(state == c.state)
            #expect(key == (c.state == .destroyed ? ref : "alias/subject"))
            #expect(!remedy.isEmpty)
            let message = error!.description
            #expect(message.contains(c.state.rawValue) && message.contains(key))
            km.invalidate(id)
            #expect(try km.describe(ref).metadata.state == c.state, "a refusal changes nothing")
        }
    }

    @Test("the lifecycle table in the code matches DESIGN.md §5")
    func tableMatches() {
        let actions: [String: LifecycleAction] = [
            "generateDataKey": .generateDataKey, "decrypt": .unwrapDataKey, "rotate": .rotate, "enable": .enable,
            "disable": .disable, "scheduleDeletion": .scheduleDeletion, "cancelDeletion": .cancelDeletion, "deprecate": .deprecate,
            "change": .change,
        ]
        for (name, row) in expectedTable {
            for (state, expected) in row {
                let outcome = KeyLifecycle.outcome(of: actions[name]!, in: state, key: "k")
                switch (outcome, expected) {
                case (.refused, nil): break
                case (.noOp, .some(let s)) where s == state: break
                case (.allowed(let s), .some(let e)) where s == e: break
                default: Issue.record("\(name) in \(state): \(outcome) vs \(String(describing: expected))")
                }
            }
        }
    }
}

@Suite("rekey job paths")
struct RekeyJobPathTests {
    @Test("a job's path reads back as given, also when its sealed form (standard base64) happens to begin with '/' — once taken for a plaintext path, so 1 job in 64 failed with 'cannot walk the filesystem'")
    func sealedPathsBeginningWithSlash() throws {
        let scratch = Scratch()
        let km = try scratch.create()
        var slashFirst = 0
        for _ in 0..<1500 {
            let job = try km.createRekeyJob(source: "alias/default", path: "/data", by: owner)
            #expect(try km.rekeyJob(job.id)?.path == "/data")
            let stored = try km.db.read { db in try String.fetchOne(db, sql: "SELECT path FROM rekey_jobs WHERE id = ?", arguments: [job.id]) }
            if stored?.hasPrefix("/") == true { slashFirst += 1 }
            try km.setRekeyState(job.id, .cancelled, by: owner)
            if slashFirst >= 1 { break }
        }
        #expect(slashFirst >= 1, "no sealed path began with '/' in 1,500 jobs (1 in 64 expected)")
    }
}

@Suite struct AuditActionTests {
    @Test("every record a key's life writes names an AuditAction — a misspelt name cannot reach the log")
    func everyRecordNamesAKnownAction() throws {
        let scratch = Scratch()
        let km = try scratch.create()
        let key = try km.createKey(aliases: ["alias/life"], tags: ["env": "dev"], by: owner)
        let ref = key.keyID.rawValue.hex
        try km.setAlias("alias/life2", to: ref, by: owner)
        try km.setTag(ref, name: "team", value: "a", by: owner)
        try km.setTag(ref, name: "team", value: nil, by: owner)
        try km.grant(.decrypt, to: .uid(4242), on: ref, by: owner)
        try km.revoke(.decrypt, from: .uid(4242), on: ref, by: owner)
        let grant = try km.createGrant(on: ref, grantee: .uid(4242), operations: [.encrypt], expiresAt: nil, by: owner)
        try km.revokeGrant(ref, grantID: grant.grantID, by: owner)
        _ = try km.rotate(ref, by: owner)
        try km.setRotation(ref, days: 90, by: owner)
        try km.setRotation(ref, days: nil, by: owner)
        try km.setMinDecryptionVersion(ref, version: KeyVersion(rawValue: 2), by: owner)
        try km.setMinDecryptionVersion(ref, version: nil, by: owner)
        let object = ID128.random()
        let dataKey = try km.generateDataKey(for: object, kind: .file, key: key.keyID, principal: owner)
        _ = try km.decryptDataKey(dataKey.wrapped, for: object, key: key.keyID, version: dataKey.version, principal: owner)
        #expect(throws: KeyManagerError.self) {
            try km.decryptDataKey(dataKey.wrapped, for: object, key: key.keyID, version: dataKey.version, principal: stranger)
        }
        try km.disable(ref, by: owner)
        #expect(throws: KeyManagerError.self) { try km.generateDataKey(for: .random(), kind: .file, key: key.keyID, principal: owner) }
        try km.enable(ref, by: owner)
        try km.bind(path: "/team", to: ref, by: owner)
        let job = try km.createRekeyJob(source: ref, by: owner)
        try km.setRekeyState(job.id, .cancelled, by: owner)
        try km.scheduleDeletion(ref, by: owner)
        try km.cancelDeletion(ref, by: owner)

        let records = try km.auditRecords(AuditFilter(), limit: nil)
        let unknown = records.map(\.event).filter { AuditAction(rawValue: $0) == nil }
        #expect(unknown.isEmpty, "\(unknown)")
        let seen = Set(records.map(\.event))
        for expected: AuditAction in [.createKey, .createAlias, .tagResource, .untagResource, .putKeyPolicy, .createGrant, .revokeGrant,
                                      .rotateKeyOnDemand, .enableKeyRotation, .disableKeyRotation, .setMinDecryptionVersion,
                                      .generateDataKey, .decrypt, .disableKey, .enableKey, .bindKey, .startRekey, .rekeyCancelled,
                                      .scheduleKeyDeletion, .cancelKeyDeletion] {
            #expect(seen.contains(expected.rawValue), "no \(expected.rawValue) record")
        }
    }
}
