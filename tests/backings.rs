//! Backings other than a local disk: another FUSE mount (what JuiceFS,
//! mountpoint-s3 or rclone give), and a slow disk (a NAS or an HDD, made
//! here with a blkio throttle, as the benchmarks do). What README's "Models
//! on a NAS or a distributed filesystem" says holds, in both serving modes.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1 << 20;

/// The throttle test counts the disk's reads device-wide: nothing else in
/// this binary may read the disk meanwhile.
static DISK: Mutex<()> = Mutex::new(());

/// The mount's serving mode as status names it.
fn serving_mode(mnt: &Path) -> String {
    mount_status(mnt)["mode"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// A modelcache mount over another modelcache mount, in each mode of the
/// upper one: model bytes are right on the first and the second read, the
/// file is cached, and writes land in the lower mount's backing folder.
#[test]
fn a_fuse_mount_as_backing_works_in_both_modes() {
    if common::needs_root("passthrough mode") {
        return;
    }
    let _disk = DISK.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = shared_tempdir();
    let [backing, lower_mnt, upper_mnt] = ["backing", "lower", "upper"].map(|d| tmp.path().join(d));
    for d in [&backing, &lower_mnt, &upper_mnt] {
        fs::create_dir(d).unwrap();
    }
    let want = pseudo_random(64 * MIB as usize, 7);
    fs::write(backing.join("m.safetensors"), &want).unwrap();

    // The lower mount in copy mode: a FUSE filesystem without passthrough,
    // as JuiceFS or rclone are.
    let lower = Mounted::separate(&backing, &lower_mnt, &Mode::Copy.args());
    for mode in [Mode::Copy, Mode::Passthrough] {
        let upper = Mounted::separate(&lower.mountpoint, &upper_mnt, &mode.args());
        let want_mode = match mode {
            Mode::Copy => "copy",
            Mode::Passthrough => "passthrough",
        };
        assert_eq!(serving_mode(&upper.mountpoint), want_mode);
        for pass in ["first", "second"] {
            let got = fs::read(upper.path("m.safetensors")).unwrap();
            assert!(got == want, "{mode:?}: {pass} read differs");
            wait_cached(&upper.mountpoint, &["m.safetensors"]);
        }
        // Passthrough over a FUSE filesystem without passthrough of its
        // own is allowed by the kernel: no fallback warning.
        assert!(
            !upper.log_text().contains("refused a backing file"),
            "{mode:?}: {}",
            upper.log_text()
        );
        let name = format!("written-{want_mode}.bin");
        fs::write(upper.path(&name), b"through two mounts").unwrap();
        fs::rename(upper.path(&name), upper.path(&format!("{name}.done"))).unwrap();
        assert_eq!(
            fs::read(backing.join(format!("{name}.done"))).unwrap(),
            b"through two mounts"
        );
        upper.unmount();
    }
    lower.unmount();

    // Over a FUSE filesystem that itself uses passthrough the kernel's
    // stacking limit refuses a second level: those opens are served through
    // the daemon, with one warning, and the bytes stay right.
    let lower = Mounted::separate(&backing, &lower_mnt, &Mode::Passthrough.args());
    let upper = Mounted::separate(&lower.mountpoint, &upper_mnt, &[]);
    for pass in ["first", "second"] {
        let got = fs::read(upper.path("m.safetensors")).unwrap();
        assert!(got == want, "stacked passthrough: {pass} read differs");
    }
    wait_cached(&upper.mountpoint, &["m.safetensors"]);
    let log = upper.log_text();
    assert_eq!(
        log.matches("the kernel refused a backing file").count(),
        1,
        "{log}"
    );
    upper.unmount();
    lower.unmount();
}

/// A backing disk throttled to 100 MB/s (a NAS): the first read through the
/// mount is throttled (the test's setup holds), the bytes are right, and once
/// the file is cached a second read moves (almost) nothing from the disk,
/// in both modes. Speed-ups are measured by the benchmarks, not here.
#[test]
fn a_slow_backing_serves_reloads_from_ram_in_both_modes() {
    if common::needs_root("throttles the disk with a blkio cgroup") {
        return;
    }
    let _disk = DISK.lock().unwrap_or_else(|e| e.into_inner());
    const RATE: u64 = 100_000_000;
    const SIZE: u64 = 128 * MIB;
    let (_tmp, backing, mnt) = dirs();
    let dev = device_of(&backing);
    // This machine kind (and CI) has both; elsewhere (cgroup v2 only, a
    // backing on tmpfs or overlayfs) there is nothing to throttle with.
    let (Some(_), Some(throttle)) = (device_read_bytes(&dev), Throttle::new(&dev, RATE)) else {
        eprintln!("skipped: {dev} has no /sys/dev/block stat, or there is no blkio cgroup v1");
        return;
    };
    let file = backing.join("m.safetensors");
    fs::write(&file, pseudo_random(SIZE as usize, 11)).unwrap();
    let want = checksum(&file);
    for mode in [Mode::Copy, Mode::Passthrough] {
        run_ok(&mut Command::new("sync"));
        drop_from_page_cache(&file);
        let m = Mounted::separate(&backing, &mnt, &mode.args());
        throttle.add(m.pid());
        // The reader joins the group too: in passthrough mode the kernel
        // reads the backing file on the reader's behalf.
        let reader = format!("cksum '{}'", m.path("m.safetensors").display());
        let started = Instant::now();
        let first = run_ok(&mut throttle.run_inside(&reader));
        let cold = started.elapsed();
        // Half the throttle's time at least: the disk really was slow.
        let floor = Duration::from_secs_f64(SIZE as f64 / RATE as f64 / 2.0);
        assert!(
            cold >= floor,
            "{mode:?}: cold read took {cold:?}, not throttled"
        );
        wait_cached(&m.mountpoint, &["m.safetensors"]);
        drop_from_page_cache(&file);

        let disk_before = device_read_bytes(&dev).unwrap();
        let second = run_ok(&mut throttle.run_inside(&reader));
        let from_disk = device_read_bytes(&dev).unwrap() - disk_before;
        assert_eq!(first.stdout, second.stdout, "{mode:?}: cksum changed");
        assert!(
            from_disk < SIZE / 20,
            "{mode:?}: the second read moved {from_disk} bytes from the disk"
        );
        let via_mount = checksum(&m.path("m.safetensors"));
        assert_eq!(via_mount, want, "{mode:?}: bytes differ");
        m.unmount();
    }
}
