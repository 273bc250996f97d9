//! The working-set record on a real mount: what was opened through it is
//! in the mount's state file after unmount, a remount goes on counting,
//! and loads the most recently opened files that fit (warm start).

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

const MIB: usize = 1 << 20;

fn mount_with(backing: &Path, mnt: &Path, state: &StateDir) -> Mounted {
    mount_with_args(backing, mnt, state, &[])
}

fn mount_with_args(backing: &Path, mnt: &Path, state: &StateDir, extra: &[&str]) -> Mounted {
    let mut cmd = Command::new(bin());
    cmd.arg("mount")
        .arg("--backing")
        .arg(backing)
        .arg(mnt)
        .args(["--passthrough", "off"])
        .args(extra);
    state.apply(&mut cmd);
    Mounted::start(cmd, mnt)
}

/// Whether the mount's status lists `path` as cached.
fn is_cached(status: &Value, path: &str) -> bool {
    status_file(status, path).is_some_and(|f| f["state"] == "cached")
}

/// The mount's state file, parsed (the only file in the state directory).
fn saved(state: &StateDir) -> Value {
    let files: Vec<_> = fs::read_dir(&state.path).unwrap().flatten().collect();
    assert_eq!(files.len(), 1, "one file per mount");
    serde_json::from_slice(&fs::read(files[0].path()).unwrap()).unwrap()
}

/// All opens of `name` in the record, whatever they were served from.
fn opens(record: &Value, name: &str) -> u64 {
    let o = &record["files"][name]["opens"];
    ["ram", "partial", "disk"]
        .iter()
        .map(|k| o[k].as_u64().unwrap_or(0))
        .sum()
}

#[test]
fn the_record_holds_what_was_opened_together_across_a_remount() {
    let (_tmp, backing, mnt) = dirs();
    let a = pseudo_random(4 * MIB, 1);
    fs::write(backing.join("a.safetensors"), &a).unwrap();
    fs::write(backing.join("b.safetensors"), pseudo_random(4 * MIB, 2)).unwrap();
    let state = StateDir::new();

    // One process (this one) opens both files: one workflow.
    let m = mount_with(&backing, &mnt, &state);
    assert_eq!(fs::read(m.path("a.safetensors")).unwrap(), a);
    fs::read(m.path("b.safetensors")).unwrap();
    m.unmount();

    let s = saved(&state);
    let record = &s["record"];
    assert_eq!(opens(record, "a.safetensors"), 1, "{s:#}");
    assert_eq!(opens(record, "b.safetensors"), 1, "{s:#}");
    let a_meta = fs::metadata(backing.join("a.safetensors")).unwrap();
    assert_eq!(
        record["files"]["a.safetensors"]["identity"]["size"],
        a_meta.len(),
        "{s:#}"
    );
    let sets = record["co_open"].as_array().unwrap();
    assert_eq!(sets.len(), 1, "one co-open set: {s:#}");
    let ids: Vec<&Value> = ["a.safetensors", "b.safetensors"]
        .iter()
        .map(|n| &record["files"][n]["id"])
        .collect();
    let mut members: Vec<&Value> = sets[0]["files"].as_array().unwrap().iter().collect();
    members.sort_by_key(|v| v.as_u64());
    let mut want = ids.clone();
    want.sort_by_key(|v| v.as_u64());
    assert_eq!(members, want, "{s:#}");
    assert_eq!(sets[0]["count"], 1);
    assert_eq!(s["pins"], serde_json::json!([]), "no pins came from it");

    // Remounted, the record is read back and counting goes on.
    let m = mount_with(&backing, &mnt, &state);
    fs::read(m.path("a.safetensors")).unwrap();
    m.unmount();
    let s = saved(&state);
    let record = &s["record"];
    assert_eq!(opens(record, "a.safetensors"), 2, "{s:#}");
    assert_eq!(opens(record, "b.safetensors"), 1, "kept: {s:#}");
    assert_eq!(record["co_open"].as_array().unwrap().len(), 1, "{s:#}");
}

#[test]
fn a_remount_loads_the_most_recent_files_that_fit_unless_told_not_to() {
    let (tmp, backing, mnt) = dirs();
    for (i, name) in ["gone", "a", "b", "c"].iter().enumerate() {
        let data = pseudo_random(4 * MIB, i as u64 + 10);
        fs::write(backing.join(format!("{name}.safetensors")), data).unwrap();
    }
    let state = StateDir::new();
    // A cap of 10 MiB: two of the 4 MiB files fit, not three.
    let cap = ["--max-size", "10MiB"];

    // Opened in this order, a second apart (the record counts seconds).
    let m = mount_with_args(&backing, &mnt, &state, &cap);
    for name in ["gone", "a", "b", "c"] {
        fs::read(m.path(&format!("{name}.safetensors"))).unwrap();
        std::thread::sleep(Duration::from_millis(1100));
    }
    m.unmount();
    fs::remove_file(backing.join("gone.safetensors")).unwrap();

    // Remounted: c and b, the most recent, load without a reader; a does
    // not fit beside them; the removed file leaves the record.
    let m = mount_with_args(&backing, &mnt, &state, &cap);
    let mut s = Value::Null;
    let loaded = wait_for(Duration::from_secs(60), || {
        s = mount_status(&mnt);
        is_cached(&s, "c.safetensors") && is_cached(&s, "b.safetensors")
    });
    assert!(loaded, "c and b never cached: {s:#}\n{}", m.log_text());
    wait_until(
        Duration::from_secs(30),
        "the warm start's last line",
        || m.log_text().contains("warm start: all loaded (2 files"),
    );
    let log = m.log_text();
    assert!(
        log.contains(
            "warm start: loading 2 files (8.0 MiB) recorded at the last mount, most recent first"
        ),
        "{log}"
    );
    assert!(
        log.contains(
            "warm start: not loading 1 file recorded, from a.safetensors on: past the cap \
             (10.0 MiB)"
        ),
        "{log}"
    );
    assert!(
        log.contains(
            "warm start: 1 file no longer there, dropped from the record: gone.safetensors"
        ),
        "{log}"
    );
    let s = mount_status(&mnt);
    assert!(!is_cached(&s, "a.safetensors"), "{s:#}");
    m.unmount();
    let record = &saved(&state)["record"];
    assert!(
        record["files"].get("gone.safetensors").is_none(),
        "{record:#}"
    );
    assert_eq!(opens(record, "c.safetensors"), 1, "a warm start is no open");

    // --no-warm-start: nothing loads.
    let m = mount_with_args(
        &backing,
        &mnt,
        &state,
        &[&cap[..], &["--no-warm-start"]].concat(),
    );
    std::thread::sleep(Duration::from_secs(2));
    let s = mount_status(&mnt);
    for name in ["a", "b", "c"] {
        assert!(!is_cached(&s, &format!("{name}.safetensors")), "{s:#}");
    }
    assert!(!m.log_text().contains("warm start"), "{}", m.log_text());
    m.unmount();

    // warm_start = false in the manifest: nothing loads either.
    let manifest = tmp.path().join("manifest.toml");
    fs::write(&manifest, "[cache]\nwarm_start = false\n").unwrap();
    let with_manifest = [&cap[..], &["--manifest", manifest.to_str().unwrap()]].concat();
    let m = mount_with_args(&backing, &mnt, &state, &with_manifest);
    std::thread::sleep(Duration::from_secs(2));
    let s = mount_status(&mnt);
    for name in ["a", "b", "c"] {
        assert!(!is_cached(&s, &format!("{name}.safetensors")), "{s:#}");
    }
    assert!(!m.log_text().contains("warm start"), "{}", m.log_text());
    m.unmount();
}
