//! The `status` answer: one mount, its cache, its files and counters
//! (`modelcache status --json` is a list of these). Fields are only ever
//! added within a protocol version; see docs/control-protocol.md.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Eviction reasons, the keys of [`Counters::evictions`].
pub const EVICT_CAP: &str = "cap";
pub const EVICT_PRESSURE: &str = "pressure";
pub const EVICT_INVALIDATED: &str = "invalidated";
pub const EVICT_MANUAL: &str = "manual";
pub const EVICTION_REASONS: [&str; 4] =
    [EVICT_CAP, EVICT_PRESSURE, EVICT_INVALIDATED, EVICT_MANUAL];

/// How the mount serves reads of cached files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Copy,
    Passthrough,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Copy => "copy",
            Mode::Passthrough => "passthrough",
        }
    }
}

/// Where a file stands in the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileState {
    /// Being loaded: `loaded_bytes` of `size` are in RAM.
    Loading,
    /// Loaded, unpinned.
    Cached,
    /// Loaded and pinned.
    Pinned,
    /// Dropped from the cache; listed while open handles still hold it.
    Evicted,
    /// Not in the cache (`MountStatus::uncached_files`, and what a verb
    /// left uncached): `last_open` says where its opens went, and why.
    Uncached,
}

impl FileState {
    pub fn as_str(self) -> &'static str {
        match self {
            FileState::Loading => "loading",
            FileState::Cached => "cached",
            FileState::Pinned => "pinned",
            FileState::Evicted => "evicted",
            FileState::Uncached => "uncached",
        }
    }
}

/// One mount and its cache: the `status` answer, and one element of
/// `modelcache status --json`'s `mounts`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MountStatus {
    /// The canonical mount point, as [`crate::names::shown`] writes it
    /// (lossless: [`crate::names::path_of`] gives the path back).
    pub mountpoint: String,
    /// The backing directory, written the same way.
    pub backing: String,
    pub mode: Mode,
    /// The cache's cap, bytes.
    pub max_size: u64,
    /// Bytes of files in the cache (loaded or loading).
    pub cached_bytes: u64,
    /// Of which pinned.
    pub pinned_bytes: u64,
    /// Of which protected by a reader (open by a protecting class, or
    /// within the grace after).
    #[serde(default)]
    pub protected_bytes: u64,
    /// Bytes locked in RAM with mlock within the pin budget (copy mode).
    #[serde(default)]
    pub locked_bytes: u64,
    /// Bytes of evicted files still held by open handles (counted against
    /// the cap until their last close).
    pub held_bytes: u64,
    /// MemAvailable, bytes.
    pub mem_available: u64,
    /// `some avg10` of /proc/pressure/memory, when the kernel has PSI.
    #[serde(default)]
    pub psi_some_avg10: Option<f64>,
    /// The files the cache holds (or held: evicted, still open).
    pub files: Vec<FileStatus>,
    /// Model files opened since the mount that the cache does not hold,
    /// state `uncached`: where their opens went, and why not to RAM.
    #[serde(default)]
    pub uncached_files: Vec<FileStatus>,
    /// Loads a prewarm or a warm start queued, while they run.
    #[serde(default)]
    pub loading: Vec<LoadingProgress>,
    pub counters: Counters,
}

/// How far a prewarm (the manifest's pinned and warm files) or a warm start
/// (the recorded working set) has got: the files it queued, until all are
/// loaded or gone.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadingProgress {
    /// `"prewarm"` or `"warm start"`.
    pub what: String,
    pub files: u64,
    pub files_loaded: u64,
    pub bytes: u64,
    pub loaded_bytes: u64,
}

/// One file the cache knows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileStatus {
    /// Relative to the mount root.
    pub path: String,
    pub size: u64,
    pub state: FileState,
    /// Bytes in RAM: `size` once loaded.
    pub loaded_bytes: u64,
    pub pinned: bool,
    /// Kept by a protecting reader (`[hooks.CLASS] protect`): open by one,
    /// or within the grace after; not evicted for room meanwhile.
    #[serde(default)]
    pub protected: bool,
    /// Opens that found it wholly cached: the same as `opens_from_ram`
    /// (kept for the clients that read it).
    pub hits: u64,
    /// Its opens by where they were served from, and what they saved.
    #[serde(flatten)]
    pub by_source: OpensBySource,
    /// Where its latest open was served from; absent when not opened since
    /// the mount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_open: Option<LastOpen>,
    /// Bytes the daemon read from the backing file for its readers: reads
    /// the cache's page cache did not answer (while loading, or not cached).
    pub bytes_from_backing: u64,
    /// The last open or read, in seconds since the Unix epoch.
    #[serde(default)]
    pub last_access: Option<u64>,
    pub open_handles: u64,
    /// Of which served by kernel passthrough.
    pub passthrough_handles: u64,
    /// The classes (`cuda`, `rocm`, `cpu`) of the processes that opened it.
    pub reader_classes: Vec<String>,
    /// Why it is pinned (absent when it is not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin_origin: Option<PinOrigin>,
}

/// Who pinned a file: the manifest's `[[pin]]`, or `modelcache pin`
/// (kept in the mount's state file).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PinOrigin {
    Manifest,
    Runtime,
}

impl PinOrigin {
    pub fn as_str(self) -> &'static str {
        match self {
            PinOrigin::Manifest => "manifest",
            PinOrigin::Runtime => "runtime",
        }
    }
}

impl FileStatus {
    /// A file in `state` with nothing counted yet.
    pub fn new(path: String, state: FileState) -> FileStatus {
        FileStatus {
            path,
            size: 0,
            state,
            loaded_bytes: 0,
            pinned: false,
            protected: false,
            hits: 0,
            by_source: OpensBySource::default(),
            last_open: None,
            bytes_from_backing: 0,
            last_access: None,
            open_handles: 0,
            passthrough_handles: 0,
            reader_classes: Vec::new(),
            pin_origin: None,
        }
    }
}

/// Where an open of a model file was served from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LastOpen {
    /// `ram` (wholly cached), `partial` (its load under way) or `disk`.
    pub source: String,
    /// For `partial`: how much of it was in RAM, percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resident_percent: Option<u8>,
    /// For `disk`: why, and the fix where there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Opens of model files by where they were served from (one file's, or
/// the mount's), and the disk time that saved. JSON: these five fields,
/// in the object that holds them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct OpensBySource {
    /// Wholly cached at open.
    #[serde(default)]
    pub opens_from_ram: u64,
    /// Being loaded at open.
    #[serde(default)]
    pub opens_partial: u64,
    /// Not cached at open.
    #[serde(default)]
    pub opens_from_disk: u64,
    /// The sizes of the files opened from RAM, summed.
    #[serde(default)]
    pub bytes_opened_from_ram: u64,
    /// An estimate of the disk reads those opens did not spend: each one's
    /// size over the read rate measured then, summed (0 before a load
    /// read the disk). It never goes down.
    #[serde(default)]
    pub disk_seconds_avoided: f64,
}

/// Counters since the mount started.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    /// Opens of model files by where they were served from, and what
    /// they saved.
    #[serde(flatten)]
    pub by_source: OpensBySource,
    /// The backing's read rate, bytes per second, as the cache's recent
    /// loads of this mount measured it; absent before a load finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_rate: Option<f64>,
    /// Opens of model files by reader class (`cuda`, `rocm`, `cpu`).
    pub opens_by_class: BTreeMap<String, u64>,
    /// Bytes the daemon read from backing files for readers of model
    /// files, by reader class (see `bytes_from_backing`).
    pub bytes_by_class: BTreeMap<String, u64>,
    /// Bytes the daemon read from backing files for readers of model files:
    /// reads the cache's page cache did not answer (while loading, or not
    /// cached).
    pub bytes_from_backing: u64,
    /// Opens of a model file found wholly cached, and not: the same as
    /// `opens_from_ram`, and `opens_partial + opens_from_disk` (kept for
    /// the clients that read them).
    pub file_hits: u64,
    pub file_misses: u64,
    /// Whole-file loads finished, their bytes and time.
    pub loads: u64,
    pub load_bytes: u64,
    pub load_seconds: f64,
    /// Files evicted, by reason: `cap`, `pressure`, `invalidated`, `manual`.
    pub evictions: BTreeMap<String, u64>,
    /// Times the pressure monitor had to free memory.
    pub pressure_events: u64,
}

/// `modelcache status --json`: every reachable mount.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub version: u32,
    pub mounts: Vec<MountStatus>,
}
