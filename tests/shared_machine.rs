//! Safe on a shared machine: what a daemon trusts. It runs its manifest's
//! hook commands as itself, so it reads only a manifest that no one else
//! could have written, a root daemon never takes one from a user's home,
//! a FIFO in a manifest's place cannot hang it, and its hook commands run
//! with a sane umask, no stdin, and a bound on how many run at once.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const MIB: usize = 1 << 20;

/// Runs `modelcache mount ARGS` expecting a refusal: it must exit (within
/// 10 s, so never hang) with an error, mount nothing, and say `want`.
fn expect_refusal(mut cmd: Command, mnt: &Path, want: &[&str]) -> String {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            force_unmount(mnt);
            panic!("the daemon neither refused nor exited within 10 s (it mounted, or hung)");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    let mounted = our_mount_at(&mnt.canonicalize().unwrap());
    force_unmount(mnt);
    assert!(!status.success(), "mounted with a bad manifest: {err}");
    assert!(!mounted, "a refused mount is live: {err}");
    for w in want {
        assert!(err.contains(w), "missing {w:?} in: {err}");
    }
    err
}

fn mount_cmd(backing: &Path, mnt: &Path, manifest: &Path) -> Command {
    let mut cmd = Command::new(bin());
    cmd.arg("mount")
        .arg("--backing")
        .arg(backing)
        .arg(mnt)
        .arg("--manifest")
        .arg(manifest);
    cmd
}

#[test]
fn a_daemon_refuses_a_manifest_someone_else_could_write() {
    let (tmp, backing, mnt) = dirs();
    let manifest = tmp.path().join("manifest.toml");
    fs::write(&manifest, "[cache]\nmax_size = \"64MiB\"\n").unwrap();

    // A user's file, read by a root daemon (sudo, su, --manifest).
    chown(&manifest, NOBODY, NOGROUP);
    set_mode(&manifest, 0o644);
    expect_refusal(
        mount_cmd(&backing, &mnt, &manifest),
        &mnt,
        &["is owned by uid 65534", "runs as uid 0", "chown 0"],
    );

    // Root's file, but others may write it.
    chown(&manifest, 0, 0);
    for (mode, who) in [
        (0o666, "group and others"),
        (0o620, "its group"),
        (0o602, "others"),
    ] {
        set_mode(&manifest, mode);
        expect_refusal(
            mount_cmd(&backing, &mnt, &manifest),
            &mnt,
            &[&format!("writable by {who}"), "chmod go-w"],
        );
    }

    // A FIFO in the manifest's place: refused at once, no hang.
    let fifo = tmp.path().join("fifo.toml");
    run_ok(Command::new("mkfifo").arg(&fifo));
    expect_refusal(
        mount_cmd(&backing, &mnt, &fifo),
        &mnt,
        &["is not a regular file"],
    );

    // The same file, root's and 0644: accepted.
    set_mode(&manifest, 0o644);
    let m = Mounted::start(mount_cmd(&backing, &mnt, &manifest), &mnt);
    assert!(
        m.log_text().contains("cache cap 64.0 MiB"),
        "{}",
        m.log_text()
    );
    m.unmount();
}

/// A model file of `len` bytes at `path`.
fn write_model(path: &Path, len: usize, seed: u64) {
    fs::write(path, pseudo_random(len, seed)).unwrap();
}

/// `sudo -E` keeps the user's HOME and XDG_CONFIG_HOME: a root daemon
/// must not take that user's manifest (and run its hooks as root).
#[test]
fn a_root_daemon_never_reads_a_manifest_from_a_users_home() {
    let (tmp, backing, mnt) = dirs();
    write_model(&backing.join("m.safetensors"), 2 * MIB, 1);
    let home = tmp.path().join("home");
    let config = home.join(".config/modelcache");
    fs::create_dir_all(&config).unwrap();
    let marker = tmp.path().join("ran-as-root");
    fs::write(
        config.join("manifest.toml"),
        format!(
            "[cache]\nmax_size = \"64MiB\"\n\n[hooks.cpu]\nexec = [\"touch\", \"{}\"]\n",
            marker.display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(bin());
    cmd.arg("mount")
        .arg("--backing")
        .arg(&backing)
        .arg(&mnt)
        .env("HOME", &home)
        .env("XDG_CONFIG_HOME", home.join(".config"));
    let m = Mounted::start(cmd, &mnt);
    let _ = fs::read(m.path("m.safetensors")).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(!marker.exists(), "a root daemon ran a user's hook");
    assert!(
        !m.log_text().contains("cache cap 64.0 MiB"),
        "a root daemon used a user's manifest: {}",
        m.log_text()
    );
    m.unmount();
}

/// Waits until `path` holds at least `lines` lines.
fn wait_lines(path: &Path, lines: usize, m: &Mounted) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = fs::read_to_string(path).unwrap_or_default();
        if text.lines().count() >= lines {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {lines} lines in {}:\n{text}\n{}",
            text.lines().count(),
            path.display(),
            m.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Hook commands run with umask 022 and /dev/null as stdin, and no more
/// than four at once however many files are opened together.
#[test]
fn hook_commands_run_with_umask_022_no_stdin_and_at_most_four_at_once() {
    let (tmp, backing, mnt) = dirs();
    const FILES: usize = 12;
    for i in 0..FILES {
        write_model(&backing.join(format!("m{i}.safetensors")), MIB, i as u64);
    }
    let env = tmp.path().join("env.txt");
    let events = tmp.path().join("events.txt");
    // Each command: its umask and stdin, then "+", a pause, "-" (appends of
    // a few bytes are atomic), so the order shows how many overlapped.
    let script = format!(
        "echo \"$(umask) $(readlink /proc/self/fd/0)\" >> {env}; echo + >> {ev}; sleep 0.3; echo - >> {ev}",
        env = env.display(),
        ev = events.display()
    );
    let manifest = tmp.path().join("manifest.toml");
    fs::write(
        &manifest,
        format!("[cache]\nmin_file_size = \"1KiB\"\n\n[hooks.cpu]\nexec = [\"sh\", \"-c\", '{script}']\n"),
    )
    .unwrap();
    let m = Mounted::start(mount_cmd(&backing, &mnt, &manifest), &mnt);
    // All opened at once, and kept open while the commands run.
    let open: Vec<fs::File> = (0..FILES)
        .map(|i| fs::File::open(m.path(&format!("m{i}.safetensors"))).unwrap())
        .collect();
    let text = wait_lines(&events, 2 * FILES, &m);
    drop(open);
    let (mut running, mut most) = (0i32, 0i32);
    for line in text.lines() {
        running += if line == "+" { 1 } else { -1 };
        most = most.max(running);
    }
    assert_eq!(most, 4, "hook commands at once: {most}\n{text}");
    let env_text = wait_lines(&env, FILES, &m);
    for line in env_text.lines() {
        assert_eq!(line, "0022 /dev/null", "{env_text}");
    }
    m.unmount();
}
