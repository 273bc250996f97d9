//! What the cache saved, on real mounts in both modes: every open of a
//! model file is counted where it was served from (RAM, partly, disk with
//! its reason), the estimate of disk time avoided grows with opens from
//! RAM, status leads with it, and the log says so once a minute per file.

mod common;

use std::fs::{self, File};
use std::io::Read;
use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn read_through(path: &Path) {
    let mut buf = Vec::new();
    File::open(path).unwrap().read_to_end(&mut buf).unwrap();
}

/// A file's entry: among the cached files, or those opened but uncached.
fn file(s: &Value, path: &str) -> Value {
    status_file(s, path)
        .or_else(|| {
            s["uncached_files"]
                .as_array()?
                .iter()
                .find(|f| f["path"] == path)
        })
        .unwrap_or_else(|| panic!("{path} not listed: {s:#}"))
        .clone()
}

/// Opens from disk (starting the load), from RAM, of a file over the cap,
/// and, where the disk can be throttled (root), mid-load.
fn opens_are_classified(mode: &str) {
    let (_tmp, backing, mnt) = dirs();
    fs::write(
        backing.join("model.safetensors"),
        pseudo_random(16 << 20, 1),
    )
    .unwrap();
    fs::write(backing.join("huge.gguf"), pseudo_random(40 << 20, 2)).unwrap();
    fs::write(backing.join("slow.safetensors"), pseudo_random(24 << 20, 3)).unwrap();
    fs::write(backing.join("rate.safetensors"), pseudo_random(4 << 20, 4)).unwrap();
    let m = Mounted::separate(
        &backing,
        &mnt,
        &["--passthrough", mode, "--max-size", "32MiB"],
    );

    // A load from the disk, no reader helping: it measures the disk.
    drop_from_page_cache(&backing.join("rate.safetensors"));
    let warmed = modelcache(&["warm", m.path("rate.safetensors").to_str().unwrap()]);
    assert!(warmed.status.success(), "{warmed:?}");

    // Not cached: this open starts its load, and goes to the disk.
    read_through(&m.path("model.safetensors"));
    let s = wait_cached(&mnt, &["model.safetensors"]);
    let f = file(&s, "model.safetensors");
    assert_eq!(f["opens_from_disk"], 1, "{f:#}");
    assert_eq!(f["last_open"]["source"], "disk", "{f:#}");
    assert_eq!(
        f["last_open"]["reason"], "not cached yet: this open started its load",
        "{f:#}"
    );
    assert_eq!(s["counters"]["opens_from_ram"], 0);
    assert_eq!(s["counters"]["disk_seconds_avoided"], 0.0);

    // Cached: from RAM, twice; the estimate grows with each.
    let first_from_ram = std::time::Instant::now();
    read_through(&m.path("model.safetensors"));
    let once = mount_status(&mnt);
    read_through(&m.path("model.safetensors"));
    let twice = mount_status(&mnt);
    let f = file(&twice, "model.safetensors");
    assert_eq!(f["opens_from_ram"], 2, "{f:#}");
    assert_eq!(f["bytes_opened_from_ram"], 32 * MIB);
    assert_eq!(f["last_open"]["source"], "ram");
    assert_eq!(f["hits"], 2, "hits keeps its meaning");
    let c = &twice["counters"];
    assert_eq!(c["opens_from_ram"], 2);
    assert_eq!(c["bytes_opened_from_ram"], 32 * MIB);
    let rate = c["read_rate"].as_f64().expect("a load measured the rate");
    let avoided = c["disk_seconds_avoided"].as_f64().unwrap();
    assert!(
        (avoided - (32 * MIB) as f64 / rate).abs() < 1e-5,
        "the bytes over the measured rate: {c:#}"
    );
    assert_eq!(f["disk_seconds_avoided"], c["disk_seconds_avoided"]);
    assert!(avoided > once["counters"]["disk_seconds_avoided"].as_f64().unwrap());
    let text = String::from_utf8(modelcache(&["status", mnt.to_str().unwrap()]).stdout).unwrap();
    let second = text.lines().nth(1).unwrap_or_default();
    assert!(
        second.starts_with("  since mount: 2 opens from RAM (32.0 MiB), ~"),
        "status leads with the payoff: {text}"
    );

    // Over the cap: never cached, listed with the reason and its fix.
    read_through(&m.path("huge.gguf"));
    let s = mount_status(&mnt);
    assert!(
        status_file(&s, "huge.gguf").is_none(),
        "not among the cached"
    );
    let f = file(&s, "huge.gguf");
    assert_eq!(f["state"], "uncached", "{f:#}");
    assert_eq!(f["opens_from_disk"], 1);
    let why = f["last_open"]["reason"].as_str().unwrap();
    assert!(
        why.starts_with("40.0 MiB is larger than the") && why.contains("cap"),
        "{why}"
    );
    assert_eq!(s["counters"]["opens_from_disk"], 2);

    // Mid-load: the daemon's disk throttled, the load is under way.
    if is_root() {
        let dev = device_of(&backing);
        if let Some(throttle) = Throttle::new(&dev, 4_000_000) {
            drop_from_page_cache(&backing.join("slow.safetensors"));
            throttle.add(m.pid());
            let slow = m.path("slow.safetensors");
            let run = modelcache(&["warm", "--no-wait", slow.to_str().unwrap()]);
            assert!(run.status.success(), "{run:?}");
            let opened = File::open(&slow).unwrap();
            let s = mount_status(&mnt);
            let f = file(&s, "slow.safetensors");
            assert_eq!(f["state"], "loading", "{f:#}");
            assert_eq!(f["opens_partial"], 1, "{f:#}");
            assert_eq!(f["last_open"]["source"], "partial");
            assert!(f["last_open"]["resident_percent"].as_u64().unwrap() < 100);
            assert_eq!(s["counters"]["opens_partial"], 1);
            drop(opened);
            drop(throttle);
        }
    }

    // The log: one line for the first open from RAM, with the estimate;
    // the second open waits for its minute (unless this test took one).
    let log = m.log_text();
    assert!(
        log.contains("model.safetensors (16.0 MiB) from RAM ×1, ~"),
        "{log}"
    );
    if first_from_ram.elapsed() < Duration::from_secs(50) {
        assert_eq!(log.matches("from RAM ×").count(), 1, "{log}");
    }
    m.unmount();
}

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn opens_are_classified_in_copy_mode() {
    opens_are_classified("off");
}

#[test]
fn opens_are_classified_in_passthrough_mode() {
    if common::needs_root("passthrough mode") {
        return;
    }
    opens_are_classified("on");
}
