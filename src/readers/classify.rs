//! Reader classification: which kind of process reads a model file. A
//! process with a GPU context holds the GPU's device nodes, mapped or open:
//! `/dev/nvidiactl`, `/dev/nvidia<N>` or `/dev/nvidia-uvm` for CUDA,
//! `/dev/kfd` for ROCm. Every other process reads for the CPU, including
//! one that only maps a GPU runtime: torch's CUDA wheel maps libcudart on a
//! machine without a GPU, and any file can be named libcudart.so.12.
//! (Whether a CPU reader could use a GPU, having its runtime, is not told
//! apart: hooks act on who drives a GPU now.)
//!
//! GPU answers are remembered per process (pid and start time, so a
//! recycled pid is classified afresh); a CPU answer is not, because a
//! process may create its GPU context after its first open.
//!
//! `hooks` runs what the manifest's `[hooks.CLASS]` tables ask for.

use std::collections::HashMap;
use std::path::Path;

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

    /// Of two answers for one process, the GPU that wins (CUDA over ROCm
    /// over CPU).
    fn max_gpu(self, other: ReaderClass) -> ReaderClass {
        self.min(other)
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

/// The GPU class of a device node a process maps or holds open, by its
/// exact path: a file elsewhere named `nvidia0` is not the device. The
/// display's nodes (`/dev/nvidia-modeset`) and tools (`/dev/nvidia-uvm-tools`)
/// are not compute: no class.
fn device_class(path: &str) -> Option<ReaderClass> {
    // A node removed and made again (a driver reinstalled) under a running
    // process: the process still holds the device.
    let path = path.strip_suffix(" (deleted)").unwrap_or(path);
    let nvidia_minor = path
        .strip_prefix("/dev/nvidia")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    match path {
        "/dev/nvidiactl" | "/dev/nvidia-uvm" => Some(ReaderClass::Cuda),
        _ if nvidia_minor => Some(ReaderClass::Cuda),
        "/dev/kfd" => Some(ReaderClass::Rocm),
        _ => None,
    }
}

/// The class of a process from the paths it maps or holds open. CUDA wins
/// over ROCm when both are there: such a process drives an NVIDIA device.
fn classify_paths<'a>(paths: impl IntoIterator<Item = &'a str>) -> ReaderClass {
    let mut class = ReaderClass::Cpu;
    for found in paths.into_iter().filter_map(device_class) {
        if found == ReaderClass::Cuda {
            return found;
        }
        class = found;
    }
    class
}

/// Whether a process maps a GPU runtime (CUDA's driver or runtime, HIP,
/// HSA): the libraries without which it has no GPU context. Not a GPU
/// reader by this alone.
fn maps_gpu_runtime(maps: &str) -> bool {
    maps.lines().filter_map(mapped_path).any(|path| {
        let file = path.rsplit('/').next().unwrap_or(path);
        let lib = |prefix: &str| file.starts_with(prefix) && file.contains(".so");
        lib("libcuda.so") || lib("libcudart") || lib("libamdhip64") || lib("libhsa-runtime64")
    })
}

/// The class of a process from its `/proc/PID/maps` text alone.
pub fn classify_maps(maps: &str) -> ReaderClass {
    classify_paths(maps.lines().filter_map(mapped_path))
}

/// Open descriptors read per process, at most. A process may hold 100k
/// of them, and a CPU reader is classified again at every open; a GPU
/// runtime opens its device nodes when it starts, among the first.
const MAX_FDS: usize = 4096;

/// What the descriptors of process `pid` point at (the first [`MAX_FDS`]
/// of them); none if they cannot be read.
fn fd_targets(pid: u32) -> Vec<String> {
    link_targets(Path::new(&format!("/proc/{pid}/fd")))
}

/// The targets of the first [`MAX_FDS`] symlinks in `dir`.
fn link_targets(dir: &Path) -> Vec<String> {
    let Ok(fds) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    fds.take(MAX_FDS)
        .flatten()
        .filter_map(|fd| {
            std::fs::read_link(fd.path())
                .ok()?
                .into_os_string()
                .into_string()
                .ok()
        })
        .collect()
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
        self.classify_with(pid, &|path| std::fs::read_to_string(path).ok(), &fd_targets)
    }

    /// `classify`, reading /proc files through `read` and a process's
    /// open descriptors through `fds`.
    fn classify_with(
        &self,
        pid: u32,
        read: &dyn Fn(&str) -> Option<String>,
        fds: &dyn Fn(u32) -> Vec<String>,
    ) -> Reader {
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
        // The maps first: a GPU context maps its device nodes, and one read
        // of them costs less than a readlink per descriptor.
        let maps = read(&format!("/proc/{pid}/maps")).unwrap_or_default();
        let mut class = classify_maps(&maps);
        // The descriptors only of a process that maps a GPU runtime: no
        // context exists without one, and most readers map none (an open
        // by a CPU reader stays one read of its maps).
        if class != ReaderClass::Cuda && maps_gpu_runtime(&maps) {
            let open = fds(pid);
            class = class.max_gpu(classify_paths(open.iter().map(String::as_str)));
        }
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

    /// The CUDA runtime and driver libraries as torch's wheels and the
    /// driver install them: mapped by any torch, GPU or not.
    const CUDA_LIBRARIES: &[&str] = &[
        "/home/me/ComfyUI/venv/lib/python3.11/site-packages/nvidia/cuda_runtime/lib/libcudart.so.12",
        "/home/me/ComfyUI/venv/lib/python3.11/site-packages/torch/lib/libcudart-d0da41ae.so.12",
        "/usr/lib/x86_64-linux-gnu/libcuda.so.1",
        "/usr/local/cuda-12.4/targets/x86_64-linux/lib/libcudart.so.12.4.127",
    ];

    #[test]
    fn gpu_runtimes_without_a_device_read_for_the_cpu() {
        assert_eq!(classify_maps(&with_python(&[])), ReaderClass::Cpu);
        assert_eq!(classify_maps(""), ReaderClass::Cpu);
        // CPU-only ComfyUI on torch's CUDA wheel, and torch's ROCm wheel:
        // the runtimes are mapped, no device.
        let mut runtimes = CUDA_LIBRARIES.to_vec();
        runtimes.extend([
            "/home/me/ComfyUI/venv/lib/python3.11/site-packages/torch/lib/libamdhip64.so",
            "/home/me/ComfyUI/venv/lib/python3.11/site-packages/torch/lib/libhsa-runtime64.so.1",
        ]);
        assert_eq!(classify_maps(&with_python(&runtimes)), ReaderClass::Cpu);
    }

    #[test]
    fn lookalikes_of_the_devices_read_for_the_cpu() {
        for path in [
            "/home/x/dev/nvidia0",
            "/tmp/nvidia0",
            "/home/x/dev/kfd",
            "/dev/nvidia",
            "/dev/nvidia0x",
            "/dev/nvidiactl.bak",
            // Display and profiling nodes: no compute context.
            "/dev/nvidia-modeset",
            "/dev/nvidia-uvm-tools",
            "/dev/nvidia-caps/nvidia-cap1",
            "/dev/dri/renderD128",
            "/dev/kfd2",
        ] {
            assert_eq!(device_class(path), None, "{path}");
            assert_eq!(
                classify_maps(&with_python(&[path])),
                ReaderClass::Cpu,
                "{path}"
            );
        }
    }

    #[test]
    fn a_cuda_context_maps_the_nvidia_devices() {
        for device in [
            "/dev/nvidia0",
            "/dev/nvidia15",
            "/dev/nvidiactl",
            "/dev/nvidia-uvm",
        ] {
            assert_eq!(
                classify_maps(&with_python(&[CUDA_LIBRARIES[0], device])),
                ReaderClass::Cuda,
                "{device}"
            );
        }
        // Paths may hold spaces, and a node may be made again under a
        // running process.
        let spaced = maps(&["/home/me/My Models/x.so", "/dev/nvidiactl"]);
        assert_eq!(classify_maps(&spaced), ReaderClass::Cuda);
        assert_eq!(
            device_class("/dev/nvidia0 (deleted)"),
            Some(ReaderClass::Cuda)
        );
    }

    #[test]
    fn a_rocm_context_maps_kfd_and_cuda_wins_over_it() {
        assert_eq!(
            classify_maps(&with_python(&["/dev/kfd"])),
            ReaderClass::Rocm
        );
        let both = with_python(&["/dev/kfd", "/dev/nvidiactl"]);
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

    /// A fake /proc: path -> text, and pid -> what its descriptors point at.
    #[derive(Default)]
    struct FakeProc {
        files: RefCell<HashMap<String, String>>,
        fds: RefCell<HashMap<u32, Vec<String>>>,
    }

    impl FakeProc {
        fn process(pid: u32, start: u64, maps: String) -> Self {
            let fake = FakeProc::default();
            fake.set(pid, start, maps);
            fake
        }

        fn set(&self, pid: u32, start: u64, maps: String) {
            let mut files = self.files.borrow_mut();
            files.insert(format!("/proc/{pid}/stat"), stat(pid, start));
            files.insert(format!("/proc/{pid}/maps"), maps);
            files.insert(
                format!("/proc/{pid}/status"),
                format!("Name:\tpython3\nTgid:\t{pid}\n"),
            );
        }

        /// What `pid`'s descriptors point at from now on.
        fn open_fds(&self, pid: u32, targets: &[&str]) {
            let targets = targets.iter().map(|t| t.to_string()).collect();
            self.fds.borrow_mut().insert(pid, targets);
        }

        fn classify(&self, c: &Classifier, pid: u32) -> Reader {
            c.classify_with(
                pid,
                &|path| self.files.borrow().get(path).cloned(),
                &|pid| self.fds.borrow().get(&pid).cloned().unwrap_or_default(),
            )
        }
    }

    /// Descriptors of a torch process: its libraries, a model, a socket.
    const TORCH_FDS: &[&str] = &[
        "/dev/null",
        "pipe:[81234]",
        "socket:[81240]",
        "/home/me/ComfyUI/models/unet/model.safetensors",
        "anon_inode:[eventpoll]",
    ];

    #[test]
    fn a_device_held_open_is_a_gpu_context_without_a_mapping() {
        let c = Classifier::default();
        let proc = FakeProc::process(10, 1, with_python(CUDA_LIBRARIES));
        proc.open_fds(10, TORCH_FDS);
        assert_eq!(proc.classify(&c, 10).class, ReaderClass::Cpu);
        let mut cuda = TORCH_FDS.to_vec();
        cuda.push("/dev/nvidiactl");
        proc.open_fds(10, &cuda);
        assert_eq!(proc.classify(&c, 10).class, ReaderClass::Cuda);

        let hsa = "/opt/rocm-6.0.0/lib/libhsa-runtime64.so.1";
        let proc = FakeProc::process(20, 1, with_python(&[hsa]));
        let mut rocm = TORCH_FDS.to_vec();
        rocm.push("/dev/kfd");
        proc.open_fds(20, &rocm);
        assert_eq!(proc.classify(&c, 20).class, ReaderClass::Rocm);

        // A regular file at a lookalike path, held open: not a device.
        let proc = FakeProc::process(30, 1, with_python(CUDA_LIBRARIES));
        proc.open_fds(30, &["/home/x/dev/nvidia0", "/srv/nvidiactl"]);
        assert_eq!(proc.classify(&c, 30).class, ReaderClass::Cpu);
    }

    #[test]
    fn the_descriptors_of_a_process_without_a_gpu_runtime_are_not_read() {
        // No GPU runtime mapped: a device held open cannot be a context
        // (and its descriptors are not read: one read of the maps suffices).
        let c = Classifier::default();
        let proc = FakeProc::process(50, 1, with_python(&[]));
        proc.open_fds(50, &["/dev/nvidiactl"]);
        let fds_read = std::cell::Cell::new(0);
        let class = c
            .classify_with(50, &|path| proc.files.borrow().get(path).cloned(), &|_| {
                fds_read.set(fds_read.get() + 1);
                vec!["/dev/nvidiactl".to_string()]
            })
            .class;
        assert_eq!((class, fds_read.get()), (ReaderClass::Cpu, 0));
    }

    #[test]
    fn a_device_mapped_is_a_gpu_context_without_a_descriptor() {
        let c = Classifier::default();
        let proc = FakeProc::process(40, 1, with_python(&["/dev/nvidia-uvm"]));
        assert_eq!(proc.classify(&c, 40).class, ReaderClass::Cuda);
    }

    #[test]
    fn descriptors_are_read_up_to_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..MAX_FDS + 100 {
            std::os::unix::fs::symlink("/dev/null", dir.path().join(i.to_string())).unwrap();
        }
        assert_eq!(link_targets(dir.path()).len(), MAX_FDS);
        // A real process's descriptors: a file this one holds open.
        let held = tempfile::NamedTempFile::new().unwrap();
        let path = held.path().to_str().unwrap().to_string();
        assert!(fd_targets(std::process::id()).contains(&path));
    }

    #[test]
    fn a_process_that_creates_a_cuda_context_after_its_first_open_is_classified_again() {
        let c = Classifier::default();
        let proc = FakeProc::process(4242, 1000, with_python(CUDA_LIBRARIES));
        assert_eq!(proc.classify(&c, 4242).class, ReaderClass::Cpu);
        proc.set(4242, 1000, with_python(&["/dev/nvidiactl", "/dev/nvidia0"]));
        assert_eq!(proc.classify(&c, 4242).class, ReaderClass::Cuda);
        // A GPU answer is remembered: neither maps nor descriptors are read
        // again.
        proc.set(4242, 1000, String::new());
        assert_eq!(proc.classify(&c, 4242).class, ReaderClass::Cuda);
        // The same pid, started later, is another process.
        proc.set(4242, 2000, with_python(CUDA_LIBRARIES));
        assert_eq!(proc.classify(&c, 4242).class, ReaderClass::Cpu);
    }

    #[test]
    fn a_thread_is_classified_as_its_process() {
        let c = Classifier::default();
        let proc = FakeProc::process(100, 5, with_python(&["/dev/kfd"]));
        proc.files.borrow_mut().insert(
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
        proc.files.borrow_mut().remove("/proc/7/maps");
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
