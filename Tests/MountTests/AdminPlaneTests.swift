import Foundation
import Testing

@Suite("admin commands on a live mount go through the daemon's control socket", .serialized)
struct AdminPlaneTests {
    @Test("key commands without a passphrase reach the daemon by MOUNTPOINT or CIPHERDIR and take effect at once")
    func forwardedCommandsTakeEffect() throws {
        let fs = try MountedFS()
        try fs.run("echo hello > $M/a")
        // No passphrase: only the daemon can have run these.
        let disabled = try fs.run("$K key disable alias/default --fs $M")
        #expect(disabled.ok, "\(disabled.stderr)")
        #expect(disabled.stdout.contains("alias/default is Disabled"))
        let denied = try fs.run("cat $M/a 2>&1 || echo status=$?")
        #expect(denied.stdout.contains("Key has been revoked"), "\(denied.stdout)")
        #expect(try fs.run("$K key enable alias/default --fs $C").ok)
        #expect(try fs.run("cat $M/a").stdout == "hello\n")
        let listed = try fs.run("cd $T && $K key list --json --fs ../mnt")
        #expect(listed.ok && listed.stdout.contains("\"state\" : \"Enabled\""), "\(listed.stderr)")
        // A failing command keeps its message and exit status across the socket.
        let missing = try fs.run("$K key describe alias/nope --fs $M")
        #expect(missing.status == 1 && missing.stderr.contains("alias/nope"), "\(missing.stderr)")
        let audit = try fs.run("$K audit list --json --limit 50 --fs $M")
        #expect(audit.stdout.contains("\"event\" : \"DisableKey\""), "\(audit.stdout)")
    }

    @Test("a uid that administers no key is refused by the socket and the refusal is audited; a granted uid is bound by key policy")
    func socketRefusesNonAdministrators() throws {
        let fs = try MountedFS()
        let other = try fs.key(["create", "--alias", "alias/other"])
        #expect(other.ok)
        let setpriv = "setpriv --reuid 4242 --regid 4242 --clear-groups"
        let refused = try fs.run("\(setpriv) $K key disable alias/default --fs $C")
        #expect(refused.status == 1)
        #expect(refused.stderr.contains("uid 4242 may not administer"), "\(refused.stderr)")
        #expect(try fs.run("$K key describe alias/default --fs $M").stdout.contains("Enabled"))
        let audit = try fs.run("$K audit list --json --limit 5 --fs $M").stdout
        #expect(audit.contains("\"event\" : \"AdminAccess\"") && audit.contains("\"uid\" : 4242"), "\(audit)")

        #expect(try fs.run("$K key policy alias/default --grant administer uid:4242 --fs $M").ok)
        let admitted = try fs.run("\(setpriv) $K key rotate alias/default --fs $C")
        #expect(admitted.ok, "\(admitted.stderr)")
        let notTheirs = try fs.run("\(setpriv) $K key disable alias/other --fs $C")
        #expect(notTheirs.status == 1 && notTheirs.stderr.contains("denied"), "\(notTheirs.stderr)")
        #expect(try fs.run("$K key describe alias/other --fs $M").stdout.contains("Enabled"))
    }
}
