//! The status as Prometheus text, for node_exporter's textfile collector
//! (`modelcache mount --metrics-file /var/lib/node_exporter/modelcache.prom`).

use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::Duration;

use super::Daemon;
use super::protocol::{EVICTION_REASONS, FileState, MountStatus};

/// A label value escaped as the text format wants: `\`, `"` and newline.
pub fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn float(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        v.to_string()
    }
}

struct Exposition {
    text: String,
    mount: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: String) {
        let _ = write!(self.text, "{name}{{mountpoint=\"{}\"", self.mount);
        for (k, v) in labels {
            let _ = write!(self.text, ",{k}=\"{}\"", escape_label(v));
        }
        let _ = writeln!(self.text, "}} {value}");
    }

    fn one(&mut self, name: &str, kind: &str, help: &str, value: impl ToString) {
        self.family(name, kind, help);
        self.sample(name, &[], value.to_string());
    }
}

/// The status in Prometheus text exposition format (version 0.0.4). Every
/// sample carries a `mountpoint` label.
pub fn render_metrics(status: &MountStatus) -> String {
    let mut e = Exposition {
        text: String::new(),
        mount: escape_label(&status.mountpoint),
    };
    e.family(
        "modelcache_info",
        "gauge",
        "The mount: its backing directory and read mode (always 1).",
    );
    e.sample(
        "modelcache_info",
        &[("backing", &status.backing), ("mode", status.mode.as_str())],
        "1".into(),
    );
    e.one(
        "modelcache_max_size_bytes",
        "gauge",
        "The cache's cap.",
        status.max_size,
    );
    e.one(
        "modelcache_cached_bytes",
        "gauge",
        "Bytes of files in the cache (loaded or loading).",
        status.cached_bytes,
    );
    e.one(
        "modelcache_pinned_bytes",
        "gauge",
        "Bytes of pinned files in the cache.",
        status.pinned_bytes,
    );
    e.one(
        "modelcache_held_bytes",
        "gauge",
        "Bytes of evicted files still held by open handles.",
        status.held_bytes,
    );
    e.one(
        "modelcache_mem_available_bytes",
        "gauge",
        "MemAvailable as the daemon last read it.",
        status.mem_available,
    );
    if let Some(psi) = status.psi_some_avg10 {
        e.one(
            "modelcache_memory_pressure_some_avg10",
            "gauge",
            "Memory pressure (PSI some avg10, percent).",
            float(psi),
        );
    }
    e.family(
        "modelcache_files",
        "gauge",
        "Files the cache lists, by state.",
    );
    for state in [
        FileState::Loading,
        FileState::Cached,
        FileState::Pinned,
        FileState::Evicted,
        FileState::Uncached,
    ] {
        let n = status.files.iter().filter(|f| f.state == state).count();
        e.sample(
            "modelcache_files",
            &[("state", state.as_str())],
            n.to_string(),
        );
    }
    e.one(
        "modelcache_open_handles",
        "gauge",
        "Open handles on cached files.",
        status.files.iter().map(|f| f.open_handles).sum::<u64>(),
    );

    let c = &status.counters;
    e.family(
        "modelcache_opens_by_source_total",
        "counter",
        "Opens of model files by where they were served from: ram (wholly cached), partial (loading), disk.",
    );
    for (source, v) in [
        ("ram", c.by_source.opens_from_ram),
        ("partial", c.by_source.opens_partial),
        ("disk", c.by_source.opens_from_disk),
    ] {
        e.sample(
            "modelcache_opens_by_source_total",
            &[("source", source)],
            v.to_string(),
        );
    }
    e.one(
        "modelcache_bytes_opened_from_ram_total",
        "counter",
        "The sizes of the model files opened from RAM, summed.",
        c.by_source.bytes_opened_from_ram,
    );
    e.one(
        "modelcache_disk_seconds_avoided_total",
        "counter",
        "Estimated seconds of disk reads avoided: bytes opened from RAM over the read rate the cache's recent loads measured.",
        float(c.by_source.disk_seconds_avoided),
    );
    e.family(
        "modelcache_opens_total",
        "counter",
        "Opens of model files, by reader class.",
    );
    for (class, v) in &c.opens_by_class {
        e.sample("modelcache_opens_total", &[("class", class)], v.to_string());
    }
    e.family(
        "modelcache_read_bytes_total",
        "counter",
        "Bytes the daemon read from backing files for readers of model files, by reader class.",
    );
    for (class, v) in &c.bytes_by_class {
        e.sample(
            "modelcache_read_bytes_total",
            &[("class", class)],
            v.to_string(),
        );
    }
    e.one(
        "modelcache_bytes_from_backing_total",
        "counter",
        "Bytes the daemon read from backing files for readers of model files: reads the cache's page cache did not answer.",
        c.bytes_from_backing,
    );
    e.one(
        "modelcache_file_hits_total",
        "counter",
        "Opens of a cacheable file found in the cache.",
        c.file_hits,
    );
    e.one(
        "modelcache_file_misses_total",
        "counter",
        "Opens of a cacheable file not in the cache.",
        c.file_misses,
    );
    e.one(
        "modelcache_loads_total",
        "counter",
        "Whole-file loads finished.",
        c.loads,
    );
    e.one(
        "modelcache_load_bytes_total",
        "counter",
        "Bytes loaded into the cache.",
        c.load_bytes,
    );
    e.one(
        "modelcache_load_seconds_total",
        "counter",
        "Time spent loading files.",
        float(c.load_seconds),
    );
    e.family(
        "modelcache_evictions_total",
        "counter",
        "Files evicted, by reason (cap, pressure, invalidated, manual).",
    );
    let extra = c
        .evictions
        .keys()
        .filter(|k| !EVICTION_REASONS.contains(&k.as_str()));
    for reason in EVICTION_REASONS
        .iter()
        .copied()
        .chain(extra.map(String::as_str))
    {
        let v = c.evictions.get(reason).copied().unwrap_or(0);
        e.sample(
            "modelcache_evictions_total",
            &[("reason", reason)],
            v.to_string(),
        );
    }
    e.one(
        "modelcache_pressure_events_total",
        "counter",
        "Times the pressure monitor had to free memory.",
        c.pressure_events,
    );
    e.text
}

/// Writes the status as Prometheus text to `path`, atomically: a reader
/// (node_exporter) sees the old file or the new one, never half of one.
pub fn write_metrics(path: &Path, status: &MountStatus) -> io::Result<()> {
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "the metrics path names no file",
        )
    })?;
    // A dot name without the .prom suffix: the collector never reads it.
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let result = (|| {
        use std::os::unix::fs::OpenOptionsExt;
        // Never write through whatever a crash (or someone else) left there.
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)?;
        f.write_all(render_metrics(status).as_bytes())?;
        f.flush()?;
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

/// A thread writing the metrics file. Dropping it stops the thread and
/// removes the file (the mount it described is gone).
pub struct MetricsHandle {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
}

impl Drop for MetricsHandle {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Writes `daemon`'s status to `path` now and then every `every`, on a
/// thread of its own. A failed write is logged (once until it works again)
/// and retried next time.
pub fn spawn_metrics_writer(
    path: PathBuf,
    daemon: Arc<dyn Daemon>,
    every: Duration,
) -> MetricsHandle {
    let (tx, rx) = mpsc::channel::<()>();
    let thread_path = path.clone();
    let thread = std::thread::Builder::new()
        .name("modelcache-metrics".into())
        .spawn(move || {
            let mut failing: Option<String> = None;
            loop {
                match write_metrics(&thread_path, &daemon.status()) {
                    Ok(()) => {
                        if failing.take().is_some() {
                            tracing::info!("metrics file {} written again", thread_path.display());
                        }
                    }
                    Err(e) => {
                        let msg = e.to_string();
                        if failing.as_deref() != Some(msg.as_str()) {
                            tracing::warn!("cannot write the metrics file: {msg}");
                        }
                        failing = Some(msg);
                    }
                }
                match rx.recv_timeout(every) {
                    Err(RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
            }
        });
    let thread = match thread {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::warn!("cannot start the metrics writer: {e}");
            None
        }
    };
    MetricsHandle {
        stop: Some(tx),
        thread,
        path,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label(r#"/a "b"\c"#), r#"/a \"b\"\\c"#);
        assert_eq!(escape_label("x\ny"), "x\\ny");
    }

    #[test]
    fn floats_as_prometheus_writes_them() {
        assert_eq!(float(0.25), "0.25");
        assert_eq!(float(13.0), "13");
        assert_eq!(float(f64::INFINITY), "+Inf");
        assert_eq!(float(f64::NAN), "NaN");
    }
}
