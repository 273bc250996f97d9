//! Following the loads a prewarm (or a warm start) queued: progress lines
//! or a progress bar, the progress `status` shows, and a last line that
//! counts only what loaded.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::cache::Cache;
use crate::control::protocol::LoadingProgress;
use crate::units::{Bytes, Count, Rate};

/// How often prewarm progress is logged.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// A file whose load a prewarm queued.
pub(super) struct Followed {
    pub(super) name: String,
    pub(super) key: crate::cache::policy::Key,
    /// `None`: it left the cache before it was first looked at.
    pub(super) size: Option<u64>,
    /// Seen fully loaded (it may be evicted later: it still loaded).
    pub(super) loaded: bool,
}

/// Files a prewarm did not load, and why: one file, or (a warm start
/// stopped by the cap or the floor) the run of files from the first.
pub(super) struct NotLoaded {
    /// "a.safetensors", or "3 recorded files from a.safetensors on".
    pub(super) what: String,
    pub(super) files: usize,
    pub(super) why: String,
}

impl NotLoaded {
    pub(super) fn one(name: String, why: String) -> NotLoaded {
        NotLoaded {
            what: name,
            files: 1,
            why,
        }
    }
}

/// The loads a prewarm queued, followed until done, and the files it named
/// that the cache refused.
pub(super) struct Prewarm {
    /// What the lines begin with: "prewarm", "warm start".
    what: &'static str,
    files: Vec<Followed>,
    /// The files refused when queued.
    refused: Vec<NotLoaded>,
    total: u64,
    /// As of the last report, for `status`.
    progress: LoadingProgress,
    started: Instant,
    last_report: Instant,
    bar: Option<indicatif::ProgressBar>,
}

/// Why a followed file that left the cache did not load. The cache logs
/// each eviction with its reason; this names where to look.
const LEFT_THE_CACHE: &str = "left the cache before it finished loading (the log's \
                              \"evicted\" line for it says why)";

impl Prewarm {
    /// Follows `files`, of `total` bytes; `refused` are the files not
    /// queued, named in the last line.
    pub(super) fn follow(
        what: &'static str,
        files: Vec<Followed>,
        refused: Vec<NotLoaded>,
        total: u64,
    ) -> Prewarm {
        // On a terminal a progress bar; under systemd or in a log file, lines.
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(total);
            let template = format!(
                "{what} [{{bar:30}}] {{binary_bytes}}/{{binary_total_bytes}} \
                 {{binary_bytes_per_sec}}, {{eta}} left"
            );
            if let Ok(style) = indicatif::ProgressStyle::with_template(&template) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar
        });
        Prewarm {
            what,
            progress: LoadingProgress {
                what: what.to_string(),
                files: files.len() as u64,
                bytes: total,
                ..LoadingProgress::default()
            },
            files,
            refused,
            total,
            started: Instant::now(),
            last_report: Instant::now(),
            bar,
        }
    }

    /// How far it has got, as of the last [`Prewarm::report`].
    pub(super) fn progress(&self) -> &LoadingProgress {
        &self.progress
    }

    /// Logs progress now and then; returns true (after the final line)
    /// once every followed file is loaded or has left the cache.
    pub(super) fn report(&mut self, cache: &Cache) -> bool {
        let (mut loaded, mut pending) = (0u64, 0usize);
        for file in &mut self.files {
            match cache.progress(file.key) {
                Some((done, size)) => {
                    loaded += done;
                    if done < size {
                        pending += 1;
                    } else {
                        file.loaded = true;
                    }
                }
                None if file.loaded => loaded += file.size.unwrap_or(0),
                None => {}
            }
        }
        self.progress = LoadingProgress {
            what: self.what.to_string(),
            files: self.files.len() as u64,
            files_loaded: self.files.iter().filter(|f| f.loaded).count() as u64,
            bytes: self.total,
            loaded_bytes: loaded,
        };
        if let Some(bar) = &self.bar {
            bar.set_position(loaded);
            if pending == 0 {
                bar.finish_and_clear();
            }
        }
        if pending == 0 {
            let dropped: Vec<NotLoaded> = self
                .files
                .iter()
                .filter(|f| !f.loaded)
                .map(|f| NotLoaded::one(f.name.clone(), LEFT_THE_CACHE.to_string()))
                .collect();
            let not_loaded: Vec<&NotLoaded> = self.refused.iter().chain(&dropped).collect();
            let done = self.files.iter().filter(|f| f.loaded).count();
            let line = summary(
                self.what,
                done,
                &not_loaded,
                loaded,
                self.started.elapsed().as_secs_f64(),
            );
            if not_loaded.is_empty() {
                info!("{line}");
            } else {
                warn!("{line}");
            }
            return true;
        }
        if self.bar.is_none() && self.last_report.elapsed() >= PROGRESS_EVERY {
            self.last_report = Instant::now();
            info!(
                "{}: {} of {} loaded, {} to go",
                self.what,
                Bytes(loaded),
                Bytes(self.total),
                Count(pending as u64, "file")
            );
        }
        false
    }
}

/// The prewarm's last line: it counts only the files that loaded, and
/// names each that did not, with why.
fn summary(what: &str, loaded: usize, not_loaded: &[&NotLoaded], bytes: u64, secs: f64) -> String {
    let how = format!("{} in {secs:.1} s, {}", Bytes(bytes), Rate { bytes, secs });
    if not_loaded.is_empty() {
        return format!(
            "{what}: all loaded ({}, {how})",
            Count(loaded as u64, "file")
        );
    }
    let named = loaded + not_loaded.iter().map(|n| n.files).sum::<usize>();
    let why: Vec<String> = not_loaded
        .iter()
        .map(|n| format!("{}: {}", n.what, n.why))
        .collect();
    format!(
        "{what}: {loaded} of {} loaded ({how}); not loaded: {}",
        Count(named as u64, "file"),
        why.join("; ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prewarm_summary_counts_only_what_loaded() {
        assert_eq!(
            summary("prewarm", 3, &[], 12 << 20, 2.0),
            "prewarm: all loaded (3 files, 12.0 MiB in 2.0 s, 6 MiB/s)"
        );
        let big = NotLoaded::one(
            "big.safetensors".to_string(),
            "20.0 MiB is larger than the cap (8.0 MiB) by 12.0 MiB: raise --max-size or max_size"
                .to_string(),
        );
        assert_eq!(
            summary("prewarm", 2, &[&big], 4 << 20, 1.0),
            "prewarm: 2 of 3 files loaded (4.0 MiB in 1.0 s, 4 MiB/s); not loaded: \
             big.safetensors: 20.0 MiB is larger than the cap (8.0 MiB) by 12.0 MiB: \
             raise --max-size or max_size"
        );
        let run = NotLoaded {
            what: "2 recorded files from b.safetensors on".to_string(),
            files: 2,
            why: "the floor".to_string(),
        };
        assert_eq!(
            summary("warm start", 1, &[&run], 4 << 20, 1.0),
            "warm start: 1 of 3 files loaded (4.0 MiB in 1.0 s, 4 MiB/s); not loaded: \
             2 recorded files from b.safetensors on: the floor",
            "a run of refused files counts each"
        );
    }
}
