//! The recorder: the thread that keeps a mount's working-set record. FUSE
//! threads only `try_send` it an [`OpenEvent`] (see `readers::opens`); it
//! counts them into the [`Record`] and writes the record into the state
//! file through the mount's [`StateKeeper`]: every [`FLUSH_EVERY`] when it
//! changed, and once more when stopped (at unmount).
//!
//! A thread of its own rather than an arm of the manifest worker's loop:
//! that worker may spend seconds walking the models folder for a reload,
//! during which opens would back up and be dropped, and a state file's
//! fsync would delay the groups it warms.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;
use tracing::warn;

use crate::pins::{SaveError, StateKeeper};
use crate::record::{OpenEvent, Record, unix_now};

/// Events waiting for the recorder; more are dropped (and counted).
pub const QUEUED: usize = 4096;
/// How often a changed record is written.
pub const FLUSH_EVERY: Duration = Duration::from_secs(60);

/// The running recorder; dropping it closes the open windows and writes
/// the record a last time.
pub struct Recorder {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
    live: LiveRecord,
}

/// The record as the recorder keeps it, between saves too: what the
/// control socket's `record` verb answers with. The recorder holds the
/// lock for each event and while it saves (never a FUSE thread: they
/// only `try_send`), so an answer may wait for a save's fsync.
#[derive(Clone)]
pub struct LiveRecord(Arc<Mutex<Record>>);

impl LiveRecord {
    /// A copy, its open windows closed as an unmount would close them:
    /// the record as it would be saved if the mount ended `now`.
    pub fn snapshot(&self, now: u64) -> Record {
        let mut record = self.0.lock().clone();
        record.close_all(now);
        record
    }
}

impl Recorder {
    /// Starts the recorder on `events`, from the record `state` read at mount.
    pub fn start(state: Arc<StateKeeper>, events: Receiver<OpenEvent>) -> Recorder {
        let (stop, stopped) = crossbeam_channel::bounded(1);
        let live = LiveRecord(Arc::new(Mutex::new(state.record())));
        let shared = live.clone();
        let thread = std::thread::Builder::new()
            .name("recorder".into())
            .spawn(move || record(&state, &shared, &events, &stopped))
            .map_err(|e| warn!("cannot start the recorder, opens are not recorded: {e}"))
            .ok();
        Recorder {
            stop: Some(stop),
            thread,
            live,
        }
    }

    /// The record as it stands (see [`LiveRecord`]).
    pub fn live(&self) -> LiveRecord {
        self.live.clone()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn record(
    state: &StateKeeper,
    live: &LiveRecord,
    events: &Receiver<OpenEvent>,
    stopped: &Receiver<()>,
) {
    let record = &live.0;
    let mut changed = false;
    // The last save's error, logged once until it changes.
    let mut failed: Option<SaveError> = None;
    let mut next_flush = Instant::now() + FLUSH_EVERY;
    loop {
        let wait = next_flush.saturating_duration_since(Instant::now());
        crossbeam_channel::select! {
            recv(events) -> event => match event {
                Ok(event) => changed |= record.lock().opened(&event),
                // The sender lives in `Opens`: gone, the mount is.
                Err(_) => break,
            },
            // Sent nothing: dropped, the mount is going away.
            recv(stopped) -> _ => break,
            default(wait) => {}
        }
        if Instant::now() >= next_flush {
            let mut record = record.lock();
            changed |= record.close_expired(unix_now());
            if changed {
                save(state, &mut record, &mut failed);
                changed = false;
            }
            next_flush = Instant::now() + FLUSH_EVERY;
        }
    }
    // What is queued still counts: the FUSE session has ended.
    let mut record = record.lock();
    for event in events.try_iter().take(QUEUED) {
        changed |= record.opened(&event);
    }
    changed |= record.close_all(unix_now());
    if changed {
        save(state, &mut record, &mut failed);
    }
}

fn save(state: &StateKeeper, record: &mut Record, failed: &mut Option<SaveError>) {
    // Files warm start found gone leave this copy too.
    match state.update(|s| {
        for (name, last_open) in s.forgotten.drain(..) {
            record.forget(&name, last_open);
        }
        s.record = record.clone();
    }) {
        Ok(()) => *failed = None,
        Err(e) => {
            if failed.as_ref() != Some(&e) {
                warn!("the record of opened files is not saved: {e}");
            }
            *failed = Some(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pins::StateFile;
    use crate::record::{FileIdentity, Source};

    fn open(name: &str, at: u64) -> OpenEvent {
        OpenEvent {
            name: name.into(),
            identity: FileIdentity::default(),
            source: Source::Disk,
            pid: 1,
            at,
        }
    }

    #[test]
    fn a_file_warm_start_found_gone_leaves_the_recorders_copy_too() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        let file = || StateFile::new(dir.clone(), std::path::Path::new("/mnt/models"));
        let keeper = StateKeeper::load(Some(file()));
        let mut record = Record::default();
        record.opened(&open("gone.gguf", 5));
        record.opened(&open("kept.gguf", 6));
        let mut failed = None;
        save(&keeper, &mut record, &mut failed);
        // Warm start finds gone.gguf gone: saved at once without it.
        keeper.forget(&[("gone.gguf".into(), 5)]).unwrap();
        let names = |r: &Record| r.files.keys().cloned().collect::<Vec<_>>();
        assert_eq!(names(&file().load().state.record), ["kept.gguf"]);
        // The recorder's next save does not bring it back.
        record.opened(&open("kept.gguf", 7));
        save(&keeper, &mut record, &mut failed);
        assert_eq!(failed, None);
        assert_eq!(names(&record), ["kept.gguf"]);
        assert_eq!(names(&file().load().state.record), ["kept.gguf"]);
    }
}
