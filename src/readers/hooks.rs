//! What opens by each class of reader do: the `[hooks.CLASS]` tables of the
//! manifest, as values. `exec.rs` runs their commands.

use std::time::Duration;

use super::ReaderClass;

/// What opens by one class of reader do: a `[hooks.CLASS]` table with
/// the class's defaults for the keys it leaves out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hook {
    /// Keep a file cached while such a reader has it open, and `grace`
    /// after its last close.
    pub protect: bool,
    pub grace: Duration,
    /// Lock the file's pages in RAM, within the pin budget.
    pub mlock: bool,
    /// Warm the rest of the file's `[[group]]`s.
    pub warm_group: bool,
    /// A command (program and arguments) run at the first open of each
    /// file by such a reader, with the file, pid and class in its
    /// environment.
    pub exec: Option<Vec<String>>,
    /// How long `exec` may run before it is killed.
    pub timeout: Duration,
}

/// How long protection lasts after the last close, unless set.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(600);
/// How long a hook command may run, unless set.
pub const DEFAULT_EXEC_TIMEOUT: Duration = Duration::from_secs(30);

impl Hook {
    /// The defaults of a class: GPU readers' files are protected for
    /// `DEFAULT_GRACE`; every class's opens warm the file's groups.
    pub fn default_for(class: ReaderClass) -> Hook {
        Hook {
            protect: class != ReaderClass::Cpu,
            grace: DEFAULT_GRACE,
            mlock: false,
            warm_group: true,
            exec: None,
            timeout: DEFAULT_EXEC_TIMEOUT,
        }
    }
}

/// Hooks per class of reader (see DESIGN: GPU readers).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hooks {
    pub cuda: Hook,
    pub rocm: Hook,
    pub cpu: Hook,
}

impl Default for Hooks {
    fn default() -> Self {
        Hooks {
            cuda: Hook::default_for(ReaderClass::Cuda),
            rocm: Hook::default_for(ReaderClass::Rocm),
            cpu: Hook::default_for(ReaderClass::Cpu),
        }
    }
}

impl Hooks {
    pub fn get(&self, class: ReaderClass) -> &Hook {
        match class {
            ReaderClass::Cuda => &self.cuda,
            ReaderClass::Rocm => &self.rocm,
            ReaderClass::Cpu => &self.cpu,
        }
    }

    pub fn get_mut(&mut self, class: ReaderClass) -> &mut Hook {
        match class {
            ReaderClass::Cuda => &mut self.cuda,
            ReaderClass::Rocm => &mut self.rocm,
            ReaderClass::Cpu => &mut self.cpu,
        }
    }

    /// Whether some class locks pages.
    pub fn any_mlock(&self) -> bool {
        ReaderClass::ALL.iter().any(|c| self.get(*c).mlock)
    }
}
