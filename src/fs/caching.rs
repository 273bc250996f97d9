//! The one interface the filesystem calls beyond its backing directory:
//! what caching says when a file is opened, and the news of files that
//! change. `readers::Opens` implements it over the cache (with reader
//! classes, hooks and counters); the filesystem knows nothing of those.

use std::fs::File;
use std::io;

use super::Stat;
use super::inodes::InodeKey;

/// What the filesystem asks of caching and tells it.
pub trait Caching: Send + Sync {
    /// Whether a regular file of `size` bytes may be a model file, which
    /// caching wants to see opened. Asked first because the question after
    /// it needs the file's name (a readlink).
    fn is_model_size(&self, size: u64) -> bool;

    /// A regular file that `is_model_size` let through was opened for
    /// reading.
    fn open_for_read(&self, open: ReadOpen<'_>) -> ReadOpened;

    /// A file is about to be opened for writing (or was just created) by
    /// `pid` (a FUSE request's caller, a thread id): it leaves the cache
    /// now, and stays out while the hold is kept (until the last close).
    fn open_for_write(&self, key: InodeKey, pid: u32) -> Box<dyn Hold>;

    /// The backing file `key` changed or is gone: no cached copy of it may
    /// serve another byte.
    fn invalidate(&self, key: InodeKey);
}

/// A read-open, as caching needs to see it.
pub struct ReadOpen<'a> {
    /// The node the kernel knows the file by.
    pub node: u64,
    /// Its path relative to the backing root, as names are shown.
    pub name: &'a str,
    /// What the backing file is now, from the open file itself.
    pub stat: &'a Stat,
    /// The process opening it (a FUSE request's caller).
    pub pid: u32,
    /// Opens the backing file again for reading (for a loader).
    pub reopen: &'a dyn Fn() -> io::Result<File>,
}

/// What caching decided at a read-open.
pub struct ReadOpened {
    /// A model file the cache takes (whether or not it is cached now).
    pub cacheable: bool,
    /// The kernel should keep the mounted file's page cache across opens
    /// (FOPEN_KEEP_CACHE): a copy-mode entry keeps its bytes there.
    pub keep_cache: bool,
    /// Kept while the file is open.
    pub hold: Option<Box<dyn Hold>>,
}

impl ReadOpened {
    /// Not a file caching takes.
    pub fn uncached() -> Self {
        Self {
            cacheable: false,
            keep_cache: false,
            hold: None,
        }
    }
}

/// Something caching keeps for as long as a file is open; dropped at the
/// last close.
pub trait Hold: Send + Sync {
    /// The daemon read `bytes` of the file for its reader (not cached, or
    /// not yet loaded).
    fn read(&self, _bytes: u64) {}
}

/// Caching that caches nothing: the filesystem alone.
pub struct NoCaching;

impl Caching for NoCaching {
    fn is_model_size(&self, _size: u64) -> bool {
        false
    }

    fn open_for_read(&self, _open: ReadOpen<'_>) -> ReadOpened {
        ReadOpened::uncached()
    }

    fn open_for_write(&self, _key: InodeKey, _pid: u32) -> Box<dyn Hold> {
        Box::new(())
    }

    fn invalidate(&self, _key: InodeKey) {}
}

impl Hold for () {}
