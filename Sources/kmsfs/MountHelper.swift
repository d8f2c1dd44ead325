import Foundation

/// `mount.kmsfs` / `mount.fuse.kmsfs`: the helper mount(8) runs for
/// `mount -t kmsfs` / `mount -t fuse.kmsfs` and /etc/fstab lines, called as
/// `mount.kmsfs CIPHERDIR MOUNTPOINT [-sfnv] [-o OPTIONS]` (mount(8),
/// "External helpers"). It turns the options into a `kmsfs mount` command
/// line: `passfile=FILE` is the passphrase file (as gocryptfs's fstab lines
/// do it), `metrics-file=PATH` and `metrics-interval=N` the metrics options, options meant for mount(8) and systemd are dropped, and the rest
/// are FUSE mount options.
enum MountHelper {
    /// Whether this process was started as a mount helper (by its name).
    static func invoked(as argv0: String) -> Bool {
        let name = (argv0 as NSString).lastPathComponent
        return name == "mount.kmsfs" || name == "mount.fuse.kmsfs" || name == "mount.fuse3.kmsfs"
    }

    /// Options that mean something to mount(8), fstab or systemd, not to FUSE.
    static let dropped: Set<String> = ["defaults", "auto", "noauto", "nofail", "_netdev", "user", "users", "nouser", "owner", "group", "rw"]


    /// The `kmsfs …` arguments for a helper's arguments.
    static func arguments(_ helper: [String]) throws -> [String] {
        var positional: [String] = []
        var options: [String] = []
        var i = 0
        while i < helper.count {
            let argument = helper[i]
            switch argument {
            case "-o":
                guard i + 1 < helper.count else { throw Failure("-o needs options") }
                options += helper[i + 1].split(separator: ",").map(String.init)
                i += 1
            case "-t":
                i += 1  // the type mount(8) was asked for; this helper serves only kmsfs
            case "-n", "-s", "-v":
                break  // no mtab to write (the kernel's table is the truth), sloppy and verbose: nothing to change
            case "-f":
                throw Failure("fake mounts (-f) are not supported")
            case "-N":
                throw Failure("mounting in another namespace (-N) is not supported")
            default:
                if argument.hasPrefix("-") { throw Failure("unknown option \(argument)") }
                positional.append(argument)
            }
            i += 1
        }
        guard positional.count == 2 else { throw Failure("usage: mount.kmsfs CIPHERDIR MOUNTPOINT [-o passfile=FILE,OPTIONS]") }
        var out = ["mount", positional[0], positional[1]]
        var fuse: [String] = []
        var passfile: String?
        var extra: [String] = []
        for option in options {
            if option.hasPrefix("passfile=") { passfile = String(option.dropFirst("passfile=".count)); continue }
            if let value = option.split(separator: "=", maxSplits: 1).last, option.hasPrefix("metrics-file=") || option.hasPrefix("metrics-interval=") {
                extra += ["--" + (option.hasPrefix("metrics-file=") ? "metrics-file" : "metrics-interval"), String(value)]
                continue
            }
            if dropped.contains(option) || option.hasPrefix("x-") || option.hasPrefix("comment=") { continue }
            fuse.append(option)
        }
        guard let passfile else {
            throw Failure("mount.kmsfs needs -o passfile=FILE (a root-only file holding the passphrase); it never prompts")
        }
        out += ["--passphrase-file", passfile]
        if !fuse.isEmpty { out += ["-o", fuse.joined(separator: ",")] }
        return out + extra
    }
}
