//! The manifest as a user meets it: `modelcache check` on real folders, the
//! example manifest, and matching over a real directory walk.

use std::fs::{self, File};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use modelcache::manifest::{Manifest, Total};
use modelcache::units::Bytes;

fn check(manifest: &Path, root: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_modelcache"))
        .arg("check")
        .arg(manifest)
        .arg("--root")
        .arg(root)
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A file of `size` bytes (sparse: sizes are what matter here).
fn file(root: &Path, rel: &str, size: u64) {
    let path = root.join(rel);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    File::create(&path).unwrap().set_len(size).unwrap();
}

fn write_manifest(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join("manifest.toml");
    fs::write(&path, body).unwrap();
    path
}

/// The lines of `out` from the one starting with `header` to the next blank line.
fn section<'a>(out: &'a str, header: &str) -> Vec<&'a str> {
    out.lines()
        .skip_while(|l| !l.starts_with(header))
        .take_while(|l| !l.is_empty())
        .collect()
}

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("mount/manifest.example.toml")
}

const WAN: [(&str, u64); 4] = [
    (
        "diffusion_models/wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors",
        3 << 20,
    ),
    (
        "diffusion_models/wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors",
        3 << 20,
    ),
    (
        "text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors",
        2 << 20,
    ),
    ("vae/wan_2.1_vae.safetensors", 1 << 20),
];

#[test]
fn example_manifest_takes_every_file_of_a_wan_setup() {
    let manifest = Manifest::load(&example(), modelcache::manifest::Reader::Report).unwrap();
    assert!(manifest.rules.len() >= 3, "pin, warm and group rules");
    let dir = tempfile::tempdir().unwrap();
    for (rel, size) in WAN {
        file(dir.path(), rel, size);
    }
    let out = check(&example(), dir.path());
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(!stdout.contains("warning"), "{stdout}");
    assert_eq!(
        section(&stdout, "pin "),
        [
            "pin (line 28): diffusion_models/wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors, diffusion_models/wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors",
            "  diffusion_models/wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors  3.0 MiB",
            "  diffusion_models/wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors   3.0 MiB",
        ]
    );
    assert!(stdout.contains("pinned  6.0 MiB in 2 files\n"), "{stdout}");
    assert!(stdout.contains("warm    3.0 MiB in 2 files"), "{stdout}");
    // Every group member is pinned or warm already.
    assert!(stdout.contains("groups  0 B in 0 files"), "{stdout}");
}

#[test]
fn check_lists_files_sizes_warnings_and_totals() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("models");
    file(&root, "diffusion_models/high.safetensors", 3000);
    file(&root, "diffusion_models/low.safetensors", 1024);
    file(&root, "diffusion_models/notes.txt", 10);
    file(&root, "vae/wan.safetensors", 512);
    let manifest = write_manifest(
        dir.path(),
        r#"[cache]
max_size = "1GiB"
min_file_size = 0

[[pin]]
paths = ["diffusion_models/*.safetensors"]

[[warm]]
paths = ["vae/*", "loras/*.safetensors"]
"#,
    );
    let out = check(&manifest, &root);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert_eq!(
        section(&stdout, "pin "),
        [
            "pin (line 5): diffusion_models/*.safetensors",
            "  diffusion_models/high.safetensors  2.9 KiB",
            "  diffusion_models/low.safetensors   1.0 KiB",
        ]
    );
    assert_eq!(
        section(&stdout, "warm "),
        [
            "warm (line 8): vae/*, loras/*.safetensors",
            "  vae/wan.safetensors  512 B",
            "  warning: \"loras/*.safetensors\" matches no file",
        ]
    );
    let ram = modelcache::cache::pressure::total_ram();
    assert_eq!(
        section(&stdout, "pinned"),
        [
            "pinned  3.9 KiB in 2 files".to_string(),
            "warm    512 B in 1 file (loaded at mount)".to_string(),
            "groups  0 B in 0 files (loaded when a member is opened)".to_string(),
            "cap     1.0 GiB (max_size, line 2)".to_string(),
            format!("RAM     {}", Bytes(ram)),
        ]
    );
}

#[test]
fn check_fails_when_pins_exceed_the_cap() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("models");
    file(&root, "a/big.safetensors", 3000);
    file(&root, "a/small.safetensors", 1024);
    let manifest = write_manifest(
        dir.path(),
        "[cache]\nmax_size = \"1KiB\"\nmin_file_size = 0\n[[pin]]\npaths = [\"a/**\"]\n",
    );
    let out = check(&manifest, &root);
    assert!(!out.status.success());
    // The listing still shows what was pinned.
    assert!(text(&out.stdout).contains("  a/big.safetensors    2.9 KiB\n"));
    let stderr = text(&out.stderr);
    assert_eq!(
        stderr.trim_end(),
        format!(
            "modelcache: {}: pinned files total 3.9 KiB, 2.9 KiB more than the cap of 1.0 KiB (max_size, line 2): raise max_size in [cache] to at least 3.9 KiB, or pin fewer files",
            manifest.display()
        )
    );
}

#[test]
fn check_reports_a_bad_manifest_with_its_location() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_manifest(dir.path(), "# sizes\n[cache]\nmax_size = \"48 gigs\"\n");
    let out = check(&manifest, dir.path());
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    assert_eq!(
        text(&out.stderr).trim_end(),
        format!(
            "modelcache: {}: line 3, column 12: max_size: invalid size \"48 gigs\": use a number with a unit (500M, 48GiB, 1.5G) or a share of RAM (20%)",
            manifest.display()
        )
    );
}

#[test]
fn check_needs_a_root_directory_and_a_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_manifest(dir.path(), "");
    let out = check(&manifest, &dir.path().join("missing"));
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("cannot read the root"),
        "{}",
        text(&out.stderr)
    );
    let out = check(&dir.path().join("none.toml"), dir.path());
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("cannot read the manifest"));
}

#[test]
fn the_walk_follows_links_inside_the_root_only() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("models");
    let outside = dir.path().join("elsewhere");
    file(&root, "checkpoints/real.safetensors", 100);
    file(&outside, "far.safetensors", 200);
    // A folder reached twice (listed once, under its real path), a link out
    // of the root, a loop back up.
    symlink("checkpoints", root.join("alias")).unwrap();
    symlink(
        outside.join("far.safetensors"),
        root.join("checkpoints/far.safetensors"),
    )
    .unwrap();
    symlink("..", root.join("checkpoints/up")).unwrap();
    let manifest = Manifest::parse(
        "[cache]\nmin_file_size = 0\n[[pin]]\npaths = [\"**/*.safetensors\"]\n",
        Path::new("m.toml"),
    )
    .unwrap();
    let found = manifest.matches(&root).unwrap();
    let paths: Vec<_> = found.rules[0]
        .files
        .iter()
        .map(|f| f.path.to_str().unwrap())
        .collect();
    assert_eq!(paths, ["checkpoints/real.safetensors"]);
    // One file by two paths is pinned once.
    assert_eq!(
        found.pinned,
        Total {
            files: 1,
            bytes: 100
        }
    );
    assert_eq!(
        found.rules[0].warnings,
        [
            "checkpoints/far.safetensors is a symlink to outside the root: the cache holds only files inside the mount"
        ]
    );
}
