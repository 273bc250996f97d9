//! README's Quick start, run exactly as it is written, as a normal user on a
//! clean copy of the source tree: install (which builds with cargo), mount
//! the ComfyUI models folder in place, read a model twice, see it cached in
//! `modelcache status`, unmount.
//!
//! The user is `nobody` with a home in a temp dir. Root's Rust toolchain is
//! lent to it as hard links (read-only to it) and root's crate downloads as
//! a copy, so the build needs no network and changes nothing of root's.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::{Mounted, NOBODY, NOGROUP};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The lines of the ```sh blocks under README's "## Quick start".
fn quick_start_commands() -> Vec<String> {
    let readme = fs::read_to_string(repo().join("README.md")).unwrap();
    let section = readme
        .split("\n## Quick start\n")
        .nth(1)
        .expect("README has a \"## Quick start\" section");
    let section = section.split("\n## ").next().unwrap();
    let mut commands = Vec::new();
    let mut in_sh = false;
    for line in section.lines() {
        match line.trim() {
            "```sh" => in_sh = true,
            "```" => in_sh = false,
            l if in_sh && !l.is_empty() && !l.starts_with('#') => commands.push(l.to_string()),
            _ => {}
        }
    }
    commands
}

/// The Quick start's command that starts with `start`.
fn command<'a>(commands: &'a [String], start: &str) -> &'a str {
    commands
        .iter()
        .find(|c| c.starts_with(start))
        .unwrap_or_else(|| {
            panic!("Quick start has no command starting with {start:?}: {commands:?}")
        })
}

/// `nobody`'s shell environment: its home, the lent toolchain, and
/// ~/.local/bin in PATH as Debian's ~/.profile puts it there.
struct User {
    home: PathBuf,
    path: String,
    rustup: PathBuf,
    cargo_home: PathBuf,
}

impl User {
    /// `sh -c LINE` as the user, in `dir`.
    fn sh(&self, line: &str, dir: &Path) -> Command {
        let mut cmd = common::as_user(NOBODY, NOGROUP, "/bin/sh");
        cmd.arg("-c")
            .arg(line)
            .current_dir(dir)
            .env_clear()
            .env("HOME", &self.home)
            .env("PATH", &self.path)
            .env("RUSTUP_HOME", &self.rustup)
            .env("CARGO_HOME", &self.cargo_home)
            .env("LANG", "C.UTF-8");
        cmd
    }

    fn run(&self, line: &str, dir: &Path) -> Output {
        self.sh(line, dir).output().unwrap()
    }
}

fn show(out: &Output) -> String {
    format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn chown_tree(root: &Path) {
    common::run_ok(
        Command::new("chown")
            .arg("-R")
            .arg(format!("{NOBODY}:{NOGROUP}"))
            .arg(root),
    );
}

/// Root's toolchain for `nobody`: rustup's toolchains as hard links (a copy
/// where links cannot cross filesystems), the cargo proxies, and a cargo home
/// of its own holding a copy of what root's cargo downloaded.
fn lend_toolchain(tmp: &Path) -> Option<(PathBuf, PathBuf, PathBuf)> {
    let root_home = PathBuf::from(std::env::var_os("HOME")?);
    let rustup = std::env::var_os("RUSTUP_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| root_home.join(".rustup"));
    let cargo = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| root_home.join(".cargo"));
    if !rustup.join("toolchains").is_dir() || !cargo.join("bin/cargo").exists() {
        eprintln!("skipping: no rustup toolchain at {}", rustup.display());
        return None;
    }
    let (lent_rustup, lent_bin, cargo_home) = (
        tmp.join("rustup"),
        tmp.join("cargo-bin"),
        tmp.join("cargo-home"),
    );
    for (from, to) in [(&rustup, &lent_rustup), (&cargo.join("bin"), &lent_bin)] {
        let linked = Command::new("cp")
            .arg("-al")
            .arg(from)
            .arg(to)
            .status()
            .unwrap();
        if !linked.success() {
            let _ = fs::remove_dir_all(to);
            common::run_ok(Command::new("cp").arg("-a").arg(from).arg(to));
        }
    }
    fs::create_dir_all(cargo_home.join("registry")).unwrap();
    for part in ["cache", "index"] {
        let from = cargo.join("registry").join(part);
        if from.is_dir() {
            common::run_ok(
                Command::new("cp")
                    .arg("-a")
                    .arg(&from)
                    .arg(cargo_home.join("registry")),
            );
        }
    }
    chown_tree(&cargo_home);
    Some((lent_rustup, lent_bin, cargo_home))
}

/// The source tree as a clone has it: the files git tracks (and new ones it
/// would), not the build output.
fn clean_copy(to: &Path) {
    let out = common::run_ok(
        Command::new("git")
            .args([
                "ls-files",
                "-z",
                "--cached",
                "--others",
                "--exclude-standard",
            ])
            .current_dir(repo()),
    );
    for rel in out.stdout.split(|b| *b == 0).filter(|p| !p.is_empty()) {
        let rel = Path::new(std::str::from_utf8(rel).unwrap());
        let from = repo().join(rel);
        if !from.exists() {
            continue; // deleted in the working tree, not yet committed
        }
        let dest = to.join(rel);
        fs::create_dir_all(dest.parent().unwrap()).unwrap();
        fs::copy(&from, &dest).unwrap();
        // git keeps the executable bit, and only it.
        let exec = fs::metadata(&from).unwrap().permissions().mode() & 0o111 != 0;
        common::set_mode(&dest, if exec { 0o755 } else { 0o644 });
    }
}

#[test]
fn the_quick_start_works_as_written_for_a_normal_user() {
    // SAFETY: no arguments.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping: needs root (runs the Quick start as another user with setpriv)");
        return;
    }
    let commands = quick_start_commands();
    assert_eq!(
        commands.first().map(String::as_str),
        Some("packaging/install.sh"),
        "the Quick start begins with the install: {commands:?}"
    );
    let install = command(&commands, "packaging/install.sh");
    let service = command(&commands, "systemctl --user enable --now");
    let mount = command(&commands, "modelcache mount ~/ComfyUI/models");
    let status = command(&commands, "modelcache status");

    let tmp = common::shared_tempdir();
    let Some((rustup, cargo_bin, cargo_home)) = lend_toolchain(tmp.path()) else {
        return;
    };
    let home = tmp.path().join("home");
    let src = home.join("src/modelcache");
    clean_copy(&src);
    let models = home.join("ComfyUI/models");
    fs::create_dir_all(models.join("checkpoints")).unwrap();
    let model = models.join("checkpoints/model.safetensors");
    common::write_safetensors(&model, 16, 4 << 20, 7);
    chown_tree(&home);
    let expected = common::run_ok(
        Command::new("sh")
            .arg("-c")
            .arg(format!("cat '{}' | cksum", model.display())),
    );
    let user = User {
        path: format!(
            "{}:{}/.local/bin:/usr/local/bin:/usr/bin:/bin",
            cargo_bin.display(),
            home.display()
        ),
        home: home.clone(),
        rustup,
        cargo_home,
    };

    // 1. Install, from the source tree, as README writes it.
    let out = user.run(install, &src);
    assert!(out.status.success(), "{install}: {}", show(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("installed modelcache "), "{said}");
    assert!(home.join(".local/bin/modelcache").is_file());
    assert!(home.join(".local/share/man/man1/modelcache.1").is_file());
    assert!(
        home.join(".local/share/bash-completion/completions/modelcache")
            .is_file()
    );
    let out = user.run("modelcache --version", &home);
    assert!(out.status.success(), "{}", show(&out));

    // 2. The user service needs a user manager, which a test machine may
    // not run; the terminal form of the same mount is tested instead.
    let has_user_manager = user.run("systemctl --user is-system-running", &home);
    if !has_user_manager.status.success() {
        eprintln!("not run (no systemd user manager here): {service}");
    }
    let mut cmd = user.sh(&format!("exec {mount}"), &home);
    cmd.env_remove("RUSTUP_HOME").env_remove("CARGO_HOME");
    let mounted = Mounted::start(cmd, &models);
    assert!(
        mounted.log_text().contains("copy mode"),
        "a normal user's mount serves in copy mode:\n{}",
        mounted.log_text()
    );

    // 3. Read the model twice: the second read is served from RAM.
    let read = "cat ~/ComfyUI/models/checkpoints/model.safetensors | cksum";
    let first = user.run(read, &home);
    assert!(first.status.success(), "{}", show(&first));
    let mut table = String::new();
    let cached = common::wait_for(Duration::from_secs(30), || {
        let out = user.run(status, &home);
        assert!(out.status.success(), "{status}: {}", show(&out));
        table = String::from_utf8_lossy(&out.stdout).into_owned();
        let row = table
            .lines()
            .find(|l| l.contains("checkpoints/model.safetensors"))
            .unwrap_or_default();
        row.contains("cached")
    });
    assert!(
        cached,
        "the model is not cached 30 s after it was read:\n{table}\n{}",
        mounted.log_text()
    );
    let second = user.run(read, &home);
    assert_eq!(first.stdout, second.stdout, "the two reads differ");
    assert_eq!(
        first.stdout, expected.stdout,
        "the mount's bytes differ from the file's"
    );
    assert!(table.contains(&models.display().to_string()), "{table}");

    // 4. Unmount, as the user.
    let out = user.run("modelcache umount ~/ComfyUI/models", &home);
    assert!(out.status.success(), "umount: {}", show(&out));
    let mut mounted = mounted;
    let exit = mounted.wait_exit(Duration::from_secs(20));
    assert!(
        exit.success(),
        "daemon exit {exit}:\n{}",
        mounted.log_text()
    );
    assert!(!common::our_mount_at(&models.canonicalize().unwrap()));
}
