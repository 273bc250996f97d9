//! The life of a mount, end to end on real FUSE mounts: data integrity,
//! in-place mounts, ownership, unprivileged mounts, stale mounts, signals,
//! busy unmounts and bad input.

mod common;

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// Every file under `root` with its contents, sorted: what a user would
/// compare after unmounting.
fn snapshot(root: &Path) -> Vec<(String, Option<Vec<u8>>)> {
    let mut out = Vec::new();
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, Option<Vec<u8>>)>) {
        for e in fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let rel = e.path().strip_prefix(root).unwrap().display().to_string();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                out.push((rel + "/", None));
                walk(root, &e.path(), out);
            } else if t.is_symlink() {
                let target = fs::read_link(e.path()).unwrap();
                out.push((
                    rel + " ->",
                    Some(target.into_os_string().into_encoded_bytes()),
                ));
            } else {
                out.push((rel, Some(fs::read(e.path()).unwrap())));
            }
        }
    }
    walk(root, root, &mut out);
    out.sort();
    out
}

#[test]
fn a_256_mib_file_written_through_the_mount_is_identical_in_the_backing_dir() {
    let (_tmp, backing, mnt) = dirs();
    let m = Mounted::separate(&backing, &mnt, &[]);
    let data = pseudo_random(256 << 20, 42);
    {
        let mut f = File::create(m.path("model.safetensors")).unwrap();
        for chunk in data.chunks(1 << 20) {
            f.write_all(chunk).unwrap();
        }
        f.sync_all().unwrap();
    }
    let through_mount = checksum(&m.path("model.safetensors"));
    m.unmount();
    let expected = {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("x"), &data).unwrap();
        checksum(&dir.path().join("x"))
    };
    assert_eq!(checksum(&backing.join("model.safetensors")), expected);
    assert_eq!(through_mount, expected);
}

#[test]
fn four_threads_writing_different_files_lose_nothing() {
    let (_tmp, backing, mnt) = dirs();
    let m = Mounted::separate(&backing, &mnt, &[]);
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let path = m.path(&format!("w{t}.bin"));
            s.spawn(move || {
                let data = pseudo_random(16 << 20, t + 1);
                let mut f = File::create(path).unwrap();
                // Uneven chunk sizes so writes do not line up with pages.
                for chunk in data.chunks(100_003) {
                    f.write_all(chunk).unwrap();
                }
            });
        }
    });
    m.unmount();
    for t in 0..4u64 {
        let got = fs::read(backing.join(format!("w{t}.bin"))).unwrap();
        assert!(got == pseudo_random(16 << 20, t + 1), "w{t}.bin differs");
    }
}

#[test]
fn rename_while_another_process_reads_the_file() {
    let (_tmp, backing, mnt) = dirs();
    let data = pseudo_random(8 << 20, 7);
    fs::write(backing.join("a.ckpt"), &data).unwrap();
    let m = Mounted::separate(&backing, &mnt, &[]);
    // The reader opens the file, waits for the rename, then reads it all.
    let mut reader = Command::new("sh")
        .arg("-c")
        .arg("exec 3< \"$1\"; read -r _; cat <&3 | cksum")
        .arg("sh")
        .arg(m.path("a.ckpt"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    fs::create_dir(m.path("moved")).unwrap();
    fs::rename(m.path("a.ckpt"), m.path("moved/b.ckpt")).unwrap();
    reader.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let out = reader.wait_with_output().unwrap();
    let expected = Command::new("sh")
        .arg("-c")
        .arg("cksum < \"$1\"")
        .arg("sh")
        .arg(backing.join("moved/b.ckpt"))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&expected.stdout)
    );
    assert_eq!(fs::read(m.path("moved/b.ckpt")).unwrap(), data);
    assert!(!m.path("a.ckpt").exists());
    m.unmount();
}

#[test]
fn in_place_mount_leaves_exactly_what_was_written() {
    let tmp = shared_tempdir();
    let models = tmp.path().join("models");
    fs::create_dir_all(models.join("checkpoints")).unwrap();
    fs::write(models.join("checkpoints/old.safetensors"), b"old").unwrap();
    fs::write(models.join("keep.txt"), b"keep").unwrap();
    fs::write(models.join("gone.txt"), b"gone").unwrap();

    let m = Mounted::in_place(&models, &[]);
    // The mount shows the directory's own files...
    assert_eq!(fs::read(m.path("keep.txt")).unwrap(), b"keep");
    // ...and takes writes of every kind.
    fs::write(m.path("checkpoints/new.safetensors"), b"new weights").unwrap();
    fs::write(m.path("checkpoints/old.safetensors"), b"replaced").unwrap();
    fs::remove_file(m.path("gone.txt")).unwrap();
    fs::create_dir(m.path("loras")).unwrap();
    std::os::unix::fs::symlink("../keep.txt", m.path("loras/link")).unwrap();
    // A download: staging file, then rename into place.
    fs::write(m.path("loras/.part"), b"lora").unwrap();
    fs::rename(m.path("loras/.part"), m.path("loras/style.safetensors")).unwrap();
    let seen_through_mount = snapshot(&m.mountpoint);
    m.unmount();

    let after = snapshot(&models);
    assert_eq!(after, seen_through_mount);
    let expected: Vec<(String, Option<Vec<u8>>)> = vec![
        ("checkpoints/".into(), None),
        (
            "checkpoints/new.safetensors".into(),
            Some(b"new weights".to_vec()),
        ),
        (
            "checkpoints/old.safetensors".into(),
            Some(b"replaced".to_vec()),
        ),
        ("keep.txt".into(), Some(b"keep".to_vec())),
        ("loras/".into(), None),
        ("loras/link ->".into(), Some(b"../keep.txt".to_vec())),
        ("loras/style.safetensors".into(), Some(b"lora".to_vec())),
    ];
    assert_eq!(after, expected);
}

#[test]
fn files_created_by_another_user_belong_to_that_user() {
    if common::needs_root("creates files as other users (setpriv)") {
        return;
    }
    let (_tmp, backing, mnt) = dirs();
    fs::create_dir(backing.join("shared")).unwrap();
    set_mode(&backing.join("shared"), 0o777);
    // A setgid directory: new entries take its group, as on the backing fs.
    fs::create_dir(backing.join("team")).unwrap();
    chown(&backing.join("team"), 0, 100);
    set_mode(&backing.join("team"), 0o2777);
    let m = Mounted::separate(&backing, &mnt, &["--allow-other"]);
    let script = "set -e; cd \"$1\"; echo data > shared/f; mkdir shared/d; \
                  ln -s f shared/l; mkfifo shared/p; echo x > team/g; mkdir team/sub";
    let status = as_user(NOBODY, NOGROUP, "sh")
        .arg("-c")
        .arg(script)
        .arg("sh")
        .arg(&m.mountpoint)
        .status()
        .unwrap();
    assert!(status.success());
    m.unmount();
    for name in ["shared/f", "shared/d", "shared/l", "shared/p"] {
        let md = fs::symlink_metadata(backing.join(name)).unwrap();
        assert_eq!((md.uid(), md.gid()), (NOBODY, NOGROUP), "{name}");
    }
    for name in ["team/g", "team/sub"] {
        let md = fs::symlink_metadata(backing.join(name)).unwrap();
        assert_eq!((md.uid(), md.gid()), (NOBODY, 100), "{name}");
    }
    let sub = fs::metadata(backing.join("team/sub")).unwrap();
    assert!(sub.mode() & 0o2000 != 0, "setgid inherited by subdirectory");
    assert_eq!(fs::read(backing.join("shared/f")).unwrap(), b"data\n");
}

#[test]
fn a_normal_user_mounts_through_fusermount3() {
    if common::needs_root("runs the daemon as another user (setpriv)") {
        return;
    }
    let (_tmp, backing, mnt) = dirs();
    chown(&backing, NOBODY, NOGROUP);
    chown(&mnt, NOBODY, NOGROUP);
    fs::write(backing.join("model.gguf"), b"weights").unwrap();
    chown(&backing.join("model.gguf"), NOBODY, NOGROUP);

    let mut daemon = as_user(NOBODY, NOGROUP, bin());
    daemon.arg("mount").arg("--backing").arg(&backing).arg(&mnt);
    let mut m = Mounted::start(daemon, &mnt);
    let mounts = fs::read_to_string("/proc/mounts").unwrap();
    let line = mounts
        .lines()
        .find(|l| l.contains(&*mnt.to_string_lossy()))
        .unwrap();
    assert!(line.contains("fuse.modelcache"), "{line}");
    assert!(line.contains("user_id=65534"), "mounted by nobody: {line}");

    let out = run_ok(
        as_user(NOBODY, NOGROUP, "sh")
            .arg("-c")
            .arg("cat \"$1/model.gguf\" && echo new > \"$1/new.txt\"")
            .arg("sh")
            .arg(&mnt),
    );
    assert_eq!(out.stdout, b"weights");
    assert_eq!(fs::read(backing.join("new.txt")).unwrap(), b"new\n");

    // The user unmounts it with the CLI; the daemon then exits 0 by itself.
    run_ok(as_user(NOBODY, NOGROUP, bin()).arg("umount").arg(&mnt));
    let status = m.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "daemon: {status}\n{}", m.log_text());
    assert!(!our_mount_at(&m.mountpoint));
}

#[test]
fn a_root_daemon_uses_passthrough_and_a_normal_user_gets_copy_mode() {
    if common::needs_root("a root daemon") {
        return;
    }
    let (_tmp, backing, mnt) = dirs();
    let want = pseudo_random(4 << 20, 7);
    fs::write(backing.join("model.safetensors"), &want).unwrap();
    fs::write(backing.join("notes.txt"), b"notes").unwrap();

    // Root, --passthrough auto (the default): the kernel reads open files
    // itself, so they stay readable while the daemon is stopped.
    let m = Mounted::separate(&backing, &mnt, &[]);
    m.wait_log("reads: passthrough");
    let model = File::open(m.path("model.safetensors")).unwrap();
    let notes = File::open(m.path("notes.txt")).unwrap();
    let stop = |sig| {
        // SAFETY: signals our own child.
        assert_eq!(unsafe { libc::kill(m.pid() as i32, sig) }, 0);
    };
    stop(libc::SIGSTOP);
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        // Plain read() calls: read_to_end would first fstat the file,
        // which asks the daemon.
        let read_all = |mut f: &File| {
            let (mut v, mut buf) = (Vec::new(), vec![0u8; 1 << 20]);
            loop {
                match f.read(&mut buf) {
                    Ok(0) => return Ok(v),
                    Ok(n) => v.extend_from_slice(&buf[..n]),
                    Err(e) => return Err(e),
                }
            }
        };
        let _ = tx.send((read_all(&model), read_all(&notes)));
    });
    let got = rx.recv_timeout(Duration::from_secs(10));
    stop(libc::SIGCONT);
    let (model_bytes, notes_bytes) = got.expect("reads wait for the stopped daemon");
    reader.join().unwrap();
    assert!(model_bytes.unwrap() == want, "model bytes differ");
    assert_eq!(notes_bytes.unwrap(), b"notes");
    m.unmount();

    // A normal user, auto: copy mode, saying why.
    for p in [&backing, &mnt, &backing.join("model.safetensors")] {
        chown(p, NOBODY, NOGROUP);
    }
    let mut daemon = as_user(NOBODY, NOGROUP, bin());
    daemon.arg("mount").arg("--backing").arg(&backing).arg(&mnt);
    let m = Mounted::start(daemon, &mnt);
    let log = m.wait_log("reads: copy mode");
    assert!(
        log.contains("serving mode: copy") && log.contains("it needs CAP_SYS_ADMIN"),
        "{log}"
    );
    let out = run_ok(as_user(NOBODY, NOGROUP, "cat").arg(m.path("model.safetensors")));
    assert!(out.stdout == want, "model bytes differ in copy mode");
    m.unmount();

    // A normal user, on: refused before anything is mounted.
    let mut cmd = as_user(NOBODY, NOGROUP, bin());
    cmd.args(["mount", "--passthrough", "on", "--backing"])
        .arg(&backing)
        .arg(&mnt);
    expect_error(cmd, "--passthrough on: it needs CAP_SYS_ADMIN");
    assert!(!our_mount_at(&mnt.canonicalize().unwrap()));
}

#[test]
fn a_stale_mount_after_sigkill_is_cleared_by_the_next_mount() {
    let (_tmp, backing, mnt) = dirs();
    fs::write(backing.join("a.pt"), b"a").unwrap();
    let mut m = Mounted::separate(&backing, &mnt, &[]);
    m.stop_with(libc::SIGKILL);
    // What a user sees: listing the directory fails.
    let err = fs::read_dir(&mnt).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN));
    assert!(
        our_mount_at(&m.mountpoint),
        "the dead mount is still listed"
    );

    let again = Mounted::separate(&backing, &mnt, &[]);
    assert!(
        again
            .log_text()
            .contains("cleared a stale modelcache mount"),
        "{}",
        again.log_text()
    );
    assert_eq!(fs::read(again.path("a.pt")).unwrap(), b"a");
    again.unmount();
}

/// In copy mode the daemon maps the files it caches through its own mount.
/// Killed in the middle of a load, it must still exit: a descriptor it kept
/// open in its own mount would make the kernel send a FLUSH at exit that
/// nobody is left to answer, leaving an unkillable process.
#[test]
fn a_copy_mode_daemon_killed_while_loading_exits() {
    let (_tmp, backing, mnt) = dirs();
    write_safetensors(&backing.join("big.safetensors"), 64, 4 << 20, 5);
    let mut m = Mounted::separate(&backing, &mnt, &["--passthrough", "off"]);
    drop_from_page_cache(&backing.join("big.safetensors"));
    let f = File::open(m.path("big.safetensors")).unwrap();
    // Its own loop: every 2 ms, to catch the load while it runs.
    let loading = std::time::Instant::now();
    while !m.log_text().contains("loaded big.safetensors")
        && cached_files(m.pid(), &backing, &m.mountpoint).is_empty()
    {
        assert!(
            loading.elapsed() < Duration::from_secs(20),
            "no load started"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(
        m.kill_and_reap(Duration::from_secs(10)),
        "the daemon was stuck after SIGKILL (its FUSE connection had to be aborted)"
    );
    drop(f);
}

#[test]
fn sigint_unmounts_cleanly_and_exits_0() {
    let (_tmp, backing, mnt) = dirs();
    let mut m = Mounted::separate(&backing, &mnt, &[]);
    assert!(m.stop_with(libc::SIGINT).success(), "{}", m.log_text());
    assert!(!our_mount_at(&m.mountpoint));
}

#[test]
fn external_unmount_ends_the_daemon_with_exit_0() {
    let (_tmp, backing, mnt) = dirs();
    let mut m = Mounted::separate(&backing, &mnt, &[]);
    run_ok(Command::new(bin()).arg("umount").arg(&mnt));
    let status = m.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "daemon: {status}\n{}", m.log_text());
}

/// A copy-mode daemon maps the files it caches through its own mount, so a
/// plain umount(2) finds the mount busy: `modelcache umount` still works
/// (it asks the daemon to let go and stop), and so does a lazy detach from
/// outside, after which the daemon lets go and exits by itself.
#[test]
fn a_copy_mode_mount_with_cached_files_unmounts_both_ways() {
    if common::needs_root("detaches the mount with umount2") {
        return;
    }
    for lazy in [false, true] {
        let (_tmp, backing, mnt) = dirs();
        write_safetensors(&backing.join("m.safetensors"), 4, 1 << 20, 6);
        let mut m = Mounted::separate(&backing, &mnt, &["--passthrough", "off"]);
        let file = m.path("m.safetensors");
        run_ok(&mut modelcache(&[Path::new("warm"), &file]));
        assert!(!cached_files(m.pid(), &backing, &m.mountpoint).is_empty());
        if lazy {
            let c = std::ffi::CString::new(mnt.to_str().unwrap()).unwrap();
            // SAFETY: NUL-terminated path of the mount this test made.
            assert_eq!(unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) }, 0);
        } else {
            run_ok(Command::new(bin()).arg("umount").arg(&mnt));
        }
        assert!(!our_mount_at(&m.mountpoint), "still mounted (lazy: {lazy})");
        let status = m.wait_exit(Duration::from_secs(10));
        assert!(status.success(), "daemon: {status}\n{}", m.log_text());
    }
}

#[test]
fn background_mode_returns_once_the_mount_is_live() {
    let (tmp, backing, mnt) = dirs();
    fs::write(backing.join("x.bin"), b"x").unwrap();
    // A rule that matches nothing: warned of before the command returns.
    let manifest = tmp.path().join("manifest.toml");
    fs::write(&manifest, "[[warm]]\npaths = [\"vae/*.safetensors\"]\n").unwrap();
    let state = StateDir::new();
    let out = Command::new(bin())
        .args(["mount", "--background", "--manifest"])
        .arg(&manifest)
        .arg("--backing")
        .arg(&backing)
        .arg(&mnt)
        .env("STATE_DIRECTORY", &state.path)
        .output()
        .unwrap();
    let status = out.status;
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains(r#""vae/*.safetensors" matches no file"#),
        "the manifest's warning, before it returned: {said}"
    );
    let mnt = mnt.canonicalize().unwrap();
    // Whatever happens next, the mount goes away with this guard.
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            force_unmount(&self.0);
        }
    }
    let _guard = Unmount(mnt.clone());
    assert!(status.success());
    assert!(our_mount_at(&mnt), "mount is live when the command returns");
    assert_eq!(fs::read(mnt.join("x.bin")).unwrap(), b"x");
    let out = Command::new(bin())
        .arg("umount")
        .arg(&mnt)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(!our_mount_at(&mnt));
}

/// Starts a process that keeps `file` open until its stdin closes.
fn hold_open(file: &Path) -> std::process::Child {
    let child = Command::new("sh")
        .arg("-c")
        .arg("exec 3< \"$1\"; read -r _; cat <&3")
        .arg("sh")
        .arg(file)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Give the shell time to open the file.
    std::thread::sleep(Duration::from_millis(300));
    child
}

#[test]
fn umount_of_a_busy_mount_names_the_holder_and_lazy_detaches() {
    let (_tmp, backing, mnt) = dirs();
    fs::write(backing.join("held.bin"), b"held").unwrap();
    let mut m = Mounted::separate(&backing, &mnt, &[]);
    let mut holder = hold_open(&m.path("held.bin"));

    let out = Command::new(bin())
        .arg("umount")
        .arg(&mnt)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("busy"), "{err}");
    assert!(err.contains(&format!("pid {}", holder.id())), "{err}");
    assert!(err.contains("--lazy"), "{err}");
    assert!(
        our_mount_at(&m.mountpoint),
        "still mounted after a refused umount"
    );

    run_ok(Command::new(bin()).args(["umount", "--lazy"]).arg(&mnt));
    assert!(!our_mount_at(&m.mountpoint), "detached at once");
    // The holder's open file keeps working after the detach.
    holder.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let mut got = Vec::new();
    holder.stdout.take().unwrap().read_to_end(&mut got).unwrap();
    assert_eq!(got, b"held");
    assert!(holder.wait().unwrap().success());
    let status = m.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "daemon: {status}\n{}", m.log_text());
}

#[test]
fn sigterm_on_a_busy_mount_reports_the_holder_and_finishes_after_it_closes() {
    let (_tmp, backing, mnt) = dirs();
    fs::write(backing.join("held.bin"), b"held").unwrap();
    let mut m = Mounted::separate(&backing, &mnt, &[]);
    let mut holder = hold_open(&m.path("held.bin"));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(m.pid() as i32, libc::SIGTERM) };
    std::thread::sleep(Duration::from_millis(500));
    let log = m.log_text();
    assert!(log.contains("busy"), "{log}");
    assert!(log.contains(&format!("pid {}", holder.id())), "{log}");
    assert!(!our_mount_at(&m.mountpoint), "detached lazily");
    holder.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let mut got = Vec::new();
    holder.stdout.take().unwrap().read_to_end(&mut got).unwrap();
    assert_eq!(got, b"held", "open file still readable after the detach");
    holder.wait().unwrap();
    let status = m.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "daemon: {status}\n{}", m.log_text());
}

/// Runs `modelcache ARGS` (optionally as another user, or with a changed
/// environment) and expects a one-line error containing `needle`.
fn expect_error(mut cmd: Command, needle: &str) {
    let state = StateDir::new();
    state.apply(&mut cmd);
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "should fail: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one clear line, got: {err}");
    assert!(lines[0].starts_with("modelcache: "), "{err}");
    assert!(lines[0].contains(needle), "expected {needle:?} in {err}");
}

fn modelcache(args: &[&Path]) -> Command {
    let mut cmd = Command::new(bin());
    cmd.args(args);
    cmd
}

#[test]
fn bad_input_gets_one_clear_line_and_changes_nothing() {
    if common::needs_root("makes directories of other users") {
        return;
    }
    let (tmp, backing, mnt) = dirs();
    let file = tmp.path().join("file.txt");
    fs::write(&file, b"f").unwrap();
    let missing = tmp.path().join("missing");
    let p = |s: &str| PathBuf::from(s);
    let before = snapshot(tmp.path());

    let cases: Vec<(Command, &str)> = vec![
        (
            modelcache(&[&p("mount"), &p("--backing"), &backing, &missing]),
            "no such directory: ",
        ),
        (
            modelcache(&[&p("mount"), &p("--backing"), &backing, &file]),
            "is not a directory",
        ),
        (
            modelcache(&[&p("mount"), &p("--backing"), &missing, &mnt]),
            "missing (--backing)",
        ),
        (
            modelcache(&[&p("mount"), &p("--backing"), &file, &mnt]),
            "is not a directory",
        ),
        (modelcache(&[&p("mount"), &missing]), "no such directory: "),
        (
            modelcache(&[&p("mount"), &p("--backing"), tmp.path(), &mnt]),
            "inside the backing directory",
        ),
        (
            modelcache(&[&p("mount"), &p("--max-size"), &p("100TiB"), &mnt]),
            "more than this machine's RAM",
        ),
        (modelcache(&[&p("umount"), tmp.path()]), "not a mount point"),
        (
            modelcache(&[&p("umount"), &p("/proc")]),
            "not a modelcache mount",
        ),
    ];
    for (cmd, needle) in cases {
        expect_error(cmd, needle);
    }

    // Unreadable backing directory, for a normal user.
    let secret = tmp.path().join("secret");
    fs::create_dir(&secret).unwrap();
    set_mode(&secret, 0o700);
    let user_mnt = tmp.path().join("user_mnt");
    fs::create_dir(&user_mnt).unwrap();
    chown(&user_mnt, NOBODY, NOGROUP);
    let mut cmd = as_user(NOBODY, NOGROUP, bin());
    cmd.args(["mount", "--backing"]).arg(&secret).arg(&user_mnt);
    expect_error(cmd, "cannot read the backing directory");

    // fusermount3 missing, for a normal user.
    chown(&backing, NOBODY, NOGROUP);
    let mut cmd = as_user(NOBODY, NOGROUP, bin());
    cmd.env("PATH", "/nonexistent")
        .args(["mount", "--backing"])
        .arg(&backing)
        .arg(&user_mnt);
    expect_error(cmd, "fusermount3 was not found");

    // No /dev/fuse: hide /dev in a private mount namespace.
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg("mount -t tmpfs tmpfs /dev && exec \"$0\" mount --backing \"$1\" \"$2\"")
        .arg(bin())
        .arg(&backing)
        .arg(&mnt);
    expect_error(cmd, "/dev/fuse does not exist");

    assert!(!our_mount_at(&mnt.canonicalize().unwrap()));
    assert_eq!(snapshot(tmp.path()), {
        let mut b = before;
        b.push(("secret/".into(), None));
        b.push(("user_mnt/".into(), None));
        b.sort();
        b
    });
}

#[test]
fn mounting_the_same_directory_twice_is_refused() {
    let tmp = shared_tempdir();
    let models = tmp.path().join("models");
    fs::create_dir(&models).unwrap();
    fs::write(models.join("a.sft"), b"a").unwrap();
    let m = Mounted::in_place(&models, &[]);
    expect_error(
        modelcache(&[Path::new("mount"), &models]),
        "already a modelcache mount",
    );
    let other = tmp.path().join("other");
    fs::create_dir(&other).unwrap();
    expect_error(
        modelcache(&[Path::new("mount"), Path::new("--backing"), &other, &models]),
        "already a modelcache mount",
    );
    // The first mount is untouched and still serves.
    assert_eq!(fs::read(m.path("a.sft")).unwrap(), b"a");
    m.unmount();
    assert_eq!(fs::read(models.join("a.sft")).unwrap(), b"a");
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn cached_listings_of_an_in_place_mount_follow_every_change_made_through_it() {
    let tmp = shared_tempdir();
    let models = tmp.path().join("models");
    fs::create_dir_all(models.join("vae")).unwrap();
    fs::write(models.join("vae/a.safetensors"), b"a").unwrap();
    let m = Mounted::in_place(&models, &[]);
    let vae = m.path("vae");
    assert_eq!(names(&vae), ["a.safetensors"]);
    fs::write(vae.join("b.safetensors"), b"b").unwrap();
    assert_eq!(names(&vae), ["a.safetensors", "b.safetensors"]);
    fs::rename(vae.join("a.safetensors"), vae.join("c.safetensors")).unwrap();
    assert_eq!(names(&vae), ["b.safetensors", "c.safetensors"]);
    fs::remove_file(vae.join("b.safetensors")).unwrap();
    assert_eq!(names(&vae), ["c.safetensors"]);
    fs::write(vae.join("c.safetensors"), b"longer").unwrap();
    assert_eq!(fs::metadata(vae.join("c.safetensors")).unwrap().len(), 6);
    m.unmount();
}

#[test]
fn changes_behind_a_separate_mount_show_within_its_one_second_ttl() {
    let (_tmp, backing, mnt) = dirs();
    fs::write(backing.join("a.bin"), b"a").unwrap();
    let m = Mounted::separate(&backing, &mnt, &[]);
    assert_eq!(names(&m.mountpoint), ["a.bin"]);
    assert_eq!(fs::metadata(m.path("a.bin")).unwrap().len(), 1);
    // Changed behind the mount, not through it.
    fs::write(backing.join("b.bin"), b"b").unwrap();
    fs::write(backing.join("a.bin"), b"aaaa").unwrap();
    // A new name is visible at once (listings are not cached with a short TTL).
    assert_eq!(names(&m.mountpoint), ["a.bin", "b.bin"]);
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(fs::metadata(m.path("a.bin")).unwrap().len(), 4);
    assert_eq!(fs::read(m.path("a.bin")).unwrap(), b"aaaa");
    m.unmount();
}

/// The error number of an I/O result, for the read-only checks.
fn errno_of<T>(r: std::io::Result<T>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

/// `--read-only` (mount's `ro`): every change gets EROFS from the kernel,
/// nothing reaches the backing directory, and reads and the cache work as
/// ever, in both modes.
#[test]
fn a_read_only_mount_refuses_every_change_and_still_caches() {
    if common::needs_root("passthrough mode") {
        return;
    }
    let (_tmp, backing, mnt) = dirs();
    let model = pseudo_random(4 << 20, 3);
    fs::write(backing.join("m.safetensors"), &model).unwrap();
    fs::create_dir(backing.join("dir")).unwrap();
    for mode in [Mode::Copy, Mode::Passthrough] {
        let mut args = vec!["--read-only"];
        args.extend(mode.args());
        let m = Mounted::separate(&backing, &mnt, &args);
        let line = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let ours = line
            .lines()
            .find(|l| l.contains(&format!(" {} ", m.mountpoint.display())))
            .unwrap();
        assert!(
            ours.split(' ')
                .nth(5)
                .unwrap()
                .split(',')
                .any(|o| o == "ro"),
            "{ours}"
        );
        assert!(fs::read(m.path("m.safetensors")).unwrap() == model);
        let p = |rel: &str| m.path(rel);
        let erofs = Some(libc::EROFS);
        assert_eq!(
            errno_of(fs::OpenOptions::new().write(true).open(p("m.safetensors"))),
            erofs
        );
        assert_eq!(errno_of(fs::File::create(p("new.bin"))), erofs);
        assert_eq!(errno_of(fs::create_dir(p("newdir"))), erofs);
        assert_eq!(errno_of(fs::remove_file(p("m.safetensors"))), erofs);
        assert_eq!(errno_of(fs::remove_dir(p("dir"))), erofs);
        assert_eq!(
            errno_of(fs::rename(p("m.safetensors"), p("x.safetensors"))),
            erofs
        );
        assert_eq!(
            errno_of(std::os::unix::fs::symlink("m.safetensors", p("l"))),
            erofs
        );
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            errno_of(fs::set_permissions(
                p("m.safetensors"),
                fs::Permissions::from_mode(0o600)
            )),
            erofs
        );
        assert_eq!(fs::read(backing.join("m.safetensors")).unwrap(), model);
        assert!(!backing.join("new.bin").exists() && !backing.join("newdir").exists());
        // The cache works as ever.
        wait_until(
            Duration::from_secs(20),
            &format!("m.safetensors to be cached ({mode:?})"),
            || {
                status_file(&mount_status(&m.mountpoint), "m.safetensors")
                    .is_some_and(|f| f["state"] == "cached")
            },
        );
        m.unmount();
    }
    // A normal user's read-only mount, through fusermount3.
    for p in [
        &backing,
        &mnt,
        &backing.join("m.safetensors"),
        &backing.join("dir"),
    ] {
        chown(p, NOBODY, NOGROUP);
    }
    let mut daemon = as_user(NOBODY, NOGROUP, bin());
    daemon
        .args(["mount", "--read-only", "--backing"])
        .arg(&backing)
        .arg(&mnt);
    let m = Mounted::start(daemon, &mnt);
    let out = as_user(NOBODY, NOGROUP, "/bin/sh")
        .arg("-c")
        .arg(format!(
            "cat {0}/m.safetensors >/dev/null && : > {0}/new.bin",
            m.mountpoint.display()
        ))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("Read-only file system"),
        "{err}"
    );
    m.unmount();
}

/// The access time of `path` on the backing filesystem, in seconds.
fn atime(path: &Path) -> i64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).unwrap().atime()
}

/// Sets `path`'s access time a day before its modification time, so that
/// relatime updates it at the next read.
fn age_atime(path: &Path) -> i64 {
    use std::os::unix::fs::MetadataExt;
    let mtime = fs::metadata(path).unwrap().mtime();
    let old = mtime - 86_400;
    let times = [
        libc::timespec {
            tv_sec: old,
            tv_nsec: 0,
        },
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
    ];
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid path and two timespecs.
    assert_eq!(
        unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) },
        0
    );
    old
}

/// `--atime noatime` keeps reads through the mount from touching access
/// times in copy mode (the daemon reads with O_NOATIME); the default
/// (relatime) updates an access time older than the last change, as the
/// backing filesystem does, in both modes. In passthrough mode the kernel
/// reads the backing file itself, under the backing filesystem's own atime
/// rule: the flag is on the mount, and README says the rest.
#[test]
fn noatime_keeps_access_times_and_relatime_is_the_default() {
    if common::needs_root("passthrough mode") {
        return;
    }
    let (_tmp, backing, mnt) = dirs();
    for name in ["a.bin", "m.safetensors"] {
        fs::write(backing.join(name), pseudo_random(2 << 20, 9)).unwrap();
    }
    let cases = [
        (Mode::Copy, Some("noatime"), true),
        (Mode::Copy, None, false),
        (Mode::Passthrough, None, false),
    ];
    for (mode, atime_flag, kept) in cases {
        let mut args: Vec<&str> = mode.args().to_vec();
        if let Some(a) = atime_flag {
            args.extend(["--atime", a]);
        }
        let m = Mounted::separate(&backing, &mnt, &args);
        for name in ["a.bin", "m.safetensors"] {
            let old = age_atime(&backing.join(name));
            let _ = fs::read(m.path(name)).unwrap();
            let now = atime(&backing.join(name));
            assert_eq!(
                now == old,
                kept,
                "{mode:?} {atime_flag:?} {name}: atime {old} -> {now}"
            );
        }
        m.unmount();
    }
    // The flags reach the mount itself, in both modes.
    for mode in [Mode::Copy, Mode::Passthrough] {
        let mut args: Vec<&str> = mode.args().to_vec();
        args.extend(["--atime", "noatime", "--nodiratime"]);
        let m = Mounted::separate(&backing, &mnt, &args);
        let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let line = info
            .lines()
            .find(|l| l.contains(&format!(" {} ", m.mountpoint.display())))
            .unwrap();
        let options: Vec<&str> = line.split(' ').nth(5).unwrap().split(',').collect();
        assert!(
            options.contains(&"noatime") && options.contains(&"nodiratime"),
            "{line}"
        );
        m.unmount();
    }
}

/// A write through a shared mapping shows in the file's mtime and ctime
/// through the mount after msync, and after close, as on the backing
/// filesystem (ComfyUI and backup tools go by mtime). Both modes, in place
/// (attributes cached for 60 s) and with --backing.
#[test]
fn writes_through_a_shared_mapping_update_mtime() {
    if common::needs_root("passthrough mode") {
        return;
    }
    use std::os::unix::fs::MetadataExt;
    for mode in [Mode::Copy, Mode::Passthrough] {
        for in_place in [true, false] {
            let (_tmp, backing, mnt) = dirs();
            fs::write(backing.join("f.bin"), vec![0u8; 1 << 16]).unwrap();
            let m = if in_place {
                Mounted::in_place(&backing, &mode.args())
            } else {
                Mounted::separate(&backing, &mnt, &mode.args())
            };
            let path = m.path("f.bin");
            let before = fs::metadata(&path).unwrap();
            std::thread::sleep(Duration::from_millis(1100));
            let file = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .unwrap();
            // SAFETY: a shared mapping of a file this test owns alone.
            let mut map = unsafe { memmap2::MmapMut::map_mut(&file).unwrap() };
            map[..5].copy_from_slice(b"hello");
            map.flush().unwrap();
            let synced = fs::metadata(&path).unwrap();
            drop(map);
            drop(file);
            let closed = fs::metadata(&path).unwrap();
            let what = format!("{mode:?}, in place {in_place}");
            assert!(
                synced.mtime_nsec() != before.mtime_nsec() || synced.mtime() != before.mtime(),
                "{what}: mtime after msync"
            );
            assert!(
                synced.ctime() * 1_000_000_000 + synced.ctime_nsec()
                    > before.ctime() * 1_000_000_000 + before.ctime_nsec(),
                "{what}: ctime after msync"
            );
            assert_eq!(
                closed.mtime(),
                fs::metadata(backing.join("f.bin")).unwrap().mtime(),
                "{what}"
            );
            assert_eq!(&fs::read(&path).unwrap()[..5], b"hello", "{what}");
            m.unmount();
        }
    }
}

/// After a write, truncate, fallocate, punch-hole or zero-range by its owner
/// or by another user with write access, a setuid/setgid file has the mode
/// it would have on the backing filesystem (which drops the bits as the
/// kernel rules say). Both modes, compared with the backing directory.
#[test]
fn setuid_and_setgid_are_dropped_as_on_the_backing_filesystem() {
    if common::needs_root("passthrough mode and other users") {
        return;
    }
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let (_tmp, backing, mnt) = dirs();
    set_mode(&backing, 0o777);
    let direct = backing.join("direct");
    fs::create_dir(&direct).unwrap();
    set_mode(&direct, 0o777);
    let ops = [
        ("write", "printf x | dd of=F conv=notrunc status=none"),
        ("truncate", "truncate -s 0 F"),
        ("fallocate", "fallocate -l 1M F"),
        ("punch", "fallocate -p -o 0 -l 4096 F"),
        ("zero", "fallocate -z -o 0 -l 4096 F"),
    ];
    let modes = [0o6666, 0o2666, 0o2676, 0o4666, 0o6676];
    for mode in [Mode::Copy, Mode::Passthrough] {
        let mut args = vec!["--allow-other"];
        args.extend(mode.args());
        let m = Mounted::separate(&backing, &mnt, &args);
        let mut diffs = Vec::new();
        for (op, script) in ops {
            for bits in modes {
                // Owned by root (nobody is another user) and by nobody.
                for owner in [0, NOBODY] {
                    let mut got = Vec::new();
                    for base in [direct.clone(), m.path("")] {
                        let name = format!("{op}-{bits:o}-{owner}-{mode:?}");
                        let f = base.join(&name);
                        fs::write(&f, vec![1u8; 8192]).unwrap();
                        chown(&f, owner, 0);
                        fs::set_permissions(&f, fs::Permissions::from_mode(bits)).unwrap();
                        let cmd = script.replace('F', &format!("'{}'", f.display()));
                        let out = as_user(NOBODY, NOGROUP, "/bin/sh")
                            .args(["-c", &cmd])
                            .output()
                            .unwrap();
                        got.push((
                            out.status.success(),
                            fs::metadata(&f).unwrap().mode() & 0o7777,
                        ));
                    }
                    if got[0] != got[1] {
                        diffs.push(format!(
                            "{op} on {bits:o} owned by {owner}: backing {:?}, mount {:?}",
                            got[0], got[1]
                        ));
                    }
                }
            }
        }
        assert!(diffs.is_empty(), "{mode:?}:\n{}", diffs.join("\n"));
        m.unmount();
    }
}
