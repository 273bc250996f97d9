//! Safe on a shared machine: what a daemon trusts. It runs its manifest's
//! hook commands as itself, so it reads only a manifest that no one else
//! could have written, a root daemon never takes one from a user's home,
//! a FIFO in a manifest's place cannot hang it, and its hook commands run
//! with a sane umask, no stdin, and a bound on how many run at once.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const MIB: usize = 1 << 20;

/// Runs `modelcache mount ARGS` expecting a refusal: it must exit (within
/// 10 s, so never hang) with an error, mount nothing, and say `want`.
fn expect_refusal(mut cmd: Command, mnt: &Path, want: &[&str]) -> String {
    let Some(done) = run_within(&mut cmd, Duration::from_secs(10)) else {
        force_unmount(mnt);
        panic!("the daemon neither refused nor exited within 10 s (it mounted, or hung)");
    };
    let err = done.stderr;
    let mounted = our_mount_at(&mnt.canonicalize().unwrap());
    force_unmount(mnt);
    assert!(!done.status.success(), "mounted with a bad manifest: {err}");
    assert!(!mounted, "a refused mount is live: {err}");
    for w in want {
        assert!(err.contains(w), "missing {w:?} in: {err}");
    }
    err
}

fn mount_cmd(backing: &Path, mnt: &Path, manifest: &Path) -> Command {
    let mut cmd = separate_command(backing, mnt);
    cmd.arg("--manifest").arg(manifest);
    cmd
}

#[test]
fn a_daemon_refuses_a_manifest_someone_else_could_write() {
    if common::needs_root("makes files of other users") {
        return;
    }
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
    if common::needs_root("a root daemon") {
        return;
    }
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
    let mut text = String::new();
    let written = wait_for(Duration::from_secs(30), || {
        text = fs::read_to_string(path).unwrap_or_default();
        text.lines().count() >= lines
    });
    assert!(
        written,
        "{} of {lines} lines in {}:\n{text}\n{}",
        text.lines().count(),
        path.display(),
        m.log_text()
    );
    text
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

/// Stops the daemon with SIGTERM and asserts it exits within 5 s.
fn stops_within_5s(mut m: Mounted, what: &str) {
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(m.pid() as i32, libc::SIGTERM) };
    let started = Instant::now();
    let status = m.wait_exit(Duration::from_secs(5));
    assert!(
        started.elapsed() < Duration::from_secs(5) && status.success(),
        "{what}: the daemon did not stop within 5 s of SIGTERM ({status}):\n{}",
        m.log_text()
    );
}

/// Runs `modelcache ARGS` and asserts it answers within 5 s.
fn answers_within_5s(args: &[&str]) -> String {
    let done = run_within(Command::new(bin()).args(args), Duration::from_secs(5))
        .unwrap_or_else(|| panic!("`modelcache {}` hung", args.join(" ")));
    format!("{}{}", done.stdout, done.stderr)
}

/// A FIFO where the daemon expects a model file (renamed over a file its
/// loader has queued, over a member of a group, or named in `warm`) is
/// refused without blocking: later files still load, the control socket
/// answers, and SIGTERM still stops the daemon.
#[test]
fn a_fifo_in_a_model_files_place_never_hangs_the_daemon() {
    let (tmp, backing, mnt) = dirs();
    // The loader's queue: one thread, a large file first, then a small one
    // that becomes a FIFO before its turn (copy mode reopens it by path).
    write_model(&backing.join("big.safetensors"), 512 * MIB, 1);
    write_model(&backing.join("queued.safetensors"), 2 * MIB, 2);
    write_model(&backing.join("later.safetensors"), 2 * MIB, 3);
    write_model(&backing.join("a.safetensors"), 2 * MIB, 4);
    write_model(&backing.join("b.safetensors"), 2 * MIB, 5);
    let manifest = tmp.path().join("manifest.toml");
    fs::write(
        &manifest,
        "[[group]]\nname = \"pair\"\npaths = [\"a.safetensors\", \"b.safetensors\"]\n",
    )
    .unwrap();
    let mut cmd = mount_cmd(&backing, &mnt, &manifest);
    // TTL 0: the kernel looks each name up again, so a rename behind the
    // mount is seen by the loader's open at once.
    cmd.args([
        "--loader-threads",
        "1",
        "--passthrough",
        "off",
        "--metadata-ttl",
        "0",
    ]);
    let m = Mounted::start(cmd, &mnt);
    // Renamed over the file behind the mount (a `--backing` mount's
    // backing changes under it): the daemon's entry does not know yet.
    let mkfifo = |name: &str| {
        let fifo = tmp.path().join(format!("{name}.fifo"));
        run_ok(Command::new("mkfifo").arg(&fifo));
        fs::rename(&fifo, backing.join(name)).unwrap();
    };

    let big = fs::File::open(m.path("big.safetensors")).unwrap();
    let queued = fs::File::open(m.path("queued.safetensors")).unwrap();
    mkfifo("queued.safetensors");
    drop((big, queued));
    // The loader went on past the FIFO: a file opened after it loads.
    let _later = fs::read(m.path("later.safetensors")).unwrap();
    let mut s = serde_json::Value::Null;
    let loaded = wait_for(Duration::from_secs(30), || {
        s = mount_status(&m.mountpoint);
        status_file(&s, "later.safetensors").is_some_and(|f| f["state"] == "cached")
    });
    assert!(loaded, "the loader is stuck: {s:#}");

    // A group member became a FIFO: opening the other member warms it.
    mkfifo("b.safetensors");
    let _a = fs::read(m.path("a.safetensors")).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let reload = answers_within_5s(&["reload", m.mountpoint.to_str().unwrap()]);
    assert!(reload.contains("reloaded "), "{reload}");

    // `warm` of a FIFO: an answer that says what it is, at once.
    mkfifo("c.safetensors");
    let warm = answers_within_5s(&["warm", m.path("c.safetensors").to_str().unwrap()]);
    assert!(warm.contains("a FIFO"), "{warm}");
    assert!(
        answers_within_5s(&["status", m.mountpoint.to_str().unwrap()])
            .contains("later.safetensors")
    );
    let log = m.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("b.safetensors") && l.contains("a FIFO")),
        "no FIFO refusal logged for the group member:\n{log}"
    );
    stops_within_5s(m, "after FIFOs");
}

/// A mount by nobody's daemon, its control socket under `runtime`.
fn nobodys_mount(backing: &Path, mnt: &Path, runtime: &Path) -> Mounted {
    let mut cmd = as_user(NOBODY, NOGROUP, bin());
    cmd.args(["mount", "--backing"])
        .arg(backing)
        .arg(mnt)
        .env("XDG_RUNTIME_DIR", runtime);
    Mounted::start(cmd, mnt)
}

/// Serves one canned answer line on a Unix socket at `path`, as `uid`
/// (python3, part of Debian's base system), until killed.
struct FakeSocket(std::process::Child);

impl FakeSocket {
    fn start(uid: u32, path: &Path, answer: &str) -> FakeSocket {
        let script = "import socket,sys\n\
            s=socket.socket(socket.AF_UNIX)\n\
            s.bind(sys.argv[1]); s.listen(8)\n\
            while True:\n\
            \x20   c,_=s.accept()\n\
            \x20   try: c.recv(65536); c.sendall(sys.argv[2].encode()+b'\\n')\n\
            \x20   except OSError: pass\n\
            \x20   c.close()\n";
        let child = as_user(uid, uid, "/usr/bin/python3")
            .args(["-c", script])
            .arg(path)
            .arg(answer)
            .spawn()
            .unwrap();
        wait_until(Duration::from_secs(10), "the fake socket to appear", || {
            path.exists()
        });
        FakeSocket(child)
    }
}

impl Drop for FakeSocket {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Root's `modelcache status` of a normal user's mount never believes a
/// socket another user planted where it looks (`/tmp/modelcache-*`), and
/// control characters in file names reach the terminal escaped.
#[test]
fn the_client_trusts_only_the_mounts_own_daemon_and_escapes_names() {
    if common::needs_root("runs a client as another user (setpriv)") {
        return;
    }
    const ATTACKER: u32 = 4242;
    let (tmp, backing, mnt) = dirs();
    let evil = "a\u{1b}[31mred\nline.safetensors";
    write_model(&backing.join(evil), 2 * MIB, 3);
    for p in [&backing, &mnt, &backing.join(evil)] {
        chown(p, NOBODY, NOGROUP);
    }
    // The real daemon: nobody's, with its socket where root does not look.
    let runtime = tmp.path().join("runtime");
    fs::create_dir(&runtime).unwrap();
    chown(&runtime, NOBODY, NOGROUP);
    let m = nobodys_mount(&backing, &mnt, &runtime);
    run_ok(
        as_user(NOBODY, NOGROUP, "cat")
            .arg(m.path(evil))
            .stdout(Stdio::null()),
    );
    let real_socket = runtime
        .join("modelcache")
        .join(modelcache::control::socket_file_name(&m.mountpoint));
    // The real answer, doctored: what a planted socket would say.
    let mut conn = std::os::unix::net::UnixStream::connect(&real_socket).unwrap();
    std::io::Write::write_all(&mut conn, b"{\"version\":1,\"verb\":\"status\"}\n").unwrap();
    let mut real = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(conn), &mut real).unwrap();
    let forged = real
        .trim_end()
        .replace("\"cached_bytes\":", "\"cached_bytes\":1234567890123,\"x\":");
    assert_ne!(forged, real.trim_end(), "the forgery changed nothing");

    let planted_dir = PathBuf::from(format!("/tmp/modelcache-{ATTACKER}"));
    let _ = fs::remove_dir_all(&planted_dir);
    fs::create_dir(&planted_dir).unwrap();
    chown(&planted_dir, ATTACKER, ATTACKER);
    let planted = planted_dir.join(modelcache::control::socket_file_name(&m.mountpoint));
    let fake = FakeSocket::start(ATTACKER, &planted, &forged);
    let out = modelcache(&["status", m.mountpoint.to_str().unwrap()]);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    drop(fake);
    let _ = fs::remove_dir_all(&planted_dir);
    assert!(
        !out.status.success(),
        "root believed a planted socket:\n{said}"
    );
    assert!(!said.contains("1.1 TiB"), "{said}");
    assert!(
        said.contains(&format!(
            "belongs to uid {ATTACKER}, not to the mount's owner (uid {NOBODY})"
        )),
        "{said}"
    );

    // The mount's own user sees the file's name escaped in the table, and
    // exact in JSON.
    let mut status = as_user(NOBODY, NOGROUP, bin());
    status
        .arg("status")
        .arg(&m.mountpoint)
        .env("XDG_RUNTIME_DIR", &runtime);
    let mut table = String::new();
    let cached = wait_for(Duration::from_secs(20), || {
        table = String::from_utf8_lossy(&run_ok(&mut status).stdout).into_owned();
        table.contains("cached")
    });
    assert!(cached, "never cached:\n{table}");
    assert!(
        !table.contains('\u{1b}'),
        "a raw escape reached the terminal:\n{table}"
    );
    assert!(
        table.contains("a\\u{1b}[31mred\\nline.safetensors"),
        "{table}"
    );
    let json = run_ok(status.arg("--json"));
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let paths: Vec<&str> = v["mounts"][0]["files"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["path"].as_str())
        .collect();
    assert_eq!(paths, [evil]);
    m.unmount();
}

/// A ladder of folders, each holding two links to the next, costs a walk
/// one visit per folder (not 2^20), and `warm` of a link out of the mount
/// (to `/`) is refused at once, naming nothing outside.
#[test]
fn walks_visit_each_folder_once_and_never_leave_the_mount() {
    let (tmp, backing, mnt) = dirs();
    const RUNGS: usize = 20;
    for i in 0..RUNGS {
        let dir = backing.join(format!("d{i}"));
        fs::create_dir(&dir).unwrap();
        if i + 1 < RUNGS {
            for link in ["a", "b"] {
                std::os::unix::fs::symlink(format!("../d{}", i + 1), dir.join(link)).unwrap();
            }
        }
    }
    write_model(
        &backing.join(format!("d{}/m.safetensors", RUNGS - 1)),
        2 * MIB,
        1,
    );
    let manifest = tmp.path().join("manifest.toml");
    fs::write(&manifest, "[[warm]]\npaths = [\"**/*.safetensors\"]\n").unwrap();
    let started = Instant::now();
    let out = answers_within_5s(&[
        "check",
        "--root",
        backing.to_str().unwrap(),
        manifest.to_str().unwrap(),
    ]);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the ladder took {:?}",
        started.elapsed()
    );
    assert!(out.contains("1 file"), "{out}");

    std::os::unix::fs::symlink("/", backing.join("root-link")).unwrap();
    std::os::unix::fs::symlink("/usr/share/doc", backing.join("doc-link")).unwrap();
    let m = Mounted::separate(&backing, &mnt, &[]);
    for link in ["root-link", "doc-link"] {
        let said = answers_within_5s(&["warm", m.path(link).to_str().unwrap()]);
        assert!(said.contains("leads outside the mount"), "{said}");
        for outside in ["etc", "usr", "bin", "copyright", "share"] {
            assert!(!said.contains(outside), "{link}: {outside} named: {said}");
        }
    }
    stops_within_5s(m, "after warm of a link to /");
}

/// Raises this process's soft open-file limit to its hard one.
fn raise_own_limit() {
    // SAFETY: plain get/set of a resource limit.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
}

/// Every file under `dir` (through the mount): stat'ed, read, counted.
fn read_every_file(dir: &Path) -> usize {
    let mut count = 0;
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let meta = fs::symlink_metadata(&path).unwrap();
        if meta.is_dir() {
            count += read_every_file(&path);
        } else {
            assert_eq!(fs::read(&path).unwrap(), b"x", "{}", path.display());
            count += 1;
        }
    }
    count
}

/// With an open-file limit of 1024, a daemon serves a folder of 100,000
/// files and a tree of 20,000 (listed, stat'ed and read, every one), keeps
/// its cache, and answers the excess of 5,000 files held open at once with
/// a clean EMFILE, never a broken mount.
#[test]
fn descriptors_are_bounded_by_design() {
    let (_tmp, backing, mnt) = dirs();
    write_model(&backing.join("m.safetensors"), 4 * MIB, 5);
    let flat = backing.join("flat");
    fs::create_dir(&flat).unwrap();
    for i in 0..100_000 {
        fs::write(flat.join(format!("f{i}")), b"x").unwrap();
    }
    let tree = backing.join("tree");
    for d in 0..200 {
        let dir = tree.join(format!("d{}/e{}", d / 20, d));
        fs::create_dir_all(&dir).unwrap();
        for i in 0..100 {
            fs::write(dir.join(format!("f{i}")), b"x").unwrap();
        }
    }
    let mut cmd = Command::new("prlimit");
    cmd.arg("--nofile=1024:1024")
        .arg("--")
        .arg(bin())
        .args(["mount", "--passthrough", "off", "--backing"])
        .arg(&backing)
        .arg(&mnt);
    let m = Mounted::start(cmd, &mnt);
    let _ = fs::read(m.path("m.safetensors")).unwrap();
    let cached = || {
        cached_files(m.pid(), &backing, &m.mountpoint)
            .iter()
            .any(|f| f.name == "m.safetensors" && f.complete)
    };
    let loaded = wait_for(Duration::from_secs(20), cached);
    assert!(loaded, "never cached:\n{}", m.log_text());

    let listed = run_ok(Command::new("ls").arg("-f").arg(m.path("flat")));
    assert_eq!(
        listed
            .stdout
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .count(),
        100_002
    );
    assert_eq!(read_every_file(&m.path("flat")), 100_000);
    assert_eq!(read_every_file(&m.path("tree")), 20_000);
    // What the daemon holds in the backing tree: node descriptors within
    // their share of the limit (and the root's), though the kernel has
    // looked up 120,000 names.
    let held = fs::read_dir(format!("/proc/{}/fd", m.pid()))
        .unwrap()
        .filter_map(|e| fs::read_link(e.unwrap().path()).ok())
        .filter(|target| target.starts_with(&backing))
        .count();
    let share = modelcache::descriptors::Budget::of(1024).node_fds;
    // Besides: the root, and a few held by the cache and calls in flight.
    assert!(
        held > 1 && held <= share + 8,
        "{held} descriptors in the backing tree, share {share}"
    );

    // 5,000 files held open at once: the excess gets EMFILE.
    raise_own_limit();
    let mut held = Vec::new();
    let mut refused = 0;
    for i in 0..5000 {
        match fs::File::open(m.path(&format!("flat/f{i}"))) {
            Ok(f) => held.push(f),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EMFILE), "open {i}: {e}");
                refused += 1;
            }
        }
    }
    assert!(
        !held.is_empty() && refused > 0,
        "{} held, {refused} refused",
        held.len()
    );
    drop(held);
    // The mount is whole: the cached file reads, a new file opens.
    assert_eq!(read_every_file(&m.path("tree/d0")), 2_000);
    let log = m.log_text();
    assert!(!log.contains("was detached"), "{log}");
    assert!(cached(), "the cache emptied itself:\n{log}");
    stops_within_5s(m, "after 120,000 files");
}

/// On a full backing filesystem every byte a writer is told was written is
/// in the file, and nothing more: writes of 3,000 bytes (not a page
/// multiple) until ENOSPC, in both modes.
#[test]
fn a_full_disk_reports_partial_writes_exactly() {
    if common::needs_root("mounts a small tmpfs backing") {
        return;
    }
    use std::io::Write;
    let (_tmp, backing, mnt) = dirs();
    let _fs = TempMount::new("tmpfs", "size=1m,mode=0755", &backing);
    for mode in [Mode::Copy, Mode::Passthrough] {
        let m = Mounted::separate(&backing, &mnt, &mode.args());
        let name = format!("fill-{mode:?}");
        let mut f = fs::File::create(m.path(&name)).unwrap();
        let chunk: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        let mut told = 0usize;
        let err = loop {
            match f.write(&chunk) {
                Ok(0) => panic!("{mode:?}: a write of 0 bytes"),
                Ok(n) => told += n,
                Err(e) => break e,
            }
        };
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{mode:?}: {err}");
        drop(f);
        let written = fs::read(backing.join(&name)).unwrap();
        assert_eq!(
            written.len(),
            told,
            "{mode:?}: the file and the writer disagree"
        );
        let want: Vec<u8> = chunk.iter().copied().cycle().take(told).collect();
        assert!(written == want, "{mode:?}: the bytes differ");
        fs::remove_file(m.path(&name)).unwrap();
        m.unmount();
    }
}

/// Names that are not UTF-8 are cached (copy mode reopens them by name) and
/// never taken for one another, though a lossy conversion makes them one;
/// the command line reaches them too.
#[test]
fn names_that_are_not_utf8_are_cached_and_kept_apart() {
    use std::os::unix::ffi::OsStrExt;
    let (_tmp, backing, mnt) = dirs();
    let names: Vec<PathBuf> = [&b"m\xef.safetensors"[..], &b"m\xee.safetensors"[..]]
        .iter()
        .map(|b| PathBuf::from(std::ffi::OsStr::from_bytes(b)))
        .collect();
    for (i, n) in names.iter().enumerate() {
        write_model(&backing.join(n), 2 * MIB, 20 + i as u64);
    }
    let m = Mounted::separate(&backing, &mnt, &Mode::Copy.args());
    for n in &names {
        assert!(fs::read(m.mountpoint.join(n)).unwrap() == fs::read(backing.join(n)).unwrap());
    }
    let want = ["m\\x{ee}.safetensors", "m\\x{ef}.safetensors"];
    let mut s = serde_json::Value::Null;
    let cached = wait_for(Duration::from_secs(20), || {
        s = mount_status(&m.mountpoint);
        let cached: Vec<&str> = s["files"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["state"] == "cached")
            .filter_map(|f| f["path"].as_str())
            .collect();
        cached == want
    });
    assert!(cached, "{s:#}\n{}", m.log_text());
    assert!(!m.log_text().contains("failed"), "{}", m.log_text());
    // evict and warm by the real (byte) path.
    let path = m.mountpoint.join(&names[0]);
    run_ok(Command::new(bin()).arg("evict").arg(&path));
    let s = mount_status(&m.mountpoint);
    assert!(
        status_file(&s, want[1]).is_none_or(|f| f["state"] != "cached"),
        "{s:#}"
    );
    run_ok(Command::new(bin()).arg("warm").arg(&path));
    m.unmount();
}

/// `warm` of a folder deeper than PATH_MAX says what it could not read
/// instead of answering "ok" and warming nothing.
#[test]
fn warm_of_a_tree_deeper_than_path_max_says_so() {
    let (_tmp, backing, mnt) = dirs();
    // 25 levels of 200-byte names: 5,000 bytes, past PATH_MAX (4,096).
    // Made with mkdirat from a descriptor, as no path could name them.
    let component = "d".repeat(200);
    let c = std::ffi::CString::new(component.as_str()).unwrap();
    fs::create_dir(backing.join("deep")).unwrap();
    let mut dir = fs::File::open(backing.join("deep")).unwrap();
    for _ in 0..25 {
        use std::os::fd::{AsRawFd, FromRawFd};
        // SAFETY: valid descriptors and NUL-terminated names.
        unsafe {
            assert_eq!(libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), 0o755), 0);
            let fd = libc::openat(
                dir.as_raw_fd(),
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY,
            );
            assert!(fd >= 0);
            dir = fs::File::from_raw_fd(fd);
        }
    }
    let m = Mounted::separate(&backing, &mnt, &[]);
    let out = Command::new(bin())
        .arg("warm")
        .arg(m.path("deep"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "answered ok: {err}");
    assert!(
        err.contains("too long") && err.contains("nothing was done"),
        "{err}"
    );
    m.unmount();
    // The tree is too deep for remove_dir_all by path: let rm do it.
    let _ = Command::new("rm")
        .arg("-rf")
        .arg(backing.join("deep"))
        .status();
}

/// A control socket directory another user made first is not used, and
/// the daemon says whose it is and what to do.
#[test]
fn a_socket_directory_made_by_another_user_is_reported_with_the_fix() {
    if common::needs_root("makes directories of other users") {
        return;
    }
    let (tmp, backing, mnt) = dirs();
    let runtime = tmp.path().join("runtime");
    fs::create_dir(&runtime).unwrap();
    chown(&runtime, NOBODY, NOGROUP);
    let planted = runtime.join("modelcache");
    fs::create_dir(&planted).unwrap();
    chown(&planted, 4242, 4242);
    set_mode(&planted, 0o777);
    for p in [&backing, &mnt] {
        chown(p, NOBODY, NOGROUP);
    }
    let m = nobodys_mount(&backing, &mnt, &runtime);
    let log = m.log_text();
    assert!(
        log.contains("belongs to uid 4242") && log.contains("remove it"),
        "{log}"
    );
    assert_eq!(
        fs::read_dir(&planted).unwrap().count(),
        0,
        "a socket was made in it"
    );
    m.unmount();
}

/// `modelcache check` warns of a manifest a daemon would refuse.
#[test]
fn check_warns_of_a_manifest_a_daemon_would_refuse() {
    let (tmp, backing, _mnt) = dirs();
    let manifest = tmp.path().join("manifest.toml");
    fs::write(&manifest, "[cache]\nmax_size = \"64MiB\"\n").unwrap();
    set_mode(&manifest, 0o664);
    let out = Command::new(bin())
        .args(["check", "--root"])
        .arg(&backing)
        .arg(&manifest)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("a daemon run by this user would refuse it") && err.contains("chmod go-w"),
        "{err}"
    );
}

/// A `warm` of a large folder whose client goes away stops its walk (the
/// daemon says so) instead of walking on for nobody.
#[test]
fn a_walk_stops_when_its_client_goes_away() {
    let (_tmp, backing, mnt) = dirs();
    for d in 0..100 {
        let dir = backing.join(format!("big/d{d}"));
        fs::create_dir_all(&dir).unwrap();
        for i in 0..1000 {
            fs::write(dir.join(format!("f{i}.bin")), b"x").unwrap();
        }
    }
    let m = Mounted::separate(&backing, &mnt, &[]);
    let mut client = Command::new(bin())
        .arg("warm")
        .arg(m.path("big"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    client.kill().unwrap();
    client.wait().unwrap();
    let stopped = wait_for(Duration::from_secs(3), || {
        m.log_text().contains("walk stopped, its client went away")
    });
    assert!(stopped, "the walk went on:\n{}", m.log_text());
    m.unmount();
}
