import Foundation
import Testing

@Suite("the administrator's toolbox: versions, formats, JSON other tools read")
struct ToolboxTests {
    @Test("kmsfs --version names its version, the formats it writes and the OpenSSL, SQLite and libfuse it runs with (as the system's tools report them)")
    func version() throws {
        let out = try sh("\(q(kmsfsBinary)) --version")
        #expect(out.ok)
        let lines = out.stdout.split(separator: "\n").map(String.init)
        #expect(lines.first?.hasPrefix("kmsfs ") == true && lines.first?.split(separator: " ").last?.split(separator: ".").count == 3, "\(lines)")
        #expect(lines.contains { $0.hasPrefix("file format 1, keystore schema v") }, "\(lines)")
        let openssl = try sh("openssl version | awk '{print $2}'").stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(lines.contains { $0.hasPrefix("OpenSSL \(openssl)") }, "\(openssl) \(lines)")
        let fuse = try sh("fusermount3 -V | awk '{print $3}'").stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(lines.contains("libfuse \(fuse)"), "\(fuse) \(lines)")
        let sqlite = try sh("dpkg-query -W -f '${Version}' libsqlite3-0 | cut -d- -f1").stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(!sqlite.isEmpty && lines.contains("SQLite \(sqlite)"), "\(sqlite) \(lines)")
    }

    @Test("status shows a filesystem's format, mounted or not; JSON output has no escaped slashes")
    func statusFormat() throws {
        let fs = try MountedFS()
        let text = try fs.run("$K status --fs $M").stdout
        #expect(text.contains("format:         file format 1, keystore schema v"), "\(text)")
        let json = try fs.run("$K status --json --fs $M").stdout
        let format = jsonObject(json)["format"] as? [String: Any]
        #expect(format?["fileFormat"] as? Int == 1 && (format?["keystoreSchema"] as? String)?.hasPrefix("v") == true, "\(json)")
        #expect(!json.contains("\\/") && json.contains(fs.cipherdir), "\(json)")
        let described = try fs.run("$K key describe alias/default --json --fs $M").stdout
        #expect(described.contains("\"alias/default\"") && !described.contains("\\/"))
        try fs.unmount()
        #expect(try fs.run("$K status --fs $C").stdout.contains("file format 1"))
    }
}
