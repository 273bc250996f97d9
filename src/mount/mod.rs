//! The life of a mount: checks before mounting, mounting (mount(2) as root,
//! `fusermount3` otherwise), serving, and unmounting on a signal.

mod daemon;
mod device;
mod mounted;
mod preflight;
mod serve;
mod settings;
mod signals;

pub use daemon::run_in_background;
pub(crate) use device::{find_fusermount, is_root};
pub use device::{umount_command, unmount};
pub(crate) use preflight::{Liveness, absolute, probe, user_name};
pub use serve::run;
pub use settings::{Atime, CacheFlags, DEFAULT_THREADS, MountConfig, Settings, VfsOptions};
