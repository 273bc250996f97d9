//! What a mount is asked to do: its configuration, the flags of the mount,
//! and the cache settings resolved from the flags and the manifest.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::Error;
use crate::cache::CacheConfig;
use crate::fs::fuse::ReadMode;
use crate::fs::passthrough::Passthrough;
use crate::manifest::{self, Admit, CapFrom, Manifest};
use crate::units::{Bytes, SizeSpec};

/// What `modelcache mount` was asked to do.
pub struct MountConfig {
    /// The directory whose files the mount shows; `None` = in place.
    pub backing: Option<PathBuf>,
    pub mountpoint: PathBuf,
    pub allow_other: bool,
    /// Flags of the mount itself, which the kernel's VFS applies.
    pub vfs: VfsOptions,
    pub threads: usize,
    /// How long the kernel may cache metadata; `None` = the mode's default.
    pub metadata_ttl: Option<Duration>,
    pub settings: Settings,
    pub read_mode: ReadMode,
    pub passthrough: Passthrough,
    /// Where to write Prometheus metrics, if anywhere.
    pub metrics_file: Option<PathBuf>,
}

/// When reads update a file's access time (the mount(8) options of the
/// same names); the kernel applies them to the mount, as on any filesystem.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Atime {
    /// Only when the access time is older than the last change or a day
    /// old: the default of every Linux filesystem.
    #[default]
    Relatime,
    /// Never.
    Noatime,
    /// At every access.
    Strictatime,
}

/// Flags of the mount that the VFS enforces, whichever daemon serves it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VfsOptions {
    /// Every change gets EROFS from the kernel; reads and the cache work
    /// as ever.
    pub read_only: bool,
    pub atime: Atime,
    /// No access-time updates on directories.
    pub nodiratime: bool,
}

impl VfsOptions {
    /// mount(2) flags (nosuid and nodev always).
    pub(super) fn flags(self) -> libc::c_ulong {
        let mut flags = libc::MS_NOSUID | libc::MS_NODEV;
        if self.read_only {
            flags |= libc::MS_RDONLY;
        }
        flags |= match self.atime {
            Atime::Relatime => libc::MS_RELATIME,
            Atime::Noatime => libc::MS_NOATIME,
            Atime::Strictatime => libc::MS_STRICTATIME,
        };
        if self.nodiratime {
            flags |= libc::MS_NODIRATIME;
        }
        flags
    }

    /// The same as fusermount3 options (it mounts nosuid,nodev itself, and
    /// relatime is the kernel's default). fusermount3 offers `ro` and
    /// `noatime` but neither `strictatime` nor `nodiratime`: those are
    /// refused with the reason rather than dropped.
    pub(super) fn fusermount_options(self) -> Result<String, Error> {
        if self.atime == Atime::Strictatime || self.nodiratime {
            return Err(Error(
                "--atime strictatime and --nodiratime need a root mount: fusermount3, \
                 through which a normal user mounts, does not offer them"
                    .into(),
            ));
        }
        let mut out = String::new();
        if self.read_only {
            out.push_str(",ro");
        }
        if self.atime == Atime::Noatime {
            out.push_str(",noatime");
        }
        Ok(out)
    }
}

/// Cache flags given on the command line; each overrides the manifest.
pub struct CacheFlags {
    pub max_size: Option<SizeSpec>,
    pub min_file_size: Option<SizeSpec>,
    pub loader_threads: Option<usize>,
    /// `--no-warm-start`: off whatever the manifest says.
    pub no_warm_start: bool,
}

/// What the mount takes from the flags and the manifest.
pub struct Settings {
    pub cache: CacheConfig,
    /// Where the cap was set: `--max-size`, else the manifest.
    pub cap_from: CapFrom,
    /// Below this much available memory even pinned files are released.
    pub critical_available: u64,
    /// Load the working set recorded at the last mount after the
    /// manifest's files: the manifest's `warm_start`, off with
    /// `--no-warm-start`.
    pub warm_start: bool,
    /// The manifest in force at mount, if any.
    pub manifest: Option<Manifest>,
    /// The --manifest file, read again on reload (without it, reloads look
    /// at the default path).
    pub manifest_arg: Option<PathBuf>,
}

impl Settings {
    /// The manifest (`--manifest`, else the default path if a file is
    /// there), with the flags' values over its own. The cap defaults to half
    /// the RAM; a cap beyond the RAM is refused (the cache would push the
    /// rest of the system into the OOM killer before it ever filled).
    pub fn resolve(flags: CacheFlags, manifest_arg: Option<PathBuf>) -> Result<Settings, Error> {
        let path = manifest_arg
            .clone()
            .or_else(|| Manifest::default_path().filter(|p| p.exists()));
        let manifest = path
            .as_deref()
            .map(|p| Manifest::load(p, manifest::Reader::Daemon))
            .transpose()?;
        // Without a manifest, its defaults: one place defines them.
        let defaults;
        let m = match &manifest {
            Some(m) => m,
            None => {
                defaults = Manifest::parse("", Path::new("(defaults)"))?;
                &defaults
            }
        };
        let ram = crate::cache::pressure::total_ram();
        let limits = m.limits(ram)?;
        let cap = flags.max_size.map_or(limits.max_size, |s| s.resolve(ram));
        if ram > 0 && cap > ram {
            return Err(Error(format!(
                "--max-size {} is more than this machine's RAM ({}); give a smaller size or a share such as 50%",
                Bytes(cap),
                Bytes(ram)
            )));
        }
        let mut cache = CacheConfig::with_cap(cap);
        cache.min_file_size = flags
            .min_file_size
            .map_or(limits.min_file_size, |s| s.resolve(ram));
        cache.loader_threads = flags.loader_threads.unwrap_or(m.cache.loader_threads);
        cache.extensions = m.cache.extensions.clone();
        cache.admit_on_open = m.cache.admit == Admit::OnOpen;
        cache.min_available = limits.min_available;
        cache.eviction = m.cache.policy;
        cache.mlock = m.cache.mlock;
        cache.pin_budget = limits.pin_budget;
        Ok(Settings {
            cache,
            cap_from: if flags.max_size.is_some() {
                CapFrom::Flag
            } else {
                CapFrom::Manifest
            },
            critical_available: limits.critical_available,
            warm_start: m.cache.warm_start && !flags.no_warm_start,
            manifest,
            manifest_arg,
        })
    }
}

impl Settings {
    /// The manifest's pins against the files of `backing`, before mounting:
    /// pins that cannot fit under the cap fail the mount with the message
    /// of `modelcache check` (pins that fit but cannot load now, for memory
    /// or a writer, are the prewarm's warnings).
    pub fn check_pins(&self, backing: &Path) -> Result<(), Error> {
        let Some(manifest) = &self.manifest else {
            return Ok(());
        };
        let matches = manifest.matches(backing)?;
        let ram = crate::cache::pressure::total_ram();
        manifest.pins_fit(&matches, self.cache.max_size, self.cap_from, ram)
    }
}

/// In place, the backing directory is hidden under the mount: every change
/// goes through it and the kernel keeps its caches coherent, so metadata can
/// be cached long. A separate backing directory may change behind the
/// mount: its changes show within a second.
pub(super) fn default_metadata_ttl(in_place: bool) -> Duration {
    Duration::from_secs(if in_place { 60 } else { 1 })
}

/// FUSE worker threads by default. Not tied to the core count: a worker
/// mostly waits (on the disk for a read the cache cannot serve yet, on the
/// kernel's copy of a reply), and ComfyUI reads with 8 threads. Measured on
/// 2 cores (README "Benchmarks"): cold ComfyUI-pattern reads 0.71–0.84× of
/// direct with 2 workers, 1.00–1.06× with 8.
pub const DEFAULT_THREADS: usize = 8;
