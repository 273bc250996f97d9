//! The processes that read model files: which class each is (CUDA, ROCm,
//! CPU), what the manifest's hooks do for each class, where each open is
//! served from and what that saved (the counters behind `status`), and the
//! one decision the filesystem asks at a read-open (`opens.rs`), where the
//! cache, the classes, the hooks and the counters meet.

pub mod classify;
pub mod exec;
pub mod hooks;
pub mod opens;
pub mod payoff;
pub mod source;
pub mod stats;

pub use classify::{Classifier, Reader, ReaderClass};
