//! Runtime pins on real mounts: `modelcache pin` outlives a reload and a
//! remount (kept in the mount's state file), and status says who pinned
//! each file.

mod common;

use std::fs;
use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::Value;

const MIB: usize = 1 << 20;

fn ok(args: &[&str]) -> String {
    let out = modelcache(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until status shows `path` in `state` with this `pin_origin`
/// (`Value::Null`: none).
fn wait_pin(mnt: &Path, path: &str, state: &str, origin: Value) -> Value {
    let mut s = Value::Null;
    let reached = wait_for(Duration::from_secs(30), || {
        s = mount_status(mnt);
        status_file(&s, path).is_some_and(|f| f["state"] == state && f["pin_origin"] == origin)
    });
    assert!(reached, "{path} never {state} ({origin}): {s:#}");
    s
}

fn mount_with(backing: &Path, mnt: &Path, manifest: &Path, state: &StateDir) -> Mounted {
    let mut cmd = separate_command(backing, mnt);
    cmd.arg("--manifest").arg(manifest);
    state.apply(&mut cmd);
    Mounted::start(cmd, mnt)
}

#[test]
fn a_runtime_pin_survives_a_reload_and_a_remount() {
    let (tmp, backing, mnt) = dirs();
    fs::write(backing.join("m.safetensors"), pseudo_random(16 * MIB, 1)).unwrap();
    fs::write(backing.join("r.safetensors"), pseudo_random(16 * MIB, 2)).unwrap();
    let manifest = tmp.path().join("manifest.toml");
    fs::write(&manifest, "[[pin]]\npaths = [\"m.safetensors\"]\n").unwrap();
    let state = StateDir::new();
    let m = mount_with(&backing, &mnt, &manifest, &state);
    wait_pin(&mnt, "m.safetensors", "pinned", "manifest".into());

    ok(&["pin", m.path("r.safetensors").to_str().unwrap()]);
    wait_pin(&mnt, "r.safetensors", "pinned", "runtime".into());
    let table = ok(&["status", mnt.to_str().unwrap()]);
    assert!(table.contains("pinned (runtime)"), "{table}");
    assert!(table.contains("pinned (manifest)"), "{table}");

    // A reload whose manifest pins nothing: the manifest's pin goes, the
    // runtime pin stays.
    fs::write(&manifest, "").unwrap();
    ok(&["reload", mnt.to_str().unwrap()]);
    wait_pin(&mnt, "m.safetensors", "cached", Value::Null);
    wait_pin(&mnt, "r.safetensors", "pinned", "runtime".into());

    // What the state file holds.
    let files: Vec<_> = fs::read_dir(&state.path).unwrap().flatten().collect();
    assert_eq!(files.len(), 1, "one file per mount");
    let saved: Value = serde_json::from_slice(&fs::read(files[0].path()).unwrap()).unwrap();
    assert_eq!(saved["version"], 1);
    assert_eq!(saved["mountpoint"], m.mountpoint.to_str().unwrap());
    assert_eq!(saved["pins"], serde_json::json!(["r.safetensors"]));
    m.unmount();

    // Remounted: loaded at mount, nobody opening it.
    let m = mount_with(&backing, &mnt, &manifest, &state);
    wait_pin(&mnt, "r.safetensors", "pinned", "runtime".into());
    ok(&["unpin", m.path("r.safetensors").to_str().unwrap()]);
    wait_pin(&mnt, "r.safetensors", "cached", Value::Null);
    let saved: Value = serde_json::from_slice(&fs::read(files[0].path()).unwrap()).unwrap();
    assert_eq!(saved["pins"], serde_json::json!([]), "unpinned for good");
    m.unmount();
    let m = mount_with(&backing, &mnt, &manifest, &state);
    std::thread::sleep(Duration::from_secs(1));
    let s = mount_status(&mnt);
    assert!(
        status_file(&s, "r.safetensors").is_none(),
        "unpinned for good: {s:#}"
    );
    m.unmount();
}

/// A file the cache never takes is refused by `pin` with why, and is
/// neither pinned nor saved; the model files named with it are.
#[test]
fn pin_refuses_what_the_cache_never_takes_and_saves_only_the_rest() {
    let (tmp, backing, mnt) = dirs();
    fs::write(backing.join("notes.txt"), pseudo_random(2 * MIB, 4)).unwrap();
    fs::write(backing.join("m.safetensors"), pseudo_random(4 * MIB, 5)).unwrap();
    let manifest = tmp.path().join("manifest.toml");
    fs::write(&manifest, "").unwrap();
    let state = StateDir::new();
    let m = mount_with(&backing, &mnt, &manifest, &state);
    let out = modelcache(&[
        "pin",
        m.path("notes.txt").to_str().unwrap(),
        m.path("m.safetensors").to_str().unwrap(),
    ]);
    let (said, err) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(!out.status.success());
    assert!(
        err.contains("notes.txt: not a model file: .txt is not in [cache] extensions"),
        "{err}"
    );
    assert!(said.contains("pinned m.safetensors (4.0 MiB)"), "{said}");
    wait_pin(&mnt, "m.safetensors", "pinned", "runtime".into());
    let file = fs::read_dir(&state.path).unwrap().next().unwrap().unwrap();
    let saved: Value = serde_json::from_slice(&fs::read(file.path()).unwrap()).unwrap();
    assert_eq!(saved["pins"], serde_json::json!(["m.safetensors"]));
    m.unmount();
}

#[test]
fn a_state_file_that_cannot_be_read_is_set_aside_and_the_mount_goes_on() {
    let (tmp, backing, mnt) = dirs();
    fs::write(backing.join("r.safetensors"), pseudo_random(4 * MIB, 3)).unwrap();
    let manifest = tmp.path().join("manifest.toml");
    fs::write(&manifest, "").unwrap();
    let state = StateDir::new();
    let m = mount_with(&backing, &mnt, &manifest, &state);
    ok(&["pin", m.path("r.safetensors").to_str().unwrap()]);
    m.unmount();
    let file = fs::read_dir(&state.path)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    fs::write(&file, "{\"version\":1,\"mountpoint\":").unwrap();

    let m = mount_with(&backing, &mnt, &manifest, &state);
    let log = m.log_text();
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("state file")).collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(
        warnings[0].contains(file.to_str().unwrap()) && warnings[0].contains("set aside as"),
        "{log}"
    );
    assert!(status_file(&mount_status(&mnt), "r.safetensors").is_none());
    // Pinning again writes a fresh file beside the one set aside.
    ok(&["pin", m.path("r.safetensors").to_str().unwrap()]);
    wait_pin(&mnt, "r.safetensors", "pinned", "runtime".into());
    assert_eq!(fs::read_dir(&state.path).unwrap().count(), 2);
    m.unmount();
}
