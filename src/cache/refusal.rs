//! Why the cache does not take a file: one reason, with the numbers a
//! person needs to act on it. Every message about a file left uncached
//! (the log, `modelcache warm`, status) is this type's `Display`.

use std::fmt;
use std::path::Path;

use crate::units::Bytes;

/// Why a file is not cached (now).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Not a file the cache takes at all, by this rule.
    NotModelFile(NotModelFile),
    /// Open for writing through the mount: its bytes are changing. Names
    /// the writer that opened it first of those holding it open.
    OpenForWriting(Writer),
    /// `admit = "manual"`: only the manifest and commands add files.
    ManualAdmission,
    /// Loading it would take available memory under the floor.
    MemoryFloor {
        size: u64,
        available: u64,
        floor: u64,
    },
    /// No room under the cap: pinned, protected and open files hold what
    /// is not free, and the file needs `short_by` more.
    CapHeld {
        size: u64,
        short_by: u64,
        pinned: u64,
    },
    /// The backing file could not be opened or prepared.
    Io(String),
}

/// A process holding a file open for writing through the mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Writer {
    /// The process (thread group) id, not the thread that opened.
    pub pid: u32,
    /// Its command name (`/proc/PID/comm`), when it could be read.
    pub command: Option<String>,
}

impl fmt::Display for Writer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pid {}", self.pid)?;
        match &self.command {
            Some(command) => write!(f, " ({command})"),
            None => Ok(()),
        }
    }
}

/// The rule a file fails to be a model file the cache takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NotModelFile {
    /// The cache is off (`max_size` 0).
    CacheOff,
    /// Its extension (if any) is not in the list.
    Extension(Option<String>),
    /// Smaller than `min_file_size`.
    Smaller { size: u64, min: u64 },
    /// Larger than the whole cache.
    Larger { size: u64, cap: u64 },
    /// Not a regular file.
    NotRegular,
}

/// Which files the cache takes: model extensions, within a size range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelFiles<'a> {
    /// Lower-case, without the dot.
    pub extensions: &'a [String],
    pub min_size: u64,
    /// `None`: no upper bound (the cap is not known yet).
    pub max_size: Option<u64>,
}

impl ModelFiles<'_> {
    /// Whether a regular file at `path` of `size` bytes is one, and if
    /// not, by which rule.
    pub fn check(&self, path: &Path, size: u64) -> Result<(), NotModelFile> {
        if self.max_size == Some(0) {
            return Err(NotModelFile::CacheOff);
        }
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase());
        if !ext.as_ref().is_some_and(|e| self.extensions.contains(e)) {
            return Err(NotModelFile::Extension(ext));
        }
        self.check_size(size)
    }

    /// The size rule alone.
    pub fn check_size(&self, size: u64) -> Result<(), NotModelFile> {
        match self.max_size {
            Some(0) => Err(NotModelFile::CacheOff),
            _ if size < self.min_size => Err(NotModelFile::Smaller {
                size,
                min: self.min_size,
            }),
            Some(cap) if size > cap => Err(NotModelFile::Larger { size, cap }),
            _ => Ok(()),
        }
    }
}

impl fmt::Display for NotModelFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NotModelFile::CacheOff => write!(f, "the cache is off (max_size is 0)"),
            NotModelFile::Extension(Some(ext)) => {
                write!(f, "not a model file: .{ext} is not in [cache] extensions")
            }
            NotModelFile::Extension(None) => {
                write!(f, "not a model file: no extension from [cache] extensions")
            }
            NotModelFile::Smaller { size, min } => {
                write!(f, "{} is under min_file_size {}", Bytes(*size), Bytes(*min))
            }
            NotModelFile::Larger { size, cap } => write!(
                f,
                "{} is larger than the cap ({}) by {}: raise --max-size or max_size",
                Bytes(*size),
                Bytes(*cap),
                Bytes(size - cap)
            ),
            NotModelFile::NotRegular => write!(f, "not a regular file"),
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::NotModelFile(why) => why.fmt(f),
            Refusal::OpenForWriting(writer) => write!(f, "open for writing by {writer}"),
            Refusal::ManualAdmission => write!(
                f,
                "admit = \"manual\": only the manifest and `modelcache warm`/`pin` add files"
            ),
            Refusal::MemoryFloor {
                size,
                available,
                floor,
            } => {
                let short = Bytes(floor.saturating_add(*size).saturating_sub(*available));
                let (size, floor) = (Bytes(*size), Bytes(*floor));
                match available.checked_sub(size.0) {
                    Some(left) => write!(
                        f,
                        "loading {size} would leave {} available, under min_available \
                         {floor} by {short}: free memory or lower min_available",
                        Bytes(left)
                    ),
                    // More than is available at all: lowering the floor
                    // alone cannot make room.
                    None => write!(
                        f,
                        "loading {size} would need {short} more than the {} available, \
                         keeping min_available {floor}: free memory",
                        Bytes(*available)
                    ),
                }
            }
            Refusal::CapHeld {
                size,
                short_by,
                pinned,
            } => write!(
                f,
                "no room for {} under the cap: {} short, with {} pinned and the rest \
                 protected or open (raise max_size, or unpin)",
                Bytes(*size),
                Bytes(*short_by),
                Bytes(*pinned)
            ),
            Refusal::Io(e) => write!(f, "{e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(exts: &[&str]) -> Vec<String> {
        exts.iter().map(|e| e.to_string()).collect()
    }

    #[test]
    fn each_rule_is_named_with_its_numbers() {
        let exts = rules(&["safetensors", "gguf"]);
        let files = ModelFiles {
            extensions: &exts,
            min_size: 1 << 20,
            max_size: Some(8 << 30),
        };
        assert_eq!(files.check(Path::new("a/m.SafeTensors"), 2 << 20), Ok(()));
        let shown = |p: &str, size: u64| files.check(Path::new(p), size).unwrap_err().to_string();
        assert_eq!(
            shown("notes.txt", 2 << 20),
            "not a model file: .txt is not in [cache] extensions"
        );
        assert_eq!(
            shown("README", 2 << 20),
            "not a model file: no extension from [cache] extensions"
        );
        assert_eq!(
            shown("m.gguf", 1000),
            "1000 B is under min_file_size 1.0 MiB"
        );
        assert_eq!(
            shown("m.gguf", 10 << 30),
            "10.0 GiB is larger than the cap (8.0 GiB) by 2.0 GiB: raise --max-size or max_size"
        );
        let off = ModelFiles {
            max_size: Some(0),
            ..files.clone()
        };
        assert_eq!(
            off.check(Path::new("m.gguf"), 2 << 20),
            Err(NotModelFile::CacheOff)
        );
    }

    #[test]
    fn room_refusals_say_by_how_much() {
        let floor = Refusal::MemoryFloor {
            size: 4 << 30,
            available: 6 << 30,
            floor: 3 << 30,
        };
        assert_eq!(
            floor.to_string(),
            "loading 4.0 GiB would leave 2.0 GiB available, under min_available 3.0 GiB \
             by 1.0 GiB: free memory or lower min_available"
        );
        let larger = Refusal::MemoryFloor {
            size: 4 << 30,
            available: 2 << 30,
            floor: 1 << 30,
        };
        assert_eq!(
            larger.to_string(),
            "loading 4.0 GiB would need 3.0 GiB more than the 2.0 GiB available, \
             keeping min_available 1.0 GiB: free memory"
        );
        let cap = Refusal::CapHeld {
            size: 4 << 30,
            short_by: 1 << 30,
            pinned: 7 << 30,
        };
        assert!(
            cap.to_string()
                .contains("1.0 GiB short, with 7.0 GiB pinned")
        );
    }

    #[test]
    fn a_file_open_for_writing_names_its_writer() {
        let by = |command: Option<&str>| {
            Refusal::OpenForWriting(Writer {
                pid: 123,
                command: command.map(str::to_string),
            })
            .to_string()
        };
        assert_eq!(by(Some("python3")), "open for writing by pid 123 (python3)");
        // Gone, or another user's under a non-root daemon: the pid alone.
        assert_eq!(by(None), "open for writing by pid 123");
    }
}
