//! The manifest on a live mount: pinned and warm files load at mount (pins
//! first), pins survive the cap, a group warms together, SIGHUP reloads the
//! manifest, and a bad manifest is refused with its line and column.

mod common;

use std::fs::{self, File};
use std::io::Read;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;
const PATIENCE: Duration = Duration::from_secs(60);

fn write_model(path: &Path, size: u64, seed: u64) {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).unwrap();
    }
    fs::write(path, pseudo_random(size as usize, seed)).unwrap();
}

/// Waits until `done` holds for the daemon's log.
fn wait_log(m: &Mounted, what: &str, done: impl Fn(&str) -> bool) -> String {
    let mut log = String::new();
    let found = wait_for(PATIENCE, || {
        log = m.log_text();
        done(&log)
    });
    assert!(found, "{what}: not in the log:\n{log}");
    log
}

/// Waits until the cache holds exactly `names`, each fully loaded.
fn wait_cached_set(m: &Mounted, backing: &Path, names: &[&str]) {
    let mut want: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    want.sort();
    let mut files = Vec::new();
    let held = wait_for(PATIENCE, || {
        files = cached_files(m.pid(), backing, &m.mountpoint);
        let mut got: Vec<String> = files
            .iter()
            .filter(|f| f.complete)
            .map(|f| f.name.clone())
            .collect();
        got.sort();
        got == want && files.len() == want.len()
    });
    assert!(
        held,
        "cache holds {files:?}, expected {want:?}:\n{}",
        m.log_text()
    );
}

fn read_all(path: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    File::open(path).unwrap().read_to_end(&mut v).unwrap();
    v
}

#[test]
fn pinned_and_warm_files_load_at_mount_pins_first_and_pins_outlast_the_cap() {
    let (tmp, backing, mnt) = dirs();
    write_model(&backing.join("warm/w.gguf"), 48 * MIB, 1);
    write_model(&backing.join("pinned.safetensors"), 64 * MIB, 2);
    write_model(&backing.join("other.safetensors"), 64 * MIB, 3);
    write_model(&backing.join("big.safetensors"), 96 * MIB, 4);
    let manifest = tmp.path().join("manifest.toml");
    // The warm rule comes first in the file: pins still load first.
    fs::write(
        &manifest,
        "[cache]\nmax_size = \"200MiB\"\n\n[[warm]]\npaths = [\"warm/*.gguf\"]\n\n\
         [[pin]]\npaths = [\"pinned.safetensors\"]\n",
    )
    .unwrap();
    let m = Mounted::separate(
        &backing,
        &mnt,
        &[
            "--manifest",
            manifest.to_str().unwrap(),
            "--loader-threads",
            "1",
        ],
    );
    // Nobody opened anything: the manifest alone loaded them.
    let log = wait_log(&m, "prewarm finished", |l| {
        l.contains("prewarm: all loaded (2 files")
    });
    wait_cached_set(&m, &backing, &["pinned.safetensors", "warm/w.gguf"]);
    let pinned_at = log.find("loaded pinned.safetensors").unwrap();
    let warm_at = log.find("loaded warm/w.gguf").unwrap();
    assert!(pinned_at < warm_at, "the pin loads first:\n{log}");

    // 112 MiB cached; reading 64 + 96 MiB more needs room: the warm file
    // goes, the pin stays.
    for (name, seed) in [("other.safetensors", 3), ("big.safetensors", 4)] {
        let bytes = read_all(&m.path(name));
        assert!(bytes == pseudo_random(bytes.len(), seed), "{name} bytes");
        std::thread::sleep(Duration::from_millis(300));
    }
    let log = wait_log(&m, "the warm file evicted", |l| {
        l.contains("evicted warm/w.gguf")
    });
    assert!(!log.contains("evicted pinned"), "{log}");
    let names: Vec<String> = cached_files(m.pid(), &backing, &m.mountpoint)
        .into_iter()
        .map(|f| f.name)
        .collect();
    assert!(
        names.contains(&"pinned.safetensors".to_string()),
        "{names:?}"
    );
    m.unmount();
}

#[test]
fn opening_one_member_of_a_group_warms_the_others() {
    let (tmp, backing, mnt) = dirs();
    write_model(&backing.join("wan/high_noise.safetensors"), 32 * MIB, 5);
    write_model(&backing.join("wan/low_noise.safetensors"), 32 * MIB, 6);
    write_model(&backing.join("vae/wan_vae.safetensors"), 8 * MIB, 7);
    write_model(&backing.join("unrelated.safetensors"), 8 * MIB, 8);
    let manifest = tmp.path().join("manifest.toml");
    fs::write(
        &manifest,
        "[[group]]\nname = \"wan\"\npaths = [\"wan/*.safetensors\", \"vae/wan_vae.safetensors\"]\n",
    )
    .unwrap();
    let m = Mounted::separate(&backing, &mnt, &["--manifest", manifest.to_str().unwrap()]);
    // Groups load nothing at mount.
    std::thread::sleep(Duration::from_millis(300));
    assert!(cached_files(m.pid(), &backing, &m.mountpoint).is_empty());

    let f = File::open(m.path("wan/high_noise.safetensors")).unwrap();
    wait_cached_set(
        &m,
        &backing,
        &[
            "wan/high_noise.safetensors",
            "wan/low_noise.safetensors",
            "vae/wan_vae.safetensors",
        ],
    );
    drop(f);
    m.unmount();
}

#[test]
fn sighup_reloads_the_manifest_new_pins_load_and_old_ones_become_ordinary() {
    let (tmp, backing, mnt) = dirs();
    write_model(&backing.join("a.safetensors"), 64 * MIB, 9);
    write_model(&backing.join("b.safetensors"), 64 * MIB, 10);
    write_model(&backing.join("c.safetensors"), 64 * MIB, 11);
    let manifest = tmp.path().join("manifest.toml");
    let pin = |name: &str| {
        fs::write(
            &manifest,
            format!("[cache]\nmax_size = \"150MiB\"\n\n[[pin]]\npaths = [\"{name}\"]\n"),
        )
        .unwrap()
    };
    pin("a.safetensors");
    let m = Mounted::separate(&backing, &mnt, &["--manifest", manifest.to_str().unwrap()]);
    wait_cached_set(&m, &backing, &["a.safetensors"]);

    // A broken edit: the reload is refused, with the line, and nothing
    // changes.
    fs::write(&manifest, "[[pin]]\npaths = \"not a list\"\n").unwrap();
    // SAFETY: signals our own child.
    unsafe { libc::kill(m.pid() as i32, libc::SIGHUP) };
    wait_log(&m, "the refused reload", |l| {
        l.contains("reload failed, the manifest in force stays") && l.contains("line 2")
    });

    pin("b.safetensors");
    // SAFETY: as above.
    unsafe { libc::kill(m.pid() as i32, libc::SIGHUP) };
    wait_cached_set(&m, &backing, &["a.safetensors", "b.safetensors"]);

    // a is an ordinary entry now: reading c evicts it, not the pinned b.
    let bytes = read_all(&m.path("c.safetensors"));
    assert!(bytes == pseudo_random(bytes.len(), 11), "c bytes");
    let log = wait_log(&m, "a evicted", |l| l.contains("evicted a.safetensors"));
    assert!(!log.contains("evicted b.safetensors"), "{log}");
    m.unmount();
}

#[test]
fn a_bad_manifest_is_refused_at_mount_with_its_line_and_column() {
    let (tmp, backing, mnt) = dirs();
    let manifest = tmp.path().join("manifest.toml");
    fs::write(&manifest, "[cache]\nmax_size = \"48 gigs\"\n").unwrap();
    let out = Command::new(bin())
        .args(["mount", "--manifest"])
        .arg(&manifest)
        .env("STATE_DIRECTORY", tmp.path().join("state"))
        .arg("--backing")
        .arg(&backing)
        .arg(&mnt)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("manifest.toml") && err.contains("line 2, column"),
        "{err}"
    );
    assert!(!our_mount_at(&mnt.canonicalize().unwrap()));
}
