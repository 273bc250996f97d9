//! The working-set record on a real mount: what was opened through it is
//! in the mount's state file after unmount, a remount goes on counting,
//! and loads the most recently opened files that fit (warm start): after
//! the pins, within the cap and the memory floor, a replaced file only if
//! among the most used. A state file that cannot be used costs its record,
//! never the mount; a killed daemon loses only the opens since the last
//! save.

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

/// The mount's state file (`mount-….json`) in `state`.
fn state_path(state: &StateDir) -> std::path::PathBuf {
    let files: Vec<_> = fs::read_dir(&state.path)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with("mount-") && name.ends_with(".json")
        })
        .collect();
    assert_eq!(files.len(), 1, "one state file: {files:?}");
    files[0].clone()
}

/// The names in the state directory, sorted.
fn listing(state: &StateDir) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(&state.path)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Where `what` first is in `log` (which must hold it).
fn at(log: &str, what: &str) -> usize {
    log.find(what)
        .unwrap_or_else(|| panic!("{what:?} not in the log:\n{log}"))
}

/// Writes 4 MiB files `NAME.safetensors` in `backing`.
fn models(backing: &Path, names: &[&str]) {
    for (i, name) in names.iter().enumerate() {
        let data = pseudo_random(4 * MIB, i as u64 + 40);
        fs::write(backing.join(format!("{name}.safetensors")), data).unwrap();
    }
}

/// Opens `names` through the mount, a second apart (the record counts
/// seconds): the last is the most recent.
fn open_in_turn(m: &Mounted, names: &[&str]) {
    for name in names {
        fs::read(m.path(&format!("{name}.safetensors"))).unwrap();
        std::thread::sleep(Duration::from_millis(1100));
    }
}

#[test]
fn pins_load_before_the_record_and_recorded_files_get_the_room_left() {
    let (tmp, backing, mnt) = dirs();
    models(&backing, &["pinned", "a", "b", "c"]);
    let state = StateDir::new();
    let m = mount_with(&backing, &mnt, &state);
    open_in_turn(&m, &["a", "b", "c"]);
    m.unmount();

    // Pinned now (never opened, so not in the record), under a cap of
    // 14 MiB: the pin and two recorded files fit, not three.
    let manifest = tmp.path().join("manifest.toml");
    fs::write(&manifest, "[[pin]]\npaths = [\"pinned.safetensors\"]\n").unwrap();
    let args = [
        "--max-size",
        "14MiB",
        "--manifest",
        manifest.to_str().unwrap(),
    ];
    let m = mount_with_args(&backing, &mnt, &state, &args);
    let log = m.wait_log("warm start: all loaded (2 files");
    let pins = at(&log, "prewarm: loading 1 file (4.0 MiB) from");
    let recorded = at(
        &log,
        "warm start: loading 2 files (8.0 MiB) recorded at the last mount, most recent first",
    );
    let over = at(
        &log,
        "warm start: not loading 1 file recorded, from a.safetensors on: past the cap \
         (14.0 MiB) with what is queued already",
    );
    assert!(pins < over && over < recorded, "pins queued first:\n{log}");
    let mut s = Value::Null;
    let loaded = wait_for(Duration::from_secs(60), || {
        s = mount_status(&mnt);
        status_file(&s, "pinned.safetensors").is_some_and(|f| f["state"] == "pinned")
    });
    assert!(loaded, "the pin never loaded: {s:#}\n{log}");
    assert_eq!(
        status_file(&s, "pinned.safetensors").unwrap()["pinned"],
        true
    );
    for name in ["b", "c"] {
        assert!(is_cached(&s, &format!("{name}.safetensors")), "{s:#}");
    }
    assert!(status_file(&s, "a.safetensors").is_none(), "{s:#}");
    assert_eq!(s["cached_bytes"], 12 * MIB, "{s:#}");
    m.unmount();
}

#[test]
fn under_the_memory_floor_the_warm_start_stops_and_names_the_floor() {
    let (tmp, backing, mnt) = dirs();
    models(&backing, &["a", "b"]);
    let state = StateDir::new();
    let m = mount_with(&backing, &mnt, &state);
    open_in_turn(&m, &["a", "b"]);
    m.unmount();

    // All of the RAM kept free: nothing can load without going under it.
    let manifest = tmp.path().join("manifest.toml");
    fs::write(&manifest, "[cache]\nmin_available = \"100%\"\n").unwrap();
    let args = ["--manifest", manifest.to_str().unwrap()];
    let m = mount_with_args(&backing, &mnt, &state, &args);
    let log = m.wait_log("warm start: 0 of ");
    assert!(
        log.contains("warm start: 0 of 2 files loaded"),
        "the last line counts each file: {log}"
    );
    assert!(
        log.contains(
            "warm start: stopped before b.safetensors, 2 recorded files not loaded: \
             loading 4.0 MiB would leave"
        ),
        "{log}"
    );
    assert!(
        log.contains("under min_available") && log.contains("free memory or lower min_available"),
        "{log}"
    );
    assert!(!log.contains("warm start: loading"), "{log}");
    assert!(!log.contains("all loaded"), "{log}");
    let s = mount_status(&mnt);
    for name in ["a", "b"] {
        assert!(
            status_file(&s, &format!("{name}.safetensors")).is_none(),
            "{s:#}"
        );
    }
    m.unmount();
    // The record is kept for the next mount.
    let record = &saved(&state)["record"];
    assert_eq!(opens(record, "a.safetensors"), 1, "{record:#}");
    assert_eq!(opens(record, "b.safetensors"), 1, "{record:#}");
}

#[test]
fn a_corrupt_state_file_or_one_of_another_version_is_set_aside_and_replaced() {
    for case in ["corrupt", "another version"] {
        let (_tmp, backing, mnt) = dirs();
        models(&backing, &["a", "b"]);
        let state = StateDir::new();
        let m = mount_with(&backing, &mnt, &state);
        fs::read(m.path("a.safetensors")).unwrap();
        m.unmount();
        let path = state_path(&state);
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let (text, why) = if case == "corrupt" {
            (
                b"{\"version\":1,\"mount".to_vec(),
                "it is not a state file's JSON",
            )
        } else {
            let mut s = saved(&state);
            s["version"] = 2.into();
            (
                serde_json::to_vec(&s).unwrap(),
                "it is version 2, this release reads version 1",
            )
        };
        fs::write(&path, &text).unwrap();

        let m = mount_with(&backing, &mnt, &state);
        let b = fs::read(m.path("b.safetensors")).unwrap();
        assert_eq!(
            b,
            fs::read(backing.join("b.safetensors")).unwrap(),
            "{case}"
        );
        let log = m.log_text();
        let warning = format!("state file {} not used ({why}", path.display());
        assert_eq!(log.matches(&warning).count(), 1, "{case}:\n{log}");
        assert_eq!(log.matches("not used (").count(), 1, "{case}:\n{log}");
        assert!(
            log.contains(&format!("; set aside as {name}.bad-")),
            "{case}:\n{log}"
        );
        m.unmount();

        // The file as it was, set aside beside the new one.
        let names = listing(&state);
        assert_eq!(names.len(), 2, "{case}: {names:?}");
        assert_eq!(names[0], name, "{case}: {names:?}");
        assert!(names[1].starts_with(&format!("{name}.bad-")), "{names:?}");
        assert_eq!(
            fs::read(state.path.join(&names[1])).unwrap(),
            text,
            "{case}"
        );
        let s: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(s["version"], 1, "{case}: {s:#}");
        let record = &s["record"];
        assert_eq!(opens(record, "b.safetensors"), 1, "{case}: {s:#}");
        assert!(
            record["files"].get("a.safetensors").is_none(),
            "{case}: {s:#}"
        );

        // The new file is used: no warning, and b loads at mount.
        let m = mount_with(&backing, &mnt, &state);
        let log = m.wait_log("warm start: all loaded (1 file");
        assert!(!log.contains("not used ("), "{case}:\n{log}");
        m.unmount();
    }
}

#[test]
fn a_state_file_of_another_user_is_set_aside_and_the_mount_goes_on() {
    if needs_root("a file of another user") {
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let (_tmp, backing, mnt) = dirs();
    models(&backing, &["a", "b"]);
    let state = StateDir::new();
    let m = mount_with(&backing, &mnt, &state);
    fs::read(m.path("a.safetensors")).unwrap();
    m.unmount();
    let path = state_path(&state);
    std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
    let text = fs::read(&path).unwrap();

    let m = mount_with(&backing, &mnt, &state);
    let b = fs::read(m.path("b.safetensors")).unwrap();
    assert_eq!(b, fs::read(backing.join("b.safetensors")).unwrap());
    let log = m.log_text();
    let warning = format!(
        "state file {} not used (it is owned by uid 65534, not by this daemon's uid 0); \
         set aside as ",
        path.display()
    );
    assert_eq!(log.matches(&warning).count(), 1, "{log}");
    assert_eq!(log.matches("not used (").count(), 1, "{log}");
    // Its record is not used: a is not loaded at mount.
    assert!(!log.contains("warm start"), "{log}");
    // Kept whole under its new name, still the other user's.
    let names = listing(&state);
    let aside: Vec<&String> = names.iter().filter(|n| n.contains(".bad-")).collect();
    assert_eq!(aside.len(), 1, "{names:?}");
    let aside = state.path.join(aside[0]);
    assert_eq!(fs::metadata(&aside).unwrap().uid(), 65534);
    assert_eq!(fs::read(&aside).unwrap(), text);
    m.unmount();

    // At unmount the daemon writes its own record at the usual path.
    assert_eq!(fs::metadata(&path).unwrap().uid(), 0);
    let record: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    let record = &record["record"];
    assert_eq!(opens(record, "b.safetensors"), 1, "{record:#}");
    assert!(record["files"].get("a.safetensors").is_none(), "{record:#}");
}

#[test]
fn a_root_owned_state_file_a_user_daemon_cannot_read_is_set_aside() {
    if needs_root("runs the daemon as another user (setpriv)") {
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let (_tmp, backing, mnt) = dirs();
    models(&backing, &["a"]);
    for path in [&backing, &mnt, &backing.join("a.safetensors")] {
        chown(path, NOBODY, NOGROUP);
    }
    let state = StateDir::new();
    let user_mount = || {
        let mut cmd = as_user(NOBODY, NOGROUP, bin());
        cmd.arg("mount")
            .arg("--backing")
            .arg(&backing)
            .arg(&mnt)
            .args(["--passthrough", "off"]);
        state.apply(&mut cmd);
        Mounted::start(cmd, &mnt)
    };
    let read_as_user = || {
        run_ok(
            as_user(NOBODY, NOGROUP, "cat")
                .arg(mnt.join("a.safetensors"))
                .stdout(std::process::Stdio::null()),
        )
    };
    // The user's daemon writes its state file; then root takes it (as a
    // daemon once run with sudo would have written it): 0600, unreadable.
    let m = user_mount();
    read_as_user();
    m.unmount();
    let path = state_path(&state);
    chown(&path, 0, 0);
    set_mode(&path, 0o600);
    let text = fs::read(&path).unwrap();

    let m = user_mount();
    read_as_user();
    let log = m.wait_log("not used (");
    assert!(
        log.contains(&format!(
            "state file {} not used (it is owned by uid 0, not by this daemon's uid {NOBODY}); \
             set aside as ",
            path.display()
        )),
        "{log}"
    );
    let names = listing(&state);
    let aside: Vec<&String> = names.iter().filter(|n| n.contains(".bad-")).collect();
    assert_eq!(aside.len(), 1, "{names:?}");
    assert_eq!(
        fs::read(state.path.join(aside[0])).unwrap(),
        text,
        "kept whole"
    );
    m.unmount();
    assert_eq!(
        fs::metadata(&path).unwrap().uid(),
        NOBODY,
        "the user's own again"
    );
}

#[test]
fn status_shows_the_warm_start_while_it_loads() {
    if needs_root("throttles the disk (blkio cgroup)") {
        return;
    }
    let (_tmp, backing, mnt) = dirs();
    let names = ["a.safetensors", "b.safetensors"];
    for (i, name) in names.iter().enumerate() {
        fs::write(backing.join(name), pseudo_random(32 * MIB, 60 + i as u64)).unwrap();
    }
    let state = StateDir::new();
    let m = mount_with(&backing, &mnt, &state);
    for name in names {
        fs::read(m.path(name)).unwrap();
    }
    m.unmount();
    for name in names {
        drop_from_page_cache(&backing.join(name));
    }
    // A disk of 16 MB/s, the daemon in it from its start: 64 MiB take ~4 s.
    let Some(throttle) = Throttle::new(&device_of(&backing), 16_000_000) else {
        eprintln!("skipped: no blkio cgroup (v1) here");
        return;
    };
    let mut cmd = throttle.run_inside(&format!(
        "'{}' mount --backing '{}' '{}' --passthrough off",
        bin(),
        backing.display(),
        mnt.display()
    ));
    state.apply(&mut cmd);
    let m = Mounted::start(cmd, &mnt);
    let mut seen = Value::Null;
    let loading = wait_for(Duration::from_secs(30), || {
        seen = mount_status(&mnt)["loading"].clone();
        seen.as_array().is_some_and(|l| !l.is_empty())
    });
    assert!(loading, "no progress shown: {seen:#}\n{}", m.log_text());
    let progress = &seen[0];
    assert_eq!(progress["what"], "warm start", "{seen:#}");
    assert_eq!(progress["files"], 2, "{seen:#}");
    assert_eq!(progress["bytes"], 64 * MIB, "{seen:#}");
    assert!(
        progress["loaded_bytes"].as_u64().unwrap() < 64 * MIB as u64,
        "{seen:#}"
    );
    let table = modelcache(&["status", mnt.to_str().unwrap()]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("  warm start: "), "{table}");
    // Done, it is no longer shown, and both files are cached.
    wait_until(Duration::from_secs(60), "the warm start to end", || {
        mount_status(&mnt)["loading"]
            .as_array()
            .is_some_and(|l| l.is_empty())
    });
    let s = mount_status(&mnt);
    for name in names {
        assert!(is_cached(&s, name), "{s:#}");
    }
    m.unmount();
}

#[test]
fn a_killed_daemon_leaves_the_last_saved_record_whole() {
    let (_tmp, backing, mnt) = dirs();
    models(&backing, &["a", "b", "c"]);
    let state = StateDir::new();
    let m = mount_with(&backing, &mnt, &state);
    open_in_turn(&m, &["a", "b"]);
    m.unmount();
    let first = saved(&state);

    // Remounted, other opens, then SIGKILL: no save at exit.
    let mut m = mount_with(&backing, &mnt, &state);
    fs::read(m.path("c.safetensors")).unwrap();
    fs::read(m.path("a.safetensors")).unwrap();
    assert!(m.kill_and_reap(Duration::from_secs(10)), "{}", m.log_text());
    drop(m);
    assert!(!our_mount_at(&mnt.canonicalize().unwrap()));

    // One file, no temporary, and it reads whole: the first record.
    assert_eq!(listing(&state).len(), 1, "{:?}", listing(&state));
    let s = saved(&state);
    assert_eq!(s["version"], 1, "{s:#}");
    for name in ["a.safetensors", "b.safetensors"] {
        assert_eq!(
            s["record"]["files"][name], first["record"]["files"][name],
            "{s:#}"
        );
    }
    assert_eq!(s["record"]["co_open"], first["record"]["co_open"], "{s:#}");

    // The next mount reads it without a warning and warm-starts from it.
    let m = mount_with(&backing, &mnt, &state);
    let log = m.wait_log("warm start: all loaded (2 files");
    assert!(!log.contains("not used ("), "{log}");
    assert!(
        log.contains("warm start: loading 2 files (8.0 MiB) recorded at the last mount"),
        "{log}"
    );
    m.unmount();
}

#[test]
fn a_replaced_file_loads_at_warm_start_only_if_among_the_most_used() {
    let (_tmp, backing, mnt) = dirs();
    models(&backing, &["hot", "cold"]);
    let state = StateDir::new();
    // A cap of 12 MiB: the top set by use may fill 6 MiB, room for hot
    // (4 MiB, opened three times) but not for cold beside it.
    let cap = ["--max-size", "12MiB"];
    let m = mount_with_args(&backing, &mnt, &state, &cap);
    for name in ["hot", "hot", "hot", "cold"] {
        fs::read(m.path(&format!("{name}.safetensors"))).unwrap();
    }
    m.unmount();

    // Both replaced by new downloads: other content, other size.
    let mut new = Vec::new();
    for (i, name) in ["hot", "cold"].iter().enumerate() {
        let data = pseudo_random(5 * MIB, i as u64 + 90);
        let tmp = backing.join(format!(".{name}.part"));
        fs::write(&tmp, &data).unwrap();
        fs::rename(&tmp, backing.join(format!("{name}.safetensors"))).unwrap();
        new.push(data);
    }

    let m = mount_with_args(&backing, &mnt, &state, &cap);
    let log = m.wait_log("warm start: all loaded (1 file");
    assert!(
        log.contains(
            "warm start: not loading 1 file replaced since recorded (another file under the \
             name) and not among the most used: cold.safetensors"
        ),
        "{log}"
    );
    assert!(
        log.contains("warm start: loading 1 file (5.0 MiB) recorded at the last mount"),
        "{log}"
    );
    let s = mount_status(&mnt);
    let hot = status_file(&s, "hot.safetensors").expect("hot in the cache");
    assert_eq!(hot["state"], "cached", "{s:#}");
    assert_eq!(hot["size"], 5 * MIB, "{s:#}");
    assert!(status_file(&s, "cold.safetensors").is_none(), "{s:#}");
    // What loaded is the new file.
    assert_eq!(fs::read(m.path("hot.safetensors")).unwrap(), new[0]);
    m.unmount();
}
