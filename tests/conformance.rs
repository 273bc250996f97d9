//! Conformance: every operation must have the same outcome through a mount
//! as on a plain directory holding the same files.
//!
//! Each row of the table runs once on a reference directory D and once on the
//! mount M of a backing directory B; D and B start as identical copies. A row
//! returns a canonical description of what happened (data, errno, normalized
//! attributes), and the two descriptions must be equal. Afterwards D and B
//! must hold the same tree.

mod common;

use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{
    DirBuilderExt, FileExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt,
};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};

use common::*;

// ---------------------------------------------------------------------------
// Canonical descriptions
// ---------------------------------------------------------------------------

/// The umask is per process and tests run on parallel threads: whoever
/// changes it, or creates files whose modes are compared, holds this.
static UMASK: Mutex<()> = Mutex::new(());

fn umask_lock() -> MutexGuard<'static, ()> {
    UMASK.lock().unwrap_or_else(|e| e.into_inner())
}

fn set_umask(mask: u32) {
    // SAFETY: plain syscall.
    unsafe { libc::umask(mask as libc::mode_t) };
}

fn errno_name(code: i32) -> String {
    const NAMES: &[(i32, &str)] = &[
        (libc::EPERM, "EPERM"),
        (libc::ENOENT, "ENOENT"),
        (libc::EIO, "EIO"),
        (libc::EBADF, "EBADF"),
        (libc::EAGAIN, "EAGAIN"),
        (libc::EACCES, "EACCES"),
        (libc::EBUSY, "EBUSY"),
        (libc::EEXIST, "EEXIST"),
        (libc::EXDEV, "EXDEV"),
        (libc::ENOTDIR, "ENOTDIR"),
        (libc::EISDIR, "EISDIR"),
        (libc::EINVAL, "EINVAL"),
        (libc::EFBIG, "EFBIG"),
        (libc::ENOSPC, "ENOSPC"),
        (libc::ESPIPE, "ESPIPE"),
        (libc::EROFS, "EROFS"),
        (libc::EMLINK, "EMLINK"),
        (libc::ERANGE, "ERANGE"),
        (libc::ENAMETOOLONG, "ENAMETOOLONG"),
        (libc::ENOSYS, "ENOSYS"),
        (libc::ENOTEMPTY, "ENOTEMPTY"),
        (libc::ELOOP, "ELOOP"),
        (libc::ENODATA, "ENODATA"),
        (libc::EOPNOTSUPP, "EOPNOTSUPP"),
        (libc::ENXIO, "ENXIO"),
        (libc::ESTALE, "ESTALE"),
        (libc::ENOTCONN, "ENOTCONN"),
        (libc::ETXTBSY, "ETXTBSY"),
    ];
    NAMES
        .iter()
        .find(|(c, _)| *c == code)
        .map(|(_, n)| n.to_string())
        .unwrap_or_else(|| format!("errno{code}"))
}

fn fail(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => format!("err {}", errno_name(code)),
        None => format!("err {:?}", e.kind()),
    }
}

/// The description of a success that returns nothing of interest.
fn ok<T>(_: T) -> String {
    "ok".into()
}

fn out<T>(r: io::Result<T>, ok: impl FnOnce(T) -> String) -> String {
    match r {
        Ok(v) => ok(v),
        Err(e) => fail(&e),
    }
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn check_size(ret: isize) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn kind(t: fs::FileType) -> &'static str {
    if t.is_symlink() {
        "symlink"
    } else if t.is_dir() {
        "dir"
    } else if t.is_file() {
        "file"
    } else if t.is_fifo() {
        "fifo"
    } else if t.is_char_device() {
        "chardev"
    } else if t.is_block_device() {
        "blockdev"
    } else if t.is_socket() {
        "socket"
    } else {
        "unknown"
    }
}

/// Normalized attributes: no device, inode number or times.
fn attrs(m: &fs::Metadata) -> String {
    format!(
        "{} mode={:o} size={} nlink={} uid={} gid={}",
        kind(m.file_type()),
        m.mode() & 0o7777,
        m.size(),
        m.nlink(),
        m.uid(),
        m.gid()
    )
}

fn mtime(m: &fs::Metadata) -> String {
    format!("mtime={}.{:09}", m.mtime(), m.mtime_nsec())
}

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf29ce484222325, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100000001b3)
    })
}

fn show_bytes(d: &[u8]) -> String {
    if d.len() <= 64 {
        format!("{:?}", String::from_utf8_lossy(d))
    } else {
        format!("{} bytes fnv={:016x}", d.len(), fnv(d))
    }
}

fn stat(r: &Path, rel: &str) -> String {
    out(fs::metadata(r.join(rel)), |m| format!("ok {}", attrs(&m)))
}

fn lstat(r: &Path, rel: &str) -> String {
    out(fs::symlink_metadata(r.join(rel)), |m| {
        format!("ok {}", attrs(&m))
    })
}

fn read(r: &Path, rel: &str) -> String {
    out(fs::read(r.join(rel)), |d| format!("ok {}", show_bytes(&d)))
}

/// Content and attributes after a change.
fn after(r: &Path, rel: &str) -> String {
    format!("{} / {}", read(r, rel), stat(r, rel))
}

/// Sorted `name:type` entries, types as readdir reports them.
fn listing(dir: &Path) -> io::Result<Vec<String>> {
    let mut names = Vec::new();
    for e in fs::read_dir(dir)? {
        let e = e?;
        names.push(format!("{:?}:{}", e.file_name(), kind(e.file_type()?)));
    }
    names.sort();
    Ok(names)
}

fn list(r: &Path, rel: &str) -> String {
    out(listing(&r.join(rel)), |v| format!("ok [{}]", v.join(" ")))
}

fn readlink(r: &Path, rel: &str) -> String {
    out(fs::read_link(r.join(rel)), |t| format!("ok {t:?}"))
}

fn ino(r: &Path, rel: &str) -> u64 {
    fs::symlink_metadata(r.join(rel)).unwrap().ino()
}

fn write_file(r: &Path, rel: &str, data: &[u8]) {
    fs::write(r.join(rel), data).unwrap();
}

fn pread(f: &File, len: usize, offset: u64) -> String {
    let mut buf = vec![0u8; len];
    out(f.read_at(&mut buf, offset), |n| {
        format!("ok n={n} {}", show_bytes(&buf[..n]))
    })
}

/// Runs `f` with another umask. Rows run while their test holds `UMASK`.
fn with_umask(mask: u32, f: impl FnOnce() -> String) -> String {
    set_umask(mask);
    let result = f();
    set_umask(0o022);
    result
}

/// Creates `rel` with `O_CREAT|O_EXCL` and `mode`; the resulting attributes.
fn create_excl(r: &Path, rel: &str, mode: u32) -> String {
    let made = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(r.join(rel));
    out(made, |_| stat(r, rel))
}

fn renameat2(r: &Path, from: &str, to: &str, flags: u32) -> io::Result<()> {
    let (a, b) = (cpath(&r.join(from)), cpath(&r.join(to)));
    // SAFETY: NUL-terminated paths, AT_FDCWD with absolute paths.
    check(unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    })
    .map(drop)
}

fn utimens(p: &Path, atime: (i64, i64), mtime: (i64, i64), flags: i32) -> io::Result<()> {
    let c = cpath(p);
    let times = [
        libc::timespec {
            tv_sec: atime.0,
            tv_nsec: atime.1,
        },
        libc::timespec {
            tv_sec: mtime.0,
            tv_nsec: mtime.1,
        },
    ];
    // SAFETY: valid path and two timespecs.
    check(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), flags) }).map(drop)
}

fn access(p: &Path) -> String {
    let c = cpath(p);
    [
        ("r", libc::R_OK),
        ("w", libc::W_OK),
        ("x", libc::X_OK),
        ("f", libc::F_OK),
    ]
    .iter()
    .map(|(n, mode)| {
        // SAFETY: NUL-terminated path.
        let r = check(unsafe { libc::access(c.as_ptr(), *mode) });
        format!("{n}={}", out(r, ok))
    })
    .collect::<Vec<_>>()
    .join(" ")
}

/// Runs a shell script as nobody with `paths` as `$1…`. Only the exit code
/// and stdout are described (stderr names absolute paths).
fn as_nobody(script: &str, paths: &[PathBuf]) -> String {
    let out = as_user(NOBODY, NOGROUP, "sh")
        .arg("-c")
        .arg(script)
        .arg("sh")
        .args(paths)
        .current_dir("/")
        .output()
        .expect("run sh as nobody");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let words: Vec<&str> = stdout.split_whitespace().collect();
    format!("exit={:?} out=[{}]", out.status.code(), words.join(" "))
}

const RWX_SCRIPT: &str = "test -e \"$1\" && echo e; test -r \"$1\" && echo r; test -w \"$1\" && echo w; \
     test -x \"$1\" && echo x; cat \"$1\" >/dev/null 2>&1 && echo read; true";

fn nobody_rwx(r: &Path, rel: &str) -> String {
    as_nobody(RWX_SCRIPT, &[r.join(rel)])
}

// Extended attributes through libc, following links unless `l*`.

fn xattr_name(name: &str) -> CString {
    CString::new(name).unwrap()
}

fn getxattr(p: &Path, name: &str, cap: usize, follow: bool) -> io::Result<Vec<u8>> {
    let (c, n) = (cpath(p), xattr_name(name));
    let mut buf = vec![0u8; cap];
    // SAFETY: buffer valid for `cap` bytes.
    let len = check_size(unsafe {
        let f = if follow {
            libc::getxattr
        } else {
            libc::lgetxattr
        };
        f(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), cap)
    })?;
    buf.truncate(len.min(cap));
    Ok(buf)
}

fn getxattr_size(p: &Path, name: &str) -> io::Result<usize> {
    let (c, n) = (cpath(p), xattr_name(name));
    // SAFETY: a size query with no buffer.
    check_size(unsafe { libc::getxattr(c.as_ptr(), n.as_ptr(), std::ptr::null_mut(), 0) })
}

fn listxattr(p: &Path, follow: bool) -> io::Result<Vec<String>> {
    let c = cpath(p);
    let mut buf = vec![0u8; 4096];
    // SAFETY: buffer valid for its length.
    let len = check_size(unsafe {
        let f = if follow {
            libc::listxattr
        } else {
            libc::llistxattr
        };
        f(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
    })?;
    let mut names: Vec<String> = buf[..len]
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect();
    names.sort();
    Ok(names)
}

fn setxattr(p: &Path, name: &str, value: &[u8], flags: i32, follow: bool) -> io::Result<()> {
    let (c, n) = (cpath(p), xattr_name(name));
    // SAFETY: valid strings and buffer.
    check(unsafe {
        let f = if follow {
            libc::setxattr
        } else {
            libc::lsetxattr
        };
        f(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
    .map(drop)
}

fn removexattr(p: &Path, name: &str) -> io::Result<()> {
    let (c, n) = (cpath(p), xattr_name(name));
    // SAFETY: valid strings.
    check(unsafe { libc::removexattr(c.as_ptr(), n.as_ptr()) }).map(drop)
}

fn lremovexattr(p: &Path, name: &str) -> io::Result<()> {
    let (c, n) = (cpath(p), xattr_name(name));
    // SAFETY: valid strings.
    check(unsafe { libc::lremovexattr(c.as_ptr(), n.as_ptr()) }).map(drop)
}

fn xattrs_of(p: &Path) -> String {
    out(listxattr(p, true), |names| {
        let all: Vec<String> = names
            .iter()
            .map(|n| {
                let v = out(getxattr(p, n, 4096, true), |v| show_bytes(&v));
                format!("{n}={v}")
            })
            .collect();
        format!("ok [{}]", all.join(" "))
    })
}

// Memory maps.

fn mmap(f: &File, len: usize, prot: i32, flags: i32) -> io::Result<*mut u8> {
    // SAFETY: a fresh mapping of an open file.
    let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, f.as_raw_fd(), 0) };
    if ptr == libc::MAP_FAILED {
        Err(io::Error::last_os_error())
    } else {
        Ok(ptr.cast())
    }
}

fn munmap(ptr: *mut u8, len: usize) {
    // SAFETY: `ptr` is a mapping of `len` bytes made by `mmap`.
    unsafe { libc::munmap(ptr.cast(), len) };
}

fn lseek(f: &File, offset: i64, whence: i32) -> io::Result<i64> {
    // SAFETY: plain syscall on an open fd.
    let r = unsafe { libc::lseek(f.as_raw_fd(), offset, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// An O_DIRECT-friendly buffer.
#[repr(C, align(4096))]
struct Page([u8; 4096]);

// ---------------------------------------------------------------------------
// The fixture
// ---------------------------------------------------------------------------

const DATA_LEN: usize = 300_001;

fn fixture(root: &Path) {
    use std::os::unix::fs::symlink;
    write_file(root, "hello.txt", b"hello, world\n");
    write_file(root, "data.bin", &pseudo_random(DATA_LEN, 7));
    fs::create_dir(root.join("sub")).unwrap();
    write_file(root, "sub/a.txt", b"a\n");
    write_file(root, "sub/b.txt", b"bee\n");
    fs::create_dir(root.join("sub/deeper")).unwrap();
    write_file(root, "sub/deeper/c.txt", b"c");
    symlink("hello.txt", root.join("link_to_hello")).unwrap();
    symlink("../hello.txt", root.join("sub/up_link")).unwrap();
    symlink("sub", root.join("link_to_sub")).unwrap();
    symlink("no-such-target", root.join("dangling")).unwrap();
    symlink("/etc", root.join("etc")).unwrap();
    fs::create_dir(root.join("empty_dir")).unwrap();
    write_file(root, "secret.txt", b"secret\n");
    set_mode(&root.join("secret.txt"), 0o600);
    write_file(root, "exec.sh", b"#!/bin/sh\necho hi\n");
    set_mode(&root.join("exec.sh"), 0o755);
    write_file(root, "noperm.txt", b"none\n");
    set_mode(&root.join("noperm.txt"), 0o000);
    write_file(root, "world.txt", b"anyone\n");
    set_mode(&root.join("world.txt"), 0o666);
    write_file(root, "nobodys.txt", b"mine\n");
    chown(&root.join("nobodys.txt"), NOBODY, NOGROUP);
    write_file(root, "hard_a", b"shared inode\n");
    fs::hard_link(root.join("hard_a"), root.join("hard_b")).unwrap();
    write_file(root, "xattr.txt", b"x\n");
    setxattr(&root.join("xattr.txt"), "user.color", b"blue", 0, true).unwrap();
    setxattr(&root.join("xattr.txt"), "user.empty", b"", 0, true).unwrap();
    write_file(root, "name with spaces.txt", b"spaces\n");
    write_file(root, "ünïcödé 名前.txt", b"unicode\n");
}

// ---------------------------------------------------------------------------
// The table
// ---------------------------------------------------------------------------

type Op = fn(&Path) -> String;

fn row(name: &'static str, op: Op) -> (&'static str, Op) {
    (name, op)
}

fn table() -> Vec<(&'static str, Op)> {
    vec![
        // --- lookup / getattr ------------------------------------------------
        row("stat root", |r| stat(r, "")),
        row("stat file", |r| stat(r, "hello.txt")),
        row("lstat file", |r| lstat(r, "hello.txt")),
        row("stat large file", |r| stat(r, "data.bin")),
        row("stat dir", |r| stat(r, "sub")),
        row("stat nested dir", |r| stat(r, "sub/deeper")),
        row("stat empty dir", |r| stat(r, "empty_dir")),
        row("stat symlink follows", |r| stat(r, "link_to_hello")),
        row("lstat symlink", |r| lstat(r, "link_to_hello")),
        row("stat symlink to dir", |r| stat(r, "link_to_sub")),
        row("stat through symlinked dir", |r| {
            stat(r, "link_to_sub/a.txt")
        }),
        row("stat relative link upwards", |r| stat(r, "sub/up_link")),
        row("stat dangling symlink", |r| stat(r, "dangling")),
        row("lstat dangling symlink", |r| lstat(r, "dangling")),
        row("stat symlink to /etc", |r| stat(r, "etc")),
        row("lstat symlink to /etc", |r| lstat(r, "etc")),
        row("stat through /etc link", |r| stat(r, "etc/hostname")),
        row("stat missing", |r| stat(r, "missing")),
        row("stat missing in subdir", |r| stat(r, "sub/missing")),
        row("stat in missing dir", |r| stat(r, "missing/x")),
        row("stat under a file", |r| stat(r, "hello.txt/x")),
        row("stat file with trailing slash", |r| stat(r, "hello.txt/")),
        row("stat mode 0600", |r| stat(r, "secret.txt")),
        row("stat mode 0755", |r| stat(r, "exec.sh")),
        row("stat mode 0000", |r| stat(r, "noperm.txt")),
        row("stat owned by nobody", |r| stat(r, "nobodys.txt")),
        row("stat hard link pair", |r| {
            let same = ino(r, "hard_a") == ino(r, "hard_b");
            format!(
                "{} / {} / same_ino={same}",
                stat(r, "hard_a"),
                stat(r, "hard_b")
            )
        }),
        row("stat name with spaces", |r| stat(r, "name with spaces.txt")),
        row("stat unicode name", |r| stat(r, "ünïcödé 名前.txt")),
        row("stat sub/.. is root", |r| {
            let same = ino(r, "sub/..") == ino(r, "");
            format!("{} same_ino_as_root={same}", stat(r, "sub/.."))
        }),
        // st_ino is the FUSE node id: a node the kernel forgot must come back
        // under the same id.
        row("inode number stable after the kernel forgets it", |r| {
            let before = ino(r, "sub/deeper/c.txt");
            // Evicts unused dentries and inodes, so the kernel forgets
            // the mount's nodes and must look them up again.
            let dropped = fs::write("/proc/sys/vm/drop_caches", b"2").is_ok();
            std::thread::sleep(std::time::Duration::from_millis(300));
            let same = before == ino(r, "sub/deeper/c.txt");
            format!("dropped={dropped} same_ino={same}")
        }),
        // --- readdir ---------------------------------------------------------
        row("readdir root", |r| list(r, "")),
        row("readdir subdir", |r| list(r, "sub")),
        row("readdir nested", |r| list(r, "sub/deeper")),
        row("readdir empty dir", |r| list(r, "empty_dir")),
        row("readdir via symlink to dir", |r| list(r, "link_to_sub")),
        row("readdir via /etc link (count)", |r| {
            out(listing(&r.join("etc")), |v| {
                format!("ok {} entries", v.len())
            })
        }),
        row("readdir missing", |r| list(r, "missing")),
        row("readdir a file", |r| list(r, "hello.txt")),
        row("readdir after creating and removing entries", |r| {
            let d = r.join("churn");
            fs::create_dir(&d).unwrap();
            for i in 0..40 {
                fs::write(d.join(format!("f{i:02}")), i.to_string()).unwrap();
            }
            for i in (0..40).step_by(2) {
                fs::remove_file(d.join(format!("f{i:02}"))).unwrap();
            }
            fs::rename(d.join("f01"), d.join("renamed")).unwrap();
            fs::create_dir(d.join("child")).unwrap();
            std::os::unix::fs::symlink("f03", d.join("ln")).unwrap();
            list(r, "churn")
        }),
        row("readdir of 3000 entries", |r| {
            let d = r.join("big_dir");
            fs::create_dir(&d).unwrap();
            for i in 0..3000 {
                File::create(d.join(format!("entry-with-a-longish-name-{i:05}"))).unwrap();
            }
            out(listing(&d), |v| {
                format!(
                    "ok {} entries fnv={:016x}",
                    v.len(),
                    fnv(v.join("/").as_bytes())
                )
            })
        }),
        row("readdir sees an entry removed by rmdir", |r| {
            fs::create_dir_all(r.join("rd_gone/x")).unwrap();
            fs::remove_dir(r.join("rd_gone/x")).unwrap();
            list(r, "rd_gone")
        }),
        // --- open + read -----------------------------------------------------
        row("read whole small file", |r| read(r, "hello.txt")),
        row("read whole large file", |r| read(r, "data.bin")),
        row("read via symlink", |r| read(r, "link_to_hello")),
        row("read via relative link upwards", |r| read(r, "sub/up_link")),
        row("read via symlinked dir", |r| read(r, "link_to_sub/b.txt")),
        row("read via /etc link", |r| read(r, "etc/hostname")),
        row("read dangling symlink", |r| read(r, "dangling")),
        row("read missing", |r| read(r, "missing")),
        row("read mode 0000 as root", |r| read(r, "noperm.txt")),
        row("read name with spaces", |r| read(r, "name with spaces.txt")),
        row("read unicode name", |r| read(r, "ünïcödé 名前.txt")),
        row("pread at offsets", |r| {
            let f = File::open(r.join("data.bin")).unwrap();
            let n = DATA_LEN as u64;
            [0, 1, 4095, 4096, 131071, 200_000, n - 10, n - 1, n, n + 100]
                .iter()
                .map(|&off| format!("@{off}: {}", pread(&f, 100, off)))
                .collect::<Vec<_>>()
                .join(" | ")
        }),
        row("pread 1 MiB spanning EOF", |r| {
            pread(&File::open(r.join("data.bin")).unwrap(), 1 << 20, 7)
        }),
        row("read past EOF returns 0", |r| {
            let mut f = File::open(r.join("hello.txt")).unwrap();
            f.seek(SeekFrom::Start(1000)).unwrap();
            let mut buf = [0u8; 10];
            out(f.read(&mut buf), |n| format!("ok n={n}"))
        }),
        row("seek from end and read", |r| {
            let mut f = File::open(r.join("hello.txt")).unwrap();
            let pos = f.seek(SeekFrom::End(-6)).unwrap();
            let mut s = String::new();
            f.read_to_string(&mut s).unwrap();
            format!("pos={pos} {s:?}")
        }),
        row("read a directory fd", |r| {
            let mut f = File::open(r.join("sub")).unwrap();
            let mut buf = [0u8; 10];
            out(f.read(&mut buf), |n| format!("ok n={n}"))
        }),
        row("open dir for writing", |r| {
            out(OpenOptions::new().write(true).open(r.join("sub")), ok)
        }),
        row("open file with O_DIRECTORY", |r| {
            let f = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECTORY)
                .open(r.join("hello.txt"));
            out(f, ok)
        }),
        row("open symlink with O_NOFOLLOW", |r| {
            let f = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(r.join("link_to_hello"));
            out(f, ok)
        }),
        row("O_DIRECT aligned read", |r| {
            let f = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .open(r.join("data.bin"))
                .unwrap();
            let mut page = Box::new(Page([0; 4096]));
            out(f.read_at(&mut page.0, 8192), |n| {
                format!("ok n={n} {}", show_bytes(&page.0[..n]))
            })
        }),
        row("open with O_TRUNC", |r| {
            write_file(r, "otrunc.txt", b"to be truncated");
            let f = OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(r.join("otrunc.txt"));
            format!("{} / {}", out(f, ok), after(r, "otrunc.txt"))
        }),
        row("two fds see each other's writes", |r| {
            write_file(r, "twofd.txt", b"0123456789");
            let w = OpenOptions::new()
                .write(true)
                .open(r.join("twofd.txt"))
                .unwrap();
            let rd = File::open(r.join("twofd.txt")).unwrap();
            let before = pread(&rd, 10, 0);
            w.write_all_at(b"XY", 4).unwrap();
            format!("{before} -> {}", pread(&rd, 10, 0))
        }),
        // --- write -----------------------------------------------------------
        row("pwrite in the middle", |r| {
            write_file(r, "w_mid.txt", b"0123456789");
            let f = OpenOptions::new()
                .write(true)
                .open(r.join("w_mid.txt"))
                .unwrap();
            f.write_all_at(b"abc", 3).unwrap();
            drop(f);
            after(r, "w_mid.txt")
        }),
        row("append with O_APPEND", |r| {
            write_file(r, "w_app.txt", b"start;");
            let mut f = OpenOptions::new()
                .append(true)
                .open(r.join("w_app.txt"))
                .unwrap();
            f.write_all(b"one;").unwrap();
            f.write_all(b"two;").unwrap();
            // Linux appends even a pwrite on an O_APPEND descriptor.
            f.write_all_at(b"three;", 0).unwrap();
            drop(f);
            after(r, "w_app.txt")
        }),
        row("two appenders interleave", |r| {
            write_file(r, "w_app2.txt", b"");
            let open = || {
                OpenOptions::new()
                    .append(true)
                    .open(r.join("w_app2.txt"))
                    .unwrap()
            };
            let (mut a, mut b) = (open(), open());
            for _ in 0..3 {
                a.write_all(b"a").unwrap();
                b.write_all(b"bb").unwrap();
            }
            drop((a, b));
            after(r, "w_app2.txt")
        }),
        row("extend past end leaves a zero hole", |r| {
            write_file(r, "w_ext.txt", b"short");
            let f = OpenOptions::new()
                .write(true)
                .open(r.join("w_ext.txt"))
                .unwrap();
            f.write_all_at(b"end", 100).unwrap();
            drop(f);
            after(r, "w_ext.txt")
        }),
        row("pwrite at 3 GiB (sparse)", |r| {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(r.join("w_far.bin"))
                .unwrap();
            let w = out(f.write_all_at(b"z", 3 << 30), ok);
            let s = stat(r, "w_far.bin");
            let tail = pread(&f, 10, (3 << 30) - 2);
            fs::remove_file(r.join("w_far.bin")).unwrap();
            format!("{w} / {s} / {tail}")
        }),
        row("write 3 MiB in odd chunks", |r| {
            let data = pseudo_random(3 << 20, 11);
            let mut f = File::create(r.join("w_big.bin")).unwrap();
            for chunk in data.chunks(123_457) {
                f.write_all(chunk).unwrap();
            }
            drop(f);
            after(r, "w_big.bin")
        }),
        row("write on a read-only fd", |r| {
            let mut f = File::open(r.join("hello.txt")).unwrap();
            out(f.write(b"x"), |n| format!("ok n={n}"))
        }),
        row("write mode 0000 file as root", |r| {
            write_file(r, "w_0000.txt", b"old");
            set_mode(&r.join("w_0000.txt"), 0o000);
            let w = fs::write(r.join("w_0000.txt"), b"new");
            format!("{} / {}", out(w, ok), after(r, "w_0000.txt"))
        }),
        // --- create ----------------------------------------------------------
        row("O_CREAT|O_EXCL on existing", |r| {
            create_excl(r, "hello.txt", 0o644)
        }),
        row("O_CREAT|O_EXCL on a dangling symlink", |r| {
            create_excl(r, "dangling", 0o644)
        }),
        row("create 0640 with umask 022", |r| {
            with_umask(0o022, || create_excl(r, "c_640_022", 0o640))
        }),
        row("create 0666 with umask 022", |r| {
            with_umask(0o022, || create_excl(r, "c_666_022", 0o666))
        }),
        row("create 0640 with umask 0", |r| {
            with_umask(0, || create_excl(r, "c_640_0", 0o640))
        }),
        row("create 0777 with umask 0", |r| {
            with_umask(0, || create_excl(r, "c_777_0", 0o777))
        }),
        row("create 0666 with umask 077", |r| {
            with_umask(0o077, || create_excl(r, "c_666_077", 0o666))
        }),
        row("create in missing dir", |r| {
            create_excl(r, "missing/new", 0o644)
        }),
        row("create through a dangling symlink", |r| {
            std::os::unix::fs::symlink("made_by_link.txt", r.join("dangling2")).unwrap();
            let made = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(r.join("dangling2"))
                .and_then(|mut f| f.write_all(b"via link"));
            format!(
                "{} / {} / {}",
                out(made, ok),
                lstat(r, "dangling2"),
                after(r, "made_by_link.txt")
            )
        }),
        row("O_CREAT without O_EXCL keeps content", |r| {
            write_file(r, "c_keep.txt", b"keep me");
            let f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(r.join("c_keep.txt"));
            format!("{} / {}", out(f, ok), after(r, "c_keep.txt"))
        }),
        row("mkfifo", |r| {
            let c = cpath(&r.join("fifo"));
            // SAFETY: NUL-terminated path.
            let made = check(unsafe { libc::mkfifo(c.as_ptr(), 0o640) });
            format!("{} / {}", out(made, ok), lstat(r, "fifo"))
        }),
        row("mknod char device", |r| {
            let c = cpath(&r.join("null_dev"));
            // SAFETY: NUL-terminated path.
            let made = check(unsafe {
                libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o644, libc::makedev(1, 3))
            });
            let rdev = fs::symlink_metadata(r.join("null_dev"))
                .map(|m| m.rdev())
                .unwrap_or(0);
            format!("{} / {} rdev={rdev}", out(made, ok), lstat(r, "null_dev"))
        }),
        // --- truncate --------------------------------------------------------
        row("set_len grow", |r| {
            write_file(r, "t_grow.txt", b"12345");
            let f = OpenOptions::new()
                .write(true)
                .open(r.join("t_grow.txt"))
                .unwrap();
            f.set_len(20).unwrap();
            drop(f);
            after(r, "t_grow.txt")
        }),
        row("set_len shrink", |r| {
            write_file(r, "t_shrink.bin", &pseudo_random(100_000, 3));
            let f = OpenOptions::new()
                .write(true)
                .open(r.join("t_shrink.bin"))
                .unwrap();
            f.set_len(1000).unwrap();
            drop(f);
            after(r, "t_shrink.bin")
        }),
        row("set_len on a read-only fd", |r| {
            out(File::open(r.join("hello.txt")).unwrap().set_len(1), ok)
        }),
        row("path truncate grow and shrink", |r| {
            write_file(r, "t_path.txt", b"0123456789");
            let c = cpath(&r.join("t_path.txt"));
            // SAFETY: NUL-terminated path.
            let grow = check(unsafe { libc::truncate(c.as_ptr(), 16) });
            let grown = after(r, "t_path.txt");
            // SAFETY: as above.
            let shrink = check(unsafe { libc::truncate(c.as_ptr(), 4) });
            format!(
                "{} {grown} / {} {}",
                out(grow, ok),
                out(shrink, ok),
                after(r, "t_path.txt")
            )
        }),
        row("path truncate through a symlink", |r| {
            write_file(r, "t_target.txt", b"abcdef");
            std::os::unix::fs::symlink("t_target.txt", r.join("t_link")).unwrap();
            let c = cpath(&r.join("t_link"));
            // SAFETY: NUL-terminated path.
            let t = check(unsafe { libc::truncate(c.as_ptr(), 2) });
            format!(
                "{} / {} / {}",
                out(t, ok),
                lstat(r, "t_link"),
                after(r, "t_target.txt")
            )
        }),
        row("path truncate a dir", |r| {
            let c = cpath(&r.join("sub"));
            // SAFETY: NUL-terminated path.
            out(check(unsafe { libc::truncate(c.as_ptr(), 0) }), ok)
        }),
        row("path truncate missing", |r| {
            let c = cpath(&r.join("missing"));
            // SAFETY: NUL-terminated path.
            out(check(unsafe { libc::truncate(c.as_ptr(), 0) }), ok)
        }),
        row("path truncate to a negative size", |r| {
            let c = cpath(&r.join("hello.txt"));
            // SAFETY: NUL-terminated path.
            out(check(unsafe { libc::truncate(c.as_ptr(), -1) }), ok)
        }),
        // --- fsync, flush, allocation ----------------------------------------
        row("fsync and fdatasync", |r| {
            let mut f = File::create(r.join("s_sync.txt")).unwrap();
            f.write_all(b"durable").unwrap();
            let a = out(f.sync_all(), ok);
            let b = out(f.sync_data(), ok);
            drop(f);
            format!("fsync {a} fdatasync {b} / {}", after(r, "s_sync.txt"))
        }),
        row("fsync a directory", |r| {
            let d = File::open(r.join("sub")).unwrap();
            format!(
                "fsync {} fdatasync {}",
                out(d.sync_all(), ok),
                out(d.sync_data(), ok)
            )
        }),
        row("close reports success and data is there", |r| {
            let mut f = File::create(r.join("s_close.txt")).unwrap();
            f.write_all(b"closed").unwrap();
            let fd = std::os::fd::IntoRawFd::into_raw_fd(f);
            // SAFETY: we own `fd` and close it once.
            let closed = check(unsafe { libc::close(fd) });
            format!("{} / {}", out(closed, ok), after(r, "s_close.txt"))
        }),
        row("close of a dup keeps the other fd usable", |r| {
            let f = File::create(r.join("s_dup.txt")).unwrap();
            drop(f.try_clone().unwrap());
            let w = out(f.write_all_at(b"after dup close", 0), ok);
            drop(f);
            format!("{w} / {}", after(r, "s_dup.txt"))
        }),
        // Without a FUSE fallocate handler the kernel answers EOPNOTSUPP
        // (posix_fallocate would hide it behind glibc's fallback).
        row("fallocate mode 0", |r| {
            let f = File::create(r.join("s_falloc.bin")).unwrap();
            // SAFETY: plain syscall on an open fd.
            let a = check(unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, 65536) });
            format!("{} / {}", out(a, ok), stat(r, "s_falloc.bin"))
        }),
        row("fallocate punch hole", |r| {
            let f = File::create(r.join("s_punch.bin")).unwrap();
            f.write_all_at(&[0xaa; 16384], 0).unwrap();
            let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            // SAFETY: plain syscall on an open fd.
            let a = check(unsafe { libc::fallocate(f.as_raw_fd(), mode, 4096, 4096) });
            drop(f);
            format!("{} / {}", out(a, ok), after(r, "s_punch.bin"))
        }),
        row("posix_fallocate", |r| {
            let f = File::create(r.join("s_pfalloc.bin")).unwrap();
            // SAFETY: plain call on an open fd; returns the error number.
            let e = unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, 10_000) };
            let a = if e == 0 {
                "ok".to_string()
            } else {
                format!("err {}", errno_name(e))
            };
            format!("{a} / {}", after(r, "s_pfalloc.bin"))
        }),
        // Without a FUSE lseek handler the kernel reports the whole file as data.
        row("lseek SEEK_DATA / SEEK_HOLE on a sparse file", |r| {
            let f = File::create(r.join("s_sparse.bin")).unwrap();
            f.write_all_at(&[1; 4096], 0).unwrap();
            f.write_all_at(b"x", 1 << 20).unwrap();
            f.sync_all().unwrap();
            format!(
                "hole@0={} data@8192={}",
                out(lseek(&f, 0, libc::SEEK_HOLE), |o| o.to_string()),
                out(lseek(&f, 8192, libc::SEEK_DATA), |o| o.to_string())
            )
        }),
        row("copy_file_range", |r| {
            let src = File::open(r.join("data.bin")).unwrap();
            let dst = File::create(r.join("s_copy.bin")).unwrap();
            let mut copied = 0usize;
            let result = loop {
                // SAFETY: two open fds, kernel-maintained offsets.
                let n = unsafe {
                    libc::copy_file_range(
                        src.as_raw_fd(),
                        std::ptr::null_mut(),
                        dst.as_raw_fd(),
                        std::ptr::null_mut(),
                        DATA_LEN,
                        0,
                    )
                };
                match check_size(n) {
                    Ok(0) => break Ok(copied),
                    Ok(n) => copied += n,
                    Err(e) => break Err(e),
                }
            };
            drop(dst);
            format!(
                "{} / {}",
                out(result, |n| format!("ok copied={n}")),
                after(r, "s_copy.bin")
            )
        }),
        row("flock conflicts between open files", |r| {
            let a = File::open(r.join("hello.txt")).unwrap();
            let b = File::open(r.join("hello.txt")).unwrap();
            // SAFETY: plain syscalls on open fds.
            let (x, y) = unsafe {
                (
                    check(libc::flock(a.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB)),
                    check(libc::flock(b.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB)),
                )
            };
            format!("first {} second {}", out(x, ok), out(y, ok))
        }),
        // --- mkdir / rmdir / unlink ------------------------------------------
        row("mkdir 0777 with umask 022", |r| {
            with_umask(0o022, || {
                let d = fs::DirBuilder::new().mode(0o777).create(r.join("md_a"));
                format!("{} / {}", out(d, ok), stat(r, "md_a"))
            })
        }),
        row("mkdir 0777 with umask 0", |r| {
            with_umask(0, || {
                let d = fs::DirBuilder::new().mode(0o777).create(r.join("md_b"));
                format!("{} / {}", out(d, ok), stat(r, "md_b"))
            })
        }),
        row("mkdir 0700", |r| {
            let d = fs::DirBuilder::new().mode(0o700).create(r.join("md_c"));
            format!("{} / {}", out(d, ok), stat(r, "md_c"))
        }),
        row("mkdir existing dir", |r| {
            out(fs::create_dir(r.join("sub")), ok)
        }),
        row("mkdir over a file", |r| {
            out(fs::create_dir(r.join("hello.txt")), ok)
        }),
        row("mkdir over a dangling symlink", |r| {
            out(fs::create_dir(r.join("dangling")), ok)
        }),
        row("mkdir in missing dir", |r| {
            out(fs::create_dir(r.join("missing/x")), ok)
        }),
        row("mkdir updates parent nlink", |r| {
            fs::create_dir(r.join("md_parent")).unwrap();
            let before = stat(r, "md_parent");
            fs::create_dir(r.join("md_parent/kid")).unwrap();
            format!("{before} -> {}", stat(r, "md_parent"))
        }),
        row("rmdir non-empty", |r| {
            out(fs::remove_dir(r.join("sub")), ok)
        }),
        row("rmdir missing", |r| {
            out(fs::remove_dir(r.join("missing")), ok)
        }),
        row("rmdir a file", |r| {
            out(fs::remove_dir(r.join("hello.txt")), ok)
        }),
        row("rmdir a symlink to a dir", |r| {
            out(fs::remove_dir(r.join("link_to_sub")), ok)
        }),
        row("rmdir empty", |r| {
            fs::create_dir(r.join("rm_empty")).unwrap();
            let rm = fs::remove_dir(r.join("rm_empty"));
            format!("{} / {}", out(rm, ok), stat(r, "rm_empty"))
        }),
        row("unlink a dir", |r| out(fs::remove_file(r.join("sub")), ok)),
        row("unlink missing", |r| {
            out(fs::remove_file(r.join("missing")), ok)
        }),
        row("unlink a file", |r| {
            write_file(r, "ul_file.txt", b"bye");
            let rm = fs::remove_file(r.join("ul_file.txt"));
            format!("{} / {}", out(rm, ok), stat(r, "ul_file.txt"))
        }),
        row("unlink a symlink keeps the target", |r| {
            write_file(r, "ul_target.txt", b"stays");
            std::os::unix::fs::symlink("ul_target.txt", r.join("ul_link")).unwrap();
            let rm = fs::remove_file(r.join("ul_link"));
            format!(
                "{} / {} / {}",
                out(rm, ok),
                lstat(r, "ul_link"),
                after(r, "ul_target.txt")
            )
        }),
        row("unlink one of two hard links", |r| {
            write_file(r, "ul_h1", b"linked");
            fs::hard_link(r.join("ul_h1"), r.join("ul_h2")).unwrap();
            let before = stat(r, "ul_h2");
            fs::remove_file(r.join("ul_h1")).unwrap();
            format!("{before} -> {}", after(r, "ul_h2"))
        }),
        row("unlinked open file stays readable and writable", |r| {
            write_file(r, "ul_open.txt", b"still here");
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(r.join("ul_open.txt"))
                .unwrap();
            fs::remove_file(r.join("ul_open.txt")).unwrap();
            f.write_all_at(b"STILL", 0).unwrap();
            let nlink = f.metadata().map(|m| m.nlink());
            format!(
                "{} nlink={} / {}",
                pread(&f, 100, 0),
                out(nlink, |n| n.to_string()),
                stat(r, "ul_open.txt")
            )
        }),
        // --- rename ----------------------------------------------------------
        row("rename plain", |r| {
            write_file(r, "rn_a", b"A");
            let rn = fs::rename(r.join("rn_a"), r.join("rn_b"));
            format!(
                "{} / {} / {}",
                out(rn, ok),
                stat(r, "rn_a"),
                after(r, "rn_b")
            )
        }),
        row("rename keeps the inode number", |r| {
            write_file(r, "rn_ino1", b"I");
            let before = ino(r, "rn_ino1");
            fs::rename(r.join("rn_ino1"), r.join("rn_ino2")).unwrap();
            format!("same_ino={}", before == ino(r, "rn_ino2"))
        }),
        row("rename over an existing file", |r| {
            write_file(r, "rn_c", b"from c");
            write_file(r, "rn_d", b"old d");
            let rn = fs::rename(r.join("rn_c"), r.join("rn_d"));
            format!(
                "{} / {} / {}",
                out(rn, ok),
                stat(r, "rn_c"),
                after(r, "rn_d")
            )
        }),
        row("rename across directories", |r| {
            fs::create_dir_all(r.join("rn_x/in")).unwrap();
            fs::create_dir(r.join("rn_y")).unwrap();
            write_file(r, "rn_x/in/f", b"moved");
            let rn = fs::rename(r.join("rn_x/in"), r.join("rn_y/in2"));
            format!(
                "{} / {} / {} / {}",
                out(rn, ok),
                list(r, "rn_x"),
                list(r, "rn_y"),
                after(r, "rn_y/in2/f")
            )
        }),
        row("rename dir over a non-empty dir", |r| {
            fs::create_dir_all(r.join("rn_d1")).unwrap();
            fs::create_dir_all(r.join("rn_d2")).unwrap();
            write_file(r, "rn_d1/f", b"1");
            write_file(r, "rn_d2/g", b"2");
            out(fs::rename(r.join("rn_d1"), r.join("rn_d2")), ok)
        }),
        row("rename dir over an empty dir", |r| {
            fs::create_dir_all(r.join("rn_d3")).unwrap();
            fs::create_dir_all(r.join("rn_d4")).unwrap();
            write_file(r, "rn_d3/f", b"3");
            let rn = fs::rename(r.join("rn_d3"), r.join("rn_d4"));
            format!(
                "{} / {} / {}",
                out(rn, ok),
                stat(r, "rn_d3"),
                list(r, "rn_d4")
            )
        }),
        row("rename file over a dir", |r| {
            write_file(r, "rn_f5", b"5");
            out(fs::rename(r.join("rn_f5"), r.join("empty_dir")), ok)
        }),
        row("rename dir over a file", |r| {
            fs::create_dir(r.join("rn_d6")).unwrap();
            out(fs::rename(r.join("rn_d6"), r.join("hello.txt")), ok)
        }),
        row("rename dir into its own subdir", |r| {
            fs::create_dir_all(r.join("rn_d7/inner")).unwrap();
            out(fs::rename(r.join("rn_d7"), r.join("rn_d7/inner/x")), ok)
        }),
        row("rename missing", |r| {
            out(fs::rename(r.join("missing"), r.join("rn_none")), ok)
        }),
        row("rename onto its own hard link", |r| {
            write_file(r, "rn_h1", b"h");
            fs::hard_link(r.join("rn_h1"), r.join("rn_h2")).unwrap();
            let rn = fs::rename(r.join("rn_h1"), r.join("rn_h2"));
            format!(
                "{} / {} / {}",
                out(rn, ok),
                stat(r, "rn_h1"),
                stat(r, "rn_h2")
            )
        }),
        row("rename a symlink", |r| {
            std::os::unix::fs::symlink("hello.txt", r.join("rn_l1")).unwrap();
            let rn = fs::rename(r.join("rn_l1"), r.join("rn_l2"));
            format!(
                "{} / {} / {}",
                out(rn, ok),
                lstat(r, "rn_l2"),
                readlink(r, "rn_l2")
            )
        }),
        row("open fd follows a renamed file", |r| {
            write_file(r, "rn_open1", b"follow me");
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(r.join("rn_open1"))
                .unwrap();
            fs::rename(r.join("rn_open1"), r.join("rn_open2")).unwrap();
            f.write_all_at(b"FOLLOW", 0).unwrap();
            drop(f);
            after(r, "rn_open2")
        }),
        row("RENAME_NOREPLACE onto existing", |r| {
            write_file(r, "rn_n1", b"n1");
            write_file(r, "rn_n2", b"n2");
            let rn = renameat2(r, "rn_n1", "rn_n2", libc::RENAME_NOREPLACE);
            format!(
                "{} / {} / {}",
                out(rn, ok),
                after(r, "rn_n1"),
                after(r, "rn_n2")
            )
        }),
        row("RENAME_NOREPLACE onto a new name", |r| {
            write_file(r, "rn_n3", b"n3");
            let rn = renameat2(r, "rn_n3", "rn_n4", libc::RENAME_NOREPLACE);
            format!("{} / {}", out(rn, ok), after(r, "rn_n4"))
        }),
        row("RENAME_EXCHANGE two files", |r| {
            write_file(r, "rn_x1", b"one");
            write_file(r, "rn_x2", b"two two");
            let (i1, i2) = (ino(r, "rn_x1"), ino(r, "rn_x2"));
            let rn = renameat2(r, "rn_x1", "rn_x2", libc::RENAME_EXCHANGE);
            let swapped = ino(r, "rn_x1") == i2 && ino(r, "rn_x2") == i1;
            format!(
                "{} / {} / {} / inodes_swapped={swapped}",
                out(rn, ok),
                after(r, "rn_x1"),
                after(r, "rn_x2")
            )
        }),
        row("RENAME_EXCHANGE file and dir", |r| {
            write_file(r, "rn_x3", b"file");
            fs::create_dir(r.join("rn_x4")).unwrap();
            write_file(r, "rn_x4/inside", b"in");
            let rn = renameat2(r, "rn_x3", "rn_x4", libc::RENAME_EXCHANGE);
            format!(
                "{} / {} / {} / {}",
                out(rn, ok),
                lstat(r, "rn_x3"),
                list(r, "rn_x3"),
                after(r, "rn_x4")
            )
        }),
        row("RENAME_EXCHANGE with a missing name", |r| {
            write_file(r, "rn_x5", b"5");
            out(
                renameat2(r, "rn_x5", "rn_x_missing", libc::RENAME_EXCHANGE),
                ok,
            )
        }),
        // --- symlink / readlink ----------------------------------------------
        row("symlink create and readlink", |r| {
            let s = std::os::unix::fs::symlink("sub/a.txt", r.join("sl_new"));
            format!(
                "{} / {} / {} / {}",
                out(s, ok),
                lstat(r, "sl_new"),
                readlink(r, "sl_new"),
                read(r, "sl_new")
            )
        }),
        row("symlink with a long target", |r| {
            let target = "t".repeat(3000);
            let s = std::os::unix::fs::symlink(&target, r.join("sl_long"));
            format!(
                "{} / {} / {}",
                out(s, ok),
                lstat(r, "sl_long"),
                out(fs::read_link(r.join("sl_long")), |t| format!(
                    "len={}",
                    t.as_os_str().len()
                ))
            )
        }),
        row("symlink with a unicode target", |r| {
            let s = std::os::unix::fs::symlink("ünïcödé 名前.txt", r.join("sl_uni"));
            format!(
                "{} / {} / {}",
                out(s, ok),
                readlink(r, "sl_uni"),
                read(r, "sl_uni")
            )
        }),
        row("symlink over an existing name", |r| {
            out(std::os::unix::fs::symlink("x", r.join("hello.txt")), ok)
        }),
        row("readlink of a file", |r| readlink(r, "hello.txt")),
        row("readlink of a dir", |r| readlink(r, "sub")),
        row("readlink missing", |r| readlink(r, "missing")),
        row("readlink exact targets", |r| {
            [
                "link_to_hello",
                "sub/up_link",
                "dangling",
                "etc",
                "link_to_sub/up_link",
            ]
            .iter()
            .map(|l| readlink(r, l))
            .collect::<Vec<_>>()
            .join(" | ")
        }),
        row("symlink loop", |r| {
            std::os::unix::fs::symlink("sl_loop", r.join("sl_loop")).unwrap();
            format!("{} / {}", stat(r, "sl_loop"), lstat(r, "sl_loop"))
        }),
        // --- link ------------------------------------------------------------
        row("link shares the inode", |r| {
            write_file(r, "ln_a", b"one inode");
            let l = fs::hard_link(r.join("ln_a"), r.join("ln_b"));
            let same = ino(r, "ln_a") == ino(r, "ln_b");
            format!(
                "{} / {} / {} / same_ino={same}",
                out(l, ok),
                stat(r, "ln_a"),
                stat(r, "ln_b")
            )
        }),
        row("write through one link, read the other", |r| {
            write_file(r, "ln_c", b"before");
            fs::hard_link(r.join("ln_c"), r.join("ln_d")).unwrap();
            write_file(r, "ln_c", b"after!");
            after(r, "ln_d")
        }),
        row("link fixture hard pair again", |r| {
            let l = fs::hard_link(r.join("hard_a"), r.join("hard_c"));
            let same = ino(r, "hard_a") == ino(r, "hard_c") && ino(r, "hard_b") == ino(r, "hard_c");
            format!("{} / {} / same_ino={same}", out(l, ok), stat(r, "hard_b"))
        }),
        row("link a dir", |r| {
            out(fs::hard_link(r.join("sub"), r.join("ln_dir")), ok)
        }),
        row("link onto an existing name", |r| {
            out(fs::hard_link(r.join("hello.txt"), r.join("exec.sh")), ok)
        }),
        row("link missing", |r| {
            out(fs::hard_link(r.join("missing"), r.join("ln_none")), ok)
        }),
        row("link a symlink links the symlink itself", |r| {
            let l = fs::hard_link(r.join("link_to_hello"), r.join("ln_sym"));
            format!(
                "{} / {} / {}",
                out(l, ok),
                lstat(r, "ln_sym"),
                readlink(r, "ln_sym")
            )
        }),
        // --- chmod / chown ---------------------------------------------------
        row("chmod 0600", |r| {
            write_file(r, "cm_a", b"");
            set_mode(&r.join("cm_a"), 0o600);
            stat(r, "cm_a")
        }),
        row("chmod setuid, setgid and sticky", |r| {
            write_file(r, "cm_b", b"");
            set_mode(&r.join("cm_b"), 0o6755);
            fs::create_dir(r.join("cm_dir")).unwrap();
            set_mode(&r.join("cm_dir"), 0o1777);
            format!("{} / {}", stat(r, "cm_b"), stat(r, "cm_dir"))
        }),
        row("chmod through a symlink changes the target", |r| {
            write_file(r, "cm_t", b"");
            std::os::unix::fs::symlink("cm_t", r.join("cm_l")).unwrap();
            set_mode(&r.join("cm_l"), 0o640);
            format!("{} / {}", lstat(r, "cm_l"), stat(r, "cm_t"))
        }),
        row("chmod missing", |r| {
            let p = fs::Permissions::from_mode(0o644);
            out(fs::set_permissions(r.join("missing"), p), ok)
        }),
        row("fchmod on an open fd", |r| {
            let f = File::create(r.join("cm_fd")).unwrap();
            let c = f.set_permissions(fs::Permissions::from_mode(0o604));
            format!("{} / {}", out(c, ok), stat(r, "cm_fd"))
        }),
        row("chown to nobody", |r| {
            write_file(r, "co_a", b"");
            let c = std::os::unix::fs::chown(r.join("co_a"), Some(NOBODY), Some(NOGROUP));
            format!("{} / {}", out(c, ok), stat(r, "co_a"))
        }),
        row("chown group only", |r| {
            write_file(r, "co_b", b"");
            let c = std::os::unix::fs::chown(r.join("co_b"), None, Some(NOGROUP));
            format!("{} / {}", out(c, ok), stat(r, "co_b"))
        }),
        row("chown clears setuid", |r| {
            write_file(r, "co_c", b"");
            set_mode(&r.join("co_c"), 0o4755);
            let c = std::os::unix::fs::chown(r.join("co_c"), Some(NOBODY), None);
            format!("{} / {}", out(c, ok), stat(r, "co_c"))
        }),
        row("lchown a symlink", |r| {
            std::os::unix::fs::symlink("hello.txt", r.join("co_l")).unwrap();
            let c = std::os::unix::fs::lchown(r.join("co_l"), Some(NOBODY), Some(NOGROUP));
            format!(
                "{} / {} / {}",
                out(c, ok),
                lstat(r, "co_l"),
                stat(r, "hello.txt")
            )
        }),
        // --- utimens ---------------------------------------------------------
        row("utimens fixed times", |r| {
            write_file(r, "ut_a", b"");
            let u = utimens(
                &r.join("ut_a"),
                (1_000_000_000, 5),
                (1_234_567_890, 123_456_789),
                0,
            );
            let m = fs::metadata(r.join("ut_a")).unwrap();
            format!(
                "{} {} atime={}.{:09}",
                out(u, ok),
                mtime(&m),
                m.atime(),
                m.atime_nsec()
            )
        }),
        row("utimens omitting mtime keeps it", |r| {
            write_file(r, "ut_b", b"");
            utimens(&r.join("ut_b"), (5, 0), (1_500_000_000, 1), 0).unwrap();
            let u = utimens(&r.join("ut_b"), (7, 0), (0, libc::UTIME_OMIT), 0);
            let m = fs::metadata(r.join("ut_b")).unwrap();
            format!("{} {}", out(u, ok), mtime(&m))
        }),
        // fuser 0.18 decodes a pre-1970 SETATTR time as -(|sec| + nsec) instead
        // of sec + nsec; the adapter undoes it.
        row("utimens before 1970", |r| {
            write_file(r, "ut_c", b"");
            let u = utimens(&r.join("ut_c"), (-1000, 0), (-1_000_000, 500), 0);
            let m = fs::metadata(r.join("ut_c")).unwrap();
            format!("{} {}", out(u, ok), mtime(&m))
        }),
        row("utimens whole seconds before 1970", |r| {
            write_file(r, "ut_c2", b"");
            let u = utimens(&r.join("ut_c2"), (-1000, 0), (-86400, 0), 0);
            let m = fs::metadata(r.join("ut_c2")).unwrap();
            format!("{} {}", out(u, ok), mtime(&m))
        }),
        row("utimens in 2100", |r| {
            write_file(r, "ut_d", b"");
            let u = utimens(
                &r.join("ut_d"),
                (4_102_444_800, 0),
                (4_102_444_800, 999_999_999),
                0,
            );
            let m = fs::metadata(r.join("ut_d")).unwrap();
            format!("{} {}", out(u, ok), mtime(&m))
        }),
        row("utimens on a dir", |r| {
            fs::create_dir(r.join("ut_dir")).unwrap();
            let u = utimens(&r.join("ut_dir"), (1, 0), (2_000_000_000, 42), 0);
            let m = fs::metadata(r.join("ut_dir")).unwrap();
            format!("{} {}", out(u, ok), mtime(&m))
        }),
        row("utimens on a symlink itself", |r| {
            std::os::unix::fs::symlink("hello.txt", r.join("ut_l")).unwrap();
            let u = utimens(
                &r.join("ut_l"),
                (1, 0),
                (1_111_111_111, 0),
                libc::AT_SYMLINK_NOFOLLOW,
            );
            let m = fs::symlink_metadata(r.join("ut_l")).unwrap();
            format!("{} {}", out(u, ok), mtime(&m))
        }),
        row("utimens missing", |r| {
            out(utimens(&r.join("missing"), (1, 0), (1, 0), 0), ok)
        }),
        // --- statfs / access -------------------------------------------------
        row("statfs", |r| {
            let c = cpath(r);
            let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
            // SAFETY: valid path and output buffer.
            let ret = check(unsafe { libc::statvfs(c.as_ptr(), &mut s) });
            out(ret, |_| {
                format!("ok bsize={} namemax={}", s.f_bsize, s.f_namemax)
            })
        }),
        row("access as root", |r| {
            [
                "hello.txt",
                "secret.txt",
                "exec.sh",
                "noperm.txt",
                "sub",
                "missing",
                "dangling",
            ]
            .iter()
            .map(|f| format!("{f}: {}", access(&r.join(f))))
            .collect::<Vec<_>>()
            .join(" | ")
        }),
        row("access as nobody: 0644", |r| nobody_rwx(r, "hello.txt")),
        row("access as nobody: 0600", |r| nobody_rwx(r, "secret.txt")),
        row("access as nobody: 0755", |r| nobody_rwx(r, "exec.sh")),
        row("access as nobody: 0666", |r| nobody_rwx(r, "world.txt")),
        row("access as nobody: own file", |r| {
            nobody_rwx(r, "nobodys.txt")
        }),
        row("access as nobody: dir 0755", |r| nobody_rwx(r, "sub")),
        row("access as nobody: via symlink", |r| {
            nobody_rwx(r, "link_to_hello")
        }),
        row("access as nobody: via /etc link", |r| {
            nobody_rwx(r, "etc/hostname")
        }),
        row("nobody writes, creates and deletes", |r| {
            fs::create_dir(r.join("nb_sticky")).unwrap();
            set_mode(&r.join("nb_sticky"), 0o1777);
            write_file(r, "nb_sticky/roots.txt", b"root's");
            let script = "cd \"$1\" || exit 9; \
                echo x >> \"$2\" && echo append_0666; \
                echo x >> \"$3\" || echo append_0644_refused; \
                echo mine > mine.txt && echo created; \
                mkdir mydir && echo mkdir; \
                ln -s mine.txt mylink && echo symlink; \
                mv mine.txt moved.txt && echo rename; \
                rm roots.txt 2>/dev/null || echo sticky_refused; \
                ln roots.txt hl 2>/dev/null || echo hardlink_refused; \
                chmod 777 roots.txt 2>/dev/null || echo chmod_refused; \
                touch -c roots.txt 2>/dev/null || echo touch_refused; \
                touch -c -d @0 roots.txt 2>/dev/null || echo settime_refused; \
                touch \"$1/../newfile\" 2>/dev/null || echo parent_refused; true";
            let res = as_nobody(
                script,
                &[
                    r.join("nb_sticky"),
                    r.join("world.txt"),
                    r.join("hello.txt"),
                ],
            );
            format!(
                "{res} / {} / {} / {} / {}",
                list(r, "nb_sticky"),
                lstat(r, "nb_sticky/moved.txt"),
                lstat(r, "nb_sticky/mydir"),
                lstat(r, "nb_sticky/mylink")
            )
        }),
        row("exec a script", |r| {
            out(Command::new(r.join("exec.sh")).output(), |o| {
                format!(
                    "ok exit={:?} {:?}",
                    o.status.code(),
                    String::from_utf8_lossy(&o.stdout)
                )
            })
        }),
        row("exec a 0644 file", |r| {
            out(Command::new(r.join("hello.txt")).output(), ok)
        }),
        // --- xattrs ----------------------------------------------------------
        row("getxattr", |r| {
            out(
                getxattr(&r.join("xattr.txt"), "user.color", 64, true),
                |v| format!("ok {}", show_bytes(&v)),
            )
        }),
        row("getxattr size query", |r| {
            out(getxattr_size(&r.join("xattr.txt"), "user.color"), |n| {
                format!("ok {n}")
            })
        }),
        row("getxattr empty value", |r| {
            out(
                getxattr(&r.join("xattr.txt"), "user.empty", 64, true),
                |v| format!("ok {}", show_bytes(&v)),
            )
        }),
        row("getxattr buffer too small", |r| {
            out(getxattr(&r.join("xattr.txt"), "user.color", 2, true), |v| {
                format!("ok {}", show_bytes(&v))
            })
        }),
        row("getxattr missing name", |r| {
            out(getxattr(&r.join("xattr.txt"), "user.nope", 64, true), |v| {
                format!("ok {}", show_bytes(&v))
            })
        }),
        row("getxattr of a missing file", |r| {
            out(getxattr(&r.join("missing"), "user.color", 64, true), ok)
        }),
        row("listxattr", |r| {
            out(listxattr(&r.join("xattr.txt"), true), |v| {
                format!("ok {v:?}")
            })
        }),
        row("listxattr of a file without xattrs", |r| {
            out(listxattr(&r.join("hello.txt"), true), |v| {
                format!("ok {v:?}")
            })
        }),
        row(
            "setxattr new, replace, create-existing, replace-missing",
            |r| {
                write_file(r, "xa_a", b"");
                let p = r.join("xa_a");
                let ok = |x: io::Result<()>| out(x, ok);
                let a = ok(setxattr(&p, "user.k", b"v1", 0, true));
                let b = ok(setxattr(&p, "user.k", b"value2", libc::XATTR_REPLACE, true));
                let c = ok(setxattr(&p, "user.k", b"v3", libc::XATTR_CREATE, true));
                let d = ok(setxattr(&p, "user.other", b"v4", libc::XATTR_REPLACE, true));
                let big = ok(setxattr(&p, "user.big", &[7u8; 3000], 0, true));
                format!("{a} {b} {c} {d} {big} / {}", xattrs_of(&p))
            },
        ),
        row("removexattr", |r| {
            write_file(r, "xa_b", b"");
            let p = r.join("xa_b");
            setxattr(&p, "user.a", b"1", 0, true).unwrap();
            setxattr(&p, "user.b", b"2", 0, true).unwrap();
            let a = out(removexattr(&p, "user.a"), ok);
            let b = out(removexattr(&p, "user.a"), ok);
            format!("{a} {b} / {}", xattrs_of(&p))
        }),
        row("xattrs on a dir", |r| {
            fs::create_dir(r.join("xa_dir")).unwrap();
            let p = r.join("xa_dir");
            let s = out(setxattr(&p, "user.d", b"dir", 0, true), ok);
            format!("{s} / {}", xattrs_of(&p))
        }),
        row("trusted.* xattr as root", |r| {
            write_file(r, "xa_t", b"");
            let p = r.join("xa_t");
            let s = out(setxattr(&p, "trusted.t", b"root only", 0, true), ok);
            format!("{s} / {}", xattrs_of(&p))
        }),
        row("getxattr follows a symlink", |r| {
            std::os::unix::fs::symlink("xattr.txt", r.join("xa_link")).unwrap();
            out(getxattr(&r.join("xa_link"), "user.color", 64, true), |v| {
                format!("ok {}", show_bytes(&v))
            })
        }),
        row("lgetxattr user.* of a symlink", |r| {
            out(
                getxattr(&r.join("link_to_hello"), "user.color", 64, false),
                |v| format!("ok {}", show_bytes(&v)),
            )
        }),
        row("lsetxattr user.* on a symlink", |r| {
            let s = setxattr(&r.join("link_to_hello"), "user.x", b"1", 0, false);
            out(s, ok)
        }),
        // trusted.* is allowed on a symlink itself (root): set, read back,
        // listed, on the link and not on what it points at.
        row(
            "lsetxattr/lgetxattr/llistxattr trusted.* on a symlink",
            |r| {
                std::os::unix::fs::symlink("hello.txt", r.join("xa_tlink")).unwrap();
                let p = r.join("xa_tlink");
                let set = out(setxattr(&p, "trusted.l", b"on the link", 0, false), ok);
                let got = out(getxattr(&p, "trusted.l", 64, false), |v| {
                    format!("ok {}", show_bytes(&v))
                });
                let listed = out(listxattr(&p, false), |v| format!("ok {v:?}"));
                let target = out(getxattr(&p, "trusted.l", 64, true), |v| {
                    format!("ok {}", show_bytes(&v))
                });
                let removed = out(lremovexattr(&p, "trusted.l"), ok);
                let after = out(listxattr(&p, false), |v| format!("ok {v:?}"));
                format!("{set} / {got} / {listed} / target {target} / {removed} / {after}")
            },
        ),
        // Every xattr call on a FIFO: user.* is refused by the kernel for
        // anything but files and folders; trusted.* works (root).
        row("xattrs on a FIFO", |r| {
            let p = r.join("xa_fifo");
            let c = cpath(&p);
            // SAFETY: a valid path.
            assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
            let user = out(setxattr(&p, "user.f", b"1", 0, false), ok);
            let trusted = out(setxattr(&p, "trusted.f", b"1", 0, false), ok);
            let got = out(getxattr(&p, "trusted.f", 64, false), |v| {
                format!("ok {}", show_bytes(&v))
            });
            let listed = out(listxattr(&p, false), |v| format!("ok {v:?}"));
            let removed = out(lremovexattr(&p, "trusted.f"), ok);
            format!("{user} / {trusted} / {got} / {listed} / {removed}")
        }),
        row("llistxattr of a symlink", |r| {
            out(listxattr(&r.join("link_to_hello"), false), |v| {
                format!("ok {v:?}")
            })
        }),
        row("xattrs as nobody", |r| {
            write_file(r, "xa_nb", b"");
            chown(&r.join("xa_nb"), NOBODY, NOGROUP);
            // One line per call: the value, or the errno name.
            let code = r#"
import errno, os, sys
def t(f):
    try:
        r = f()
        return "ok" if r is None else repr(r)
    except OSError as e:
        return errno.errorcode[e.errno]
root, own = sys.argv[1], sys.argv[2]
print(t(lambda: sorted(os.listxattr(root))).replace(" ", ""))
print(t(lambda: os.getxattr(root, "user.color")))
print(t(lambda: os.setxattr(root, "user.color", b"red")))
print(t(lambda: os.setxattr(own, "user.mine", b"1")))
print(t(lambda: os.getxattr(own, "user.mine")))
print(t(lambda: os.setxattr(own, "trusted.x", b"1")))
print(t(lambda: os.removexattr(own, "user.mine")))
"#;
            let script = "exec /usr/bin/python3 -c \"$1\" \"$2\" \"$3\"";
            let args = [PathBuf::from(code), r.join("xattr.txt"), r.join("xa_nb")];
            as_nobody(script, &args)
        }),
        // --- mmap ------------------------------------------------------------
        row("mmap MAP_PRIVATE read", |r| {
            let f = File::open(r.join("data.bin")).unwrap();
            out(
                mmap(&f, DATA_LEN, libc::PROT_READ, libc::MAP_PRIVATE),
                |p| {
                    // SAFETY: the mapping holds DATA_LEN readable bytes.
                    let s = unsafe { std::slice::from_raw_parts(p, DATA_LEN) };
                    let d = show_bytes(s);
                    munmap(p, DATA_LEN);
                    format!("ok {d}")
                },
            )
        }),
        row("mmap MAP_PRIVATE write stays private", |r| {
            write_file(r, "mm_priv.txt", b"private mapping");
            let f = File::open(r.join("mm_priv.txt")).unwrap();
            let prot = libc::PROT_READ | libc::PROT_WRITE;
            let m = out(mmap(&f, 15, prot, libc::MAP_PRIVATE), |p| {
                // SAFETY: 15 writable bytes.
                let s = unsafe { std::slice::from_raw_parts_mut(p, 15) };
                s[..7].copy_from_slice(b"CHANGED");
                let d = show_bytes(s);
                munmap(p, 15);
                format!("ok {d}")
            });
            format!("{m} / {}", after(r, "mm_priv.txt"))
        }),
        row("mmap MAP_SHARED write, msync, munmap", |r| {
            write_file(r, "mm_shared.bin", &pseudo_random(3 * 4096 + 100, 5));
            let len = 3 * 4096 + 100;
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(r.join("mm_shared.bin"))
                .unwrap();
            let prot = libc::PROT_READ | libc::PROT_WRITE;
            let m = out(mmap(&f, len, prot, libc::MAP_SHARED), |p| {
                // SAFETY: `len` writable bytes.
                let s = unsafe { std::slice::from_raw_parts_mut(p, len) };
                s[10..20].copy_from_slice(b"0123456789");
                s[4096 * 2 + 5] = b'!';
                s[len - 1] = b'$';
                // SAFETY: the mapping made above.
                let synced = check(unsafe { libc::msync(p.cast(), len, libc::MS_SYNC) });
                munmap(p, len);
                out(synced, ok)
            });
            drop(f);
            format!("{m} / {}", after(r, "mm_shared.bin"))
        }),
        row("mmap MAP_SHARED write on a read-only fd", |r| {
            let f = File::open(r.join("hello.txt")).unwrap();
            let prot = libc::PROT_READ | libc::PROT_WRITE;
            out(mmap(&f, 5, prot, libc::MAP_SHARED), |p| {
                munmap(p, 5);
                "ok".into()
            })
        }),
        // --- names -----------------------------------------------------------
        row("names with spaces, unicode and odd bytes", |r| {
            fs::create_dir(r.join("nm")).unwrap();
            let names: [&OsStr; 8] = [
                OsStr::new("with space"),
                OsStr::new("  leading and trailing  "),
                OsStr::new("ünïcödé 名前 🚀"),
                OsStr::new("-dash"),
                OsStr::new("..."),
                OsStr::new("new\nline"),
                OsStr::new("back\\slash"),
                OsStr::from_bytes(b"not-utf8-\xff\xfe"),
            ];
            let made: Vec<String> = names
                .iter()
                .map(|n| out(fs::write(r.join("nm").join(n), n.as_bytes()), ok))
                .collect();
            let back: Vec<String> = names
                .iter()
                .map(|n| {
                    out(fs::read(r.join("nm").join(n)), |d| {
                        (d == n.as_bytes()).to_string()
                    })
                })
                .collect();
            format!("{made:?} {back:?} / {}", list(r, "nm"))
        }),
        row("255-byte name", |r| {
            let name = "n".repeat(255);
            let w = fs::write(r.join(&name), b"long");
            format!("{} / {}", out(w, ok), read(r, &name))
        }),
        row("256-byte name", |r| {
            let name = "n".repeat(256);
            format!(
                "{} / {}",
                out(fs::write(r.join(&name), b"x"), ok),
                stat(r, &name)
            )
        }),
        row("2000-byte name", |r| stat(r, &"n".repeat(2000))),
        row("rename to a unicode name", |r| {
            write_file(r, "nm_plain", b"p");
            let to = OsString::from("nm_ünï 名.txt");
            let rn = fs::rename(r.join("nm_plain"), r.join(&to));
            format!("{} / {}", out(rn, ok), read(r, "nm_ünï 名.txt"))
        }),
        // --- what the kernel caches ------------------------------------------
        row("dir mtime moves on create, unlink and rename", |r| {
            fs::create_dir(r.join("dm")).unwrap();
            let m = |r: &Path| {
                // Timestamps come from a coarse clock: let it tick.
                std::thread::sleep(std::time::Duration::from_millis(20));
                let m = fs::metadata(r.join("dm")).unwrap();
                (m.mtime(), m.mtime_nsec())
            };
            let t0 = m(r);
            write_file(r, "dm/f", b"");
            let t1 = m(r);
            fs::rename(r.join("dm/f"), r.join("dm/g")).unwrap();
            let t2 = m(r);
            fs::remove_file(r.join("dm/g")).unwrap();
            let t3 = m(r);
            let _ = fs::read_dir(r.join("dm")).unwrap().count();
            let t4 = m(r);
            format!(
                "create={} rename={} unlink={} listing_keeps_it={}",
                t1 != t0,
                t2 != t1,
                t3 != t2,
                t4 == t3
            )
        }),
        row("rename over a hard-linked file drops its nlink", |r| {
            write_file(r, "kc_a", b"a");
            fs::hard_link(r.join("kc_a"), r.join("kc_b")).unwrap();
            write_file(r, "kc_new", b"new");
            let before = stat(r, "kc_b");
            fs::rename(r.join("kc_new"), r.join("kc_a")).unwrap();
            format!("{before} -> {} / {}", stat(r, "kc_b"), after(r, "kc_a"))
        }),
        row("truncate through one link, stat the other", |r| {
            write_file(r, "kc_t1", b"0123456789");
            fs::hard_link(r.join("kc_t1"), r.join("kc_t2")).unwrap();
            let _ = stat(r, "kc_t2");
            let f = OpenOptions::new()
                .write(true)
                .open(r.join("kc_t1"))
                .unwrap();
            f.set_len(3).unwrap();
            drop(f);
            after(r, "kc_t2")
        }),
        row("listing of a dir refreshed after each change", |r| {
            fs::create_dir(r.join("kc_dir")).unwrap();
            let mut seen = vec![list(r, "kc_dir")];
            write_file(r, "kc_dir/one", b"");
            seen.push(list(r, "kc_dir"));
            fs::create_dir(r.join("kc_dir/two")).unwrap();
            seen.push(list(r, "kc_dir"));
            fs::rename(r.join("kc_dir/one"), r.join("kc_dir/uno")).unwrap();
            seen.push(list(r, "kc_dir"));
            fs::rename(r.join("kc_dir/two"), r.join("kc_moved")).unwrap();
            seen.push(list(r, "kc_dir"));
            fs::remove_file(r.join("kc_dir/uno")).unwrap();
            seen.push(list(r, "kc_dir"));
            seen.join(" -> ")
        }),
        row("a name removed and made again is the new file", |r| {
            write_file(r, "kc_re", b"first");
            let _ = read(r, "kc_re");
            fs::remove_file(r.join("kc_re")).unwrap();
            fs::create_dir(r.join("kc_re")).unwrap();
            let as_dir = stat(r, "kc_re");
            fs::remove_dir(r.join("kc_re")).unwrap();
            write_file(r, "kc_re", b"second, longer");
            format!("{as_dir} / {}", after(r, "kc_re"))
        }),
        // --- the whole tree once more ----------------------------------------
        row("readdir root at the end", |r| list(r, "")),
        row("readdir sub at the end", |r| list(r, "sub")),
    ]
}

// ---------------------------------------------------------------------------
// Running and comparing
// ---------------------------------------------------------------------------

fn run(op: Op, root: &Path) -> String {
    let result = std::panic::catch_unwind(|| op(root));
    let text = match result {
        Ok(s) => s,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            format!("panic: {msg}")
        }
    };
    // Descriptions are relative; this only guards against a stray path.
    text.replace(&*root.to_string_lossy(), "<root>")
}

/// One line per entry of the tree under `root` (symlinks not followed):
/// name, type, mode, owner, size, content checksum or link target, xattrs.
fn tree(root: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let mut entries: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap()).collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap();
            let m = fs::symlink_metadata(&p).unwrap();
            let t = m.file_type();
            let what = if t.is_symlink() {
                format!("-> {:?}", fs::read_link(&p).unwrap())
            } else if t.is_file() {
                let (h, len) = checksum(&p);
                format!("len={len} fnv={h:016x} xattrs={}", xattrs_of(&p))
            } else if t.is_dir() {
                format!("xattrs={}", xattrs_of(&p))
            } else {
                format!("rdev={}", m.rdev())
            };
            out.push(format!(
                "{rel:?} {} mode={:o} uid={} gid={} size={} {what}",
                kind(t),
                m.mode() & 0o7777,
                m.uid(),
                m.gid(),
                if t.is_dir() { 0 } else { m.size() },
            ));
            if t.is_dir() {
                walk(root, &p, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out
}

fn tree_differences(a: &Path, b: &Path) -> Vec<String> {
    let (ta, tb) = (tree(a), tree(b));
    let mut diffs: Vec<String> = ta
        .iter()
        .filter(|l| !tb.contains(l))
        .map(|l| format!("  only in plain dir:   {l}"))
        .collect();
    diffs.extend(
        tb.iter()
            .filter(|l| !ta.contains(l))
            .map(|l| format!("  only in backing dir: {l}")),
    );
    diffs
}

/// Tests run in parallel: each checks only its own mount point.
fn no_mount_left(mountpoint: &Path) {
    assert!(
        !our_mount_at(mountpoint),
        "a mount is left at {}",
        mountpoint.display()
    );
}

/// How the mount under test is made.
enum Layout<'a> {
    /// `mount --backing B M`.
    Separate(&'a [&'a str]),
    /// `mount DIR` over the directory itself.
    InPlace(&'a [&'a str]),
}

/// Runs the whole table on a plain directory and on a mount of an identical
/// copy, then compares the two trees; one assertion lists every difference.
fn conformance(layout: Layout) {
    let tmp = shared_tempdir();
    let t = tmp.path().canonicalize().unwrap();
    let d = t.join("plain");
    let (b, mnt) = match layout {
        Layout::Separate(_) => (t.join("backing"), t.join("mnt")),
        Layout::InPlace(_) => (t.join("in_place"), t.join("in_place")),
    };
    {
        let _guard = umask_lock();
        set_umask(0o022);
        for dir in [&d, &b, &mnt] {
            if !dir.exists() {
                fs::create_dir(dir).unwrap();
            }
            set_mode(dir, 0o755);
        }
        fixture(&d);
        fixture(&b);
    }
    assert!(
        tree_differences(&d, &b).is_empty(),
        "the two fixtures differ"
    );

    let m = match layout {
        Layout::Separate(extra) => Mounted::separate(&b, &mnt, extra),
        Layout::InPlace(extra) => Mounted::in_place(&mnt, extra),
    };
    let show = std::env::var_os("CONFORMANCE_SHOW").is_some();
    let mut mismatches = Vec::new();
    let rows = table();
    for (name, op) in &rows {
        // Both sides of a row see the same umask, whatever other tests do.
        let _guard = umask_lock();
        set_umask(0o022);
        let want = run(*op, &d);
        let got = run(*op, &m.mountpoint);
        if show {
            eprintln!("{name}\n    plain: {want}\n    mount: {got}");
        }
        if want != got {
            mismatches.push(format!("{name}\n    plain: {want}\n    mount: {got}"));
        }
    }
    let mountpoint = m.mountpoint.clone();
    m.unmount();
    no_mount_left(&mountpoint);

    let tree_diffs = tree_differences(&d, &b);
    assert!(
        mismatches.is_empty() && tree_diffs.is_empty(),
        "{} of {} rows differ between a plain directory and the mount:\n{}\n\n\
         final trees (plain dir vs backing dir), {} differences:\n{}",
        mismatches.len(),
        rows.len(),
        mismatches.join("\n"),
        tree_diffs.len(),
        tree_diffs.join("\n")
    );
}

// allow_other everywhere: some rows run processes as nobody.

#[test]
fn every_operation_behaves_as_on_a_plain_directory() {
    if common::needs_root("passthrough mode and chown") {
        return;
    }
    conformance(Layout::Separate(&["--allow-other"]));
}

/// A long metadata TTL also keeps directory listings in the kernel.
#[test]
fn every_operation_behaves_as_on_a_plain_directory_with_cached_metadata() {
    if common::needs_root("passthrough mode and chown") {
        return;
    }
    conformance(Layout::Separate(&["--allow-other", "--metadata-ttl", "60"]));
}

/// Copy mode: the daemon answers every read (a root daemon otherwise
/// uses passthrough, where the kernel reads and writes backing files).
#[test]
fn every_operation_behaves_as_on_a_plain_directory_in_copy_mode() {
    if common::needs_root("changes owners (chown) as the table asks") {
        return;
    }
    conformance(Layout::Separate(&["--allow-other", "--passthrough", "off"]));
}

#[test]
fn every_operation_behaves_as_on_a_plain_directory_mounted_in_place() {
    if common::needs_root("passthrough mode and chown") {
        return;
    }
    conformance(Layout::InPlace(&["--allow-other"]));
}

// ---------------------------------------------------------------------------
// Symlinks that point outside
// ---------------------------------------------------------------------------

/// What a user sees through the links of a tree: every line must be the
/// same on the plain directory and through the mount. `t` (the temp dir
/// holding both) is shown as `<tmp>`.
fn escape_observations(root: &Path, t: &Path) -> Vec<String> {
    let tmp_name = t.file_name().unwrap().to_str().unwrap();
    let hide = |s: String| s.replace(&*t.to_string_lossy(), "<tmp>");
    let mut obs = Vec::new();
    let mut note = |label: &str, value: String| obs.push(format!("{label}: {}", hide(value)));

    for link in ["etc", "up", "abs_outside", "sub/rel_outside", "dir_outside"] {
        note(&format!("lstat {link}"), lstat(root, link));
        note(&format!("readlink {link}"), readlink(root, link));
    }
    note("read etc/hostname", read(root, "etc/hostname"));
    note("read etc/passwd", read(root, "etc/passwd"));
    note("read abs_outside", read(root, "abs_outside"));
    note("read sub/rel_outside", read(root, "sub/rel_outside"));
    let via_up = format!("up/{tmp_name}/outside.txt");
    note("read up/<tmp>/outside.txt", read(root, &via_up));
    note("stat outside.txt by name", stat(root, "outside.txt"));

    // `..` is resolved by the kernel's path walk on both sides: from the
    // root it reaches the real parent directory, never anything the daemon
    // chose.
    let dir = File::open(root).unwrap();
    let parent = {
        // SAFETY: valid dir fd and NUL-terminated name.
        let fd = check(unsafe {
            libc::openat(
                dir.as_raw_fd(),
                c"..".as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        });
        out(
            fd.map(|fd| {
                // SAFETY: a descriptor just opened and now owned.
                let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
                let m = f.metadata().unwrap();
                let real = fs::metadata(t).unwrap();
                (m.dev(), m.ino()) == (real.dev(), real.ino())
            }),
            |same| format!("ok is_the_temp_dir={same}"),
        )
    };
    note("openat(root, \"..\")", parent);
    for name in ["../outside.txt", "outside.txt", "sub/../../outside.txt"] {
        let c = CString::new(name).unwrap();
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid dir fd, name and output buffer.
        let r = check(unsafe { libc::fstatat(dir.as_raw_fd(), c.as_ptr(), &mut st, 0) });
        let real = fs::metadata(t.join("outside.txt")).unwrap();
        note(
            &format!("fstatat(root, {name:?})"),
            out(r, |_| {
                format!(
                    "ok is_outside_txt={}",
                    (st.st_dev, st.st_ino) == (real.dev(), real.ino())
                )
            }),
        );
    }

    // A symlink made here behaves as any other.
    let made = std::os::unix::fs::symlink("/etc/passwd", root.join("new_link"));
    note("symlink new_link -> /etc/passwd", out(made, ok));
    note("readlink new_link", readlink(root, "new_link"));
    note("read new_link", read(root, "new_link"));
    // A hard link of a link is the link, not what it points to.
    let hl = fs::hard_link(root.join("etc"), root.join("etc_hard"));
    note("link etc etc_hard", out(hl, ok));
    note("lstat etc_hard", lstat(root, "etc_hard"));
    note("readlink etc_hard", readlink(root, "etc_hard"));
    let rn = fs::rename(root.join("etc_hard"), root.join("etc_renamed"));
    note("rename etc_hard", out(rn, ok));
    note("readlink etc_renamed", readlink(root, "etc_renamed"));
    // A write through a link to an outside directory lands there, as the
    // link says; cleaned up so the other side starts the same.
    let w = fs::write(root.join("dir_outside/via_link.txt"), b"through the link");
    note("write dir_outside/via_link.txt", out(w, ok));
    let landed = t.join("outside_dir/via_link.txt");
    note(
        "landed in the outside dir",
        out(fs::read(&landed), |d| format!("ok {}", show_bytes(&d))),
    );
    let _ = fs::remove_file(&landed);
    // Removing a link removes only the link.
    let rm = fs::remove_file(root.join("abs_outside"));
    note("unlink abs_outside", out(rm, ok));
    note("outside.txt still there", stat(t, "outside.txt"));
    note("tree", format!("{:?}", tree(root)));
    obs
}

/// A directory replaced by a symlink to /etc in the backing dir (behind the
/// mount): a descriptor opened before still names the old directory, as on
/// a plain directory, so the daemon never resolves the new link itself; once
/// the metadata TTL (1 s) has passed the name is the link, as on D.
fn swap_observations(root: &Path, backing: &Path) -> Vec<String> {
    let dir = File::open(root.join("swapped")).unwrap();
    fs::rename(backing.join("swapped"), backing.join("swapped_old")).unwrap();
    std::os::unix::fs::symlink("/etc", backing.join("swapped")).unwrap();
    let open_in = |name: &std::ffi::CStr| {
        // SAFETY: valid dir fd and NUL-terminated name.
        let fd = check(unsafe {
            libc::openat(
                dir.as_raw_fd(),
                name.as_ptr(),
                libc::O_RDONLY | libc::O_CLOEXEC,
            )
        });
        out(fd, |fd| {
            // SAFETY: a descriptor just opened and now owned.
            let mut f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            let mut data = Vec::new();
            f.read_to_end(&mut data).unwrap();
            format!("ok {}", show_bytes(&data))
        })
    };
    let mut obs = vec![
        format!("old dir fd: passwd: {}", open_in(c"passwd")),
        format!("old dir fd: inside.txt: {}", open_in(c"inside.txt")),
    ];
    std::thread::sleep(std::time::Duration::from_millis(1500));
    obs.push(format!(
        "after TTL: lstat swapped: {}",
        lstat(root, "swapped")
    ));
    obs.push(format!(
        "after TTL: swapped/passwd: {}",
        read(root, "swapped/passwd")
    ));
    obs
}

#[test]
fn symlinks_lead_where_they_point_and_nothing_else_leaves_the_backing_dir() {
    use std::os::unix::fs::symlink;
    let tmp = shared_tempdir();
    let t = tmp.path().canonicalize().unwrap();
    let (d, b, mnt) = (t.join("plain"), t.join("backing"), t.join("mnt"));
    let outside = t.join("outside.txt");
    {
        let _guard = umask_lock();
        set_umask(0o022);
        for dir in [&d, &b, &mnt, &t.join("outside_dir")] {
            fs::create_dir(dir).unwrap();
        }
        fs::write(&outside, b"outside the backing dir\n").unwrap();
        for root in [&d, &b] {
            fs::create_dir(root.join("sub")).unwrap();
            fs::write(root.join("sub/inside.txt"), b"inside\n").unwrap();
            fs::create_dir(root.join("swapped")).unwrap();
            fs::write(root.join("swapped/inside.txt"), b"old dir\n").unwrap();
            symlink("/etc", root.join("etc")).unwrap();
            symlink("../..", root.join("up")).unwrap();
            symlink(&outside, root.join("abs_outside")).unwrap();
            symlink("../../outside.txt", root.join("sub/rel_outside")).unwrap();
            symlink(t.join("outside_dir"), root.join("dir_outside")).unwrap();
        }
    }

    let m = Mounted::separate(&b, &mnt, &[]);
    let mut plain = escape_observations(&d, &t);
    let mut mounted = escape_observations(&m.mountpoint, &t);
    plain.extend(swap_observations(&d, &d));
    mounted.extend(swap_observations(&m.mountpoint, &b));

    // The links read the host's files through the mount exactly as they do
    // on a plain directory.
    let hostname = fs::read("/etc/hostname").unwrap();
    assert_eq!(fs::read(m.path("etc/hostname")).unwrap(), hostname);
    assert_eq!(fs::read_link(m.path("etc")).unwrap(), Path::new("/etc"));
    assert_eq!(fs::read_link(m.path("up")).unwrap(), Path::new("../.."));
    assert_eq!(
        fs::read_link(m.path("sub/rel_outside")).unwrap(),
        Path::new("../../outside.txt")
    );
    // Nothing outside the backing dir shows up under its own name.
    assert_eq!(
        fs::metadata(m.path("outside.txt"))
            .map_err(|e| e.raw_os_error())
            .err(),
        Some(Some(libc::ENOENT))
    );
    let through_mount = tree(&m.mountpoint);
    let in_backing = tree(&b);
    let mountpoint = m.mountpoint.clone();
    m.unmount();
    no_mount_left(&mountpoint);

    if std::env::var_os("CONFORMANCE_SHOW").is_some() {
        for (a, b) in plain.iter().zip(&mounted) {
            eprintln!("plain: {a}\nmount: {b}");
        }
    }
    let differ: Vec<String> = plain
        .iter()
        .zip(&mounted)
        .filter(|(a, b)| a != b)
        .map(|(a, b)| format!("  plain: {a}\n  mount: {b}"))
        .collect();
    assert!(
        differ.is_empty(),
        "links behave differently:\n{}",
        differ.join("\n")
    );
    assert_eq!(plain.len(), mounted.len());
    assert_eq!(
        through_mount, in_backing,
        "the mount shows exactly the backing dir, links as links"
    );
    assert_eq!(
        tree(&b),
        tree(&d),
        "backing dir and plain dir end up the same"
    );
    assert!(fs::read(&outside).unwrap() == b"outside the backing dir\n");
}
