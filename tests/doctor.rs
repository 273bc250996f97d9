//! `modelcache doctor`: each check's passing and failing case, made by
//! changing the doctor's real environment (PATH, the user, rlimits, a
//! private mount namespace over /dev/fuse or /etc), never the machine's.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::*;

fn is_root() -> bool {
    // SAFETY: no arguments.
    unsafe { libc::geteuid() == 0 }
}

/// True (after one printed line) when the test cannot run here.
fn skip_unless_root() -> bool {
    if is_root() {
        return false;
    }
    println!("skipped: needs root (run through tests/run)");
    true
}

/// An environment without the caller's manifest: HOME is an empty
/// directory anyone can read.
struct Env {
    home: tempfile::TempDir,
}

impl Env {
    fn new() -> Self {
        Env {
            home: shared_tempdir(),
        }
    }

    fn apply<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        cmd.env("HOME", self.home.path())
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("NO_COLOR")
    }

    /// `modelcache doctor ARGS` as this process's user.
    fn doctor(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(bin());
        self.apply(&mut cmd).arg("doctor").args(args);
        cmd.output().unwrap()
    }

    /// `modelcache doctor ARGS` as nobody, with `path` as PATH.
    fn doctor_as_nobody(&self, path: &str, args: &[&str]) -> Output {
        let mut cmd = as_user(NOBODY, NOGROUP, bin());
        self.apply(&mut cmd)
            .env("PATH", path)
            .arg("doctor")
            .args(args);
        cmd.output().unwrap()
    }

    /// `sh -c SCRIPT` in a private mount namespace (as root); the script
    /// ends by running `$DOCTOR_AS_NOBODY` (setpriv to nobody, then
    /// `modelcache doctor "$@"`) or `$DOCTOR`.
    fn in_namespace(&self, script: &str, args: &[&str]) -> Output {
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(format!("set -e\n{script}"))
            .arg("sh")
            .args(args)
            .env(
                "DOCTOR_AS_NOBODY",
                format!(
                    "/usr/bin/setpriv --reuid={NOBODY} --regid={NOGROUP} --clear-groups -- {} doctor",
                    bin()
                ),
            )
            .env("DOCTOR", format!("{} doctor", bin()));
        self.apply(&mut cmd).output().unwrap()
    }
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The output line of `check` (`STATUS  check: …`), which must be there.
fn line(out: &Output, check: &str) -> String {
    let text = stdout(out);
    text.lines()
        .find(|l| {
            l.get(6..)
                .is_some_and(|rest| rest.starts_with(&format!("{check}: ")))
        })
        .unwrap_or_else(|| {
            panic!(
                "no {check:?} line in:\n{text}\nstderr: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
        .to_string()
}

fn has_line(out: &Output, check: &str) -> bool {
    stdout(out).lines().any(|l| {
        l.get(6..)
            .is_some_and(|rest| rest.starts_with(&format!("{check}: ")))
    })
}

fn assert_status(out: &Output, check: &str, status: &str) -> String {
    let l = line(out, check);
    assert!(
        l.starts_with(&format!("{status:<4}  ")),
        "expected {status} for {check}, got:\n{}",
        stdout(out)
    );
    l
}

fn code(out: &Output) -> i32 {
    out.status.code().expect("exited")
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn root_passes_on_its_own_directory_in_plain_text() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let out = env.doctor(&[path_str(dir.path())]);
    assert_eq!(code(&out), 0, "{}", stdout(&out));
    assert_status(&out, "fusermount3", "ok");
    assert_status(&out, "/dev/fuse", "ok");
    assert_status(&out, "manifest", "ok");
    assert_status(&out, "mount point", "ok");
    // Root: passthrough or copy mode, information either way.
    assert!(!line(&out, "reads").starts_with("FAIL"));
    assert!(!has_line(&out, "allow_other"), "only with --allow-other");
    assert!(!has_line(&out, "ComfyUI"), "not a ComfyUI tree");
    assert!(!out.stdout.contains(&0x1b), "no ANSI when not a terminal");
    let last = stdout(&out).lines().last().unwrap_or("").to_string();
    assert!(last.starts_with("nothing blocks a mount"), "{last}");
}

#[test]
fn fusermount3_missing_from_path_fails_for_a_normal_user() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new();
    let out = env.doctor_as_nobody("/nonexistent-dir", &[]);
    let l = assert_status(&out, "fusermount3", "FAIL");
    assert!(
        l.contains("not found in PATH") && l.contains("fuse3"),
        "{l}"
    );
    assert_eq!(code(&out), 1);
    assert!(String::from_utf8_lossy(&out.stderr).contains("failed"));

    // Root needs none.
    let mut cmd = Command::new(bin());
    env.apply(&mut cmd)
        .env("PATH", "/nonexistent-dir")
        .arg("doctor");
    let out = cmd.output().unwrap();
    assert!(assert_status(&out, "fusermount3", "ok").contains("not needed as root"));

    // One in PATH: setuid root passes, a plain copy does not. The doctor
    // only looks at the file, it never runs it.
    let bins = shared_tempdir();
    let helper = bins.path().join("fusermount3");
    fs::write(&helper, "#!/bin/sh\nexit 1\n").unwrap();
    set_mode(&helper, 0o4755);
    let out = env.doctor_as_nobody(path_str(bins.path()), &[]);
    assert!(assert_status(&out, "fusermount3", "ok").contains("setuid root"));
    set_mode(&helper, 0o755);
    let out = env.doctor_as_nobody(path_str(bins.path()), &[]);
    assert!(assert_status(&out, "fusermount3", "FAIL").contains("not setuid root"));
    assert_eq!(code(&out), 1);
}

/// Makes `$T/fuse`, a FUSE device node of `mode`, for binding over
/// /dev/fuse in a namespace; false (after a printed line) where this
/// machine does not let root make device nodes.
fn device_copy(dir: &Path, mode: &str) -> bool {
    let node = dir.join("fuse");
    let _ = fs::remove_file(&node);
    let made = Command::new("mknod")
        .args(["-m", mode])
        .arg(&node)
        .args(["c", "10", "229"])
        .status()
        .is_ok_and(|s| s.success());
    if !made {
        println!("skipped: mknod is not allowed here");
    }
    made
}

#[test]
fn a_fuse_device_the_user_cannot_open_fails() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new();
    let t = shared_tempdir();
    if !device_copy(t.path(), "0600") {
        return;
    }
    let bind = r#"mount --bind "$1" /dev/fuse; exec $DOCTOR_AS_NOBODY"#;
    let node = t.path().join("fuse");
    let out = env.in_namespace(bind, &[path_str(&node)]);
    let l = assert_status(&out, "/dev/fuse", "FAIL");
    assert!(
        l.contains("cannot be opened read-write by uid 65534"),
        "{l}"
    );
    assert!(
        l.contains("mode 0600") && l.contains("chmod 0666 /dev/fuse"),
        "{l}"
    );
    assert!(l.contains("--device /dev/fuse"), "{l}");
    assert_eq!(code(&out), 1);

    // The same device, mode 0666: nobody opens it.
    assert!(device_copy(t.path(), "0666"));
    let out = env.in_namespace(bind, &[path_str(&node)]);
    assert_status(&out, "/dev/fuse", "ok");

    // A regular file in its place.
    let file = t.path().join("file");
    fs::write(&file, "").unwrap();
    let out = env.in_namespace(bind, &[path_str(&file)]);
    assert!(assert_status(&out, "/dev/fuse", "FAIL").contains("regular file"));
    assert_eq!(code(&out), 1);

    // No /dev/fuse at all.
    let out = env.in_namespace("mount -t tmpfs tmpfs /dev; exec $DOCTOR", &[]);
    let l = assert_status(&out, "/dev/fuse", "FAIL");
    assert!(
        l.contains("does not exist") && l.contains("modprobe fuse"),
        "{l}"
    );
    assert_eq!(code(&out), 1);
}

#[test]
fn allow_other_needs_user_allow_other_in_fuse_conf() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new();
    let t = shared_tempdir();
    // /etc as an overlay in the namespace: its fuse.conf is the test's,
    // the machine's is never touched.
    for d in ["upper", "work"] {
        fs::create_dir(t.path().join(d)).unwrap();
    }
    let script = r#"T="$1"; shift
mount -t overlay overlay -o "lowerdir=/etc,upperdir=$T/upper,workdir=$T/work" /etc || exit 77
case "$CONF" in
  none) rm -f /etc/fuse.conf ;;
  *) printf "$CONF" > /etc/fuse.conf ;;
esac
exec $DOCTOR_AS_NOBODY "$@""#;
    let run = |conf: &str| {
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(script)
            .arg("sh")
            .arg(t.path())
            .arg("--allow-other")
            .env("CONF", conf)
            .env(
                "DOCTOR_AS_NOBODY",
                format!(
                    "/usr/bin/setpriv --reuid={NOBODY} --regid={NOGROUP} --clear-groups -- {} doctor",
                    bin()
                ),
            );
        env.apply(&mut cmd).output().unwrap()
    };
    let out = run("# user_allow_other\\nmount_max = 1000\\n");
    if code(&out) == 77 {
        println!("skipped: an overlay mount over /etc is not possible here");
        return;
    }
    let l = assert_status(&out, "allow_other", "FAIL");
    assert!(
        l.contains("not set") && l.contains("echo user_allow_other >> /etc/fuse.conf"),
        "{l}"
    );
    assert_eq!(code(&out), 1);
    let out = run("none");
    assert!(assert_status(&out, "allow_other", "FAIL").contains("does not exist"));
    let out = run("user_allow_other");
    assert!(assert_status(&out, "allow_other", "FAIL").contains("no newline"));
    let out = run("mount_max = 1000\\nuser_allow_other\\n");
    assert_status(&out, "allow_other", "ok");

    // Root needs no user_allow_other; without --allow-other nothing is said.
    let out = env.doctor(&["--allow-other"]);
    assert_status(&out, "allow_other", "ok");
    let out = env.doctor_as_nobody("/usr/bin:/bin", &[]);
    assert!(!has_line(&out, "allow_other"));
}

#[test]
fn a_missing_directory_or_a_file_fails() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new();
    let t = tempfile::tempdir().unwrap();
    let missing = t.path().join("models");
    let out = env.doctor(&[path_str(&missing)]);
    let l = assert_status(&out, "mount point", "FAIL");
    assert!(
        l.contains("does not exist") && l.contains("mkdir -p"),
        "{l}"
    );
    assert_eq!(code(&out), 1);

    let file = t.path().join("file");
    fs::write(&file, "").unwrap();
    let out = env.doctor(&[path_str(&file)]);
    assert!(assert_status(&out, "mount point", "FAIL").contains("not a directory"));
    assert_eq!(code(&out), 1);

    let out = env.doctor(&[path_str(&t.path().join("no/such/parent"))]);
    assert_status(&out, "mount point", "FAIL");
    assert_eq!(code(&out), 1);
}

#[test]
fn root_on_another_users_directory_needs_allow_other() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new();
    let t = shared_tempdir();
    let models = t.path().join("models");
    fs::create_dir(&models).unwrap();
    chown(&models, NOBODY, NOGROUP);
    let out = env.doctor(&[path_str(&models)]);
    let l = assert_status(&out, "mount point", "FAIL");
    assert!(l.contains("belongs to nobody (uid 65534)"), "{l}");
    assert!(
        l.contains("sudo -u nobody modelcache mount") && l.contains("add --allow-other"),
        "both fixes: {l}"
    );
    assert_eq!(code(&out), 1);

    let out = env.doctor(&[path_str(&models), "--allow-other"]);
    assert_status(&out, "mount point", "ok");
    assert_eq!(code(&out), 0, "{}", stdout(&out));

    // As its owner, it can be mounted (whatever else this machine lacks).
    let out = env.doctor_as_nobody("/usr/bin:/bin", &[path_str(&models)]);
    assert_status(&out, "mount point", "ok");
    // Another normal user's directory it cannot write: fusermount3 refuses.
    chown(&models, 0, 0);
    let out = env.doctor_as_nobody("/usr/bin:/bin", &[path_str(&models)]);
    assert!(assert_status(&out, "mount point", "FAIL").contains("no write access"));
    assert_eq!(code(&out), 1);
}

#[test]
fn a_live_mount_is_ok_and_a_stale_one_a_warning() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new();
    let t = shared_tempdir();
    let models = t.path().join("models");
    fs::create_dir(&models).unwrap();
    fs::create_dir(models.join("checkpoints")).unwrap();
    let mut m = Mounted::in_place(&models, &[]);
    let out = env.doctor(&[path_str(&models)]);
    assert!(assert_status(&out, "mount point", "ok").contains("already mounted"));
    assert_status(&out, "ComfyUI", "info");
    assert_eq!(code(&out), 0, "{}", stdout(&out));

    // A daemon killed with SIGKILL leaves its mount behind.
    assert!(m.kill_and_reap(Duration::from_secs(10)), "daemon stuck");
    assert!(
        our_mount_at(&m.mountpoint),
        "the mount should be left behind"
    );
    let out = env.doctor(&[path_str(&models)]);
    let l = assert_status(&out, "mount point", "warn");
    assert!(
        l.contains("stale") && l.contains("Transport endpoint is not connected"),
        "{l}"
    );
    assert!(
        l.contains("`modelcache mount` clears it")
            && l.contains(&format!("`fusermount3 -u {}`", m.mountpoint.display())),
        "{l}"
    );
    assert_eq!(code(&out), 0, "a stale mount is cleared by the next mount");
    assert!(our_mount_at(&m.mountpoint), "the doctor changes nothing");
    drop(m);
    assert!(!our_mount_at(&models.canonicalize().unwrap()));
}

#[test]
fn a_comfyui_tree_gets_the_fast_disk_advice() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new();
    let t = tempfile::tempdir().unwrap();
    let comfy = t.path().join("ComfyUI");
    let models = comfy.join("models");
    fs::create_dir_all(&models).unwrap();
    let out = env.doctor(&[path_str(&models)]);
    assert!(!has_line(&out, "ComfyUI"));

    fs::create_dir(models.join("diffusion_models")).unwrap();
    let out = env.doctor(&[path_str(&models)]);
    let l = assert_status(&out, "ComfyUI", "info");
    assert!(
        l.contains("fast_disk=False") && l.contains("--fast-disk"),
        "{l}"
    );
    assert!(l.contains("0.3.64 and older do not know the flag"), "{l}");

    // Recognised by ComfyUI's own files beside it too.
    fs::remove_dir(models.join("diffusion_models")).unwrap();
    fs::write(comfy.join("main.py"), "").unwrap();
    fs::create_dir(comfy.join("comfy")).unwrap();
    let out = env.doctor(&[path_str(&models)]);
    assert_status(&out, "ComfyUI", "info");
}

#[test]
fn a_memlock_limit_under_the_pin_budget_is_a_warning() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new();
    let t = shared_tempdir();
    let manifest = t.path().join("manifest.toml");
    fs::write(&manifest, "[cache]\nmlock = true\npin_budget = \"64MiB\"\n").unwrap();
    set_mode(&manifest, 0o644);
    let run = |limit: &str| {
        let mut cmd = Command::new("prlimit");
        cmd.arg(format!("--memlock={limit}:{limit}"))
            .arg("--")
            .arg("/usr/bin/setpriv")
            .arg(format!("--reuid={NOBODY}"))
            .arg(format!("--regid={NOGROUP}"))
            .args(["--clear-groups", "--"])
            .arg(bin())
            .args(["doctor", "--manifest"])
            .arg(&manifest);
        env.apply(&mut cmd).output().unwrap()
    };
    // nobody has no CAP_IPC_LOCK: its limit is what counts (copy mode).
    let out = run("1048576");
    let l = assert_status(&out, "memlock", "warn");
    assert!(
        l.contains("1.0 MiB") && l.contains("64.0 MiB pin budget"),
        "{l}"
    );
    assert!(l.contains("LimitMEMLOCK=infinity"), "{l}");
    // Lowering a limit is always allowed, raising it not always: the
    // passing case is a budget under the same limit.
    fs::write(
        &manifest,
        "[cache]\nmlock = true\npin_budget = \"512KiB\"\n",
    )
    .unwrap();
    let out = run("1048576");
    assert!(assert_status(&out, "memlock", "ok").contains("covers the 512.0 KiB pin budget"));
    // Without mlock, copy mode locks nothing.
    fs::write(&manifest, "[cache]\nmlock = false\n").unwrap();
    let out = run("1048576");
    assert!(assert_status(&out, "memlock", "ok").contains("locks nothing"));
}

#[test]
fn ram_cap_and_manifest_checks() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new();
    // MemAvailable is always under all of the RAM.
    let out = env.doctor(&["--max-size", "100%"]);
    let l = assert_status(&out, "RAM", "warn");
    assert!(
        l.contains("(--max-size)") && l.contains("lower the cap"),
        "{l}"
    );
    assert_eq!(code(&out), 0, "a warning does not fail");
    let out = env.doctor(&["--max-size", "1MiB"]);
    assert!(assert_status(&out, "RAM", "ok").contains("cap 1.0 MiB"));
    assert!(!line(&out, "cgroup").starts_with("FAIL"), "warn-level only");

    let t = tempfile::tempdir().unwrap();
    let manifest = t.path().join("manifest.toml");
    fs::write(&manifest, "[cache]\nmax_size = \"2MiB\"\n").unwrap();
    let out = env.doctor(&["--manifest", path_str(&manifest)]);
    assert_status(&out, "manifest", "ok");
    assert!(line(&out, "RAM").contains("cap 2.0 MiB (max_size in"));

    fs::write(&manifest, "[cache]\nmax_size = \"lots\"\n").unwrap();
    let out = env.doctor(&["--manifest", path_str(&manifest)]);
    assert_status(&out, "manifest", "FAIL");
    assert!(line(&out, "RAM").contains("the default, 50% of RAM"));
    assert_eq!(code(&out), 1);
}
