import Foundation
import Synchronization
import Testing
import ChunkCipher
@testable import KeyManager

/// A clock tests move by hand.
final class TestClock: Sendable {
    private let now = Mutex<Double>(1_800_000_000)
    var time: Double { now.withLock { $0 } }
    func advance(days: Double) { now.withLock { $0 += days * 86_400 } }
    var function: @Sendable () -> Double { { [self] in self.time } }
}

let owner = Principal(uid: 1000, gid: 1000, pid: 1)
let stranger = Principal(uid: 4242, gid: 4242, pid: 2)
let fastKDF = ScryptParameters(logN: 10)

func passphrase(_ text: String = "correct horse battery staple") -> SecretKey {
    SecretKey(copying: Array(text.utf8))
}

/// A fresh keystore in a temporary directory, removed at deinit.
final class Scratch {
    let root: String
    var keystore: String { root + "/.kmsfs" }
    let clock = TestClock()

    init() {
        root = FileManager.default.temporaryDirectory.appendingPathComponent("kmsfs-test-\(UUID().uuidString)").path
        try? FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
    }

    deinit { try? FileManager.default.removeItem(atPath: root) }

    func create(passphrase text: String = "correct horse battery staple") throws -> KeyManager {
        try KeyManager.create(in: keystore, passphrase: passphrase(text), options: FilesystemOptions(scrypt: fastKDF),
                              creator: owner, clock: clock.function)
    }

    func open(passphrase text: String = "correct horse battery staple") throws -> KeyManager {
        try KeyManager.open(in: keystore, passphrase: passphrase(text), clock: clock.function)
    }

    /// SHA-256 of the main database file: what "modified" means for a
    /// keystore (SQLite's -shm index is rebuilt by every opener).
    func databaseDigest() -> [UInt8] {
        let data = (try? [UInt8](Data(contentsOf: URL(fileURLWithPath: keystore + "/" + KeyManager.databaseName)))) ?? []
        return KeyDerivation.sha256(data)
    }

    /// Every byte of the keystore's files (database, WAL, shared memory).
    func databaseBytes() -> [UInt8] {
        let files = (try? FileManager.default.contentsOfDirectory(atPath: keystore)) ?? []
        return files.sorted().flatMap { name -> [UInt8] in
            (try? [UInt8](Data(contentsOf: URL(fileURLWithPath: keystore + "/" + name)))) ?? []
        }
    }
}

extension Array where Element == UInt8 {
    func contains(subsequence needle: [UInt8]) -> Bool {
        guard !needle.isEmpty, needle.count <= count else { return false }
        let first = needle[0]
        var i = 0
        while i <= count - needle.count {
            if self[i] == first && Array(self[i..<(i + needle.count)]) == needle { return true }
            i += 1
        }
        return false
    }
}

func keyError(_ body: () throws -> Void) -> KeyManagerError? {
    do { try body(); return nil } catch let error as KeyManagerError { return error } catch {
        Issue.record("not a KeyManagerError: \(error)")
        return nil
    }
}

func bytes(of key: borrowing SecretKey) -> [UInt8] {
    key.withUnsafeBytes { Array($0) }
}
