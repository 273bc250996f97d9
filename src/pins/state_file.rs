//! The state file of a mount: what the daemon keeps across reloads and
//! remounts (runtime pins, the record of what was opened), one JSON file
//! per mount point, written by one owner ([`StateKeeper`]).
//!
//! Where: `$STATE_DIRECTORY` (set by systemd's `StateDirectory=`), else
//! `/var/lib/modelcache` for root, else `$XDG_STATE_HOME/modelcache` or
//! `~/.local/state/modelcache`. The directory is the daemon's own (owned by
//! its effective uid, writable by no one else) or it is not used. The file
//! is read without blocking or following a link, type-checked and bounded;
//! one that cannot be trusted or read is set aside (renamed
//! `<name>.bad-<unix time>`) with one warning, never fatal. It is written
//! atomically: a temporary file in the same directory, fsynced, renamed
//! over the old one, and the directory fsynced.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::state_dir::{euid, open_dir, openat, owner_of, rename_noreplace, renameat, unlinkat};
use crate::record::Record;
use crate::units::Bytes;

/// The format written; a file of another version is set aside. Still 1
/// with the record: fields are only added (with defaults), so either
/// release reads the other's file.
pub const STATE_VERSION: u32 = 1;

/// The largest state file read (10,000 pins of long names fit well).
pub const MAX_STATE_FILE: u64 = 4 << 20;
/// Copies of a bad state file set aside in one second, at most.
const SET_ASIDE_TRIES: u32 = 100;

/// What a mount's state file holds. Fields added later take serde
/// defaults, so a file written before them still reads.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MountState {
    pub version: u32,
    /// The canonical mount point, as `names::shown` writes it.
    pub mountpoint: String,
    /// Runtime pins (`modelcache pin`), relative to the mount root.
    pub pins: Vec<String>,
    /// What was opened through the mount (absent in files written before).
    pub record: Record,
    /// Files warm start found gone, with their last open, that the
    /// recorder has yet to drop from its own copy of the record (see
    /// [`StateKeeper::forget`]). Not saved.
    #[serde(skip)]
    pub forgotten: Vec<(String, u64)>,
}

/// The state directory for a daemon, given what it sees: its effective
/// uid, `$STATE_DIRECTORY`, `$XDG_STATE_HOME` and `$HOME`. `None` when none
/// can be named (a user without a home).
pub fn state_dir(
    euid: u32,
    state_directory: Option<OsString>,
    xdg_state_home: Option<OsString>,
    home: Option<OsString>,
) -> Option<PathBuf> {
    let absolute = |v: Option<OsString>| v.map(PathBuf::from).filter(|p| p.is_absolute());
    // systemd may list several, colon-separated: the first is this one's.
    let systemd = state_directory.and_then(|v| {
        let first = v.as_bytes().split(|b| *b == b':').next()?.to_vec();
        absolute(Some(OsString::from(std::ffi::OsStr::from_bytes(&first))))
    });
    if systemd.is_some() {
        return systemd;
    }
    if euid == 0 {
        return Some(PathBuf::from("/var/lib/modelcache"));
    }
    absolute(xdg_state_home)
        .or_else(|| absolute(home).map(|h| h.join(".local/state")))
        .map(|d| d.join("modelcache"))
}

/// The state file's name for a mount point: `mount-<16 hex digits>.json`,
/// the hash of the control socket's name.
pub fn state_file_name(mountpoint: &Path) -> String {
    format!(
        "mount-{:016x}.json",
        crate::control::fnv1a64(mountpoint.as_os_str().as_bytes())
    )
}

/// What reading the state file gave: the state (empty if none could be
/// used), and the one warning to log if the file was not usable.
#[derive(Debug, Default)]
pub struct Loaded {
    pub state: MountState,
    pub warning: Option<String>,
}

/// One mount's state file.
#[derive(Clone, Debug)]
pub struct StateFile {
    dir: PathBuf,
    name: String,
    mountpoint: String,
}

impl StateFile {
    /// The state file of the mount at `mountpoint` (canonical) in `dir`.
    pub fn new(dir: PathBuf, mountpoint: &Path) -> Self {
        Self {
            name: state_file_name(mountpoint),
            mountpoint: crate::names::shown(mountpoint),
            dir,
        }
    }

    /// Where this process keeps the state of the mount at `mountpoint`.
    pub fn for_mount(mountpoint: &Path) -> Option<Self> {
        let dir = state_dir(
            euid(),
            std::env::var_os("STATE_DIRECTORY").filter(|v| !v.is_empty()),
            std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()),
            std::env::var_os("HOME").filter(|v| !v.is_empty()),
        )?;
        Some(Self::new(dir, mountpoint))
    }

    /// The mount point, as the file records it.
    pub fn mountpoint(&self) -> &str {
        &self.mountpoint
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(&self.name)
    }

    /// Reads the state. Never fails: a file that is missing gives an empty
    /// state; one that cannot be used gives an empty state and a warning
    /// (and is set aside when it is the daemon's own).
    pub fn load(&self) -> Loaded {
        let shown = self.path().display().to_string();
        let dir = match open_dir(&self.dir, false) {
            Ok(Some(dir)) => dir,
            Ok(None) => return Loaded::default(),
            Err(why) => {
                return Loaded {
                    state: MountState::default(),
                    warning: Some(format!("state file {shown} not read: {why}")),
                };
            }
        };
        self.remove_stale_temporaries();
        match self.read_in(&dir) {
            Ok(state) => Loaded {
                state: state.unwrap_or_default(),
                warning: None,
            },
            Err(Unusable { why, set_aside }) => {
                let aside = if set_aside {
                    match self.set_aside(&dir) {
                        Ok(to) => format!("set aside as {to}"),
                        Err(e) => format!("could not be set aside: {e}"),
                    }
                } else {
                    "left in place until this mount saves its own state over it".to_string()
                };
                Loaded {
                    state: MountState::default(),
                    warning: Some(format!(
                        "state file {shown} not used ({why}); {aside}, and the mount goes on \
                         without its runtime pins and record"
                    )),
                }
            }
        }
    }

    fn read_in(&self, dir: &OwnedFd) -> Result<Option<MountState>, Unusable> {
        let aside = |why: String| Unusable {
            why,
            set_aside: true,
        };
        let flags = libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_NOCTTY;
        let mut file = match openat(dir, &self.name, flags, 0) {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(aside("it is a symbolic link".into()));
            }
            // Another user's file, unreadable to us (written 0600 by a
            // daemon once run with sudo): kept under another name, as below.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EACCES | libc::EPERM)) => {
                return Err(match owner_of(dir, &self.name) {
                    Ok(uid) if uid != euid() => aside(foreign(uid)),
                    _ => Unusable {
                        why: format!("cannot open it: {e}"),
                        set_aside: false,
                    },
                });
            }
            Err(e) => {
                return Err(Unusable {
                    why: format!("cannot open it: {e}"),
                    set_aside: false,
                });
            }
        };
        let meta = file.metadata().map_err(|e| Unusable {
            why: format!("cannot stat it: {e}"),
            set_aside: false,
        })?;
        if !meta.file_type().is_file() {
            return Err(aside("it is not a regular file".into()));
        }
        // Another user's file in our own directory (one only root could
        // put there, such as a daemon once run with sudo): its content is
        // kept, under another name, rather than replaced at the next save.
        if meta.uid() != euid() {
            return Err(aside(foreign(meta.uid())));
        }
        if meta.mode() & 0o022 != 0 {
            return Err(aside(format!(
                "others may write it (mode {:04o})",
                meta.mode() & 0o7777
            )));
        }
        if meta.len() > MAX_STATE_FILE {
            return Err(aside(format!(
                "it is {}, over the {} a state file may be",
                Bytes(meta.len()),
                Bytes(MAX_STATE_FILE)
            )));
        }
        let mut text = Vec::new();
        (&mut file)
            .take(MAX_STATE_FILE + 1)
            .read_to_end(&mut text)
            .map_err(|e| Unusable {
                why: format!("cannot read it: {e}"),
                set_aside: false,
            })?;
        let state: MountState = serde_json::from_slice(&text)
            .map_err(|e| aside(format!("it is not a state file's JSON: {e}")))?;
        if state.version != STATE_VERSION {
            return Err(aside(format!(
                "it is version {}, this release reads version {STATE_VERSION}",
                state.version
            )));
        }
        if state.mountpoint != self.mountpoint {
            return Err(aside(format!(
                "it is the state of {}, not of {}",
                state.mountpoint, self.mountpoint
            )));
        }
        if state.pins.len() > super::MAX_RUNTIME_PINS {
            return Err(aside(format!(
                "it names {} pins, over the {} a mount may have",
                state.pins.len(),
                super::MAX_RUNTIME_PINS
            )));
        }
        if let Some(bad) = state.pins.iter().find(|p| !is_relative_name(p)) {
            return Err(aside(format!(
                "pin {bad:?} is not a path relative to the mount root"
            )));
        }
        if let Some(bad) = state.record.files.keys().find(|p| !is_relative_name(p)) {
            return Err(aside(format!(
                "its record names {bad:?}, not a path relative to the mount root"
            )));
        }
        if let Some(why) = state.record.problem() {
            return Err(aside(why));
        }
        let mut state = state;
        state.record.settle();
        Ok(Some(state))
    }

    /// Renames the file `<name>.bad-<unix time>`; returns the new name.
    fn set_aside(&self, dir: &OwnedFd) -> io::Result<String> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        // Never over an earlier copy set aside in the same second.
        for n in 0..SET_ASIDE_TRIES {
            let to = match n {
                0 => format!("{}.bad-{now}", self.name),
                n => format!("{}.bad-{now}-{n}", self.name),
            };
            match rename_noreplace(dir, &self.name, &to) {
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => continue,
                done => return done.map(|()| to),
            }
        }
        Err(io::Error::other(format!(
            "{SET_ASIDE_TRIES} copies were set aside in this second already"
        )))
    }

    /// Replaces the file with `state`, atomically: a reader (or a crash)
    /// sees the old file whole or the new one whole. The directory is
    /// made (0700) if missing.
    pub fn save(&self, state: &MountState) -> Result<(), String> {
        let shown = self.path().display().to_string();
        let dir = match open_dir(&self.dir, true) {
            Ok(Some(dir)) => dir,
            Ok(None) => return Err(format!("cannot create {}", self.dir.display())),
            Err(why) => return Err(why),
        };
        let text = to_json(state).map_err(|e| e.to_string())?;
        static SAVES: AtomicU64 = AtomicU64::new(0);
        let temp = format!(
            ".{}.tmp-{}-{}",
            self.name,
            std::process::id(),
            SAVES.fetch_add(1, Ordering::Relaxed)
        );
        let written = (|| {
            let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW;
            let mut file = openat(&dir, &temp, flags, 0o600)?;
            file.write_all(&text)?;
            file.write_all(b"\n")?;
            file.sync_all()?;
            renameat(&dir, &temp, &self.name)?;
            // The rename itself must reach the disk.
            File::from(dir.try_clone()?).sync_all()
        })();
        written.map_err(|e| {
            let _ = unlinkat(&dir, &temp);
            format!("cannot write the state file {shown}: {e}")
        })
    }

    /// Temporary files a crash left behind (only this mount's).
    fn remove_stale_temporaries(&self) {
        let prefix = format!(".{}.tmp-", self.name);
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        // Bounded: the directory is the daemon's own, but a listing is not
        // worth more than this.
        for entry in entries.take(10_000).flatten() {
            if entry.file_name().as_bytes().starts_with(prefix.as_bytes()) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// Why the state could not be saved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SaveError {
    /// No state directory could be named.
    NoStateDir,
    /// Writing the file failed (the line says where and why).
    Write(String),
}

impl std::fmt::Display for SaveError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SaveError::NoStateDir => write!(
                f,
                "no state directory (set $STATE_DIRECTORY, $XDG_STATE_HOME or $HOME)"
            ),
            SaveError::Write(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for SaveError {}

/// The one writer of a mount's state file. It holds the whole state; the
/// pins and the recorder each change their part through it, so that a
/// save of one never drops the other's, and saves never interleave.
pub struct StateKeeper {
    file: Option<StateFile>,
    state: Mutex<MountState>,
}

impl StateKeeper {
    /// Reads the state of the mount kept in `file` (a file that cannot be
    /// used is logged once, and the mount goes on without it).
    pub fn load(file: Option<StateFile>) -> Self {
        let state = match &file {
            Some(f) => {
                let loaded = f.load();
                if let Some(w) = loaded.warning {
                    tracing::warn!("{w}");
                }
                loaded.state
            }
            None => MountState::default(),
        };
        Self {
            file,
            state: Mutex::new(state),
        }
    }

    /// The runtime pins read or last saved.
    pub fn pins(&self) -> Vec<String> {
        self.state.lock().pins.clone()
    }

    /// The record read or last saved.
    pub fn record(&self) -> Record {
        self.state.lock().record.clone()
    }

    /// Drops files no longer there from the record, `(name, last open)`
    /// (one opened since stays), and saves. The recorder, which keeps its
    /// own copy, drops them too at its next save ([`MountState::forgotten`]).
    /// Bounded: a name is kept only while the record holds it.
    pub fn forget(&self, gone: &[(String, u64)]) -> Result<(), SaveError> {
        self.update(|s| {
            for (name, last_open) in gone {
                if s.record.forget(name, *last_open) {
                    s.forgotten.push((name.clone(), *last_open));
                }
            }
            s.forgotten.truncate(crate::record::MAX_FILES);
        })
    }

    /// Changes the state with `change` and saves it whole. Should the
    /// file pass [`MAX_STATE_FILE`] (pins of long names beside a full
    /// record), the record's least recently opened files give way: a file
    /// too large would be set aside at the next mount, pins and all.
    pub fn update(&self, change: impl FnOnce(&mut MountState)) -> Result<(), SaveError> {
        let mut state = self.state.lock();
        change(&mut state);
        let Some(file) = &self.file else {
            return Err(SaveError::NoStateDir);
        };
        state.version = STATE_VERSION;
        state.mountpoint = file.mountpoint().to_string();
        while !state.record.files.is_empty() && serialized_len(&state) >= MAX_STATE_FILE {
            let keep = state.record.files.len() / 2;
            state.record.keep_most_recent(keep);
        }
        file.save(&state).map_err(SaveError::Write)
    }
}

/// The file's text, less its final newline. Compact: pretty-printed, the
/// record's many small fields would take twice the room.
fn to_json(state: &MountState) -> serde_json::Result<Vec<u8>> {
    serde_json::to_vec(state)
}

/// The size of the file `state` is written as (its final newline included).
fn serialized_len(state: &MountState) -> u64 {
    to_json(state).map_or(u64::MAX, |v| v.len() as u64 + 1)
}

/// Why a state file was not used, and whether it is to be set aside.
/// Why another user's file is not used.
fn foreign(uid: u32) -> String {
    format!(
        "it is owned by uid {uid}, not by this daemon's uid {}",
        euid()
    )
}

struct Unusable {
    why: String,
    set_aside: bool,
}

/// A relative name within the mount: not empty, not absolute, no `.` or
/// `..` component, no NUL.
fn is_relative_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('/')
        && !name.contains('\0')
        && name
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

#[cfg(test)]
mod tests {
    use std::ffi::CString;
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    const MP: &str = "/home/me/ComfyUI/models";

    fn state(pins: &[&str]) -> MountState {
        MountState {
            version: STATE_VERSION,
            mountpoint: MP.into(),
            pins: pins.iter().map(|p| p.to_string()).collect(),
            ..MountState::default()
        }
    }

    /// A record of `files` files of `name_len`-byte names (as JSON writes
    /// them), opened in pairs by one process each.
    fn record_of(files: usize, name_len: usize) -> Record {
        use crate::record::{FileIdentity, OpenEvent, Source};
        let mut record = Record::default();
        for i in 0..files {
            let name = format!("{i:08}/{}", "é".repeat(name_len));
            let name = &name[..name.floor_char_boundary(name_len - 2)];
            record.opened(&OpenEvent {
                name: name.to_string(),
                identity: FileIdentity {
                    dev: u64::MAX,
                    ino: u64::MAX - i as u64,
                    size: u64::MAX,
                    mtime_ns: i64::MIN,
                },
                source: Source::Disk,
                pid: (i / 2) as u32,
                at: 1_700_000_000 + i as u64,
            });
        }
        record.close_all(u64::MAX);
        record
    }

    /// A state file in a fresh directory `state` under a temp dir.
    fn fixture() -> (tempfile::TempDir, StateFile) {
        let tmp = tempfile::tempdir().unwrap();
        let file = StateFile::new(tmp.path().join("state"), Path::new(MP));
        (tmp, file)
    }

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path)
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    }

    /// The names in the state directory, sorted.
    fn listing(file: &StateFile) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&file.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// Loads, expecting one warning that names the file and `cause`, and
    /// an empty state.
    fn load_refused(file: &StateFile, cause: &str) -> String {
        let loaded = file.load();
        assert_eq!(loaded.state, MountState::default());
        let warning = loaded.warning.expect("one warning");
        assert!(
            warning.contains(&file.path().display().to_string()) && warning.contains(cause),
            "{warning}"
        );
        warning
    }

    #[test]
    fn the_state_directory_follows_systemd_then_root_then_xdg() {
        let d = |euid, sd: Option<&str>, xdg: Option<&str>, home: Option<&str>| {
            state_dir(
                euid,
                sd.map(Into::into),
                xdg.map(Into::into),
                home.map(Into::into),
            )
        };
        let p = |s: &str| Some(PathBuf::from(s));
        assert_eq!(d(0, Some("/var/lib/mc:/x"), None, None), p("/var/lib/mc"));
        assert_eq!(d(1000, Some("/st"), Some("/xdg"), None), p("/st"));
        assert_eq!(
            d(0, None, Some("/xdg"), Some("/root")),
            p("/var/lib/modelcache")
        );
        assert_eq!(
            d(1000, None, Some("/xdg"), Some("/h")),
            p("/xdg/modelcache")
        );
        assert_eq!(
            d(1000, Some("relative"), Some("rel"), Some("/h")),
            p("/h/.local/state/modelcache")
        );
        assert_eq!(d(1000, None, None, None), None);
        assert_eq!(
            state_file_name(Path::new("/mnt/models")),
            "mount-4b8cf20ebc651986.json",
            "the control socket's hash"
        );
    }

    #[test]
    fn saved_state_reads_back_from_a_private_file() {
        let (_tmp, file) = fixture();
        assert_eq!(file.load().state, MountState::default(), "no file yet");
        assert!(!file.dir.exists(), "reading creates nothing");
        let s = state(&["a/b.safetensors", "c.gguf"]);
        file.save(&s).unwrap();
        assert_eq!(mode(&file.dir), 0o700);
        assert_eq!(mode(&file.path()), 0o600);
        let loaded = file.load();
        assert_eq!(loaded.warning, None);
        assert_eq!(loaded.state, s);
        file.save(&state(&["c.gguf"])).unwrap();
        assert_eq!(file.load().state, state(&["c.gguf"]));
        assert_eq!(listing(&file), vec![file.name.clone()], "no temporary left");
        // Fields a later release adds are ignored; a missing list is empty.
        std::fs::write(
            file.path(),
            format!(r#"{{"version":1,"mountpoint":"{MP}","working_set":[]}}"#),
        )
        .unwrap();
        assert_eq!(file.load().state, state(&[]));
    }

    #[test]
    fn a_full_record_of_long_names_stays_under_the_limit() {
        use crate::record::{MAX_FILES, MAX_NAME_JSON_BYTES, MAX_SET_FILES, MAX_SETS};
        let mut s = state(&[]);
        s.record = record_of(MAX_FILES, MAX_NAME_JSON_BYTES);
        assert_eq!(s.record.files.len(), MAX_FILES, "every name was kept");
        // Fill the sets too, each as large as a set may be.
        let ids: Vec<u64> = s.record.files.values().map(|f| f.id).collect();
        s.record.co_open = (0..MAX_SETS)
            .map(|i| crate::record::CoOpenSet {
                files: ids[i..i + MAX_SET_FILES].to_vec(),
                count: u64::MAX,
                last_seen: u64::MAX,
            })
            .collect();
        assert_eq!(s.record.problem(), None);
        let len = serialized_len(&s);
        assert!(
            len < MAX_STATE_FILE * 3 / 4,
            "{len} bytes: room is left for pins"
        );
        let (_tmp, file) = fixture();
        file.save(&s).unwrap();
        assert_eq!(file.load().state, s, "read back whole");
    }

    #[test]
    fn pins_and_record_are_saved_together_by_their_one_keeper() {
        let (_tmp, file) = fixture();
        let keeper = StateKeeper::load(Some(file.clone()));
        keeper.update(|s| s.pins = vec!["p.gguf".into()]).unwrap();
        let record = record_of(3, 40);
        let flushed = record.clone();
        keeper.update(|s| s.record = flushed).unwrap();
        assert_eq!(
            file.load().state.pins,
            vec!["p.gguf".to_string()],
            "a flush keeps the pins"
        );
        keeper.update(|s| s.pins.clear()).unwrap();
        assert_eq!(
            file.load().state.record,
            record,
            "a pin change keeps the record"
        );

        // Read at the next mount.
        let again = StateKeeper::load(Some(file.clone()));
        assert_eq!(again.record(), record);
        assert!(again.pins().is_empty());

        // Pins of long names beside a full record: the record gives way,
        // the pins stay, the file is still one the next mount reads.
        let long_pins: Vec<String> = (0..super::super::MAX_RUNTIME_PINS)
            .map(|i| format!("{i:05}/{}", "p".repeat(300)))
            .collect();
        let full = record_of(crate::record::MAX_FILES, 200);
        keeper
            .update(|s| {
                s.pins = long_pins.clone();
                s.record = full;
            })
            .unwrap();
        assert!(std::fs::metadata(file.path()).unwrap().len() <= MAX_STATE_FILE);
        let loaded = file.load();
        assert_eq!(loaded.warning, None);
        assert_eq!(loaded.state.pins, long_pins);
        let kept = loaded.state.record.files.len();
        assert!(kept > 0 && kept < crate::record::MAX_FILES, "{kept} kept");
        let last = format!("{:08}/", crate::record::MAX_FILES - 1);
        assert!(
            loaded
                .state
                .record
                .files
                .keys()
                .any(|n| n.starts_with(&last)),
            "the most recently opened stay"
        );
    }

    #[test]
    fn a_record_over_its_bounds_is_set_aside() {
        let (_tmp, file) = fixture();
        let mut s = state(&[]);
        s.record = record_of(2, 40);
        s.record.co_open[0].files.push(12345);
        file.save(&s).unwrap();
        load_refused(&file, "co-open set it cannot resolve");
        s.record = record_of(2, 40);
        let name = s.record.files.keys().next().unwrap().clone();
        let entry = s.record.files.remove(&name).unwrap();
        s.record.files.insert("../outside.gguf".into(), entry);
        file.save(&s).unwrap();
        load_refused(&file, "not a path relative to the mount root");
    }

    #[test]
    fn a_crash_before_the_rename_leaves_the_old_file_whole() {
        let (_tmp, file) = fixture();
        let mut s = state(&["old.safetensors"]);
        s.record = record_of(4, 30);
        file.save(&s).unwrap();
        // What a crash mid-save leaves: a partly written temporary.
        let temp = file.dir.join(format!(".{}.tmp-99999-0", file.name));
        std::fs::write(&temp, b"{\"version\":1,\"mount").unwrap();
        let loaded = file.load();
        assert_eq!(loaded.warning, None);
        assert_eq!(loaded.state, s);
        assert!(!temp.exists(), "the stale temporary is cleared");
    }

    #[test]
    fn a_copy_set_aside_earlier_in_the_same_second_is_kept() {
        let (_tmp, file) = fixture();
        file.save(&state(&[])).unwrap();
        // Copies already set aside under every name this second (and the
        // next few) could take.
        let now = crate::record::unix_now();
        let earlier: Vec<String> = (now..now + 10)
            .map(|t| format!("{}.bad-{t}", file.name))
            .collect();
        for name in &earlier {
            std::fs::write(file.dir.join(name), b"earlier").unwrap();
        }
        std::fs::write(file.path(), b"{bad").unwrap();
        load_refused(&file, "not a state file's JSON");
        for name in &earlier {
            assert_eq!(std::fs::read(file.dir.join(name)).unwrap(), b"earlier");
        }
        let new: Vec<String> = listing(&file)
            .into_iter()
            .filter(|n| !earlier.contains(n))
            .collect();
        assert_eq!(new.len(), 1, "{new:?}");
        assert!(new[0].ends_with("-1"), "{new:?}");
        assert_eq!(std::fs::read(file.dir.join(&new[0])).unwrap(), b"{bad");
    }

    #[test]
    fn a_corrupt_file_is_set_aside_whole() {
        let (_tmp, file) = fixture();
        file.save(&state(&[])).unwrap();
        std::fs::write(file.path(), b"{not json").unwrap();
        load_refused(&file, "not a state file's JSON");
        let names = listing(&file);
        assert_eq!(names.len(), 1);
        assert!(
            names[0].starts_with(&format!("{}.bad-", file.name)),
            "{names:?}"
        );
        assert_eq!(
            std::fs::read(file.dir.join(&names[0])).unwrap(),
            b"{not json"
        );
        assert_eq!(
            file.load().warning,
            None,
            "once set aside, no more warnings"
        );
    }

    #[test]
    fn another_version_or_mount_or_a_bad_name_is_set_aside() {
        for (text, cause) in [
            (
                format!(r#"{{"version":2,"mountpoint":"{MP}","pins":[]}}"#),
                "version 2, this release reads version 1",
            ),
            (
                r#"{"version":1,"mountpoint":"/elsewhere","pins":[]}"#.to_string(),
                "the state of /elsewhere",
            ),
            (
                format!(r#"{{"version":1,"mountpoint":"{MP}","pins":["../../etc/shadow"]}}"#),
                "not a path relative to the mount root",
            ),
        ] {
            let (_tmp, file) = fixture();
            file.save(&state(&[])).unwrap();
            std::fs::write(file.path(), &text).unwrap();
            load_refused(&file, cause);
            assert!(!file.path().exists(), "set aside: {cause}");
        }
    }

    #[test]
    fn a_fifo_or_a_symlink_at_the_path_is_set_aside_without_blocking() {
        let (tmp, file) = fixture();
        file.save(&state(&[])).unwrap();
        std::fs::remove_file(file.path()).unwrap();
        let c = CString::new(file.path().as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        load_refused(&file, "not a regular file");
        assert!(!file.path().exists());

        let target = tmp.path().join("elsewhere.json");
        std::fs::write(
            &target,
            format!(r#"{{"version":1,"mountpoint":"{MP}","pins":["x.gguf"]}}"#),
        )
        .unwrap();
        std::os::unix::fs::symlink(&target, file.path()).unwrap();
        load_refused(&file, "symbolic link");
        assert!(target.exists(), "the link's target is untouched");
    }

    #[test]
    fn a_file_others_may_write_or_of_another_user_is_set_aside() {
        let (_tmp, file) = fixture();
        file.save(&state(&["a.gguf"])).unwrap();
        std::fs::set_permissions(file.path(), std::fs::Permissions::from_mode(0o666)).unwrap();
        load_refused(&file, "others may write it (mode 0666)");
        assert!(!file.path().exists());

        if euid() != 0 {
            return; // Making another user's file needs root.
        }
        file.save(&state(&["a.gguf"])).unwrap();
        std::os::unix::fs::chown(file.path(), Some(65534), None).unwrap();
        load_refused(&file, "owned by uid 65534");
        assert!(!file.path().exists(), "set aside");
    }

    #[test]
    fn a_directory_others_may_write_is_not_used() {
        let (_tmp, file) = fixture();
        file.save(&state(&["a.gguf"])).unwrap();
        std::fs::set_permissions(&file.dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let warning = file.load().warning.expect("a warning");
        assert!(warning.contains("chmod go-w"), "{warning}");
        let err = file.save(&state(&[])).unwrap_err();
        assert!(err.contains("writable by others (mode 0777)"), "{err}");
        assert!(file.path().exists(), "nothing is lost");
    }
}
