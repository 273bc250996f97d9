//! POSIX ACLs on the backing filesystem hold through the mount, for every
//! caller, in both serving modes: what another user may read, write or list
//! through a root `--allow-other` mount is exactly what they may do on the
//! backing directory itself. Default ACLs, the umask and setgid directories
//! shape new files as they do on the backing filesystem.
//!
//! Each case runs the same command as `nobody` on the backing directory (the
//! reference) and through the mount, and asserts both the reference's answer
//! (so a case that no longer tests anything fails) and the mount's.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use common::*;

fn setfacl(args: &[&str], path: &Path) {
    run_ok(Command::new("setfacl").args(args).arg(path));
}

/// `getfacl` of `path` without its header (the file name), numeric ids.
fn getfacl(path: &Path) -> String {
    let out = run_ok(
        Command::new("getfacl")
            .args(["--omit-header", "--numeric"])
            .arg(path),
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether `script` (sh, run in `dir` as nobody) succeeds.
fn nobody_may(dir: &Path, script: &str) -> bool {
    as_user(NOBODY, NOGROUP, "/bin/sh")
        .args(["-c", script])
        .current_dir(dir)
        .output()
        .unwrap()
        .status
        .success()
}

/// The ACL cases: (what, script run as nobody, allowed on ext4).
const CASES: [(&str, &str, bool); 7] = [
    (
        "read a 0644 file with user:nobody:---",
        "cat user-denied.txt",
        false,
    ),
    (
        "read a 0640 file whose group::--- (mask r--)",
        "cat group-denied.txt",
        false,
    ),
    (
        "list a 0755 directory with user:nobody:---",
        "ls denied-dir",
        false,
    ),
    (
        "read a file inside that directory",
        "cat denied-dir/inner.txt",
        false,
    ),
    (
        "write a 0666 file with user:nobody:r--",
        "echo x >> write-denied.txt",
        false,
    ),
    ("read that file", "cat write-denied.txt", true),
    (
        "read a 0600 file with user:nobody:r--",
        "cat granted.txt",
        true,
    ),
];

fn make_acl_files(backing: &Path) {
    let file = |name: &str, mode: u32| {
        let path = backing.join(name);
        fs::write(&path, b"secret\n").unwrap();
        set_mode(&path, mode);
        path
    };
    setfacl(&["-m", "u:65534:---"], &file("user-denied.txt", 0o644));
    let group = file("group-denied.txt", 0o640);
    chown(&group, 0, NOGROUP);
    setfacl(&["-m", "g::---,m::r--"], &group);
    let dir = backing.join("denied-dir");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("inner.txt"), b"secret\n").unwrap();
    set_mode(&dir, 0o755);
    set_mode(&dir.join("inner.txt"), 0o644);
    setfacl(&["-m", "u:65534:---"], &dir);
    setfacl(&["-m", "u:65534:r--"], &file("write-denied.txt", 0o666));
    setfacl(&["-m", "u:65534:r--"], &file("granted.txt", 0o600));
}

#[test]
fn acls_of_the_backing_filesystem_hold_for_other_users_in_both_modes() {
    if common::needs_root("reads as other users (setpriv) and passthrough") {
        return;
    }
    let (_tmp, backing, mnt) = dirs();
    make_acl_files(&backing);
    for mode in [Mode::Copy, Mode::Passthrough] {
        let mut args = vec!["--allow-other"];
        args.extend(mode.args());
        let m = Mounted::separate(&backing, &mnt, &args);
        for (what, script, allowed) in CASES {
            assert_eq!(
                nobody_may(&backing, script),
                allowed,
                "on the backing directory: {what}"
            );
            assert_eq!(
                nobody_may(&m.mountpoint, script),
                allowed,
                "{mode:?}: through the mount: {what}"
            );
        }
        assert_eq!(
            fs::read(backing.join("write-denied.txt")).unwrap(),
            b"secret\n",
            "{mode:?}: a denied write changed the file"
        );
        m.unmount();
    }
}

/// The mode, owner and ACL of a new file or directory.
fn shape(path: &Path) -> (u32, u32, u32, String) {
    let meta = fs::symlink_metadata(path).unwrap();
    (meta.mode(), meta.uid(), meta.gid(), getfacl(path))
}

/// Creates `name` in `dir` with `sh` under `umask`, as `uid:gid`.
fn create(dir: &Path, uid: u32, gid: u32, umask: &str, command: &str) {
    run_ok(
        as_user(uid, gid, "/bin/sh")
            .args(["-c", &format!("umask {umask} && {command}")])
            .current_dir(dir),
    );
}

/// New files and directories made through the mount get exactly the mode,
/// group and ACL that the same calls give on the backing filesystem: a
/// default ACL replaces the umask, a setgid directory passes on its group
/// and its setgid bit, and chmod by an owner outside the file's group
/// clears setgid.
#[test]
fn new_files_take_default_acls_umask_and_setgid_as_on_the_backing_filesystem() {
    if common::needs_root("creates files as other users (setpriv)") {
        return;
    }
    let (_tmp, backing, mnt) = dirs();
    set_mode(&backing, 0o777);
    let inherit = backing.join("inherit");
    fs::create_dir(&inherit).unwrap();
    set_mode(&inherit, 0o777);
    setfacl(&["-d", "-m", "u:65534:rwx,g::r-x,o::---"], &inherit);
    let plain = backing.join("plain");
    fs::create_dir(&plain).unwrap();
    set_mode(&plain, 0o777);
    let sgid = backing.join("sgid");
    fs::create_dir(&sgid).unwrap();
    chown(&sgid, 0, 100);
    set_mode(&sgid, 0o2777);

    for mode in [Mode::Copy, Mode::Passthrough] {
        let mut args = vec!["--allow-other"];
        args.extend(mode.args());
        let m = Mounted::separate(&backing, &mnt, &args);
        let tag = format!("{mode:?}").to_lowercase();
        // (directory, umask, command making NAME) — as root and as nobody.
        let cases = [
            ("inherit", "077", "touch NAME"),
            ("inherit", "022", "mkdir NAME"),
            ("plain", "027", "touch NAME"),
            ("plain", "002", "mkdir NAME"),
            ("sgid", "022", "touch NAME"),
            ("sgid", "022", "mkdir NAME"),
        ];
        for (i, (dir, umask, command)) in cases.iter().enumerate() {
            for (uid, gid) in [(0, 0), (NOBODY, NOGROUP)] {
                let direct = format!("direct-{tag}-{i}-{uid}");
                let via = format!("mount-{tag}-{i}-{uid}");
                create(
                    &backing.join(dir),
                    uid,
                    gid,
                    umask,
                    &command.replace("NAME", &direct),
                );
                create(
                    &m.path(dir),
                    uid,
                    gid,
                    umask,
                    &command.replace("NAME", &via),
                );
                let want = shape(&backing.join(dir).join(&direct));
                let got = shape(&backing.join(dir).join(&via));
                assert_eq!(
                    got, want,
                    "{mode:?}: `umask {umask}; {command}` in {dir} as uid {uid}"
                );
            }
        }
        // The cases above test what they claim.
        let inherited = getfacl(&backing.join(format!("inherit/mount-{tag}-0-0")));
        assert!(inherited.contains("user:65534:rwx"), "{inherited}");
        let sub = fs::metadata(backing.join(format!("sgid/mount-{tag}-5-0"))).unwrap();
        assert!(
            sub.mode() & 0o2000 != 0 && sub.gid() == 100,
            "{:o}",
            sub.mode()
        );

        // chmod g+s by an owner outside the file's group: setgid dropped.
        for (base, name) in [(&backing, "direct"), (&m.mountpoint, "mount")] {
            let path = base.join(format!("plain/chmod-{tag}-{name}"));
            fs::write(&path, b"").unwrap();
            chown(&path, NOBODY, 0);
            run_ok(as_user(NOBODY, NOGROUP, "chmod").arg("2775").arg(&path));
        }
        let want = fs::metadata(backing.join(format!("plain/chmod-{tag}-direct"))).unwrap();
        let got = fs::metadata(backing.join(format!("plain/chmod-{tag}-mount"))).unwrap();
        assert_eq!(want.mode() & 0o7777, 0o775, "the reference kept setgid");
        assert_eq!(
            got.mode(),
            want.mode(),
            "{mode:?}: chmod 2775 by a non-member"
        );
        m.unmount();
    }
}

/// Over a backing filesystem without ACLs (NFS, an object-store FUSE,
/// ramfs here) another user reads and lists by the mode bits, in both
/// modes: the kernel's ACL checks find "no ACL", not an error.
#[test]
fn a_backing_without_acls_is_read_by_mode_bits() {
    if common::needs_root("mounts a ramfs backing") {
        return;
    }
    let (_tmp, backing, mnt) = dirs();
    let _ramfs = TempMount::new("ramfs", "", &backing);
    set_mode(&backing, 0o755);
    fs::create_dir(backing.join("dir")).unwrap();
    set_mode(&backing.join("dir"), 0o755);
    fs::write(backing.join("dir/f.txt"), b"readable\n").unwrap();
    set_mode(&backing.join("dir/f.txt"), 0o644);
    for mode in [Mode::Copy, Mode::Passthrough] {
        let mut args = vec!["--allow-other"];
        args.extend(mode.args());
        let m = Mounted::separate(&backing, &mnt, &args);
        assert!(
            nobody_may(&m.mountpoint, "ls dir && cat dir/f.txt"),
            "{mode:?}"
        );
        assert!(
            !nobody_may(&m.mountpoint, "echo x >> dir/f.txt"),
            "{mode:?}"
        );
        m.unmount();
    }
}
