//! Reader classification: which kind of process reads a model file. A
//! process that maps the CUDA or ROCm runtime (or a GPU device node) is
//! loading weights onto a GPU; everything else reads for the CPU. Each
//! process is classified once, keyed by pid and start time so a recycled
//! pid is classified afresh.

use std::collections::HashMap;

use parking_lot::Mutex;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ReaderClass {
    Cuda,
    Rocm,
    Cpu,
}

impl ReaderClass {
    pub const ALL: [ReaderClass; 3] = [ReaderClass::Cuda, ReaderClass::Rocm, ReaderClass::Cpu];

    pub fn name(self) -> &'static str {
        match self {
            ReaderClass::Cuda => "cuda",
            ReaderClass::Rocm => "rocm",
            ReaderClass::Cpu => "cpu",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// The class of a process from its `/proc/PID/maps` text.
pub fn classify_maps(maps: &str) -> ReaderClass {
    let mut rocm = false;
    for line in maps.lines() {
        let Some(path) = line.split_whitespace().nth(5) else {
            continue;
        };
        let file = path.rsplit('/').next().unwrap_or(path);
        if file.starts_with("libcuda.so")
            || (file.starts_with("libcudart") && file.contains(".so"))
            || path.starts_with("/dev/nvidia")
        {
            return ReaderClass::Cuda;
        }
        if file.starts_with("libamdhip64.so")
            || file.starts_with("libhsa-runtime64.so")
            || path == "/dev/kfd"
        {
            rocm = true;
        }
    }
    if rocm {
        ReaderClass::Rocm
    } else {
        ReaderClass::Cpu
    }
}

/// Classifies callers by pid, remembering each process (pid + start time).
#[derive(Default)]
pub struct Classifier {
    known: Mutex<HashMap<(u32, u64), ReaderClass>>,
}

/// Processes remembered before the table is cleared (pids are recycled; a
/// stale row only costs one reclassification).
const MAX_KNOWN: usize = 4096;

impl Classifier {
    pub fn classify(&self, pid: u32) -> ReaderClass {
        let Some(start) = start_time(pid) else {
            return ReaderClass::Cpu;
        };
        if let Some(class) = self.known.lock().get(&(pid, start)) {
            return *class;
        }
        let class = std::fs::read_to_string(format!("/proc/{pid}/maps"))
            .map_or(ReaderClass::Cpu, |maps| classify_maps(&maps));
        let mut known = self.known.lock();
        if known.len() >= MAX_KNOWN {
            known.clear();
        }
        known.insert((pid, start), class);
        class
    }
}

/// A process's start time (field 22 of /proc/PID/stat, after the command
/// name, which may itself contain spaces and parentheses).
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn maps(paths: &[&str]) -> String {
        paths
            .iter()
            .map(|p| format!("7f0000000000-7f0000001000 r-xp 00000000 fe:00 123 {p}\n"))
            .collect()
    }

    #[test]
    fn processes_are_classified_by_what_they_map() {
        let cpu = maps(&["/usr/lib/libc.so.6", "/usr/bin/python3.11", "[heap]"]);
        assert_eq!(classify_maps(&cpu), ReaderClass::Cpu);
        let cuda = maps(&["/usr/lib/x86_64-linux-gnu/libcuda.so.535.104.05"]);
        assert_eq!(classify_maps(&cuda), ReaderClass::Cuda);
        let cudart =
            maps(&["/venv/lib/python3.11/site-packages/nvidia/cuda_runtime/lib/libcudart.so.12"]);
        assert_eq!(classify_maps(&cudart), ReaderClass::Cuda);
        assert_eq!(classify_maps(&maps(&["/dev/nvidia0"])), ReaderClass::Cuda);
        let rocm = maps(&["/opt/rocm/lib/libamdhip64.so.6.0.60000"]);
        assert_eq!(classify_maps(&rocm), ReaderClass::Rocm);
        assert_eq!(classify_maps(&maps(&["/dev/kfd"])), ReaderClass::Rocm);
        // A process with both runtimes loaded drives a CUDA device.
        let both = maps(&["/dev/kfd", "/usr/lib/libcuda.so.1"]);
        assert_eq!(classify_maps(&both), ReaderClass::Cuda);
        // Names that merely contain the words are not the runtimes.
        let lookalike = maps(&["/home/u/notes/libcuda_notes.txt", "/opt/kfd-tools/bin"]);
        assert_eq!(classify_maps(&lookalike), ReaderClass::Cpu);
    }

    #[test]
    fn this_process_is_a_cpu_reader_and_is_remembered() {
        let c = Classifier::default();
        let me = std::process::id();
        assert_eq!(c.classify(me), ReaderClass::Cpu);
        assert_eq!(c.known.lock().len(), 1);
        assert_eq!(c.classify(me), ReaderClass::Cpu);
        assert_eq!(c.known.lock().len(), 1);
        // A pid that does not exist is a CPU reader, and not remembered.
        assert_eq!(c.classify(u32::MAX - 1), ReaderClass::Cpu);
        assert_eq!(c.known.lock().len(), 1);
    }
}
