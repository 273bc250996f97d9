//! `tests/run`, the test command, judges only the mounts its tests made: a
//! modelcache mount that was there before (the user's own service) neither
//! fails the run nor is touched, and a mount a test leaves behind does fail
//! it, by name.
//!
//! The suite itself is replaced by a stand-in `cargo` (tests/run runs
//! `$CARGO test`), so this runs in seconds. Its own test binary, and one test:
//! tests/run compares the mount table before and after, which mounts of
//! tests running beside it would disturb.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use common::*;

/// Runs `tests/run` with a stand-in cargo whose `test` runs `suite` (sh).
fn run_tests_run(dir: &Path, suite: &str) -> Output {
    let cargo = dir.join("cargo");
    fs::write(
        &cargo,
        format!("#!/bin/sh\n# stand-in for cargo: only `test` does anything\n[ \"$1\" = test ] || exit 0\n{suite}\n"),
    )
    .unwrap();
    fs::set_permissions(&cargo, fs::Permissions::from_mode(0o755)).unwrap();
    Command::new("tests/run")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("CARGO", &cargo)
        .output()
        .unwrap()
}

#[test]
fn tests_run_judges_only_the_mounts_its_tests_made() {
    if common::needs_root("tests/run is run as root") {
        return;
    }
    let dir = shared_tempdir();
    let (foreign_backing, foreign_mnt) = (dir.path().join("fb"), dir.path().join("fm"));
    let (left_backing, left_mnt) = (dir.path().join("lb"), dir.path().join("lm"));
    for d in [&foreign_backing, &foreign_mnt, &left_backing, &left_mnt] {
        fs::create_dir(d).unwrap();
    }
    let foreign = Mounted::separate(&foreign_backing, &foreign_mnt, &[]);

    // A clean suite with someone else's mount present: success.
    let out = run_tests_run(dir.path(), "exit 0");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tests/run failed:\n{said}");
    assert!(!said.contains("fm"), "{said}");
    assert!(
        our_mount_at(&foreign.mountpoint),
        "tests/run touched a mount it did not make"
    );

    // A suite that leaves a mount behind: failure, naming that mount only.
    let leave = format!(
        "'{}' mount --background --backing '{}' '{}'",
        bin(),
        left_backing.display(),
        left_mnt.display()
    );
    let out = run_tests_run(dir.path(), &leave);
    let left = left_mnt.canonicalize().unwrap();
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    force_unmount(&left);
    assert!(!out.status.success(), "a mount left behind passed:\n{said}");
    assert!(
        said.contains("left modelcache mounts behind") && said.contains(&*left.to_string_lossy()),
        "{said}"
    );
    assert!(
        !said.contains(&*foreign.mountpoint.to_string_lossy()),
        "the foreign mount was blamed:\n{said}"
    );
    assert!(our_mount_at(&foreign.mountpoint));
    foreign.unmount();
}
