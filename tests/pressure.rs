//! Memory pressure on a real mount: when another process takes memory
//! until MemAvailable falls under the floor, the daemon gives back its
//! unpinned files and keeps the pinned ones; pushed under the critical
//! floor, it releases the pinned ones too. Nobody is OOM-killed.

mod common;

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;
const FILE: u64 = 256 * MIB;

/// The tests read MemAvailable: one at a time.
static ALONE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn cached_names(m: &Mounted, backing: &Path) -> Vec<String> {
    let mut names: Vec<String> = cached_files(m.pid(), backing, &m.mountpoint)
        .into_iter()
        .map(|f| f.name)
        .collect();
    names.sort();
    names
}

fn wait_cache_holds(m: &Mounted, backing: &Path, want: &[&str], why: &str) {
    let mut names = Vec::new();
    let held = wait_for(Duration::from_secs(20), || {
        names = cached_names(m, backing);
        names == want
    });
    assert!(
        held,
        "{why}: the cache holds {names:?}, expected {want:?}; MemAvailable {} MiB\n{}",
        mem_available() >> 20,
        m.log_text()
    );
}

/// A manifest with these floors and cap, and `rest` after `[cache]`.
fn floors_manifest(dir: &Path, max_size: &str, min: u64, critical: u64, rest: &str) -> PathBuf {
    let manifest = dir.join("manifest.toml");
    fs::write(
        &manifest,
        format!(
            "[cache]\nmax_size = \"{max_size}\"\nmin_available = \"{}MiB\"\n\
             critical_available = \"{}MiB\"\n\n{rest}",
            min >> 20,
            critical >> 20
        ),
    )
    .unwrap();
    manifest
}

/// Waits for every load to be complete (locked or populated).
fn wait_loads_complete(m: &Mounted, backing: &Path) {
    wait_until(Duration::from_secs(20), "every load to complete", || {
        cached_files(m.pid(), backing, &m.mountpoint)
            .iter()
            .all(|f| f.complete)
    });
}

/// "Killed process" lines in the kernel log (the OOM killer's), if the
/// log is readable here.
fn oom_kills() -> Option<usize> {
    let out = Command::new("dmesg").output().ok()?;
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("Killed process"))
            .count()
    })
}

fn pressure_in(mode: Mode) {
    let (tmp, backing, mnt) = dirs();
    for (i, name) in ["pinned.safetensors", "u1.safetensors", "u2.safetensors"]
        .iter()
        .enumerate()
    {
        fs::write(backing.join(name), pseudo_random(FILE as usize, i as u64)).unwrap();
    }
    // Floors set just under what is available now: a hog of a known size
    // crosses them, whatever the machine.
    let available = mem_available();
    let min = available - 1024 * MIB;
    let critical = available - 2560 * MIB;
    let manifest = floors_manifest(
        tmp.path(),
        "1GiB",
        min,
        critical,
        "[[pin]]\npaths = [\"pinned.safetensors\"]\n",
    );
    let mut args = vec!["--manifest", manifest.to_str().unwrap()];
    args.extend(mode.args());
    let m = Mounted::separate(&backing, &mnt, &args);
    for name in ["u1.safetensors", "u2.safetensors"] {
        let mut v = Vec::new();
        File::open(m.path(name))
            .unwrap()
            .read_to_end(&mut v)
            .unwrap();
    }
    wait_cache_holds(
        &m,
        &backing,
        &["pinned.safetensors", "u1.safetensors", "u2.safetensors"],
        "loaded",
    );
    wait_loads_complete(&m, &backing);

    // Under the floor (but above the critical one): the unpinned files go,
    // the pinned one stays.
    let mut low = Hog::new();
    low.grow_until_available_below(min - 256 * MIB);
    wait_cache_holds(&m, &backing, &["pinned.safetensors"], "under min_available");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(cached_names(&m, &backing), ["pinned.safetensors"]);

    // Under the critical floor: the pinned file goes too, loudly.
    let mut critical_hog = Hog::new();
    critical_hog.grow_until_available_below(critical - 256 * MIB);
    wait_cache_holds(&m, &backing, &[], "under critical_available");
    let log = m.log_text();
    assert!(log.contains("memory low"), "{log}");
    assert!(log.contains("releasing pinned pinned.safetensors"), "{log}");

    assert!(critical_hog.release(), "the second hog was killed");
    assert!(low.release(), "the first hog was killed");
    // The daemon lived through it and still serves the files.
    let mut v = Vec::new();
    File::open(m.path("pinned.safetensors"))
        .unwrap()
        .read_to_end(&mut v)
        .unwrap();
    assert!(v == pseudo_random(FILE as usize, 0), "pinned file bytes");
    m.unmount();
}

/// One test, both modes in turn: two at once would read each other's
/// memory use.
#[test]
fn under_memory_pressure_unpinned_files_go_first_and_pinned_ones_only_when_critical() {
    if common::needs_root("passthrough mode") {
        return;
    }
    let _alone = ALONE.lock().unwrap_or_else(|e| e.into_inner());
    let kills = oom_kills();
    pressure_in(Mode::Passthrough);
    pressure_in(Mode::Copy);
    assert_eq!(oom_kills(), kills, "the OOM killer ran");
}

/// Copy mode: the cached pages are page cache, which MemAvailable counts
/// as available, yet other processes can have them only if the cache lets
/// them go. `min_available` is kept for others *beside* the cache, as in
/// passthrough mode (whose locked pages MemAvailable leaves out): with
/// MemAvailable 512 MiB over the floor, 1 GiB of it the cached file, the
/// daemon gives the file back.
#[test]
fn copy_mode_keeps_the_floor_beside_its_own_pages() {
    let _alone = ALONE.lock().unwrap_or_else(|e| e.into_inner());
    let (tmp, backing, mnt) = dirs();
    let size = 1024 * MIB;
    fs::write(
        backing.join("m.safetensors"),
        pseudo_random(size as usize, 7),
    )
    .unwrap();
    let available = mem_available();
    let min = available - 2048 * MIB;
    let manifest = floors_manifest(tmp.path(), "2GiB", min, available - 6144 * MIB, "");
    let mut args = vec!["--manifest", manifest.to_str().unwrap()];
    args.extend(Mode::Copy.args());
    let m = Mounted::separate(&backing, &mnt, &args);
    // Read without keeping it: the test's own memory must not count.
    let mut file = File::open(m.path("m.safetensors")).unwrap();
    std::io::copy(&mut file, &mut std::io::sink()).unwrap();
    drop(file);
    wait_cache_holds(&m, &backing, &["m.safetensors"], "loaded");
    wait_loads_complete(&m, &backing);
    let mut hog = Hog::new();
    hog.grow_until_available_below(min + 512 * MIB);
    wait_cache_holds(
        &m,
        &backing,
        &[],
        "MemAvailable over the floor only by the cache's pages",
    );
    assert!(m.log_text().contains("memory low"), "{}", m.log_text());
    assert!(hog.release(), "the hog was killed");
    m.unmount();
}

/// A pin released under critical pressure loads again once memory has
/// stayed back (at `min_available` plus its margin) for 30 s, and the log
/// says so.
#[test]
fn a_pin_released_under_critical_pressure_comes_back_with_memory() {
    let _alone = ALONE.lock().unwrap_or_else(|e| e.into_inner());
    let (tmp, backing, mnt) = dirs();
    fs::write(
        backing.join("pinned.safetensors"),
        pseudo_random(32 * MIB as usize, 5),
    )
    .unwrap();
    // Memory is back at min_available plus an eighth of it: the floor is
    // set low enough for that to be reached once the hog is gone, the
    // critical floor under it by 512 MiB.
    let available = mem_available();
    let min = (available.saturating_sub(768 * MIB) / 9 * 8) / MIB * MIB;
    let critical = min - 512 * MIB;
    let hog = available - critical + 256 * MIB;
    if hog > 14 << 30 {
        eprintln!(
            "skipped: a hog of {} MiB is too much for this test",
            hog >> 20
        );
        return;
    }
    let manifest = floors_manifest(
        tmp.path(),
        "1GiB",
        min,
        critical,
        "[[pin]]\npaths = [\"pinned.safetensors\"]\n",
    );
    let m = Mounted::separate(&backing, &mnt, &["--manifest", manifest.to_str().unwrap()]);
    let state =
        || status_file(&mount_status(&mnt), "pinned.safetensors").map(|f| f["state"].clone());
    wait_until(Duration::from_secs(20), "the pin loaded", || {
        state().is_some_and(|s| s == "pinned")
    });

    let mut critical_hog = Hog::new();
    critical_hog.grow_until_available_below(critical - 256 * MIB);
    wait_until(Duration::from_secs(20), "the pin released", || {
        state().is_none()
    });
    assert!(
        m.log_text().contains("releasing pinned pinned.safetensors"),
        "{}",
        m.log_text()
    );
    assert!(critical_hog.release(), "the hog was killed");
    let gone = std::time::Instant::now();
    let back = wait_for(Duration::from_secs(60), || {
        let s = mount_status(&mnt);
        status_file(&s, "pinned.safetensors")
            .is_some_and(|f| f["state"] == "pinned" && f["pin_origin"] == "manifest")
    });
    let log = m.log_text();
    assert!(back, "never came back:\n{log}");
    assert!(
        gone.elapsed() >= Duration::from_secs(30),
        "back after {:?}, before memory had stayed back 30 s",
        gone.elapsed()
    );
    // "for 30 s", or a second more when the worker's tick came late.
    let line = log
        .lines()
        .find(|l| l.contains("memory is back ("))
        .unwrap_or_else(|| panic!("no comeback line:\n{log}"));
    assert!(
        (line.contains("for 30 s)") || line.contains("for 31 s)"))
            && line.contains("reloading 1 file released under critical pressure, pins first"),
        "{line}"
    );
    m.unmount();
}
