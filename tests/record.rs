//! The working-set record on a real mount: what was opened through it is
//! in the mount's state file after unmount, and a remount goes on counting.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::*;
use serde_json::Value;

const MIB: usize = 1 << 20;

fn mount_with(backing: &Path, mnt: &Path, state: &StateDir) -> Mounted {
    let mut cmd = Command::new(bin());
    cmd.arg("mount")
        .arg("--backing")
        .arg(backing)
        .arg(mnt)
        .args(["--passthrough", "off"]);
    state.apply(&mut cmd);
    Mounted::start(cmd, mnt)
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
