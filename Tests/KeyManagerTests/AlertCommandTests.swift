import Foundation
import Testing
@testable import KeyManager

@Suite struct AlertCommandTests {
    @Test("an alert command that exits without reading its input (1 MiB of it, more than a pipe holds) does not kill the process raising the alert with SIGPIPE, and the next command still runs")
    func commandIgnoringInput() throws {
        KeyManager.run("true", input: String(repeating: "x", count: 1 << 20))
        let marker = FileManager.default.temporaryDirectory.appendingPathComponent("kmsfs-alert-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: marker) }
        KeyManager.run("cat > '\(marker)'", input: "after\n")
        #expect(try String(contentsOfFile: marker, encoding: .utf8) == "after\n")
    }
}
