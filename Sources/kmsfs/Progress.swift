import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// Feedback for a long operation run at a terminal, on stderr: a bar with
/// rate and ETA redrawn in place on a TTY (at most ten times a second),
/// plain lines every few seconds otherwise (a log, a pipe, systemd's
/// journal), nothing under --json. `KMSFS_PROGRESS_SECONDS` sets the
/// interval of the plain lines (5 s by default; tests shorten it).
final class ProgressMeter {
    enum Style { case bar, lines, silent }
    let label: String
    let unit: String
    let style: Style
    let started = Date()
    private var lastDrawn = Date.distantPast
    private let interval: Double
    private var drew = false

    init(_ label: String, unit: String, json: Bool) {
        self.label = label
        self.unit = unit
        style = json ? .silent : (isatty(2) == 1 ? .bar : .lines)
        interval = style == .bar ? 0.1 : (ProcessInfo.processInfo.environment["KMSFS_PROGRESS_SECONDS"].flatMap(Double.init) ?? 5)
    }

    /// `done` of `total` units (and bytes for the rate), redrawn when due.
    func update(_ done: Int, of total: Int, bytes: Int? = nil, force: Bool = false) {
        guard style != .silent else { return }
        let now = Date()
        guard force || now.timeIntervalSince(lastDrawn) >= interval else { return }
        lastDrawn = now
        let elapsed = now.timeIntervalSince(started)
        let fraction = total > 0 ? min(1, Double(done) / Double(total)) : 0
        let eta = fraction > 0 && fraction < 1 && elapsed > 0.5 ? elapsed * (1 - fraction) / fraction : nil
        let rate = bytes.flatMap { elapsed > 0 ? String(format: ", %.1f MB/s", Double($0) / elapsed / 1e6) : nil } ?? ""
        let etaText = eta.map { String(format: ", ETA %@", Self.duration($0)) } ?? ""
        switch style {
        case .bar:
            let width = 30, filled = Int(Double(width) * fraction)
            let bar = String(repeating: "#", count: filled) + String(repeating: ".", count: width - filled)
            write("\r\(label) [\(bar)] \(done)/\(total) \(unit)\(rate)\(etaText)\u{1B}[K")
            drew = true
        case .lines:
            write("\(label): \(done) of \(total) \(unit) (\(Int(fraction * 100))%)\(rate)\(etaText)\n")
        case .silent:
            break
        }
    }

    /// A step of an operation without a count (a key derivation, a write).
    func step(_ text: String) {
        switch style {
        case .bar: write("\r\(label): \(text)\u{1B}[K"); drew = true
        case .lines: write("\(label): \(text)\n")
        case .silent: break
        }
    }

    /// Ends the bar's line.
    func finish() {
        if style == .bar, drew { write("\r\u{1B}[K") }
    }

    static func duration(_ seconds: Double) -> String {
        seconds < 90 ? String(format: "%.0f s", seconds) : seconds < 5400 ? String(format: "%.0f min", seconds / 60) : String(format: "%.1f h", seconds / 3600)
    }

    private func write(_ text: String) { FileHandle.standardError.write(Data(text.utf8)) }
}
