// kmsfs-bench: micro-benchmarks of the library layers, compared in the same
// run with OpenSSL's own `openssl speed`. Usage: kmsfs-bench cipher [MiB]
import ChunkCipher
import KeyManager
import Dispatch
import Foundation

func now() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

/// Best of three runs: the machine's other load only ever slows a run down.
func bestOf3(chunkSize: Int, totalBytes: Int, open: Bool, lanes: Int) throws -> Double {
    try (0..<3).map { _ in try measure(chunkSize: chunkSize, totalBytes: totalBytes, open: open, lanes: lanes) }.max() ?? 0
}

/// MB/s (10^6 bytes) of sealing or opening `totalBytes` in `chunkSize` chunks.
func measure(chunkSize: Int, totalBytes: Int, open: Bool, lanes: Int) throws -> Double {
    let layout = try ChunkLayout(chunkSize: chunkSize)
    let cipher = try FileCipher(key: .random(), fileID: .random(), layout: layout)
    // A 1 MiB run per lane (cache-resident, as openssl speed's buffer is), reused: measures the cipher, not the allocator or page faults.
    let runChunks = max(1, (1 << 20) / chunkSize)
    let plain = [UInt8](repeating: 0x5A, count: runChunks * chunkSize)
    var sealedRuns = [[UInt8]]()
    var outputs = [[UInt8]]()
    for _ in 0..<lanes {
        var s = [UInt8](repeating: 0, count: runChunks * layout.sealedChunkSize)
        try plain.withUnsafeBytes { p in try s.withUnsafeMutableBytes { o in
            _ = try ChunkPipeline.seal(cipher, first: ChunkIndex(0), plaintext: p, into: o, workers: 1) } }
        sealedRuns.append(s)
        outputs.append([UInt8](repeating: 0, count: open ? plain.count : s.count))
    }
    let rounds = max(1, totalBytes / (runChunks * chunkSize) / lanes)
    let start = now()
    nonisolated(unsafe) var outs = outputs
    let runs = sealedRuns
    let failures = Atomic()
    DispatchQueue.concurrentPerform(iterations: lanes) { lane in
        runs[lane].withUnsafeBytes { sealed in
            outs[lane].withUnsafeMutableBytes { out in
                plain.withUnsafeBytes { p in
                    for _ in 0..<rounds {
                        do {
                            if open {
                                _ = try ChunkPipeline.open(cipher, first: ChunkIndex(0), sealed: sealed, into: out, workers: 1)
                            } else {
                                _ = try ChunkPipeline.seal(cipher, first: ChunkIndex(0), plaintext: p, into: out, workers: 1)
                            }
                        } catch { failures.bump() }
                    }
                }
            }
        }
    }
    let elapsed = now() - start
    precondition(failures.value == 0, "cipher failures during benchmark")
    return Double(rounds * lanes * runChunks * chunkSize) / elapsed / 1e6
}

final class Atomic: @unchecked Sendable {
    private let lock = NSLock()
    private var count = 0
    func bump() { lock.lock(); count += 1; lock.unlock() }
    var value: Int { lock.lock(); defer { lock.unlock() }; return count }
}

/// `openssl speed -evp aes-256-gcm` single-core MB/s for one buffer size.
func opensslSpeed(bytes: Int, decrypt: Bool) -> Double? {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/usr/bin/openssl")
    process.arguments = ["speed", "-elapsed", "-mr", "-seconds", "1", "-bytes", String(bytes)]
        + (decrypt ? ["-decrypt"] : []) + ["-evp", "aes-256-gcm"]
    let pipe = Pipe()
    process.standardOutput = pipe
    process.standardError = FileHandle.nullDevice
    guard (try? process.run()) != nil else { return nil }
    let data = pipe.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    let text = String(decoding: data, as: UTF8.self)
    // "+F:<n>:AES-256-GCM:<bytes per second>"
    for line in text.split(separator: "\n") where line.hasPrefix("+F:") {
        if let value = line.split(separator: ":").last.flatMap({ Double($0) }) { return value / 1e6 }
    }
    return nil
}

func cipherBench(totalMiB: Int) throws {
    let total = totalMiB << 20
    let cores = ProcessInfo.processInfo.activeProcessorCount
    print("kmsfs cipher benchmark: \(totalMiB) MiB per cell (best of 3), \(cores) cores, MB/s = 10^6 bytes/s")
    print("chunk     seal-1t   open-1t  seal-all  open-all  openssl-enc  openssl-dec  seal/ossl  open/ossl")
    var at64: (seal: Double, open: Double, speedup: Double) = (0, 0, 0)
    for kib in [4, 16, 64, 256] {
        let size = kib * 1024
        let seal1 = try bestOf3(chunkSize: size, totalBytes: total, open: false, lanes: 1)
        let open1 = try bestOf3(chunkSize: size, totalBytes: total, open: true, lanes: 1)
        let sealN = try bestOf3(chunkSize: size, totalBytes: total, open: false, lanes: cores)
        let openN = try bestOf3(chunkSize: size, totalBytes: total, open: true, lanes: cores)
        let osslEnc = opensslSpeed(bytes: size, decrypt: false) ?? .nan
        let osslDec = opensslSpeed(bytes: size, decrypt: true) ?? .nan
        let row = [seal1, open1, sealN, openN, osslEnc, osslDec].map { String(format: "%9.0f", $0) }.joined(separator: " ")
        print(String(format: "%3d KiB ", kib) + row + String(format: "      %5.2fx      %5.2fx", seal1 / osslEnc, open1 / osslDec))
        if kib == 64 {
            at64 = (seal1 / osslEnc, open1 / osslDec, (sealN + openN) / (seal1 + open1))
        }
    }
    print(String(format: "cipher: seal %.2fx open %.2fx of openssl at 64 KiB; parallel speedup %.2fx", at64.seal, at64.open, at64.speedup))
}

/// Envelope unwraps per second and the scrypt unlock time at the default cost.
func keyManagerBench() throws {
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("kmsfs-bench-\(UUID().uuidString)").path
    defer { try? FileManager.default.removeItem(atPath: dir) }
    let principal = Principal(uid: getuid(), gid: getgid())
    let phrase = Array("benchmark passphrase".utf8)
    var start = now()
    let created = try KeyManager.create(in: dir, passphrase: SecretKey(copying: phrase), options: FilesystemOptions(), creator: principal)
    let createSeconds = now() - start
    _ = created
    start = now()
    let manager = try KeyManager.open(in: dir, passphrase: SecretKey(copying: phrase))
    let unlock = now() - start
    let key = try manager.resolve("alias/default")
    // As the mount runs it: usage index and audit records group-committed.
    try manager.startBatchingUsage()
    defer { try? manager.stopBatchingUsage() }
    var wrapped = [(ID128, KeyVersion, [UInt8])]()
    start = now()
    for _ in 0..<2000 {
        let object = ID128.random()
        let dek = try manager.generateDataKey(for: object, kind: .file, key: key, principal: principal)
        wrapped.append((object, dek.version, dek.wrapped))
    }
    let generatePerSecond = 2000 / (now() - start)
    start = now()
    var n = 0
    while now() - start < 2 {
        let (object, version, blob) = wrapped[n % wrapped.count]
        _ = try manager.decryptDataKey(blob, for: object, key: key, version: version, principal: principal)
        n += 1
    }
    let unwrapPerSecond = Double(n) / (now() - start)
    // Audit records alone: group-committed (as mounted) and one transaction each (offline).
    let record = AuditEvent(.decrypt, key: key, version: KeyVersion(rawValue: 1), principal: principal, object: .random())
    start = now()
    for _ in 0..<50_000 { manager.audit(record) }
    try manager.flushUsage()
    let batched = 50_000 / (now() - start)
    try manager.stopBatchingUsage()
    start = now()
    for _ in 0..<2000 { manager.audit(record) }
    let single = 2000 / (now() - start)
    try manager.startBatchingUsage()
    print(String(format: "audit: %.0f records/s group-committed, %.0f records/s one transaction each (%.0fx)", batched, single, batched / single))
    print(String(format: "scrypt N=2^%d: init %.2f s, unlock %.2f s", ScryptParameters.strong.logN, createSeconds, unlock))
    print(String(format: "keymanager: %.0f unwraps/s, %.0f data keys generated/s (each audited and recorded in the usage index, group-committed); unlock %.2f s",
                 unwrapPerSecond, generatePerSecond, unlock))
}

/// Per-file setup costs: what creating or opening one file spends in crypto.
func setupBench() throws {
    let layout = try ChunkLayout(chunkSize: 16384)
    let key = SecretKey.random()
    func time(_ name: String, _ n: Int, _ body: () throws -> Void) rethrows {
        let start = now()
        for _ in 0..<n { try body() }
        print(name.padding(toLength: 28, withPad: " ", startingAt: 0) + String(format: "%8.2f µs", (now() - start) / Double(n) * 1e6))
    }
    try time("SecretKey.random", 20000) { _ = SecretKey.random() }
    try time("AESGCM init", 20000) { _ = try AESGCM(key: key) }
    try time("HMAC-SHA256 commitment", 20000) { _ = KeyDerivation.hmacSHA256(key: key, message: [UInt8](repeating: 1, count: 40)) }
    try time("FileCipher init", 20000) { _ = try FileCipher(key: key, fileID: .random(), layout: layout) }
    let names = try NameCipher(nameKey: key, directoryID: .random())
    try time("NameCipher.encrypt", 20000) { _ = try names.encrypt("some-file-name.c") }
    let enc = try names.encrypt("some-file-name.c")
    try time("NameCipher.decrypt", 20000) { _ = try names.decrypt(enc) }
}

let arguments = CommandLine.arguments.dropFirst()
switch arguments.first {
case "setup":
    try setupBench()
case "keymanager":
    try keyManagerBench()
case "cipher":
    try cipherBench(totalMiB: arguments.dropFirst().first.flatMap { Int($0) } ?? 256)
default:
    print("usage: kmsfs-bench cipher [MiB] | keymanager")
    exit(2)
}
