import Administration
import ArgumentParser
import Foundation
import FUSEBridge
import KeyManager

/// What this process is doing: who runs it, and the keystore it opened
/// itself (offline), whose audit records get a signed digest when the
/// command ends. Admin commands go through an `AdminClient`: to a live
/// mount's daemon as typed requests, or to the keystore opened here.
enum Invocation {
    nonisolated(unsafe) static var opened: KeyManager?

    /// The user running this command.
    static let principal = Principal(uid: getuid(), gid: getgid(), pid: getpid(), processName: "kmsfs")

    /// Prints an error the way kmsfs does and returns the exit code. With
    /// `json` (the command line has `--json`), the error is one JSON object on
    /// stderr: `{"error": {"code": CODE, "message": TEXT}}` (docs/JSON.md).
    static func report(_ error: Error, json: Bool = false) -> Int32 {
        let (code, message, status): (String, String, Int32)
        switch error {
        case let error as KeyManagerError: (code, message, status) = (error.code, error.description, 1)
        case let error as AdminFailure: (code, message, status) = (error.code, error.message, 1)
        case let error as ControlRefusal: (code, message, status) = ("ControlRefused", error.description, 1)
        case let error as Failure: (code, message, status) = ("Failed", error.description, 1)
        case let error as MountError: (code, message, status) = ("MountFailed", error.description, 1)
        default:
            let exit = KMSFS.exitCode(for: error).rawValue
            let text = KMSFS.fullMessage(for: error)
            // Help and --version are not errors: printed as they are. An ExitCode
            // with no message (a forwarded command's status) prints nothing more.
            if exit == 0 || !json || text.isEmpty {
                if !text.isEmpty { exit == 0 ? Output.line(text) : Output.note(text) }
                return exit
            }
            (code, message, status) = ("UsageError", text, exit)
        }
        if json {
            struct Body: Encodable { var error: Detail; struct Detail: Encodable { var code: String; var message: String } }
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
            let data = (try? encoder.encode(Body(error: .init(code: code, message: message)))) ?? Data()
            Output.note(String(decoding: data, as: UTF8.self))
        } else {
            Output.note("kmsfs: " + message)
        }
        return status
    }
}
