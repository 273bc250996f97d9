//! The composition root: `run` checks, builds the cache, the overlay and the
//! FUSE session, mounts, starts rules and control, and serves until unmounted.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tracing::{info, warn};

use super::daemon::notify_ready;
use super::device::{fuse_mount, stop, unmount};
use super::mounted;
use super::preflight::{Checked, Liveness, check, probe, warn_of_users_before_mount};
use super::settings::{Atime, MountConfig, default_metadata_ttl};
use super::signals::{block_signals, wait_signal};
use crate::Error;
use crate::cache::Cache;
use crate::cache::pressure::{Monitor, Pressure, Sample, Thresholds};
use crate::control;
use crate::fs::Overlay;
use crate::fs::backing;
use crate::fs::fuse::FuseAdapter;
use crate::fs::passthrough::{self, BackingFiles, Passthrough};
use crate::mountinfo;
use crate::pins::{Pins, StateFile, StateKeeper};
use crate::readers::exec::CommandRunner;
use crate::readers::opens::Opens;
use crate::recorder::{self, Recorder};
use crate::rules::{LiveMount, ManifestWorker};
use crate::service::MountService;
use crate::units::Bytes;

/// `modelcache mount`: mounts, serves until unmounted or signalled, and
/// unmounts. Returns once the mount is gone.
pub fn run(config: MountConfig) -> Result<(), Error> {
    // Before any thread starts (the cache's loaders and reaper, hooks...):
    // a stop signal must reach `wait_signal`, never a thread that would let
    // it kill the process.
    block_signals();
    let Checked {
        backing,
        mountpoint,
    } = check(&config)?;
    config.settings.check_pins(&backing)?;
    // Open the backing directory *before* mounting: in place, it is about to
    // be hidden under the mount.
    let root = backing::open_root(&backing)
        .map_err(|e| Error(format!("cannot open {}: {e}", backing.display())))?;
    let MountConfig {
        settings,
        read_mode,
        metrics_file,
        ..
    } = config;
    let cap = settings.cache.max_size;
    let settings_floor = Thresholds::new(settings.cache.min_available, settings.critical_available);
    let passthrough_wanted = match (config.passthrough, passthrough::unsupported_reason()) {
        (Passthrough::Off, _) => false,
        (Passthrough::On, Some(why)) => {
            return Err(Error(format!(
                "--passthrough on: {why}; run as root on Linux 6.9+, or use --passthrough auto"
            )));
        }
        (Passthrough::Auto, Some(why)) => {
            // Information, not a warning: copy mode is the normal mode of a
            // user's daemon.
            info!(
                "serving mode: copy, cached files are kept in the mount's page cache (passthrough is for root daemons: {why})"
            );
            false
        }
        (_, None) => true,
    };
    // Before the overlay sizes its tables from the limit.
    crate::descriptors::raise_limit();
    let backing_files = Arc::new(BackingFiles::new(passthrough_wanted));
    let cache = Arc::new(Cache::new(settings.cache.clone()));
    // Read before mounting: the state directory could be under the mount
    // point (in place). Nothing is pinned until the manifest's worker runs.
    let state = Arc::new(StateKeeper::load(StateFile::for_mount(&mountpoint)));
    let pins = Arc::new(Pins::new(cache.clone(), state.clone()));
    // Every open of a model file reaches the recorder through this
    // (bounded: a FUSE thread never waits for the record).
    let (recorded_opens, opens_to_record) = crossbeam_channel::bounded(recorder::QUEUED);
    let recorder = Recorder::start(state.clone(), opens_to_record);
    // Opens of a group's member reach the manifest's worker through this
    // (bounded: warming a group is best effort).
    let (group_opens, opened_members) = crossbeam_channel::bounded(GROUP_OPENS_QUEUED);
    // Before the first open: a reader's class acts from its first request.
    let hooks = settings.manifest.as_ref().map(|m| m.hooks.clone());
    let opens = Arc::new(Opens::new(
        cache.clone(),
        hooks.unwrap_or_default(),
        CommandRunner::start(mountpoint.clone()),
        group_opens,
        recorded_opens,
    ));
    let overlay = Arc::new(
        Overlay::new(root, opens.clone(), config.vfs.atime == Atime::Noatime)
            .map_err(|e| Error(format!("{}: {e}", backing.display())))?,
    );

    // The caller's umask is applied per create (fs/creds.rs); the daemon's
    // own must not mask the mode a second time on threads that have none.
    // SAFETY: process-wide but harmless here; no path of ours relies on it.
    unsafe { libc::umask(0) };
    // Hold no directory busy (ours could be inside another mount).
    let _ = std::env::set_current_dir("/");

    warn_of_users_before_mount(&mountpoint, backing == mountpoint);
    let fuse_fd = fuse_mount(&mountpoint, &backing, config.allow_other, config.vfs)?;
    // Kept to probe passthrough on the live session.
    let fuse_dev = fuse_fd
        .try_clone()
        .map_err(|e| Error(format!("cannot duplicate the FUSE descriptor: {e}")))?;
    let mut fuse_config = fuser::Config::default();
    fuse_config.n_threads = Some(config.threads);
    fuse_config.clone_fd = true;
    let acl = if config.allow_other {
        fuser::SessionACL::All
    } else {
        fuser::SessionACL::Owner
    };
    fuse_config.acl = acl;
    let ttl = config
        .metadata_ttl
        .unwrap_or_else(|| default_metadata_ttl(backing == mountpoint));
    let adapter = FuseAdapter::new(overlay.clone(), ttl, read_mode, backing_files.clone());
    let session = match fuser::Session::from_fd(adapter, fuse_fd, acl, fuse_config) {
        Ok(s) => s,
        Err(e) => {
            let _ = unmount(&mountpoint, true);
            return Err(Error(format!("FUSE handshake failed: {e}")));
        }
    };
    let mounted_files: Arc<dyn crate::cache::MountView> = Arc::new(mounted::MountedFiles::new(
        mountpoint.clone(),
        session.notifier(),
        Arc::downgrade(&overlay),
    ));
    let session = std::thread::Builder::new()
        .name("fuse-session".into())
        .spawn(move || session.run())
        .map_err(|e| Error(format!("cannot start the FUSE session: {e}")))?;
    let how = if backing == mountpoint {
        "in place".to_string()
    } else {
        format!("from {}", backing.display())
    };
    let confirmed = confirm_passthrough(&mountpoint, &fuse_dev, &backing_files);
    cache.serve_from((!matches!(confirmed, Ok(true))).then_some(mounted_files));
    let reads = match confirmed {
        Ok(true) => "passthrough".to_string(),
        Ok(false) if config.passthrough == Passthrough::On => {
            let _ = unmount(&mountpoint, true);
            return Err(Error(
                "--passthrough on: this kernel does not offer FUSE passthrough (Linux 6.9+ \
                 with CONFIG_FUSE_PASSTHROUGH); use --passthrough auto"
                    .into(),
            ));
        }
        Ok(false) => format!("copy mode, {:?}", config.read_mode).to_lowercase(),
        Err(e) => {
            let _ = unmount(&mountpoint, true);
            return Err(e);
        }
    };
    drop(fuse_dev);
    // Before the manifest's prewarm: its admissions must see the floor.
    let monitor = start_pressure_monitor(&cache, &settings_floor);
    let rules = ManifestWorker::start(
        LiveMount {
            overlay: overlay.clone(),
            opens: opens.clone(),
            mountpoint: mountpoint.clone(),
            pins: pins.clone(),
            state,
            warm_start: settings.warm_start,
        },
        settings.manifest,
        settings.manifest_arg,
        opened_members,
    );
    let service = Arc::new(MountService {
        mountpoint: mountpoint.clone(),
        backing: backing.clone(),
        overlay: overlay.clone(),
        opens,
        backing_files: backing_files.clone(),
        rules: rules.clone(),
        pins,
        record: recorder.live(),
        memory: Arc::new(move || monitor.as_ref().and_then(|m| m.latest())),
    });
    let socket = control::socket_path_for(&mountpoint);
    let _control = match control::serve(&socket, service.clone()) {
        Ok(server) => Some(server),
        Err(e) => {
            warn!(
                "no control socket at {} ({e}): `modelcache status` cannot reach this mount",
                socket.display()
            );
            None
        }
    };
    let _metrics = metrics_file
        .map(|path| control::spawn_metrics_writer(path, service.clone(), METRICS_EVERY));
    // Logged once everything (control socket included) is up: scripts and
    // tests may wait for this line.
    info!(
        "mounted {} {how} ({} threads, metadata TTL {} s, cache cap {}, reads: {reads}{})",
        mountpoint.display(),
        config.threads,
        ttl.as_secs(),
        Bytes(cap),
        match (config.allow_other, config.vfs.read_only) {
            (true, true) => ", allow_other, read-only",
            (true, false) => ", allow_other",
            (false, true) => ", read-only",
            (false, false) => "",
        }
    );
    // Ready once the manifest is applied (its walk is bounded, and so is
    // this wait): its warnings are printed before `--background` returns.
    if !rules.wait_first_applied(FIRST_APPLY_WAIT) {
        info!(
            "the manifest is still being applied (walking the models folder): its warnings \
             from here on go to the daemon's log (with --background, nowhere)"
        );
    }
    notify_ready();
    let ours = mountinfo::mount_at(&mountpoint)
        .filter(|m| m.is_modelcache())
        .map(|m| m.id);
    let reloads = Arc::new(SignalReloads::default());
    let served = serve_until_unmounted(
        &mountpoint,
        ours,
        session,
        &|| reloads.request(&rules),
        &|| cache.release_all(),
    );
    // The session is over: no open comes any more. The record's windows
    // close and it is written before the process exits.
    drop(recorder);
    served
}

/// How long the mount waits for its first manifest to be applied before it
/// reports itself ready.
const FIRST_APPLY_WAIT: Duration = Duration::from_secs(10);

/// Reloads asked for by SIGHUP. A reload waits for the worker's walk of the
/// mount, so it runs off the loop that answers a stop signal, on one thread
/// at a time: signals that arrive meanwhile make it run once more, not
/// start more threads.
#[derive(Default)]
struct SignalReloads {
    running: std::sync::atomic::AtomicBool,
    again: std::sync::atomic::AtomicBool,
}

impl SignalReloads {
    fn request(self: &Arc<Self>, rules: &Arc<ManifestWorker>) {
        use std::sync::atomic::Ordering::SeqCst;
        self.again.store(true, SeqCst);
        if self.running.swap(true, SeqCst) {
            return;
        }
        let (me, rules) = (self.clone(), rules.clone());
        let spawned = std::thread::Builder::new()
            .name("reload".into())
            .spawn(move || {
                loop {
                    while me.again.swap(false, SeqCst) {
                        match rules.reload() {
                            // Its warnings were logged as it was applied.
                            Ok((what, _)) => info!("{what}"),
                            Err(e) => warn!("reload failed, the manifest in force stays: {e}"),
                        }
                    }
                    me.running.store(false, SeqCst);
                    // A signal between the last check and now: go on.
                    if !me.again.load(SeqCst) || me.running.swap(true, SeqCst) {
                        return;
                    }
                }
            });
        if let Err(e) = spawned {
            self.running.store(false, SeqCst);
            warn!("reload failed, the manifest in force stays: cannot start its thread: {e}");
        }
    }
}

/// How often `--metrics-file` is rewritten.
const METRICS_EVERY: Duration = Duration::from_secs(5);
/// Opens of group members waiting for the manifest's worker; more are dropped
/// (the group is warming already).
const GROUP_OPENS_QUEUED: usize = 256;

/// Starts the memory-pressure monitor: it keeps the cache's view of
/// available memory current (admissions stay above the floor) and evicts
/// when memory runs low: unpinned files under `min_available`, pinned ones
/// too under `critical_available`. `None` (with a warning) where memory
/// cannot be read.
fn start_pressure_monitor(cache: &Arc<Cache>, floor: &Thresholds) -> Option<Arc<Monitor>> {
    // Once now: the monitor's first sample comes from its own thread, after
    // the prewarm that starts next may have admitted files past the floor.
    if let Ok(sample) = Sample::read() {
        cache.note_available(sample.available());
    }
    let (sampled, relieved) = (cache.clone(), cache.clone());
    let (min, critical) = (floor.min_available, floor.critical_available);
    let started = Monitor::with_sampler(
        *floor,
        Monitor::DEFAULT_INTERVAL,
        move || {
            let mut sample = Sample::read()?;
            sample.cache_in_available = sampled.bytes_in_mem_available();
            sampled.note_available(sample.available());
            Ok(sample)
        },
        move |sample, pressure| {
            let available = Bytes(sample.available());
            match pressure {
                Pressure::Calm => {}
                Pressure::Low { to_free } => {
                    let freed = relieved.relieve_pressure(to_free, false);
                    if freed > 0 {
                        warn!(
                            "memory low ({available} available, floor {}): released {}",
                            Bytes(min),
                            Bytes(freed)
                        );
                    }
                }
                Pressure::Critical { to_free } => {
                    let mut freed = relieved.relieve_pressure(to_free, false);
                    if freed < to_free {
                        freed += relieved.relieve_pressure(to_free - freed, true);
                    }
                    if freed > 0 {
                        warn!(
                            "memory critically low ({available} available, critical floor {}): \
                             released {}, pinned files included",
                            Bytes(critical),
                            Bytes(freed)
                        );
                    }
                }
            }
        },
    );
    match started {
        Ok(m) => Some(Arc::new(m)),
        Err(e) => {
            warn!("cannot watch memory ({e}): the cache will not give memory back under pressure");
            None
        }
    }
}

/// Once the session answers (INIT done), checks that the kernel really
/// accepts backing files from this daemon; `auto` falls back to copy mode
/// with one log line saying why. Returns whether passthrough is in use.
fn confirm_passthrough(
    mountpoint: &Path,
    fuse_dev: &OwnedFd,
    backing_files: &BackingFiles,
) -> Result<bool, Error> {
    if !backing_files.is_enabled() {
        return Ok(false);
    }
    if let Liveness::Silent = probe(mountpoint) {
        return Err(Error(format!(
            "{} does not answer after mounting",
            mountpoint.display()
        )));
    }
    if !backing_files.is_enabled() {
        // INIT found no passthrough in this kernel.
        return Ok(false);
    }
    match passthrough::probe(fuse_dev.as_fd()) {
        Ok(()) => Ok(true),
        Err(e) => {
            info!(
                "serving mode: copy, cached files are kept in the mount's page cache (the kernel refused passthrough's test file: {e})"
            );
            backing_files.disable();
            Ok(false)
        }
    }
}

/// Serves until the session ends: the mount was unmounted and its last
/// user is gone. `release` lets go of the cache's own files in the mount
/// (copy-mode entries map them): before unmounting on a stop signal, and
/// when the mount (id `ours`) was detached from outside (`umount -l`).
fn serve_until_unmounted(
    mountpoint: &Path,
    ours: Option<u64>,
    session: JoinHandle<io::Result<()>>,
    reload: &dyn Fn(),
    release: &dyn Fn(),
) -> Result<(), Error> {
    let mp = mountpoint.display();
    let mut stopping = false;
    let mut detached = false;
    // Whether the last read of the mount table failed (logged once).
    let mut unreadable_table = false;
    while !session.is_finished() {
        match wait_signal(Duration::from_millis(200)) {
            Some(libc::SIGHUP) => reload(),
            Some(_) if stopping => {
                warn!("second stop signal: exiting now; files still open on {mp} will fail");
                return Ok(());
            }
            Some(_) => {
                stopping = true;
                crate::notify::stopping();
                release();
                stop(mountpoint);
            }
            None => {}
        }
        if !detached && let Some(id) = ours {
            match mountinfo::is_gone(mountinfo::try_mounts(), id) {
                Ok(true) => {
                    detached = true;
                    info!("{mp} was detached: releasing the cache's files in it");
                    crate::notify::stopping();
                    release();
                }
                Ok(false) => unreadable_table = false,
                // Never taken for "detached": that would empty the cache
                // because this process ran out of descriptors.
                Err(e) => {
                    if !unreadable_table {
                        warn!("{}", mountinfo::unreadable_message(&e));
                    }
                    unreadable_table = true;
                }
            }
        }
    }
    // Unknown counts as mounted: the ECONNABORTED below is then an error.
    let still_mounted = || match ours {
        Some(id) => !matches!(mountinfo::is_gone(mountinfo::try_mounts(), id), Ok(true)),
        None => mountinfo::mount_at(mountpoint).is_some_and(|m| m.is_modelcache()),
    };
    match session.join() {
        Ok(Ok(())) => {
            info!("unmounted {mp}");
            Ok(())
        }
        // The kernel answers ECONNABORTED instead of ENODEV to a worker that
        // was taking a request (a last FORGET or RELEASE) just as the
        // unmounted connection was torn down. With the mount gone, that is a
        // normal end; a connection aborted under a live mount (fusectl) is
        // still an error.
        Ok(Err(e)) if e.raw_os_error() == Some(libc::ECONNABORTED) && !still_mounted() => {
            info!("unmounted {mp}");
            Ok(())
        }
        Ok(Err(e)) => Err(Error(format!(
            "FUSE session for {mp} ended with an error: {e}"
        ))),
        Err(_) => Err(Error(format!("FUSE session for {mp} panicked"))),
    }
}
