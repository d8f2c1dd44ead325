import Foundation
import Testing

@Suite("removing directories: a directory keeps its keys unless it is really gone", .serialized)
struct RemovalTests {
    @Test("an rmdir the backing filesystem refuses (immutable parent) leaves the directory usable; a later rmdir and a rename over an empty directory work and leave nothing behind")
    func failedRmdirKeepsKeys() throws {
        let fs = try MountedFS()
        #expect(try fs.run("mkdir -p $M/p/d $M/p/e $M/p/f && echo kept > $M/p/f/x").ok)
        let backing = try fs.run("find $C -path $C/.kmsfs -prune -o -inum $(stat -c %i $M/p) -print").stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(!backing.isEmpty)
        let refused = try fs.run("""
            chattr +i \(q(backing))
            trap 'chattr -i \(q(backing))' EXIT
            if rmdir $M/p/d 2>$T/err; then echo removed; else cat $T/err; fi
            if mv -T $M/p/f $M/p/e 2>$T/err; then echo renamed; else cat $T/err; fi
            """)
        #expect(refused.ok && refused.stdout.contains("Operation not permitted") && !refused.stdout.contains("removed"), "\(refused.stdout) \(refused.stderr)")
        #expect(!refused.stdout.contains("renamed"))
        // Both directories still have their keys: names are written and read in them.
        let usable = try fs.run("echo new > $M/p/d/made && cat $M/p/d/made && ls $M/p/e | wc -l && cat $M/p/f/x")
        #expect(usable.ok && usable.stdout == "new\n0\nkept\n", "\(usable.stdout) \(usable.stderr)")
        try fs.unmount()
        try fs.mount()
        #expect(try fs.run("cat $M/p/d/made").stdout == "new\n", "after a remount too")
        // Now the removals succeed and leave no set-aside keys behind.
        #expect(try fs.run("rm $M/p/d/made && rmdir $M/p/d && mv -T $M/p/f $M/p/e && cat $M/p/e/x && ls -A $M/p").stdout == "kept\ne\n")
        #expect(try fs.run("ls -A \(q(backing)) | grep -c '^.kmsfs.rmdir' || true").stdout == "0\n")
        try fs.unmount()
        let checked = try fs.kmsfs(["fsck", fs.cipherdir])
        #expect(checked.ok, "\(checked.stdout) \(checked.stderr)")
    }
}
