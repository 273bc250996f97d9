//! A restart in passthrough mode: a clean stop leaves the cached files'
//! pages in the backing files' page cache (unlocked, not paged out), and
//! the next daemon's warm start locks them again without reading the disk.

mod common;

use std::fs;
use std::path::Path;
use std::time::Duration;

use common::*;

const MIB: usize = 1 << 20;
const NAMES: [&str; 2] = ["a.safetensors", "b.safetensors"];

/// One test at a time: each reads the disk on purpose, which the other's
/// count of the device's reads would see.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// A passthrough mount whose memory floor is low: memory counts as short
/// (and a stop pages out) only under 64 MiB available, whatever else the
/// machine runs meanwhile.
fn mount_passthrough(backing: &Path, mnt: &Path, state: &StateDir, extra: &[&str]) -> Mounted {
    let manifest = backing.parent().unwrap().join("manifest.toml");
    fs::write(
        &manifest,
        "[cache]\nmin_available = \"64MiB\"\ncritical_available = \"32MiB\"\n",
    )
    .unwrap();
    let mut cmd = separate_command(backing, mnt);
    cmd.args(["--passthrough", "on", "--manifest"])
        .arg(&manifest)
        .args(extra);
    state.apply(&mut cmd);
    Mounted::start(cmd, mnt)
}

/// Whether `path` is on a tmpfs, whose pages are never read from a disk
/// nor paged out: these tests would show nothing there.
fn on_tmpfs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: a NUL-terminated path and room for the answer.
    assert_eq!(unsafe { libc::statfs(c.as_ptr(), st.as_mut_ptr()) }, 0);
    // SAFETY: statfs succeeded.
    unsafe { st.assume_init() }.f_type == libc::TMPFS_MAGIC
}

/// The test's temp dirs, or `None` (said in one line) where they are on a
/// tmpfs.
fn disk_backed_dirs() -> Option<(tempfile::TempDir, std::path::PathBuf, std::path::PathBuf)> {
    let (tmp, backing, mnt) = dirs();
    if on_tmpfs(&backing) {
        eprintln!(
            "skipped: {} is on a tmpfs (set TMPDIR to a disk-backed directory)",
            backing.display()
        );
        return None;
    }
    Some((tmp, backing, mnt))
}

#[test]
fn a_passthrough_restart_locks_the_working_set_again_without_reading_the_disk() {
    if needs_root("passthrough mode") {
        return;
    }
    let _alone = one_at_a_time();
    let Some((_tmp, backing, mnt)) = disk_backed_dirs() else {
        return;
    };
    let size = 64 * MIB;
    let working_set = (NAMES.len() * size) as u64;
    for (i, name) in NAMES.iter().enumerate() {
        let path = backing.join(name);
        fs::write(&path, pseudo_random(size, 40 + i as u64)).unwrap();
        drop_from_page_cache(&path);
    }
    let state = StateDir::new();

    // First mount: the files are opened, so loaded from the disk, which
    // the read counters show (the checks below can fail): the daemon's
    // and this reader's, which shared the work.
    let m = mount_passthrough(&backing, &mnt, &state, &[]);
    let reader_before = thread_disk_reads();
    for name in NAMES {
        fs::read(m.path(name)).unwrap();
    }
    let reader = thread_disk_reads() - reader_before;
    wait_cached(&m.mountpoint, &NAMES);
    let first_load = process_disk_reads(m.pid()) + reader;
    assert!(
        first_load >= working_set * 9 / 10,
        "the first load read {first_load} bytes from the disk, expected about {working_set}"
    );
    m.unmount();

    // Restarted: warm start locks the recorded files again, from RAM.
    let dev = device_of(&backing);
    let device_before = device_read_bytes(&dev);
    let m = mount_passthrough(&backing, &mnt, &state, &[]);
    wait_cached(&m.mountpoint, &NAMES);
    wait_until(Duration::from_secs(30), "warm start's last line", || {
        m.log_text().contains("warm start: all loaded (2 files")
    });
    let daemon_reads = process_disk_reads(m.pid());
    let device_reads = device_before
        .zip(device_read_bytes(&dev))
        .map(|(before, after)| after - before);
    let log = m.log_text();
    assert!(
        daemon_reads < working_set / 16,
        "the restarted daemon read {daemon_reads} bytes from the disk for a working set of {working_set}:\n{log}"
    );
    // The device's own counter counts the whole machine's reads (tests of
    // other binaries do not run meanwhile; background services may), hence
    // the margin: without the pages kept it reads the whole working set.
    if let Some(device_reads) = device_reads {
        assert!(
            device_reads < working_set / 2,
            "{device_reads} bytes were read from {dev} during the restart, for a working set of {working_set}"
        );
    }
    m.unmount();
}

#[test]
fn a_clean_stop_leaves_the_pages_where_they_were() {
    if needs_root("passthrough mode") {
        return;
    }
    let _alone = one_at_a_time();
    let Some((_tmp, backing, mnt)) = disk_backed_dirs() else {
        return;
    };
    let path = backing.join(NAMES[0]);
    fs::write(&path, pseudo_random(64 * MIB, 7)).unwrap();
    drop_from_page_cache(&path);
    let state = StateDir::new();
    let m = mount_passthrough(&backing, &mnt, &state, &["--no-warm-start"]);
    fs::read(m.path(NAMES[0])).unwrap();
    wait_cached(&mnt, &NAMES[..1]);
    m.unmount();
    let resident = page_cache_bytes(&path);
    assert!(
        resident >= 64 * MIB as u64 * 9 / 10,
        "after a clean stop only {resident} bytes of the cached file are still in RAM"
    );
}
