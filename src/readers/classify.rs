//! Reader classification: which kind of process reads a model file. A
//! process that maps the CUDA or ROCm runtime (or a GPU device node) is
//! loading weights onto a GPU; everything else reads for the CPU. GPU
//! answers are remembered per process (pid and start time, so a recycled
//! pid is classified afresh); a CPU answer is not, because a process may
//! load a GPU runtime after its first open.
//!
//! `hooks` runs what the manifest's `[hooks.CLASS]` tables ask for.

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

/// The process behind a FUSE request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reader {
    /// The process id (thread group id): FUSE names the calling thread.
    pub pid: u32,
    pub class: ReaderClass,
}

/// The path of one line of `/proc/PID/maps` (the sixth field, which may
/// hold spaces), without the ` (deleted)` mark; `None` for anonymous maps.
fn mapped_path(line: &str) -> Option<&str> {
    let mut rest = line;
    for _ in 0..5 {
        rest = rest.trim_start();
        rest = &rest[rest.find(char::is_whitespace)?..];
    }
    let path = rest.trim();
    (!path.is_empty()).then(|| path.strip_suffix(" (deleted)").unwrap_or(path))
}

/// The class of a process from its `/proc/PID/maps` text. CUDA wins over
/// ROCm when both are mapped: such a process drives an NVIDIA device.
pub fn classify_maps(maps: &str) -> ReaderClass {
    let mut rocm = false;
    for path in maps.lines().filter_map(mapped_path) {
        let file = path.rsplit('/').next().unwrap_or(path);
        // libcudart.so.12, and the hashed copies wheels bundle
        // (libcudart-d0da41ae.so.12).
        if file.starts_with("libcuda.so")
            || (file.starts_with("libcudart") && file.contains(".so"))
            || path.starts_with("/dev/nvidia")
        {
            return ReaderClass::Cuda;
        }
        if file.starts_with("libamdhip64") && file.contains(".so")
            || file.starts_with("libhsa-runtime64") && file.contains(".so")
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

/// Classifies callers by pid.
#[derive(Default)]
pub struct Classifier {
    /// GPU answers by (process id, start time).
    gpu: Mutex<HashMap<(u32, u64), ReaderClass>>,
}

/// GPU processes remembered before the table is cleared (pids are
/// recycled; a forgotten row only costs one reclassification).
const MAX_KNOWN: usize = 4096;

impl Classifier {
    /// The process behind request pid `pid` (a thread id) and its class.
    /// Never fails: a process that cannot be read (exited, another user's
    /// under a non-root daemon) is a CPU reader.
    pub fn classify(&self, pid: u32) -> Reader {
        self.classify_with(pid, &|path| std::fs::read_to_string(path).ok())
    }

    /// `classify`, reading /proc files through `read`.
    fn classify_with(&self, pid: u32, read: &dyn Fn(&str) -> Option<String>) -> Reader {
        let pid = read(&format!("/proc/{pid}/status"))
            .and_then(|s| thread_group(&s))
            .unwrap_or(pid);
        let cpu = Reader {
            pid,
            class: ReaderClass::Cpu,
        };
        let start = || read(&format!("/proc/{pid}/stat")).and_then(|s| start_time(&s));
        let Some(started) = start() else {
            return cpu;
        };
        if let Some(class) = self.gpu.lock().get(&(pid, started)) {
            return Reader { pid, class: *class };
        }
        let class =
            read(&format!("/proc/{pid}/maps")).map_or(ReaderClass::Cpu, |m| classify_maps(&m));
        // Read again: the maps were those of the process that started then,
        // not of a newer one given the same pid meanwhile.
        if class != ReaderClass::Cpu && start() == Some(started) {
            let mut gpu = self.gpu.lock();
            if gpu.len() >= MAX_KNOWN {
                gpu.clear();
            }
            gpu.insert((pid, started), class);
        }
        Reader { pid, class }
    }
}

/// The `Tgid:` of /proc/PID/status: the process a thread belongs to.
pub(super) fn thread_group(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))?
        .trim()
        .parse()
        .ok()
}

/// A process's start time: field 22 of /proc/PID/stat, after the command
/// name, which may itself hold spaces and parentheses.
fn start_time(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::HashMap;

    use super::*;

    /// A /proc/PID/maps text mapping `paths`, as the kernel writes it.
    fn maps(paths: &[&str]) -> String {
        paths
            .iter()
            .enumerate()
            .map(|(i, p)| {
                format!(
                    "7f1c{i:08x}000-7f1c{i:08x}fff r-xp 00000000 fe:01 {}                    {p}\n",
                    3146001 + i
                )
            })
            .collect()
    }

    const PYTHON: &[&str] = &[
        "/usr/bin/python3.11",
        "/usr/lib/x86_64-linux-gnu/libc.so.6",
        "/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0",
        "/home/me/ComfyUI/venv/lib/python3.11/site-packages/numpy.libs/libopenblas64_p-r0-0cf96a72.3.23.dev.so",
        "/home/me/ComfyUI/venv/lib/python3.11/site-packages/torch/lib/libtorch_cpu.so",
        "/home/me/ComfyUI/models/unet/model.safetensors",
        "[heap]",
        "[stack]",
        "[vdso]",
    ];

    fn with_python(extra: &[&str]) -> String {
        let mut paths = PYTHON.to_vec();
        paths.extend_from_slice(extra);
        maps(&paths) + "7f1c30000000-7f1c30021000 rw-p 00000000 00:00 0 \n"
    }

    #[test]
    fn plain_python_and_cpu_torch_read_for_the_cpu() {
        assert_eq!(classify_maps(&with_python(&[])), ReaderClass::Cpu);
        assert_eq!(classify_maps(""), ReaderClass::Cpu);
        // Names that merely contain the words are not the runtimes.
        let lookalikes = with_python(&[
            "/home/me/notes/libcuda_notes.txt",
            "/opt/kfd-tools/bin/kfdtest",
            "/usr/local/cuda/lib64/libcudart_static.a",
            "/dev/dri/renderD128",
        ]);
        assert_eq!(classify_maps(&lookalikes), ReaderClass::Cpu);
    }

    #[test]
    fn torch_cuda_wheels_and_the_driver_read_for_cuda() {
        for runtime in [
            "/home/me/ComfyUI/venv/lib/python3.11/site-packages/nvidia/cuda_runtime/lib/libcudart.so.12",
            "/home/me/ComfyUI/venv/lib/python3.11/site-packages/torch/lib/libcudart-d0da41ae.so.12",
            "/usr/lib/x86_64-linux-gnu/libcuda.so.1",
            "/usr/lib/x86_64-linux-gnu/libcuda.so.550.54.14",
            "/usr/local/cuda-12.4/targets/x86_64-linux/lib/libcudart.so.12.4.127",
            "/dev/nvidia0",
            "/dev/nvidiactl",
            "/dev/nvidia-uvm",
            // Paths may hold spaces, and a library may be deleted (upgraded
            // under a running process).
            "/home/me/My Models/venv/site-packages/nvidia/cuda_runtime/lib/libcudart.so.12",
            "/opt/venv/lib/libcudart.so.12 (deleted)",
        ] {
            assert_eq!(
                classify_maps(&with_python(&[runtime])),
                ReaderClass::Cuda,
                "{runtime}"
            );
        }
    }

    #[test]
    fn torch_rocm_wheels_read_for_rocm() {
        for runtime in [
            "/home/me/ComfyUI/venv/lib/python3.11/site-packages/torch/lib/libamdhip64.so",
            "/home/me/ComfyUI/venv/lib/python3.11/site-packages/torch/lib/libhsa-runtime64.so.1",
            "/opt/rocm-6.0.0/lib/libamdhip64.so.6.0.60000",
            "/dev/kfd",
        ] {
            assert_eq!(
                classify_maps(&with_python(&[runtime])),
                ReaderClass::Rocm,
                "{runtime}"
            );
        }
        // Both runtimes mapped: the process drives an NVIDIA device.
        let both = with_python(&["/dev/kfd", "/usr/lib/x86_64-linux-gnu/libcuda.so.1"]);
        assert_eq!(classify_maps(&both), ReaderClass::Cuda);
    }

    /// A /proc/PID/stat line with start time `start`, the command name
    /// holding spaces and parentheses.
    fn stat(pid: u32, start: u64) -> String {
        let mut fields = vec!["0".to_string(); 19];
        fields[0] = "S".into();
        fields.push(start.to_string());
        format!("{pid} (py (thon) 3) {} 0 0\n", fields.join(" "))
    }

    /// A fake /proc: path -> text.
    struct FakeProc(RefCell<HashMap<String, String>>);

    impl FakeProc {
        fn process(pid: u32, start: u64, maps: String) -> Self {
            let fake = FakeProc(RefCell::new(HashMap::new()));
            fake.set(pid, start, maps);
            fake
        }

        fn set(&self, pid: u32, start: u64, maps: String) {
            let mut files = self.0.borrow_mut();
            files.insert(format!("/proc/{pid}/stat"), stat(pid, start));
            files.insert(format!("/proc/{pid}/maps"), maps);
            files.insert(
                format!("/proc/{pid}/status"),
                format!("Name:\tpython3\nTgid:\t{pid}\n"),
            );
        }

        fn classify(&self, c: &Classifier, pid: u32) -> Reader {
            c.classify_with(pid, &|path| self.0.borrow().get(path).cloned())
        }
    }

    #[test]
    fn a_process_that_loads_cuda_after_its_first_open_is_classified_again() {
        let c = Classifier::default();
        let proc = FakeProc::process(4242, 1000, with_python(&[]));
        assert_eq!(proc.classify(&c, 4242).class, ReaderClass::Cpu);
        let cuda = "/venv/site-packages/nvidia/cuda_runtime/lib/libcudart.so.12";
        proc.set(4242, 1000, with_python(&[cuda]));
        assert_eq!(proc.classify(&c, 4242).class, ReaderClass::Cuda);
        // A GPU answer is remembered: the maps are not read again.
        proc.set(4242, 1000, String::new());
        assert_eq!(proc.classify(&c, 4242).class, ReaderClass::Cuda);
        // The same pid, started later, is another process.
        proc.set(4242, 2000, with_python(&[]));
        assert_eq!(proc.classify(&c, 4242).class, ReaderClass::Cpu);
    }

    #[test]
    fn a_thread_is_classified_as_its_process() {
        let c = Classifier::default();
        let proc = FakeProc::process(100, 5, with_python(&["/dev/kfd"]));
        proc.0.borrow_mut().insert(
            "/proc/107/status".into(),
            "Name:\tpt_thread\nTgid:\t100\nPid:\t107\n".into(),
        );
        assert_eq!(
            proc.classify(&c, 107),
            Reader {
                pid: 100,
                class: ReaderClass::Rocm
            }
        );
    }

    #[test]
    fn processes_that_cannot_be_read_are_cpu_readers() {
        let c = Classifier::default();
        let proc = FakeProc::process(7, 1, with_python(&["/dev/nvidia0"]));
        // Maps unreadable (another user's process under a non-root daemon).
        proc.0.borrow_mut().remove("/proc/7/maps");
        assert_eq!(proc.classify(&c, 7).class, ReaderClass::Cpu);
        assert_eq!(proc.classify(&c, 99).class, ReaderClass::Cpu);
        assert!(c.gpu.lock().is_empty());
    }

    #[test]
    fn real_processes_this_one_and_one_that_exited() {
        let c = Classifier::default();
        let me = std::process::id();
        assert_eq!(
            c.classify(me),
            Reader {
                pid: me,
                class: ReaderClass::Cpu
            }
        );
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let gone = child.id();
        child.wait().unwrap();
        assert_eq!(c.classify(gone).class, ReaderClass::Cpu);
        assert!(c.gpu.lock().is_empty(), "CPU answers are not remembered");
    }
}
