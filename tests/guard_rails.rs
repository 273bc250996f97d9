//! Guard rails around mounting and unmounting, on real FUSE mounts: a root
//! mount that would lock a user out, a mistyped directory, processes left in
//! the directory underneath an in-place mount, and who really holds a busy
//! mount.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use common::*;

/// A helper process, killed and reaped on drop (also when a test fails).
struct Helper(Child);

impl Helper {
    /// `sleep 300` with its working directory `cwd`.
    fn sleep_in(cwd: &Path) -> Helper {
        Helper(
            Command::new("sleep")
                .arg("300")
                .current_dir(cwd)
                .spawn()
                .expect("start sleep"),
        )
    }

    /// `sleep 300` keeping `file` open on fd 3, working directory `cwd`.
    fn holding_open(file: &Path, cwd: &Path) -> Helper {
        let h = Helper(
            Command::new("sh")
                .arg("-c")
                .arg("exec 3< \"$1\"; exec sleep 300")
                .arg("sh")
                .arg(file)
                .current_dir(cwd)
                .spawn()
                .expect("start sh"),
        );
        // Until the shell has opened the file and become `sleep`.
        wait_until(Duration::from_secs(10), "sh to exec sleep", || {
            fs::read_to_string(format!("/proc/{}/comm", h.pid())).unwrap_or_default() == "sleep\n"
        });
        h
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Expects `cmd` to fail within 20 s with one line, `modelcache: …`, and
/// returns it. Should it mount instead, the daemon is killed and the mount
/// points in `unmount` are detached before the test fails.
fn one_error_line(mut cmd: Command, unmount: &[&Path]) -> String {
    let state = StateDir::new();
    state.apply(&mut cmd);
    let Some(done) = run_within(&mut cmd, Duration::from_secs(20)) else {
        for p in unmount {
            force_unmount(&p.canonicalize().unwrap_or_else(|_| p.to_path_buf()));
        }
        panic!("{cmd:?} did not fail: it ran for 20 s");
    };
    let err = done.stderr;
    assert!(!done.status.success(), "should fail: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one clear line, got: {err}");
    assert!(lines[0].starts_with("modelcache: "), "{err}");
    lines[0].to_string()
}

fn mount_cmd(args: &[&Path]) -> Command {
    let mut cmd = Command::new(bin());
    cmd.arg("mount").args(args);
    cmd
}

fn canonical_tempdir() -> (tempfile::TempDir, PathBuf) {
    let tmp = shared_tempdir();
    let root = tmp.path().canonicalize().unwrap();
    (tmp, root)
}

#[test]
fn a_root_mount_over_another_users_directory_needs_allow_other() {
    if common::needs_root("mounts as root over another user's directory") {
        return;
    }
    let (_tmp, root) = canonical_tempdir();
    let models = root.join("models");
    fs::create_dir(&models).unwrap();
    fs::write(models.join("a.safetensors"), b"a").unwrap();
    chown(&models, NOBODY, NOGROUP);

    let line = one_error_line(mount_cmd(&[&models]), &[&models]);
    assert_eq!(
        line,
        format!(
            "modelcache: {} belongs to nobody (uid 65534): a root mount without --allow-other \
             would lock nobody out of it. Run modelcache as nobody (e.g. systemctl --user as \
             that user), or add --allow-other",
            models.display()
        )
    );
    assert!(!our_mount_at(&models), "nothing mounted");
    // A separate mount point of that user: the same.
    let mnt = root.join("mnt");
    fs::create_dir(&mnt).unwrap();
    chown(&mnt, NOBODY, NOGROUP);
    let backing = root.join("backing");
    fs::create_dir(&backing).unwrap();
    let line = one_error_line(
        mount_cmd(&[Path::new("--backing"), &backing, &mnt]),
        &[&mnt],
    );
    assert!(line.contains("belongs to nobody (uid 65534)"), "{line}");
    assert!(!our_mount_at(&mnt), "nothing mounted");

    // With --allow-other the user keeps access: it mounts, and they can read.
    let m = Mounted::in_place(&models, &["--allow-other"]);
    let out = run_ok(as_user(NOBODY, NOGROUP, "cat").arg(m.path("a.safetensors")));
    assert_eq!(out.stdout, b"a");
    m.unmount();

    // The backing directory's owner is not judged: a root-owned mount
    // point over a user's files locks nobody out of their own directory.
    let root_mnt = root.join("root_mnt");
    fs::create_dir(&root_mnt).unwrap();
    let m = Mounted::separate(&models, &root_mnt, &[]);
    assert_eq!(fs::read(m.path("a.safetensors")).unwrap(), b"a");
    m.unmount();
}

#[test]
fn a_mistyped_directory_gets_the_nearest_existing_one() {
    let (_tmp, root) = canonical_tempdir();
    fs::create_dir_all(root.join("ComfyUI/models/checkpoints")).unwrap();
    let models = root.join("ComfyUI/models");
    let r = root.display();

    // The mount point, in place.
    let line = one_error_line(mount_cmd(&[&root.join("ComfyUI/modles")]), &[]);
    assert_eq!(
        line,
        format!(
            "modelcache: no such directory: {r}/ComfyUI/modles — did you mean {r}/ComfyUI/models?"
        )
    );
    // A missing parent: named, and the whole path corrected.
    let line = one_error_line(mount_cmd(&[&root.join("ComfUI/models/checkpoints")]), &[]);
    assert_eq!(
        line,
        format!(
            "modelcache: no such directory: {r}/ComfUI/models/checkpoints: {r}/ComfUI does not \
             exist — did you mean {r}/ComfyUI/models/checkpoints?"
        )
    );
    // --backing.
    let mnt = root.join("mnt");
    fs::create_dir(&mnt).unwrap();
    let line = one_error_line(
        mount_cmd(&[Path::new("--backing"), &root.join("ComfyUI/model"), &mnt]),
        &[&mnt],
    );
    assert_eq!(
        line,
        format!(
            "modelcache: no such directory: {r}/ComfyUI/model (--backing) — did you mean \
             {r}/ComfyUI/models?"
        )
    );
    // Nothing near: no guess, and no advice to create it.
    let line = one_error_line(mount_cmd(&[&root.join("ComfyUI/unrelated")]), &[]);
    assert_eq!(
        line,
        format!("modelcache: no such directory: {r}/ComfyUI/unrelated")
    );
    assert!(!our_mount_at(&models) && !our_mount_at(&mnt));
    assert!(!root.join("ComfyUI/modles").exists(), "nothing created");
}

#[test]
fn processes_in_the_directory_before_an_in_place_mount_are_named_in_one_warning() {
    let (_tmp, root) = canonical_tempdir();
    let models = root.join("models");
    fs::create_dir_all(models.join("loras")).unwrap();
    fs::write(models.join("a.safetensors"), b"a").unwrap();
    let in_dir = Helper::sleep_in(&models.join("loras"));
    let with_file = Helper::holding_open(&models.join("a.safetensors"), &root);
    let elsewhere = Helper::sleep_in(&root);

    let m = Mounted::in_place(&models, &[]);
    let log = m.log_text();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("from before the mount"))
        .collect();
    assert_eq!(warnings.len(), 1, "one warning line:\n{log}");
    let w = warnings[0];
    assert!(w.contains("WARN"), "{w}");
    assert!(
        w.contains(&format!(
            "2 processes use {} from before the mount and will not see it (they keep the \
             directory underneath, uncached): ",
            models.display()
        )),
        "{w}"
    );
    assert!(
        w.contains(&format!("pid {} (sleep, working directory)", in_dir.pid())),
        "{w}"
    );
    assert!(
        w.contains(&format!("pid {} (sleep, open file)", with_file.pid())),
        "{w}"
    );
    assert!(w.ends_with(": restart them, or cd out and back in"), "{w}");
    assert!(!w.contains(&format!("pid {} ", elsewhere.pid())), "{w}");
    assert!(!w.contains(&format!("pid {} ", m.pid())), "{w}");
    // They are not holders of the mount: it unmounts cleanly.
    m.unmount();

    // Nobody in the directory: no warning.
    drop((in_dir, with_file));
    let m = Mounted::in_place(&models, &[]);
    assert!(
        !m.log_text().contains("from before the mount"),
        "{}",
        m.log_text()
    );
    m.unmount();
}

/// A copy-mode daemon maps the files it caches through its mount, so a
/// plain umount(2) finds it busy; `modelcache umount` must tell that, and a
/// process left in the directory underneath, from real holders.
#[test]
fn umount_names_only_processes_that_really_use_the_mount() {
    let (_tmp, root) = canonical_tempdir();
    let models = root.join("models");
    fs::create_dir_all(models.join("sub")).unwrap();
    write_safetensors(&models.join("m.safetensors"), 4, 1 << 20, 9);
    // In the directory from before the mount: it keeps the one underneath.
    let underneath = Helper::sleep_in(&models.join("sub"));
    let umount = |lazy: bool| {
        let mut cmd = Command::new(bin());
        cmd.arg("umount");
        if lazy {
            cmd.arg("--lazy");
        }
        cmd.arg(&models).output().unwrap()
    };
    let warm = |m: &Mounted| {
        run_ok(Command::new(bin()).arg("warm").arg(m.path("m.safetensors")));
        assert!(
            !cached_files(m.pid(), &models, &m.mountpoint).is_empty(),
            "the daemon maps the file it caches"
        );
    };

    // Only the daemon (and the process underneath): umount succeeds.
    let mut m = Mounted::in_place(&models, &["--passthrough", "off"]);
    warm(&m);
    let out = umount(false);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!our_mount_at(&models));
    let status = m.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "daemon: {status}\n{}", m.log_text());

    // A process inside the mount: named (pid and command), the daemon and
    // the process underneath are not; then a lazy umount detaches it.
    let mut m = Mounted::in_place(&models, &["--passthrough", "off"]);
    warm(&m);
    let inside = Helper::sleep_in(&m.path("sub"));
    let out = umount(false);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains(&format!(
            "{} is busy: held by pid {} (sleep) via its working directory. ",
            models.display(),
            inside.pid()
        )),
        "{err}"
    );
    assert!(!err.contains(&format!("pid {} ", m.pid())), "{err}");
    assert!(!err.contains("modelcache)"), "{err}");
    assert!(
        !err.contains(&format!("pid {} ", underneath.pid())),
        "{err}"
    );
    assert!(
        our_mount_at(&models),
        "still mounted after a refused umount"
    );
    let out = umount(true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!our_mount_at(&models), "detached at once");
    drop(inside);
    let status = m.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "daemon: {status}\n{}", m.log_text());

    // SIGTERM: the process underneath does not make the mount busy.
    let mut m = Mounted::in_place(&models, &["--passthrough", "off"]);
    warm(&m);
    let status = m.stop_with(libc::SIGTERM);
    assert!(status.success(), "daemon: {status}\n{}", m.log_text());
    assert!(!m.log_text().contains("busy"), "{}", m.log_text());
    assert!(!our_mount_at(&models));
}

/// At SIGTERM, a busy mount's warning names the real holder, never the
/// daemon nor a process in the directory underneath.
#[test]
fn sigterm_on_a_busy_mount_names_only_the_real_holder() {
    let (_tmp, root) = canonical_tempdir();
    let models = root.join("models");
    fs::create_dir_all(models.join("sub")).unwrap();
    let underneath = Helper::sleep_in(&models.join("sub"));
    let mut m = Mounted::in_place(&models, &[]);
    let inside = Helper::sleep_in(&m.path("sub"));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(m.pid() as i32, libc::SIGTERM) };
    let warned = wait_for(Duration::from_secs(10), || m.log_text().contains("is busy"));
    assert!(warned, "no busy warning:\n{}", m.log_text());
    let log = m.log_text();
    let line = log.lines().find(|l| l.contains("is busy")).unwrap();
    assert!(
        line.contains(&format!(
            "is busy: held by pid {} (sleep) via its working directory;",
            inside.pid()
        )),
        "{line}"
    );
    assert!(
        !line.contains(&format!("pid {} ", underneath.pid())),
        "{line}"
    );
    assert!(!our_mount_at(&models), "detached lazily");
    drop(inside);
    let status = m.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "daemon: {status}\n{}", m.log_text());
}
