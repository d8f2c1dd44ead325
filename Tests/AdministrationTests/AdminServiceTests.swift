import ChunkCipher
import Foundation
import Synchronization
import Testing
@testable import Administration
@testable import KeyManager

private let owner = Principal(uid: 1000, gid: 1000, pid: 1)
private let stranger = Principal(uid: 4242, gid: 4242, pid: 2)

/// A keystore in a temporary directory (removed at deinit), made with a fast KDF.
private final class Keystore {
    let root = FileManager.default.temporaryDirectory.appendingPathComponent("kmsfs-admin-\(UUID().uuidString)").path
    let manager: KeyManager
    init() throws {
        try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
        manager = try KeyManager.create(in: root + "/.kmsfs", passphrase: SecretKey(copying: Array("correct horse battery staple".utf8)),
                                        options: FilesystemOptions(scrypt: ScryptParameters(logN: 10)), creator: owner)
    }
    deinit { try? FileManager.default.removeItem(atPath: root) }
}

/// Counts what the admin plane asks of a live mount's rekey worker.
private final class RekeyCalls: RekeyDriver {
    let wakes = Atomic<Int>(0)
    let interrupts = Atomic<Int>(0)
    func wake() { wakes.add(1, ordering: .relaxed) }
    func interruptAndWait() { interrupts.add(1, ordering: .relaxed) }
}

@Suite("the typed admin protocol: requests on the wire, and the service that carries them out")
struct AdminServiceTests {
    static let samples: [AdminRequest] = [
        .createKey(KeyCreation(spec: .eccP256, description: "signing", aliases: ["alias/s"], tags: ["env": "prod"], rotationDays: nil,
                               external: ExternalKeyConfig(provider: "aws-kms", keyID: "k", region: "eu-west-1"))),
        .listKeys(state: .enabled, tag: KeyTag(name: "env", value: "prod")), .describeKey(key: "alias/a"), .rotateKey(key: "alias/a"),
        .setRotation(key: "alias/a", days: nil), .enableKey(key: "k"), .disableKey(key: "k"), .scheduleDeletion(key: "k", days: 7),
        .cancelDeletion(key: "k"), .deprecateKey(key: "a", successor: "b", mode: .reencrypt, rate: 2.5, carryPolicy: true),
        .keyUsage(key: "k", objects: true), .setAlias(alias: "alias/x", key: "k"), .deleteAlias(alias: "alias/x"),
        .changeTags(key: "k", set: [KeyTag(name: "a", value: "=b")], remove: ["c"]),
        .changePolicy(key: "k", grant: [PolicyChange(.decrypt, .gid(100)), PolicyChange(.encrypt, .anyone)], revoke: [PolicyChange(.administer, .uid(7))]),
        .bind(path: "/prod", key: "k"), .unbind(path: "/prod"), .listBindings, .retireVersion(key: "k", version: KeyVersion(rawValue: 2)),
        .listRotations(key: "k"), .setMinDecryptionVersion(key: "k", version: nil), .sign(key: "k", message: Data([0, 255, 10])),
        .verify(key: "k", message: Data(), signature: Data([1])), .getPublicKey(key: "k"),
        .createGrant(key: "k", grantee: .uid(5), operations: [.decrypt], expiresAt: 1.5), .listGrants(key: "k"), .revokeGrant(key: "k", grantID: "g"),
        .accessReport(unusedDays: 90), .verifyAudit, .auditRecords(filter: AuditFilter(since: 1, key: "k", uid: 0), limit: nil),
        .auditPaths(mode: .plain, hash: "/a"), .alerts(change: AlertChange()),
        .startRekey(RekeyStart(source: nil, target: "b", mode: .rewrap, path: "/p", rate: nil, workers: 2)), .rekeyStatus,
        .changeRekey(state: .paused), .resumeRekey(rate: 1), .createBackup(out: "/tmp/b", passphraseFile: "/tmp/p"),
    ]

    @Test("every request survives JSON unchanged, and only sign, verify, get-public-key and giving up a grant count as key use")
    func wireFormat() throws {
        for request in Self.samples {
            let data = try JSONEncoder().encode(request)
            #expect(try JSONDecoder().decode(AdminRequest.self, from: data) == request, "\(String(decoding: data, as: UTF8.self))")
        }
        let keyUse = Self.samples.filter(\.isKeyUse).map { String(describing: $0).prefix(while: { $0 != "(" }) }
        #expect(keyUse == ["sign", "verify", "getPublicKey", "revokeGrant"])
        // Bytes travel as base64, so a 256 KiB message fits in the socket's 1 MiB request bound.
        let big = try JSONEncoder().encode(AdminRequest.sign(key: "k", message: Data(repeating: 0xFF, count: 256 << 10)))
        #expect(big.count < ControlServer.maxRequest)
    }

    @Test("a keystore failure reaches the caller with its code and message; a value the request may not carry is refused")
    func failures() throws {
        let store = try Keystore()
        let service = AdminService(manager: store.manager)
        do {
            _ = try service.perform(.disableKey(key: "alias/none"), as: owner)
            Issue.record("a missing key was disabled")
        } catch {
            #expect(error.code == "NotFoundException" && error.message.contains("alias/none"), "\(error)")
        }
        do {
            _ = try service.perform(.changeRekey(state: .running), as: owner)
            Issue.record("a job cannot be set running by changeRekey")
        } catch {
            #expect(error.code == "ValidationException")
        }
        // Policy still decides: a stranger may not disable the owner's key, offline or live.
        for live in [false, true] {
            let svc = AdminService(manager: store.manager, rekey: live ? RekeyCalls() : nil, owner: owner.uid)
            do {
                _ = try svc.perform(.disableKey(key: "alias/default"), as: stranger)
                Issue.record("stranger disabled a key")
            } catch {
                #expect(error.code == "AccessDeniedException", "\(error)")
            }
        }
    }

    @Test("on a live mount a peer other than root and the mounting user reads only its own trail and may not set an alert command or write a backup")
    func livePeers() throws {
        let store = try Keystore()
        let calls = RekeyCalls()
        let live = AdminService(manager: store.manager, rekey: calls, owner: owner.uid)
        _ = try live.perform(.rotateKey(key: "alias/default"), as: owner)
        guard case .auditRecords(let all, let filesystem) = try live.perform(.auditRecords(filter: AuditFilter(), limit: nil), as: owner) else {
            Issue.record("not records"); return
        }
        #expect(all.contains { $0.event == "RotateKeyOnDemand" && $0.uid == Int(owner.uid) })
        #expect(filesystem == store.manager.filesystemID.hex)
        guard case .auditRecords(let seen, _) = try live.perform(.auditRecords(filter: AuditFilter(), limit: nil), as: stranger) else {
            Issue.record("not records"); return
        }
        #expect(!seen.contains { $0.uid == Int(owner.uid) }, "\(seen.map(\.event))")
        // Naming someone else as the viewer changes nothing.
        var posing = AuditFilter()
        posing.viewer = owner
        guard case .auditRecords(let posed, _) = try live.perform(.auditRecords(filter: posing, limit: nil), as: stranger) else {
            Issue.record("not records"); return
        }
        #expect(!posed.contains { $0.uid == Int(owner.uid) })

        var change = AlertChange()
        change.command = "touch /tmp/pwned"
        #expect(throws: AdminFailure.self) { try live.perform(.alerts(change: change), as: stranger) }
        let out = store.root + "/backup"
        let pass = store.root + "/pass"
        try "backup passphrase 123".write(toFile: pass, atomically: true, encoding: .utf8)
        #expect(throws: AdminFailure.self) { try live.perform(.createBackup(out: out, passphraseFile: pass), as: stranger) }
        #expect(!FileManager.default.fileExists(atPath: out))
        // Nor make the daemon load a PKCS#11 module or call AWS with its credentials.
        let evil = ExternalKeyConfig(pkcs11Module: store.root + "/evil.so", token: "t", objectLabel: "l", pinFile: "/etc/shadow")
        do {
            _ = try live.perform(.createKey(KeyCreation(spec: nil, description: "", aliases: [], tags: [:], rotationDays: nil,
                                                        external: evil, createInToken: true)), as: stranger)
            Issue.record("a stranger made the daemon load a module")
        } catch {
            #expect(error.code == "AccessDeniedException" && error.message.contains("PKCS#11"), "\(error)")
        }
        let aws = ExternalKeyConfig(provider: "aws-kms", keyID: "k", region: "eu-west-1", endpoint: "http://127.0.0.1:9")
        #expect(throws: AdminFailure.self) {
            try live.perform(.createKey(KeyCreation(spec: nil, description: "", aliases: [], tags: [:], rotationDays: nil, external: aws)), as: stranger)
        }
        // The mounting user may; the file is private and names its signer.
        guard case .backupWritten(let bytes, _, let fingerprint) = try live.perform(.createBackup(out: out, passphraseFile: pass), as: owner) else {
            Issue.record("no backup"); return
        }
        let attributes = try FileManager.default.attributesOfItem(atPath: out)
        #expect((attributes[.size] as? Int) == bytes && (attributes[.posixPermissions] as? Int) == 0o600 && fingerprint.hasPrefix("sha256:"))
        #expect(throws: AdminFailure.self) { try live.perform(.createBackup(out: out, passphraseFile: pass), as: owner) }

        // Deprecation queues a rekey job and wakes the worker; pausing it waits for the worker.
        guard case .key(let successor) = try live.perform(.createKey(KeyCreation(spec: nil, description: "", aliases: ["alias/next"], tags: [:], rotationDays: nil)), as: owner),
              case .deprecated(let outcome) = try live.perform(.deprecateKey(key: "alias/default", successor: "alias/next", mode: .rewrap, rate: nil, carryPolicy: true), as: owner) else {
            Issue.record("no deprecation"); return
        }
        #expect(outcome.live && outcome.queued?.targetKey == successor.keyID && outcome.busy == nil)
        #expect(calls.wakes.load(ordering: .relaxed) == 1)
        guard case .rekeyJob(let paused, true) = try live.perform(.changeRekey(state: .paused), as: owner) else { Issue.record("no job"); return }
        #expect(paused.state == .paused && calls.interrupts.load(ordering: .relaxed) == 1)
    }

    @Test("mount table fields decode /proc's octal escapes (space, tab, newline, backslash) and keep anything else as it is")
    func mountTableEscapes() {
        #expect(MountTable.unescape("/mnt/a\\040b\\011c\\012d\\134e") == "/mnt/a b\tc\nd\\e")
        // Not an escape: a digit past 7, a first digit past 3, too few digits.
        #expect(MountTable.unescape("/x\\080/y\\400/z\\04") == "/x\\080/y\\400/z\\04")
    }
}
