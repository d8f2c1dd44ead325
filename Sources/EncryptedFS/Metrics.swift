import FUSEBridge
import Foundation
import KeyManager

/// The daemon's metrics in the Prometheus text format (version 0.0.4), written
/// every `interval` seconds to a file for node_exporter's textfile collector
/// (`kmsfs mount --metrics-file /var/lib/node_exporter/textfile/kmsfs.prom`):
/// written beside it and renamed over it, so the collector never reads half
/// a file. Counters count since the mount started.
// @unchecked: only its DispatchSourceTimer (a let, used from start and stop) is not marked Sendable.
public final class MetricsWriter: @unchecked Sendable {
    let path: String
    let interval: Double
    let filesystem: EncryptedFileSystem
    let mountpoint: String
    let started: Double
    private let timer: DispatchSourceTimer

    public init(path: String, interval: Double, filesystem: EncryptedFileSystem, mountpoint: String, started: Double) {
        self.path = path
        self.interval = max(1, interval)
        self.filesystem = filesystem
        self.mountpoint = mountpoint
        self.started = started
        timer = DispatchSource.makeTimerSource(queue: .global(qos: .utility))
    }

    public func start() {
        filesystem.keyManager.countKeyUse()
        write()
        timer.schedule(deadline: .now() + interval, repeating: interval)
        timer.setEventHandler { [weak self] in self?.write() }
        timer.resume()
    }

    /// Stops, writing a last snapshot.
    public func stop() {
        timer.cancel()
        write()
    }

    func write() {
        let scratch = path + ".tmp"
        guard FileManager.default.createFile(atPath: scratch, contents: Data(render().utf8), attributes: [.posixPermissions: 0o644]) else { return }
        if rename(scratch, path) != 0 { unlink(scratch) }
    }

    /// A label value, escaped as the text format wants.
    static func label(_ value: String) -> String {
        "\"" + value.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"")
            .replacingOccurrences(of: "\n", with: "\\n") + "\""
    }

    /// errno names for the label (the number where kmsfs knows no name).
    static let errnoNames: [Int32: String] = [
        EPERM: "EPERM", ENOENT: "ENOENT", EIO: "EIO", EBADF: "EBADF", EACCES: "EACCES", EEXIST: "EEXIST", EXDEV: "EXDEV",
        ENOTDIR: "ENOTDIR", EISDIR: "EISDIR", EINVAL: "EINVAL", EFBIG: "EFBIG", ENOSPC: "ENOSPC", EROFS: "EROFS", EMLINK: "EMLINK",
        ERANGE: "ERANGE", ENAMETOOLONG: "ENAMETOOLONG", ENOTEMPTY: "ENOTEMPTY", ELOOP: "ELOOP", ENODATA: "ENODATA",
        EOPNOTSUPP: "EOPNOTSUPP", EKEYREVOKED: "EKEYREVOKED", EKEYREJECTED: "EKEYREJECTED", E2BIG: "E2BIG", ENOSYS: "ENOSYS",
        EDQUOT: "EDQUOT", EMFILE: "EMFILE", ENFILE: "ENFILE", EBUSY: "EBUSY", ENXIO: "ENXIO", ETXTBSY: "ETXTBSY",
    ]

    func render() -> String {
        var out = ""
        let mount = "mountpoint=" + Self.label(mountpoint)
        func metric(_ name: String, _ type: String, _ help: String, _ samples: [(labels: String, value: Double)]) {
            out += "# HELP \(name) \(help)\n# TYPE \(name) \(type)\n"
            for sample in samples {
                let labels = sample.labels.isEmpty ? mount : mount + "," + sample.labels
                let value = sample.value.rounded() == sample.value && abs(sample.value) < 1e15 ? String(Int64(sample.value)) : String(sample.value)
                out += "\(name){\(labels)} \(value)\n"
            }
        }
        let stats = filesystem.statistics
        let counters = RequestCounters.shared
        metric("kmsfs_up", "gauge", "1 while the filesystem is mounted.", [("", 1)])
        metric("kmsfs_start_time_seconds", "gauge", "When the mount started, seconds since 1970.", [("", started)])
        metric("kmsfs_requests_total", "counter", "FUSE requests answered.", [("", Double(counters.requests.load(ordering: .relaxed)))])
        metric("kmsfs_request_errors_total", "counter", "FUSE requests answered with an error, by errno.",
               counters.errorCounts.sorted { $0.key < $1.key }.map { ("errno=" + Self.label(Self.errnoNames[$0.key] ?? String($0.key)), Double($0.value)) })
        metric("kmsfs_read_bytes_total", "counter", "Plaintext bytes read through the mount.", [("", Double(stats.bytesRead))])
        metric("kmsfs_written_bytes_total", "counter", "Plaintext bytes written through the mount.", [("", Double(stats.bytesWritten))])
        metric("kmsfs_denied_requests_total", "counter", "Requests a key policy refused.", [("", Double(stats.deniedRequests))])
        metric("kmsfs_integrity_failures_total", "counter", "Chunks, headers or names that did not authenticate (read as EIO).",
               [("", Double(stats.integrityFailures))])
        metric("kmsfs_open_files", "gauge", "Files open through the mount.", [("", Double(stats.openFiles))])
        metric("kmsfs_cached_inodes", "gauge", "Inodes the kernel holds references to.", [("", Double(stats.nodes))])
        metric("kmsfs_backing_descriptors", "gauge", "Backing descriptors the cached inodes hold (the rest are parked: a file handle each).",
               [("", Double(stats.descriptors))])
        metric("kmsfs_parked_descriptors_total", "counter", "Descriptors the daemon closed to stay under its limit, keeping the entry's file handle.",
               [("", Double(stats.parkedDescriptors))])
        metric("kmsfs_reopened_descriptors_total", "counter", "Parked descriptors opened again from their file handle.",
               [("", Double(stats.reopenedDescriptors))])
        metric("kmsfs_polled_requests_total", "counter", "FUSE requests a worker found by polling after its last one, not by waking up.",
               [("", Double(stats.polledRequests))])
        metric("kmsfs_writes_behind_total", "counter", "Streaming appends answered before their ciphertext reached the backing file (space reserved first).",
               [("", Double(stats.writesBehind))])
        metric("kmsfs_forget_requests_total", "counter", "Entries the daemon asked the kernel to forget to stay under its descriptor limit.",
               [("", Double(stats.forgottenOnRequest))])
        let manager = filesystem.keyManager
        let aliases = Dictionary(((try? manager.listKeys()) ?? []).map { ($0.keyID, $0.aliases.first ?? "") }, uniquingKeysWith: { a, _ in a })
        let uses = manager.keyUseCounts.sorted { ($0.key.key.rawValue.hex, $0.key.event.rawValue, $0.key.outcome.rawValue) < ($1.key.key.rawValue.hex, $1.key.event.rawValue, $1.key.outcome.rawValue) }
        metric("kmsfs_key_operations_total", "counter",
               "Key operations by key, operation (GenerateDataKey: a data key made; Decrypt: one unwrapped; ReEncrypt, Authorize, ...) and outcome.",
               uses.map { use in
                   ("key=\(Self.label(use.key.key.rawValue.hex)),alias=\(Self.label(aliases[use.key.key] ?? "")),operation=\(Self.label(use.key.event.rawValue)),outcome=\(Self.label(use.key.outcome.rawValue))",
                    Double(use.value))
               })
        if let job = try? manager.latestRekeyJob() {
            let labels = "job=\(Self.label(String(job.id))),state=\(Self.label(job.state.rawValue))"
            metric("kmsfs_rekey_files", "gauge", "Files of the latest rekey job: done and total.",
                   [(labels + ",of=\"done\"", Double(job.filesDone)), (labels + ",of=\"total\"", Double(job.filesTotal))])
            metric("kmsfs_rekey_bytes", "gauge", "Bytes of the latest rekey job: done and total.",
                   [(labels + ",of=\"done\"", Double(job.bytesDone)), (labels + ",of=\"total\"", Double(job.bytesTotal))])
        }
        return out
    }
}
