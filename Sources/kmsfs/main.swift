import ArgumentParser
import Foundation
import FUSEBridge
import KeyManager

// Errors of the libraries already read as advice; print them as they are.
do {
    var command = try KMSFS.parseAsRoot()
    try command.run()
} catch let error as KeyManagerError {
    Output.note("kmsfs: \(error.description)")
    exit(1)
} catch let error as Failure {
    Output.note("kmsfs: \(error.description)")
    exit(1)
} catch let error as MountError {
    Output.note("kmsfs: \(error.description)")
    exit(1)
} catch {
    KMSFS.exit(withError: error)
}
