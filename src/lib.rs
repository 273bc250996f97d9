//! modelcache: a FUSE overlay of an AI models directory.
//!
//! `fs` is the overlay (a filesystem core plus a thin FUSE adapter),
//! `mount` the life of a mount, `mountinfo` what /proc says about mounts.

pub mod cache;
pub mod cli;
pub mod control;
pub mod descriptors;
pub mod doctor;
pub mod fs;
pub mod manifest;
pub mod mount;
pub mod mountinfo;
pub mod names;
pub mod notify;
pub mod pins;
pub mod readers;
pub mod record;
pub mod recorder;
pub mod rules;
pub mod service;
pub mod suggest;
pub mod units;

/// A user-facing error: one line saying what is wrong and how to fix it.
#[derive(Debug)]
pub struct Error(pub String);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}
