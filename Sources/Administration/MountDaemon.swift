import ChunkCipher
import CLinux
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// Running in the background the way gocryptfs does: never fork once threads
/// exist; re-execute ourselves in the foreground as a child and wait for it
/// to say the mount is ready (or why it failed).
public enum MountDaemon {
    /// Starts `kmsfs mount ARGUMENTS` (with -f) as a daemon, hands it the
    /// passphrase on a pipe, and waits for it to report: returns the
    /// warnings it reported with a successful mount, throws its failure.
    public static func spawn(passphrase: borrowing SecretKey, arguments: [String]) throws(AdminFailure) -> [String] {
        var secretPipe: [Int32] = [0, 0], notifyPipe: [Int32] = [0, 0]
        // Close-on-exec, so the child holds only the copies dup2 gives it as fds 3 and 4
        // (otherwise it would never see end-of-file on the passphrase).
        guard kmsfs_pipe_cloexec(&secretPipe) == 0, kmsfs_pipe_cloexec(&notifyPipe) == 0 else { throw AdminFailure("cannot create pipes") }
        let argv = ["kmsfs", "mount"] + arguments + ["--passphrase-fd", "3", "--notify-fd", "4"]
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, secretPipe[0], 3)
        posix_spawn_file_actions_adddup2(&actions, notifyPipe[1], 4)
        // The daemon holds nothing but stdio and these two pipes, or a caller
        // waiting for end-of-file on a pipe it shared with us would hang.
        _ = kmsfs_spawn_close_from(&actions, 5)
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0)
        // The daemon's log goes nowhere unless KMSFS_DAEMON_LOG names a file to append it to.
        let log = ProcessInfo.processInfo.environment["KMSFS_DAEMON_LOG"] ?? "/dev/null"
        posix_spawn_file_actions_addopen(&actions, 2, log, O_WRONLY | O_CREAT | O_APPEND, 0o600)
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        posix_spawnattr_setflags(&attributes, KMSFS_POSIX_SPAWN_SETSID)
        var cArgs = argv.map { strdup($0) } + [nil]
        defer { cArgs.forEach { free($0) } }
        var pid: pid_t = 0
        let status = posix_spawn(&pid, "/proc/self/exe", &actions, &attributes, &cArgs, environ)
        close(secretPipe[0])
        close(notifyPipe[1])
        guard status == 0 else {
            close(secretPipe[1]); close(notifyPipe[0])
            throw AdminFailure(code: "MountFailed", "cannot start the mount daemon: \(String(cString: strerror(status)))")
        }
        passphrase.withUnsafeBytes { raw in _ = write(secretPipe[1], raw.baseAddress, raw.count) }
        close(secretPipe[1])
        var reply = [UInt8]()
        var byte: UInt8 = 0
        while read(notifyPipe[0], &byte, 1) == 1 { reply.append(byte) }
        close(notifyPipe[0])
        let lines = String(decoding: reply, as: UTF8.self).split(separator: "\n", omittingEmptySubsequences: false)
        let message = lines.first.map(String.init) ?? ""
        guard message == "ok" else {
            var childStatus: Int32 = 0
            waitpid(pid, &childStatus, 0)
            throw AdminFailure(code: "MountFailed", message.isEmpty ? "the mount daemon exited without mounting" : message)
        }
        return lines.dropFirst().map(String.init)
    }

    /// In the daemon: tells the waiting parent "ok" (and warnings, a line
    /// each) or why the mount failed, and closes the pipe.
    public static func report(_ fd: Int32, _ message: String) {
        _ = message.withCString { write(fd, $0, strlen($0)) }
        close(fd)
    }
}
