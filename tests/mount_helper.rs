//! The mount(8) helper `mount/mount.fuse.modelcache`: how it turns mount
//! options into modelcache flags, and real `mount -t fuse.modelcache` and
//! fstab mounts through it.

mod common;

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::*;

fn helper() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("mount/mount.fuse.modelcache")
}

fn write_executable(path: &Path, text: &str) {
    fs::write(path, text).unwrap();
    set_mode(path, 0o755);
}

/// A stand-in for the modelcache binary: prints each argument on its own
/// line and exits with $FAKE_RC (default 0).
fn fake_modelcache(dir: &Path) -> PathBuf {
    let path = dir.join("modelcache");
    write_executable(
        &path,
        "#!/bin/sh\nfor a in \"$@\"; do printf '%s\\n' \"$a\"; done\nexit \"${FAKE_RC:-0}\"\n",
    );
    path
}

struct Outcome {
    code: i32,
    /// The arguments the fake binary received; empty if it did not run.
    args: Vec<String>,
    stderr: String,
}

fn outcome(out: Output) -> Outcome {
    let stdout = String::from_utf8(out.stdout).unwrap();
    Outcome {
        code: out.status.code().expect("helper killed by a signal"),
        args: stdout.lines().map(str::to_string).collect(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

/// Runs the helper as mount(8) would, with the fake binary in MODELCACHE_BIN.
fn run_helper(args: &[&str], fake_rc: i32) -> Outcome {
    let tmp = tempfile::tempdir().unwrap();
    let fake = fake_modelcache(tmp.path());
    let out = Command::new(helper())
        .args(args)
        .env("MODELCACHE_BIN", &fake)
        .env("FAKE_RC", fake_rc.to_string())
        .output()
        .unwrap();
    outcome(out)
}

/// The arguments modelcache gets for `-o OPTS` on /src and "/mnt/my models".
fn flags_for(opts: &str) -> Vec<String> {
    let r = run_helper(&["/src", "/mnt/my models", "-o", opts], 0);
    assert_eq!(r.code, 0, "-o {opts}: {}", r.stderr);
    assert_eq!(r.stderr, "", "-o {opts}");
    r.args
}

fn expected(flags: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = ["mount", "--backing", "/src", "/mnt/my models"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    v.extend(flags.iter().map(|s| s.to_string()));
    v.push("--background".into());
    v
}

#[test]
fn mount_options_become_modelcache_flags() {
    assert_eq!(flags_for("rw"), expected(&[]));
    assert_eq!(
        flags_for("rw,allow_other,threads=4,nofail"),
        expected(&["--allow-other", "--threads", "4"])
    );
    assert_eq!(
        flags_for("rw,threads=2,allow_other"),
        expected(&["--threads", "2", "--allow-other"])
    );
    assert_eq!(
        flags_for("rw,manifest=/etc/model cache/pins.toml,max_size=24G"),
        expected(&[
            "--manifest",
            "/etc/model cache/pins.toml",
            "--max-size",
            "24G"
        ])
    );
}

#[test]
fn generic_mount_and_fstab_options_are_ignored() {
    let generic = "rw,defaults,auto,noauto,user,users,nouser,nofail,_netdev,\
                   x-systemd.automount,x-systemd.requires-mounts-for=/data,comment=x,\
                   suid,nosuid,dev,nodev,exec,noexec,atime,diratime,lazytime";
    assert_eq!(flags_for(generic), expected(&[]));
    assert_eq!(
        flags_for(&format!("{generic},allow_other")),
        expected(&["--allow-other"])
    );
}

#[test]
fn the_flags_mount8_may_pass_are_accepted() {
    for flags in [&["-n"][..], &["-s"], &["-v"], &["-s", "-n", "-v"]] {
        let mut args = vec!["/src", "/mnt/my models"];
        args.extend_from_slice(flags);
        args.extend(["-o", "rw,allow_other"]);
        let r = run_helper(&args, 0);
        assert_eq!(r.code, 0, "{flags:?}: {}", r.stderr);
        assert_eq!(r.args, expected(&["--allow-other"]), "{flags:?}");
    }
    // -v shows the command it runs.
    let r = run_helper(&["/src", "/mnt", "-v", "-o", "rw,threads=3"], 0);
    assert!(
        r.stderr
            .contains("mount --backing /src /mnt --threads 3 --background"),
        "{}",
        r.stderr
    );
}

#[test]
fn fake_mode_runs_nothing() {
    let r = run_helper(&["/src", "/mnt", "-f", "-o", "rw,allow_other"], 0);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.args.is_empty(), "{:?}", r.args);
}

#[test]
fn an_unknown_option_is_named_in_one_line_and_nothing_runs() {
    let r = run_helper(&["/src", "/mnt", "-o", "rw,allow_other,bogus=1"], 0);
    assert_eq!(r.code, 1);
    assert!(r.args.is_empty(), "{:?}", r.args);
    assert_eq!(r.stderr, "mount.fuse.modelcache: unknown option: bogus=1\n");
}

#[test]
fn sloppy_mode_skips_unknown_options_with_a_warning() {
    let r = run_helper(&["/src", "/mnt", "-s", "-o", "rw,bogus,allow_other"], 0);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        r.args,
        [
            "mount",
            "--backing",
            "/src",
            "/mnt",
            "--allow-other",
            "--background"
        ]
    );
    assert_eq!(
        r.stderr,
        "mount.fuse.modelcache: ignoring unknown option: bogus\n"
    );
}

#[test]
fn ro_and_the_atime_options_become_flags_and_remount_is_refused() {
    assert_eq!(
        flags_for("ro,noatime,nodiratime"),
        expected(&["--read-only", "--atime", "noatime", "--nodiratime"])
    );
    assert_eq!(
        flags_for("rw,strictatime"),
        expected(&["--atime", "strictatime"])
    );
    assert_eq!(flags_for("relatime"), expected(&["--atime", "relatime"]));
    let r = run_helper(&["/src", "/mnt", "-o", "remount,ro"], 0);
    assert_eq!(r.code, 1);
    assert!(r.args.is_empty(), "{:?}", r.args);
    assert!(
        r.stderr.contains("remount is not supported")
            && r.stderr.contains("unmount, then mount again"),
        "{}",
        r.stderr
    );
}

#[test]
fn the_exit_code_of_modelcache_is_passed_on() {
    let r = run_helper(&["/src", "/mnt", "-o", "rw"], 3);
    assert_eq!(r.code, 3);
    assert_eq!(
        r.args,
        ["mount", "--backing", "/src", "/mnt", "--background"]
    );
}

#[test]
fn bad_calls_get_a_usage_line() {
    for args in [
        &[][..],
        &["/src"],
        &["/src", "/mnt", "-o"],
        &["/src", "/mnt", "extra"],
    ] {
        let r = run_helper(args, 0);
        assert_eq!(r.code, 1, "{args:?}");
        assert!(r.args.is_empty(), "{args:?}: {:?}", r.args);
        assert!(
            r.stderr.starts_with("mount.fuse.modelcache: ") && r.stderr.lines().count() == 1,
            "{args:?}: {}",
            r.stderr
        );
    }
}

/// mount(8) runs helpers without PATH; the helper then finds modelcache
/// next to where it really lives, also through a symlink.
#[test]
fn the_binary_is_found_next_to_the_helper_without_path() {
    let tmp = tempfile::tempdir().unwrap();
    let install = tmp.path().join("opt");
    let sbin = tmp.path().join("sbin");
    fs::create_dir(&install).unwrap();
    fs::create_dir(&sbin).unwrap();
    fs::copy(helper(), install.join("mount.fuse.modelcache")).unwrap();
    fake_modelcache(&install);
    let link = sbin.join("mount.fuse.modelcache");
    symlink(install.join("mount.fuse.modelcache"), &link).unwrap();
    let out = Command::new(&link)
        .args(["/src", "/mnt", "-o", "rw,allow_other"])
        .env_clear()
        .output()
        .unwrap();
    let r = outcome(out);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        r.args,
        [
            "mount",
            "--backing",
            "/src",
            "/mnt",
            "--allow-other",
            "--background"
        ]
    );
}

#[test]
fn a_missing_binary_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(helper())
        .args(["/src", "/mnt", "-o", "rw"])
        .env("MODELCACHE_BIN", tmp.path().join("nothing-here"))
        .output()
        .unwrap();
    let r = outcome(out);
    assert_eq!(r.code, 1);
    assert_eq!(
        r.stderr,
        format!(
            "mount.fuse.modelcache: {} is not an executable file\n",
            tmp.path().join("nothing-here").display()
        )
    );

    // Nowhere to be found (unless installed system-wide on this machine).
    if [
        "/usr/local/bin/modelcache",
        "/usr/bin/modelcache",
        "/bin/modelcache",
    ]
    .iter()
    .any(|p| Path::new(p).exists())
    {
        return;
    }
    fs::copy(helper(), tmp.path().join("mount.fuse.modelcache")).unwrap();
    let out = Command::new(tmp.path().join("mount.fuse.modelcache"))
        .args(["/src", "/mnt", "-o", "rw"])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .output()
        .unwrap();
    let r = outcome(out);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .starts_with("mount.fuse.modelcache: cannot find the modelcache binary")
            && r.stderr.contains("MODELCACHE_BIN")
            && r.stderr.lines().count() == 1,
        "{}",
        r.stderr
    );
}

// ---- Real mounts through mount(8) ----

/// A scenario in a temp dir: backing dir `src` with a model file, mount
/// point `mnt`, and the overlay dirs that install the helper.
struct Scenario {
    tmp: tempfile::TempDir,
    src: PathBuf,
    mnt: PathBuf,
    model: Vec<u8>,
}

impl Scenario {
    fn new() -> Self {
        let tmp = shared_tempdir();
        let src = tmp.path().join("src");
        let mnt = tmp.path().join("mnt");
        for d in ["src", "mnt", "upper", "work"] {
            fs::create_dir(tmp.path().join(d)).unwrap();
        }
        let model = pseudo_random(3 << 20, 7);
        fs::write(src.join("model.safetensors"), &model).unwrap();
        fs::copy(helper(), tmp.path().join("upper/mount.fuse.modelcache")).unwrap();
        set_mode(&tmp.path().join("upper/mount.fuse.modelcache"), 0o755);
        Self {
            tmp,
            src,
            mnt,
            model,
        }
    }

    /// Runs `body` with sh in a private mount namespace in which
    /// /sbin/mount.fuse.modelcache is our helper.
    ///
    /// mount(8) looks for `mount.<type>` in /sbin, /sbin/fs.d and /sbin/fs
    /// (libmount's built-in search path, no way to change it), so the helper
    /// has to appear there. The namespace mounts an overlay on /sbin (on
    /// Debian a link to /usr/sbin, hence `readlink -f`): the real directory as
    /// the read-only lower layer, and a temp dir holding only our helper as the
    /// upper layer. Every real mount helper stays visible, nothing on the host
    /// changes, and the overlay (like every mount made in the namespace)
    /// vanishes with it.
    ///
    /// `body` sees $SRC, $MNT and $T (the temp dir); the EXIT trap detaches
    /// the mount and stops the daemon, whatever happens.
    fn run(&self, body: &str) -> Output {
        let script = format!(
            r#"set -eu
sbin=$(readlink -f /sbin)
mount -t overlay overlay -o "lowerdir=$sbin,upperdir=$T/upper,workdir=$T/work" "$sbin"
daemon=''
mounted() {{ grep -qF " $MNT fuse.modelcache " /proc/mounts; }}
# Waits (at most 10 s) for the daemon to exit after an unmount.
daemon_exits() {{
    i=0
    while kill -0 "$daemon" 2>/dev/null; do
        i=$((i + 1))
        [ "$i" -le 200 ] || return 1
        sleep 0.05
    done
}}
cleanup() {{
    if mounted; then umount -l "$MNT"; fi
    if [ -n "$daemon" ] && ! daemon_exits; then kill -KILL "$daemon"; fi
}}
trap cleanup EXIT
trap 'exit 1' HUP INT TERM
{body}
"#
        );
        let out = Command::new("timeout")
            .args(["--kill-after=10", "120"])
            .args(["unshare", "--mount", "--propagation", "private", "sh", "-c"])
            .arg(script)
            .env("MODELCACHE_BIN", bin())
            .env("SRC", &self.src)
            .env("MNT", &self.mnt)
            .env("T", self.tmp.path())
            .env("STATE_DIRECTORY", self.tmp.path().join("state"))
            .output()
            .unwrap();
        self.reap_daemons();
        assert!(
            !our_mount_at(&self.mnt),
            "the mount leaked out of the namespace"
        );
        out
    }

    /// Waits for modelcache daemons serving our mount point to exit; kills
    /// any still there after 10 s and fails.
    fn reap_daemons(&self) {
        let mut left = Vec::new();
        let reaped = wait_for(Duration::from_secs(10), || {
            left = daemons_serving(&self.mnt);
            left.is_empty()
        });
        if !reaped {
            for pid in &left {
                // SAFETY: a daemon started by this test for its own mount point.
                unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
            }
            panic!("modelcache daemons {left:?} still running after the test");
        }
    }
}

/// Processes running `modelcache mount … MNT …` for exactly this mount point.
fn daemons_serving(mnt: &Path) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_modelcache = args[0].ends_with(b"/modelcache") || args[0] == b"modelcache";
        if is_modelcache
            && args.get(1) == Some(&&b"mount"[..])
            && args.contains(&mnt.as_os_str().as_encoded_bytes())
        {
            pids.push(pid);
        }
    }
    pids
}

/// The checks after mounting: mount table, daemon, a read, a write, then
/// `umount` and the daemon's exit.
const CHECK_MOUNTED: &str = r#"
echo "mounts: $(grep -F " $MNT fuse.modelcache " /proc/mounts)"
daemon=$(pgrep --ns $$ --nslist mnt -x modelcache)
echo "daemon: $(tr '\0' ' ' < "/proc/$daemon/cmdline")"
cmp "$SRC/model.safetensors" "$MNT/model.safetensors"
echo "read: same bytes"
printf 'written through the mount\n' > "$MNT/written.txt"
echo "backing: $(cat "$SRC/written.txt")"
umount "$MNT"
echo "unmounted: $(grep -cF " $MNT " /proc/mounts || true)"
daemon_exits
daemon=''
echo "daemon exited"
"#;

fn assert_mounted_and_unmounted(s: &Scenario, out: &Output) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let all = format!("stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(out.status.success(), "{}\n{all}", out.status);

    let line = |prefix: &str| -> String {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no `{prefix}` line\n{all}"))
            .to_string()
    };
    let mounts: Vec<String> = line("mounts: ").split(' ').map(String::from).collect();
    assert_eq!(mounts[0], s.src.display().to_string(), "{all}");
    assert_eq!(mounts[1], s.mnt.display().to_string(), "{all}");
    assert_eq!(mounts[2], "fuse.modelcache", "{all}");
    let opts: Vec<&str> = mounts[3].split(',').collect();
    for o in ["rw", "nosuid", "nodev", "allow_other"] {
        assert!(opts.contains(&o), "no {o} in {}\n{all}", mounts[3]);
    }
    let daemon = line("daemon: ");
    assert!(
        daemon.contains(&format!(
            " mount --backing {} {} --allow-other --threads 2 ",
            s.src.display(),
            s.mnt.display()
        )),
        "{all}"
    );
    assert_eq!(line("read: "), "same bytes");
    assert_eq!(line("backing: "), "written through the mount");
    assert_eq!(line("unmounted: "), "0");
    assert!(stdout.contains("\ndaemon exited\n"), "{all}");

    assert_eq!(
        fs::read_to_string(s.src.join("written.txt")).unwrap(),
        "written through the mount\n"
    );
    assert_eq!(fs::read(s.src.join("model.safetensors")).unwrap(), s.model);
}

#[test]
fn mount_t_fuse_modelcache_mounts_serves_and_unmounts() {
    if common::needs_root("mount(8) in a private mount namespace") {
        return;
    }
    let s = Scenario::new();
    let out = s.run(&format!(
        "mount -t fuse.modelcache -o allow_other,threads=2,nofail \"$SRC\" \"$MNT\"\n{CHECK_MOUNTED}"
    ));
    assert_mounted_and_unmounted(&s, &out);
}

#[test]
fn an_fstab_line_mounts_serves_and_unmounts() {
    if common::needs_root("mount(8) in a private mount namespace") {
        return;
    }
    let s = Scenario::new();
    // `mount --fstab FILE DIR` reads the line from FILE instead of /etc/fstab.
    fs::write(
        s.tmp.path().join("fstab"),
        format!(
            "# test\n{} {} fuse.modelcache allow_other,threads=2,nofail 0 0\n",
            s.src.display(),
            s.mnt.display()
        ),
    )
    .unwrap();
    let out = s.run(&format!(
        "mount --fstab \"$T/fstab\" \"$MNT\"\n{CHECK_MOUNTED}"
    ));
    assert_mounted_and_unmounted(&s, &out);
}

#[test]
fn mount_reports_bad_options_and_mounts_nothing() {
    if common::needs_root("mount(8) in a private mount namespace") {
        return;
    }
    let s = Scenario::new();
    let out = s.run(
        r#"
for opts in allow_other,bogus remount threads=0; do
    if mount -t fuse.modelcache -o "$opts" "$SRC" "$MNT" 2>"$T/err"; then
        echo "$opts: mounted"
    else
        echo "$opts: failed"
    fi
    sed "s/^/$opts: /" "$T/err"
    if mounted; then echo "$opts: mount left behind"; fi
done
"#,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let all = format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{all}");
    for opts in ["allow_other,bogus", "remount", "threads=0"] {
        assert!(stdout.contains(&format!("{opts}: failed\n")), "{all}");
    }
    assert!(
        stdout.contains("allow_other,bogus: mount.fuse.modelcache: unknown option: bogus\n"),
        "{all}"
    );
    assert!(
        stdout.contains("remount: mount.fuse.modelcache: remount is not supported"),
        "{all}"
    );
    // modelcache's own refusal comes through.
    assert!(
        stdout.contains("threads=0: ") && stdout.contains("--threads"),
        "{all}"
    );
    assert!(!stdout.contains("left behind"), "{all}");
    assert!(!stdout.contains(": mounted"), "{all}");
}
