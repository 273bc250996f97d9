//! Packaging: the systemd user unit, `packaging/install.sh`, the .deb
//! metadata, the example manifests, and the daemon's sd_notify messages.

mod common;

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn show(out: &Output) -> String {
    format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    )
}

/// Whether `tool` is on PATH.
fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Makes sure `tool` is there, installing Debian's `package` if it is not
/// (the tests run as root on Debian, as tests/run installs fuse3). False,
/// with the reason printed, only when it cannot be had.
fn ensure_tool(tool: &str, package: &str) -> bool {
    if have(tool) {
        return true;
    }
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let _ = apt(&["update", "-qq"]);
    if apt(&["install", "-y", "-qq", package]) && have(tool) {
        return true;
    }
    eprintln!("skipping: {tool} is missing and `apt-get install {package}` failed");
    false
}

// ---- install.sh ----

/// A scratch area: `home` and `config` stand in for $HOME and
/// $XDG_CONFIG_HOME, so install.sh can touch nothing of the real user.
struct Sandbox {
    tmp: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        for d in ["home", "config", "prefix"] {
            fs::create_dir(tmp.path().join(d)).unwrap();
        }
        Self { tmp }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    fn prefix(&self) -> PathBuf {
        self.path("prefix")
    }

    /// `packaging/install.sh ARGS` as README writes it (run from the
    /// source tree, by its own `#!` line), with the sandbox's HOME and config.
    fn run(&self, args: &[&str]) -> Output {
        Command::new("packaging/install.sh")
            .current_dir(repo())
            .args(args)
            .env("HOME", self.path("home"))
            .env("XDG_CONFIG_HOME", self.path("config"))
            .env_remove("XDG_DATA_HOME")
            .output()
            .unwrap()
    }

    fn run_ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "install.sh {args:?}: {}", show(&out));
        text(&out.stdout)
    }

    /// `run` with PATH set to `path`.
    fn run_with_path(&self, args: &[&str], path: &Path) -> Output {
        Command::new("packaging/install.sh")
            .current_dir(repo())
            .args(args)
            .env("HOME", self.path("home"))
            .env("XDG_CONFIG_HOME", self.path("config"))
            .env("PATH", path)
            .output()
            .unwrap()
    }

    /// Installs the binary under test into the prefix.
    fn install(&self) -> String {
        let prefix = self.prefix();
        self.run_ok(&[
            "--prefix",
            prefix.to_str().unwrap(),
            "--binary",
            bin(),
            "--no-fuse",
        ])
    }

    fn uninstall(&self) -> String {
        let prefix = self.prefix();
        self.run_ok(&["--prefix", prefix.to_str().unwrap(), "--uninstall"])
    }
}

/// Every path under `root`, with what it is: type, mode, and a file's
/// contents (checksum) or a link's target. Equal trees are the same
/// installation.
fn tree(root: &Path) -> BTreeMap<PathBuf, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, String>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = fs::symlink_metadata(&path).unwrap();
            let mode = meta.permissions().mode() & 0o7777;
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            let what = if meta.is_dir() {
                walk(root, &path, out);
                format!("dir {mode:o}")
            } else if meta.is_symlink() {
                format!("link {}", fs::read_link(&path).unwrap().display())
            } else {
                format!("file {mode:o} {:?}", checksum(&path))
            };
            out.insert(rel, what);
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn names(tree: &BTreeMap<PathBuf, String>) -> Vec<String> {
    tree.keys().map(|p| p.display().to_string()).collect()
}

#[test]
fn install_sh_is_valid_posix_sh() {
    let script = repo().join("packaging/install.sh");
    run_ok(Command::new("sh").arg("-n").arg(&script));
    if have("shellcheck") {
        run_ok(Command::new("shellcheck").arg(&script));
    } else {
        eprintln!("shellcheck not installed: only `sh -n` checked");
    }
}

#[test]
fn installing_twice_gives_the_same_tree_and_a_working_binary() {
    let s = Sandbox::new();
    let prefix = s.prefix();
    let first = s.install();
    assert!(first.contains("installed modelcache "), "{first}");
    let once = tree(&prefix);
    let second = s.install();
    let twice = tree(&prefix);
    assert_eq!(once, twice, "a second install changed the tree");
    let manifest = prefix.join("etc/modelcache/manifest.toml");
    assert!(
        second.contains(&format!("kept {}", manifest.display())),
        "{second}"
    );

    // One man page per verb, made from the CLI definitions; the rest by name.
    let (pages, others): (Vec<String>, Vec<String>) = names(&twice)
        .into_iter()
        .partition(|n| n.starts_with("share/man/man1/"));
    for page in ["modelcache.1", "modelcache-mount.1", "modelcache-doctor.1"] {
        assert!(
            pages.contains(&format!("share/man/man1/{page}")),
            "{page} not in {pages:?}"
        );
    }
    assert_eq!(
        others,
        [
            "bin",
            "bin/modelcache",
            "etc",
            "etc/modelcache",
            "etc/modelcache/manifest.toml",
            "share",
            "share/bash-completion",
            "share/bash-completion/completions",
            "share/bash-completion/completions/modelcache",
            "share/doc",
            "share/doc/modelcache",
            "share/doc/modelcache/README.md",
            "share/doc/modelcache/manifest.comfyui.toml",
            "share/doc/modelcache/manifest.example.toml",
            "share/fish",
            "share/fish/vendor_completions.d",
            "share/fish/vendor_completions.d/modelcache.fish",
            "share/man",
            "share/man/man1",
            "share/modelcache",
            "share/modelcache/installed-files",
            "share/systemd",
            "share/systemd/user",
            "share/systemd/user/modelcache@.service",
            "share/zsh",
            "share/zsh/site-functions",
            "share/zsh/site-functions/_modelcache",
        ]
    );
    // The binary works from where it was installed.
    let out = run_ok(Command::new(prefix.join("bin/modelcache")).arg("--version"));
    assert_eq!(
        text(&out.stdout).trim(),
        format!("modelcache {}", env!("CARGO_PKG_VERSION"))
    );
    // The unit runs that binary, with the manifest installed beside it.
    let unit = fs::read_to_string(prefix.join("share/systemd/user/modelcache@.service")).unwrap();
    let exec: Vec<&str> = unit
        .lines()
        .filter(|l| l.starts_with("ExecStart="))
        .collect();
    assert_eq!(
        exec,
        [format!(
            "ExecStart={}/bin/modelcache mount --manifest {} %f",
            prefix.display(),
            manifest.display()
        )]
    );
    assert_eq!(
        fs::read(&manifest).unwrap(),
        fs::read(repo().join("mount/manifest.comfyui.toml")).unwrap()
    );
    // Nothing was written outside the prefix.
    assert!(tree(&s.path("home")).is_empty());
    assert!(tree(&s.path("config")).is_empty());
}

#[test]
fn uninstall_leaves_the_prefix_as_it_was() {
    let s = Sandbox::new();
    let prefix = s.prefix();
    // Someone else's files, in directories install.sh also uses.
    fs::create_dir_all(prefix.join("bin")).unwrap();
    fs::write(prefix.join("bin/other-tool"), "#!/bin/sh\n").unwrap();
    fs::create_dir_all(prefix.join("share/doc/other")).unwrap();
    fs::write(prefix.join("share/doc/other/README"), "other\n").unwrap();
    let before = tree(&prefix);

    s.install();
    s.install();
    assert_ne!(tree(&prefix), before);
    let out = s.uninstall();
    assert!(out.contains("uninstalled modelcache"), "{out}");
    assert_eq!(names(&tree(&prefix)), names(&before));
    assert_eq!(tree(&prefix), before);

    // A second uninstall finds nothing to do and says so.
    let again = s.uninstall();
    assert!(again.contains("nothing to uninstall"), "{again}");
    assert_eq!(tree(&prefix), before);
}

#[test]
fn an_edited_manifest_survives_reinstall_and_uninstall() {
    let s = Sandbox::new();
    let prefix = s.prefix();
    let manifest = prefix.join("etc/modelcache/manifest.toml");
    s.install();
    let mut edited = fs::read_to_string(&manifest).unwrap();
    edited.push_str("\n[[pin]]\npaths = [\"checkpoints/mine.safetensors\"]\n");
    fs::write(&manifest, &edited).unwrap();

    s.install();
    assert_eq!(fs::read_to_string(&manifest).unwrap(), edited);
    let out = s.uninstall();
    assert!(
        out.contains(&format!("kept {}", manifest.display())),
        "{out}"
    );
    assert_eq!(fs::read_to_string(&manifest).unwrap(), edited);
    // Everything else is gone.
    assert_eq!(
        names(&tree(&prefix)),
        ["etc", "etc/modelcache", "etc/modelcache/manifest.toml"]
    );

    // A manifest that was there before the first install is never the
    // installer's: not replaced, not removed.
    s.install();
    s.uninstall();
    assert_eq!(fs::read_to_string(&manifest).unwrap(), edited);
}

#[test]
fn installing_for_the_user_uses_local_and_xdg_config_home() {
    let s = Sandbox::new();
    let (home, config) = (s.path("home"), s.path("config"));
    let out = s.run_ok(&["--binary", bin(), "--no-fuse"]);
    assert!(out.contains("systemctl --user enable --now"), "{out}");
    let unit = fs::read_to_string(config.join("systemd/user/modelcache@.service")).unwrap();
    assert!(
        unit.lines().any(|l| l
            == format!(
                "ExecStart={}/.local/bin/modelcache mount %f",
                home.display()
            )),
        "{unit}"
    );
    assert!(home.join(".local/bin/modelcache").is_file());
    assert!(config.join("modelcache/manifest.toml").is_file());
    assert!(home.join(".local/share/doc/modelcache/README.md").is_file());

    s.run_ok(&["--uninstall"]);
    assert!(tree(&home).is_empty(), "{:?}", names(&tree(&home)));
    assert!(tree(&config).is_empty(), "{:?}", names(&tree(&config)));
}

#[test]
fn install_sh_refuses_bad_input_clearly() {
    let s = Sandbox::new();
    let out = s.run(&["--bogus"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "install.sh: unknown argument: --bogus (see install.sh --help)\n"
    );
    let missing = s.path("no-such-binary");
    let out = s.run(&[
        "--prefix",
        s.prefix().to_str().unwrap(),
        "--binary",
        missing.to_str().unwrap(),
        "--no-fuse",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        format!(
            "install.sh: {} is not an executable file\n",
            missing.display()
        )
    );
    // Nothing was installed.
    assert!(tree(&s.prefix()).is_empty());
}

#[test]
fn a_missing_fusermount3_is_installed_with_the_package_manager() {
    // SAFETY: no arguments.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping: as a normal user install.sh would ask sudo");
        return;
    }
    let s = Sandbox::new();
    // A PATH with what install.sh uses, but no fusermount3, and an apt-get
    // that logs its arguments and "installs" one.
    let tools = s.path("tools");
    fs::create_dir(&tools).unwrap();
    for tool in [
        "awk", "basename", "cat", "chmod", "cksum", "cp", "dirname", "grep", "id", "mkdir",
        "mktemp", "mv", "rm", "rmdir", "sed", "sh", "sort",
    ] {
        let real = ["/usr/bin", "/bin"]
            .iter()
            .map(|d| Path::new(d).join(tool))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("no {tool}"));
        std::os::unix::fs::symlink(real, tools.join(tool)).unwrap();
    }
    let log = s.path("apt-get.log");
    fs::write(
        tools.join("apt-get"),
        format!(
            "#!/bin/sh\necho \"$*\" >>{}\nprintf '#!/bin/sh\\n' >\"$(dirname \"$0\")/fusermount3\"\nchmod 755 \"$(dirname \"$0\")/fusermount3\"\n",
            log.display()
        ),
    )
    .unwrap();
    set_mode(&tools.join("apt-get"), 0o755);

    let prefix = s.prefix();
    let args = ["--prefix", prefix.to_str().unwrap(), "--binary", bin()];
    let out = s.run_with_path(&args, &tools);
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        text(&out.stdout).contains(
            "fusermount3 was not found: installing fuse3 as root: apt-get install -y fuse3\n"
        ),
        "{}",
        show(&out)
    );
    assert_eq!(fs::read_to_string(&log).unwrap(), "install -y fuse3\n");
    // Found now: a second run installs nothing more.
    let out = s.run_with_path(&args, &tools);
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(fs::read_to_string(&log).unwrap(), "install -y fuse3\n");

    // No package manager that install.sh knows: it says what to do, and
    // installs nothing.
    fs::remove_file(tools.join("apt-get")).unwrap();
    fs::remove_file(tools.join("fusermount3")).unwrap();
    let other = s.path("other-prefix");
    let out = s.run_with_path(
        &["--prefix", other.to_str().unwrap(), "--binary", bin()],
        &tools,
    );
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert_eq!(
        text(&out.stderr),
        "install.sh: fusermount3 was not found, and neither apt-get, dnf, pacman nor zypper: \
         install your distribution's fuse3 package, then run install.sh again\n"
    );
    assert!(!other.exists());
}

// ---- the systemd unit ----

/// `systemd-analyze verify --user UNIT`: passes only if it exits 0 and has
/// nothing to say (it reports unknown keys and bad values as warnings,
/// with exit code 0).
fn verify(unit: &Path, runtime: &Path) -> Result<(), String> {
    let out = Command::new("systemd-analyze")
        .args(["verify", "--user"])
        .arg(unit)
        // The user manager it simulates needs a runtime directory.
        .env("XDG_RUNTIME_DIR", runtime)
        .output()
        .unwrap();
    if out.status.success() && out.stderr.is_empty() && out.stdout.is_empty() {
        Ok(())
    } else {
        Err(show(&out))
    }
}

#[test]
fn the_user_unit_passes_systemd_analyze_verify() {
    let unit_src =
        fs::read_to_string(repo().join("packaging/systemd/modelcache@.service")).unwrap();
    for line in [
        "Type=notify",
        "ExecStart=/usr/bin/modelcache mount %f",
        "Restart=on-failure",
        "KillMode=mixed",
        "WantedBy=default.target",
    ] {
        assert!(unit_src.lines().any(|l| l == line), "no `{line}` line");
    }
    if !ensure_tool("systemd-analyze", "systemd") {
        return;
    }
    let s = Sandbox::new();
    s.install();
    let runtime = s.path("runtime");
    fs::create_dir(&runtime).unwrap();
    set_mode(&runtime, 0o700);
    // An instance, as users enable it; the template is found beside it.
    let dir = s.prefix().join("share/systemd/user");
    let instance = dir.join("modelcache@home-me-ComfyUI-models.service");
    verify(&instance, &runtime).unwrap();

    // The check is not vacuous: a misspelt key, or a binary that is not
    // there, fails it.
    let broken = s.path("broken");
    fs::create_dir(&broken).unwrap();
    let installed = fs::read_to_string(dir.join("modelcache@.service")).unwrap();
    for (from, to) in [
        ("KillMode=mixed", "KilMode=mixed"),
        (
            &*format!("ExecStart={}", s.prefix().join("bin").display()),
            "ExecStart=/nonexistent",
        ),
    ] {
        assert!(installed.contains(from));
        fs::write(
            broken.join("modelcache@.service"),
            installed.replace(from, to),
        )
        .unwrap();
        let err = verify(&broken.join("modelcache@x.service"), &runtime)
            .expect_err("a broken unit passed");
        assert!(err.contains("modelcache@"), "{err}");
    }
}

// ---- the .deb ----

/// `packaging/deb.sh`, run as README writes it, builds a .deb without a
/// warning, holding the binary, the user unit, the mount(8) helper, the docs,
/// a man page per verb and the three shells' completions.
#[test]
fn the_deb_builds_without_warnings_and_holds_what_readme_says() {
    let readme = fs::read_to_string(repo().join("README.md")).unwrap();
    assert!(
        readme.contains("`packaging/deb.sh`"),
        "README no longer tells how to build the .deb"
    );
    let have_cargo_deb = Command::new(env!("CARGO"))
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        have_cargo_deb,
        "cargo-deb is missing: `cargo install cargo-deb` (tests/run installs it)"
    );
    let debian = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| repo().join("target"), PathBuf::from)
        .join("debian");
    let _ = fs::remove_dir_all(&debian);
    let out = run_ok(
        Command::new("packaging/deb.sh")
            .current_dir(repo())
            .env("CARGO", env!("CARGO")),
    );
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        !said.to_lowercase().contains("warning"),
        "cargo deb warned:\n{said}"
    );
    let deb = fs::read_dir(&debian)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("no .deb written");
    let info = text(&run_ok(Command::new("dpkg-deb").arg("-I").arg(&deb)).stdout);
    let depends = info
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends:"))
        .unwrap_or_default();
    assert!(depends.split(',').any(|d| d.trim() == "fuse3"), "{info}");
    assert!(info.contains("Maintainer: "), "{info}");
    let listing = text(&run_ok(Command::new("dpkg-deb").arg("-c").arg(&deb)).stdout);
    let files: Vec<&str> = listing
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .collect();
    let has = |path: &str| files.contains(&format!("./{path}").as_str());
    let mut want = vec![
        "usr/bin/modelcache".to_string(),
        "usr/lib/systemd/user/modelcache@.service".into(),
        // mount(8) looks for /sbin/mount.fuse.modelcache (/usr/sbin on merged /usr).
        "usr/sbin/mount.fuse.modelcache".into(),
        "usr/share/doc/modelcache/README.md".into(),
        "usr/share/doc/modelcache/manifest.comfyui.toml".into(),
        "usr/share/doc/modelcache/copyright".into(),
        "usr/share/bash-completion/completions/modelcache".into(),
        "usr/share/zsh/vendor-completions/_modelcache".into(),
        "usr/share/fish/vendor_completions.d/modelcache.fish".into(),
        "usr/share/man/man1/modelcache.1.gz".into(),
    ];
    for verb in [
        "mount", "umount", "status", "warm", "doctor", "check", "suggest",
    ] {
        want.push(format!("usr/share/man/man1/modelcache-{verb}.1.gz"));
    }
    let missing: Vec<&String> = want.iter().filter(|p| !has(p)).collect();
    assert!(missing.is_empty(), "missing {missing:?} in:\n{listing}");
}

// ---- the example manifests ----

/// The manifest with its commented-out settings and rules turned on: the
/// examples a user uncomments must be valid too.
fn uncommented(manifest: &str) -> String {
    manifest
        .lines()
        .map(|line| {
            let Some(rest) = line.strip_prefix("# ") else {
                return line.to_string();
            };
            let key = rest.split(" = ").next().unwrap();
            let is_toml = rest.starts_with('[')
                || rest.starts_with("  \"")
                || rest == "]"
                || (rest.contains(" = ")
                    && !key.is_empty()
                    && key.chars().all(|c| c.is_ascii_lowercase() || c == '_'));
            if is_toml {
                rest.to_string()
            } else {
                line.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_example_manifests_pass_check() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("models");
    for d in ["checkpoints", "vae", "loras", "diffusion_models"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::write(
        root.join("checkpoints/sd_xl_base_1.0.safetensors"),
        [0u8; 64],
    )
    .unwrap();
    let comfyui = fs::read_to_string(repo().join("mount/manifest.comfyui.toml")).unwrap();
    let all_on = tmp.path().join("comfyui-uncommented.toml");
    fs::write(&all_on, uncommented(&comfyui)).unwrap();
    assert!(
        fs::read_to_string(&all_on)
            .unwrap()
            .contains("\n[[group]]\n"),
        "nothing was uncommented"
    );
    for manifest in [
        repo().join("mount/manifest.comfyui.toml"),
        repo().join("mount/manifest.example.toml"),
        all_on,
    ] {
        let out = Command::new(bin())
            .arg("check")
            .arg(&manifest)
            .arg("--root")
            .arg(&root)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            manifest.display(),
            show(&out)
        );
    }
}

// ---- sd_notify ----

/// Whether `path` is a FUSE mount whose daemon answers right now: statfs
/// of a FUSE mount always goes to the daemon and reports FUSE's magic; the
/// directory under the mount would report its own filesystem's.
fn fuse_answers(path: &Path) -> bool {
    const FUSE_SUPER_MAGIC: libc::c_long = 0x6573_5546;
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: valid path and output buffer.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as libc::c_long == FUSE_SUPER_MAGIC
    }
}

/// A message from the daemon, and what was true when it arrived.
struct Received {
    message: String,
    at: Instant,
    /// Our mount was in the mount table and answered statfs.
    live: bool,
}

/// How the mount is ended.
enum Stop {
    Sigterm,
    /// `umount -l` from outside: the daemon notices and exits by itself.
    LazyDetach,
}

fn ready_then_stopping(stop: Stop) {
    let (tmp, backing, mnt) = dirs();
    fs::write(backing.join("a.txt"), "a\n").unwrap();
    let mnt = mnt.canonicalize().unwrap();
    let socket_path = tmp.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();

    // Checks the mount the moment each message arrives, until STOPPING=1
    // (or 30 s of silence).
    let watched = mnt.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = socket.recv(&mut buf) {
            let live = our_mount_at(&watched) && fuse_answers(&watched);
            let message = text(&buf[..n]);
            let last = message.lines().any(|l| l == "STOPPING=1");
            let received = Received {
                message,
                at: Instant::now(),
                live,
            };
            if tx.send(received).is_err() || last {
                break;
            }
        }
    });

    let mut cmd = Command::new(bin());
    cmd.arg("mount")
        .arg("--backing")
        .arg(&backing)
        .arg(&mnt)
        .env("NOTIFY_SOCKET", &socket_path);
    let m = Mounted::start(cmd, &mnt);
    let ready = rx
        .recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| panic!("no READY=1 from a live mount:\n{}", m.log_text()));
    assert_eq!(ready.message, "READY=1");
    assert!(
        ready.live,
        "READY=1 arrived before the mount answered:\n{}",
        m.log_text()
    );
    assert_eq!(fs::read_to_string(m.path("a.txt")).unwrap(), "a\n");

    let log = m.log_text();
    let signalled = Instant::now();
    match stop {
        Stop::Sigterm => m.unmount(),
        Stop::LazyDetach => {
            let mut m = m;
            let c = CString::new(mnt.as_os_str().as_bytes()).unwrap();
            // SAFETY: NUL-terminated path of our own mount.
            assert_eq!(unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) }, 0);
            let status = m.wait_exit(Duration::from_secs(10));
            assert!(status.success(), "{status}\n{}", m.log_text());
        }
    }
    let stopping = rx
        .recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| panic!("no STOPPING=1 once stopped:\n{log}"));
    assert_eq!(stopping.message, "STOPPING=1");
    assert!(stopping.at >= signalled && ready.at < signalled);
    // Nothing else, and nothing twice.
    assert!(rx.try_recv().is_err());
}

#[test]
fn the_daemon_says_ready_once_the_mount_answers_and_stopping_on_sigterm() {
    ready_then_stopping(Stop::Sigterm);
}

#[test]
fn the_daemon_says_stopping_when_its_mount_is_detached_from_outside() {
    if common::needs_root("detaches the mount with umount2") {
        return;
    }
    ready_then_stopping(Stop::LazyDetach);
}

#[test]
fn a_notify_socket_nobody_listens_on_does_not_stop_the_mount() {
    let (tmp, backing, mnt) = dirs();
    fs::write(backing.join("a.txt"), "a\n").unwrap();
    let mut cmd = Command::new(bin());
    cmd.arg("mount")
        .arg("--backing")
        .arg(&backing)
        .arg(&mnt)
        .env("NOTIFY_SOCKET", tmp.path().join("nobody-here.sock"));
    let m = Mounted::start(cmd, &mnt);
    assert_eq!(fs::read_to_string(m.path("a.txt")).unwrap(), "a\n");
    let log = m.log_text();
    assert!(
        log.contains("cannot tell systemd READY=1 through $NOTIFY_SOCKET"),
        "{log}"
    );
    m.unmount();
}
