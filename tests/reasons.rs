//! Every file the cache will not take is named with its one true cause and
//! the fix, on a real mount: through `modelcache warm` (the cap, the memory
//! floor, a writer, the extension, the size), in the log and the prewarm
//! summary at mount, and as the mount's own refusal of pins over the cap,
//! with the message of `modelcache check`.

mod common;

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

const MIB: usize = 1 << 20;
const PATIENCE: Duration = Duration::from_secs(60);

fn write_model(path: &Path, size: usize, seed: u64) {
    fs::write(path, pseudo_random(size, seed)).unwrap();
}

/// `modelcache warm PATH`, which must fail: what it printed.
fn refused_warm(path: &Path) -> String {
    let out = modelcache(&["warm", path.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "warm of {} succeeded: {err}",
        path.display()
    );
    err
}

/// Writes `text` as the manifest, in `dir`, and mounts `backing` at `mnt`
/// with it and `extra`. Returns the mount and the manifest's path.
fn mount_with_manifest(
    dir: &Path,
    text: &str,
    backing: &Path,
    mnt: &Path,
    extra: &[&str],
) -> (Mounted, std::path::PathBuf) {
    let manifest = dir.join("manifest.toml");
    fs::write(&manifest, text).unwrap();
    let mut args = vec!["--manifest", manifest.to_str().unwrap()];
    args.extend_from_slice(extra);
    (Mounted::separate(backing, mnt, &args), manifest)
}

/// A shell that holds `path` open for writing (O_WRONLY) until killed.
struct Writer(Child);

impl Writer {
    fn open(path: &Path) -> Writer {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg("exec 3>>\"$0\" && echo open && exec sleep 600")
            .arg(path)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(
            line,
            "open\n",
            "the writer could not open {}",
            path.display()
        );
        Writer(child)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn warm_names_the_cap_the_writer_the_extension_and_the_size() {
    let (_tmp, backing, mnt) = dirs();
    write_model(&backing.join("big.safetensors"), 10 * MIB, 1);
    write_model(&backing.join("written.safetensors"), 2 * MIB, 2);
    write_model(&backing.join("notes.txt"), 2 * MIB, 3);
    write_model(&backing.join("tiny.safetensors"), 1000, 4);
    let m = Mounted::separate(&backing, &mnt, &["--max-size", "8MiB"]);

    assert!(refused_warm(&m.path("big.safetensors")).contains(
        "big.safetensors: 10.0 MiB is larger than the cap (8.0 MiB) by 2.0 MiB: \
             raise --max-size or max_size"
    ));
    assert!(
        refused_warm(&m.path("notes.txt"))
            .contains("notes.txt: not a model file: .txt is not in [cache] extensions")
    );
    assert!(
        refused_warm(&m.path("tiny.safetensors"))
            .contains("tiny.safetensors: 1000 B is under min_file_size 1.0 MiB")
    );

    let writer = Writer::open(&m.path("written.safetensors"));
    let err = refused_warm(&m.path("written.safetensors"));
    assert!(
        err.contains(&format!(
            "written.safetensors: open for writing by pid {} (sh)",
            writer.0.id()
        )),
        "{err}"
    );
    // Closed, the file is taken again.
    drop(writer);
    let out = modelcache(&["warm", m.path("written.safetensors").to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    m.unmount();
}

#[test]
fn the_memory_floor_is_named_by_warm_and_by_the_prewarm_which_never_says_all_loaded() {
    let (tmp, backing, mnt) = dirs();
    write_model(&backing.join("pinned.safetensors"), 2 * MIB, 5);
    write_model(&backing.join("other.safetensors"), 2 * MIB, 6);
    // All of the RAM kept free: nothing can load without going under it.
    let (m, _) = mount_with_manifest(
        tmp.path(),
        "[cache]\nmin_available = \"100%\"\n\n[[pin]]\npaths = [\"pinned.safetensors\"]\n",
        &backing,
        &mnt,
        &["--max-size", "8MiB"],
    );
    let floor = "would leave";
    let fix = "free memory or lower min_available";
    let log = m.wait_log("prewarm: 0 of 1 file loaded");
    assert!(
        log.contains("cannot cache pinned file pinned.safetensors: loading 2.0 MiB would leave")
            && log.contains(fix),
        "{log}"
    );
    assert!(
        log.contains("not loaded: pinned.safetensors: loading 2.0 MiB"),
        "{log}"
    );
    assert!(!log.contains("all loaded"), "{log}");

    let err = refused_warm(&m.path("other.safetensors"));
    assert!(
        err.contains("other.safetensors: loading 2.0 MiB")
            && err.contains(floor)
            && err.contains("under min_available")
            && err.contains(fix),
        "{err}"
    );
    m.unmount();
}

#[test]
fn a_warm_file_over_the_cap_is_a_warning_and_the_summary_counts_what_loaded() {
    let (tmp, backing, mnt) = dirs();
    write_model(&backing.join("pinned.safetensors"), 2 * MIB, 7);
    write_model(&backing.join("big.safetensors"), 10 * MIB, 8);
    let (m, _) = mount_with_manifest(
        tmp.path(),
        "[[pin]]\npaths = [\"pinned.safetensors\"]\n\n[[warm]]\npaths = [\"big.safetensors\"]\n",
        &backing,
        &mnt,
        &["--max-size", "8MiB"],
    );
    let log = m.wait_log("prewarm: 1 of 2 files loaded");
    let cap = "big.safetensors: 10.0 MiB is larger than the cap (8.0 MiB) by 2.0 MiB: \
               raise --max-size or max_size";
    assert!(
        log.contains(&format!("cannot cache warm file {cap}")),
        "{log}"
    );
    assert!(log.contains(&format!("not loaded: {cap}")), "{log}");
    assert!(!log.contains("all loaded"), "{log}");
    m.unmount();
}

/// `modelcache mount`, which must fail before mounting: what it printed.
fn refused_mount(backing: &Path, mnt: &Path, extra: &[&str]) -> String {
    let mut cmd = Command::new(bin());
    cmd.args(["mount", "--backing"])
        .arg(backing)
        .arg(mnt)
        .args(extra);
    let done = run_within(&mut cmd, PATIENCE);
    // A mount that went live (the test failed) is taken down.
    force_unmount(&mnt.canonicalize().unwrap());
    let done = done.expect("the mount neither failed nor went live in time");
    assert!(!done.status.success(), "mounted: {}", done.stderr);
    assert!(!our_mount_at(&mnt.canonicalize().unwrap()));
    done.stderr
}

#[test]
fn pins_over_the_cap_fail_the_mount_with_the_message_of_check() {
    let (tmp, backing, mnt) = dirs();
    write_model(&backing.join("a.safetensors"), 6 * MIB, 9);
    write_model(&backing.join("b.safetensors"), 6 * MIB, 10);
    let manifest = tmp.path().join("manifest.toml");
    fs::write(
        &manifest,
        "[cache]\nmax_size = \"8MiB\"\n\n[[pin]]\npaths = [\"*.safetensors\"]\n",
    )
    .unwrap();
    let check = modelcache(&[
        "check",
        manifest.to_str().unwrap(),
        "--root",
        backing.to_str().unwrap(),
    ]);
    assert!(!check.status.success());
    let said = String::from_utf8_lossy(&check.stderr).into_owned();
    assert!(
        said.contains(
            "pinned files total 12.0 MiB, 4.0 MiB more than the cap of 8.0 MiB (max_size, line 2): \
             raise max_size in [cache] to at least 12.0 MiB, or pin fewer files"
        ),
        "{said}"
    );
    let m = manifest.to_str().unwrap();
    assert_eq!(refused_mount(&backing, &mnt, &["--manifest", m]), said);

    // A cap given on the command line is the one to raise.
    fs::write(&manifest, "[[pin]]\npaths = [\"*.safetensors\"]\n").unwrap();
    let err = refused_mount(&backing, &mnt, &["--manifest", m, "--max-size", "8MiB"]);
    assert!(
        err.contains(
            "pinned files total 12.0 MiB, 4.0 MiB more than the cap of 8.0 MiB (--max-size): \
             raise --max-size to at least 12.0 MiB, or pin fewer files"
        ),
        "{err}"
    );
}

#[test]
fn a_reload_pinning_more_than_the_cap_is_refused_and_the_manifest_in_force_stays() {
    let (tmp, backing, mnt) = dirs();
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        write_model(
            &backing.join(format!("{name}.safetensors")),
            4 * MIB,
            11 + i as u64,
        );
    }
    let (m, manifest) = mount_with_manifest(
        tmp.path(),
        "[[pin]]\npaths = [\"a.safetensors\"]\n",
        &backing,
        &mnt,
        &["--max-size", "8MiB"],
    );
    m.wait_log("loaded a.safetensors");

    fs::write(&manifest, "[[pin]]\npaths = [\"*.safetensors\"]\n").unwrap();
    let out = modelcache(&["reload", mnt.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(
            "pinned files total 12.0 MiB, 4.0 MiB more than the cap of 8.0 MiB \
             (in force since the mount): pin fewer files"
        ),
        "{err}"
    );
    let status = mount_status(&m.mountpoint);
    let pinned: Vec<&str> = status["files"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["pinned"] == true)
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert_eq!(pinned, ["a.safetensors"], "{status}");
    m.unmount();
}

/// Through the mount and a reload: a manifest that names a file of the
/// wrong extension, one too small, and one open for writing gets each
/// named with its own reason, in the log and in `reload`'s warnings.
#[test]
fn the_manifest_names_the_extension_the_size_and_the_writer_at_mount_and_reload() {
    let (tmp, backing, mnt) = dirs();
    write_model(&backing.join("notes.txt"), 2 * MIB, 9);
    write_model(&backing.join("tiny.safetensors"), 1000, 10);
    write_model(&backing.join("written.safetensors"), 2 * MIB, 11);
    let (m, manifest) = mount_with_manifest(
        tmp.path(),
        "[[pin]]\npaths = [\"notes.txt\"]\n\n[[warm]]\npaths = [\"tiny.safetensors\"]\n",
        &backing,
        &mnt,
        &[],
    );
    let log = m.wait_log("tiny.safetensors: 1000 B is under min_file_size 1.0 MiB");
    assert!(
        log.contains("notes.txt: not a model file: .txt is not in [cache] extensions"),
        "{log}"
    );

    let writer = Writer::open(&m.path("written.safetensors"));
    fs::write(&manifest, "[[pin]]\npaths = [\"written.safetensors\"]\n").unwrap();
    let out = modelcache(&["reload", mnt.to_str().unwrap()]);
    let warned = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "warnings only: {warned}");
    assert!(
        warned.contains(&format!(
            "cannot cache pinned file written.safetensors: open for writing by pid {} (sh)",
            writer.0.id()
        )),
        "{warned}"
    );
    drop(writer);
    m.unmount();
}
