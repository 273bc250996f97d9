//! `modelcache suggest`: a manifest made from a live mount's record passes
//! `check`, and a mount given it pins what it suggested; a mount with no
//! use recorded says so and writes nothing.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

const MIB: usize = 1 << 20;

fn mount_with(backing: &Path, mnt: &Path, state: &StateDir, extra: &[&str]) -> Mounted {
    let mut cmd = Command::new(bin());
    cmd.arg("mount")
        .arg("--backing")
        .arg(backing)
        .arg(mnt)
        .args(["--passthrough", "off", "--max-size", "20MiB"])
        .args(extra);
    state.apply(&mut cmd);
    Mounted::start(cmd, mnt)
}

fn state_of(mnt: &Path, path: &str) -> Option<String> {
    let s = mount_status(mnt);
    status_file(&s, path).map(|f| f["state"].as_str().unwrap_or("").to_string())
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

#[test]
fn a_suggested_manifest_passes_check_and_pins_what_it_says() {
    let (tmp, backing, mnt) = dirs();
    for (i, name) in ["a", "b", "c", "unused"].iter().enumerate() {
        let data = pseudo_random(4 * MIB, i as u64 + 30);
        fs::write(backing.join(format!("{name}.safetensors")), data).unwrap();
    }
    let state = StateDir::new();
    let m = mount_with(&backing, &mnt, &state, &[]);

    // a: opened from RAM three times (loaded by the first open).
    fs::read(m.path("a.safetensors")).unwrap();
    wait_until(Duration::from_secs(60), "a cached", || {
        state_of(&mnt, "a.safetensors").as_deref() == Some("cached")
    });
    for _ in 0..3 {
        fs::read(m.path("a.safetensors")).unwrap();
    }
    // b and c: opened together by one process, twice.
    for _ in 0..2 {
        let out = Command::new("cat")
            .arg(m.path("b.safetensors"))
            .arg(m.path("c.safetensors"))
            .output()
            .unwrap();
        assert!(out.status.success());
    }

    let mnt_s = mnt.to_str().unwrap();
    let out = modelcache(&["suggest", mnt_s]);
    let shown = text(&out.stdout);
    assert!(out.status.success(), "{shown}{}", text(&out.stderr));
    assert!(
        shown.starts_with("# Suggested by `modelcache suggest` from the record of "),
        "{shown}"
    );
    assert!(
        shown.contains("[[pin]]\npaths = [\n    \"a.safetensors\",  # 3 of 4 opens from RAM"),
        "{shown}"
    );
    assert!(shown.contains("[[group]]\nname = \"b + c\"\n"), "{shown}");
    assert!(!shown.contains("unused"), "never opened: {shown}");

    // Written once it passes the checks; check agrees.
    let file = tmp.path().join("suggested.toml");
    let file_s = file.to_str().unwrap();
    let out = modelcache(&["suggest", mnt_s, "--write", file_s]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("wrote "),
        "{}",
        text(&out.stdout)
    );
    let written = fs::read_to_string(&file).unwrap();
    let out = modelcache(&["check", file_s, "--root", backing.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "check: {}{}\n{written}",
        text(&out.stdout),
        text(&out.stderr)
    );
    // Never over an existing file.
    let out = modelcache(&["suggest", mnt_s, "--write", file_s]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("exists"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(fs::read_to_string(&file).unwrap(), written);
    m.unmount();

    // Applied: the suggested pins are pinned, by the manifest.
    let manifest: toml::Value = toml::from_str(&written).unwrap();
    let pins: Vec<String> = manifest["pin"][0]["paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    assert!(pins.contains(&"a.safetensors".to_string()), "{written}");
    let m = mount_with(
        &backing,
        &mnt,
        &state,
        &["--manifest", file_s, "--no-warm-start"],
    );
    let mut s = Value::Null;
    let pinned = wait_for(Duration::from_secs(60), || {
        s = mount_status(&mnt);
        pins.iter().all(|p| {
            status_file(&s, p)
                .is_some_and(|f| f["state"] == "pinned" && f["pin_origin"] == "manifest")
        })
    });
    assert!(
        pinned,
        "{pins:?} not all pinned by the manifest: {s:#}\n{}",
        m.log_text()
    );
    m.unmount();
}

#[test]
fn a_mount_with_no_use_recorded_says_so_and_writes_nothing() {
    let (tmp, backing, mnt) = dirs();
    fs::write(backing.join("a.safetensors"), pseudo_random(2 * MIB, 1)).unwrap();
    let state = StateDir::new();
    let m = mount_with(&backing, &mnt, &state, &[]);
    let mnt_s = mnt.to_str().unwrap();

    let out = modelcache(&["suggest", mnt_s]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert!(shown.contains("no use recorded yet"), "{shown}");
    assert!(!shown.contains("[["), "{shown}");

    let file = tmp.path().join("s.toml");
    let out = modelcache(&["suggest", mnt_s, "--write", file.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("nothing written"),
        "{}",
        text(&out.stderr)
    );
    assert!(!file.exists());
    m.unmount();
}
