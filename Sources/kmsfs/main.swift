import ArgumentParser
import ChunkCipher
import Foundation
import KeyManager

// Passphrases, master keys and data keys pass through every kmsfs process:
// none may leave in a core file or be read by ptrace from another user.
KeyMemory.forbidCoreDumps()

// Errors of the libraries already read as advice; print them as they are.
// An offline command that touched a keystore leaves its audit records under a signed digest.
var status: Int32 = 0
do {
    let arguments = Array(CommandLine.arguments.dropFirst())
    var command = try MountHelper.invoked(as: CommandLine.arguments[0])
        ? KMSFS.parseAsRoot(try MountHelper.arguments(arguments))
        : KMSFS.parseAsRoot()
    try command.run()
} catch {
    status = Invocation.report(error, json: CommandLine.arguments.contains("--json"))
}
Invocation.opened?.sealAuditDigest()
KeyManager.drainAlerts()
exit(status)
