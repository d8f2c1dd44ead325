import ArgumentParser
import Foundation

// Errors of the libraries already read as advice; print them as they are.
do {
    var command = try KMSFS.parseAsRoot()
    try command.run()
} catch {
    exit(Invocation.report(error))
}
