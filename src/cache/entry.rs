//! One cached file: its bytes in a memfd, filled from the start by a loader,
//! readable up to how far the load has come.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use memmap2::{MmapOptions, MmapRaw};

use super::policy::{EntryId, Key};
use crate::fs::Stat;

/// What a cached copy was made from. If the backing file no longer matches
/// (edited behind the mount, replaced by a rename), the copy is stale.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl Identity {
    pub fn of(st: &Stat) -> Self {
        let ns = |sec: i64, nsec: i64| sec as i128 * 1_000_000_000 + nsec as i128;
        Self {
            dev: st.st_dev,
            ino: st.st_ino,
            size: st.st_size as u64,
            mtime_ns: ns(st.st_mtime, st.st_mtime_nsec),
            ctime_ns: ns(st.st_ctime, st.st_ctime_nsec),
        }
    }

    pub fn key(&self) -> Key {
        (self.dev, self.ino)
    }
}

/// `modelcache:<path>`, shown in /proc/PID/fd. memfd_create takes at most
/// 249 bytes: a long path keeps its end (the file name).
fn memfd_name(path: &str) -> String {
    const MAX: usize = 249 - "modelcache:".len();
    let mut start = path.len().saturating_sub(MAX);
    while !path.is_char_boundary(start) {
        start += 1;
    }
    format!("modelcache:{}", &path[start..])
}

pub struct Entry {
    pub id: EntryId,
    pub identity: Identity,
    /// The file's path in the mount when it was cached (for logs, status).
    pub name: String,
    memfd: File,
    /// Read-only shared mapping of the memfd. Only the loaded prefix is ever
    /// turned into a slice: the rest is still being written by the loader.
    map: MmapRaw,
    /// Bytes loaded from the start of the file (Release by the loader,
    /// Acquire by readers: a reader sees every byte below it).
    loaded: AtomicU64,
    /// Set when the entry is dropped from the cache: its load stops.
    cancelled: AtomicBool,
    /// Set when the file changed: open handles stop reading these bytes and
    /// go to the backing file.
    stale: AtomicBool,
}

impl Entry {
    /// An empty entry of the file's size: a sealable memfd, not yet filled.
    pub fn new(id: EntryId, identity: Identity, name: &str) -> io::Result<Self> {
        let cname =
            std::ffi::CString::new(memfd_name(name)).unwrap_or_else(|_| c"modelcache".to_owned());
        // SAFETY: valid NUL-terminated name; the fd returned is ours.
        let fd = unsafe {
            libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned here.
        let memfd = unsafe { File::from_raw_fd(fd) };
        memfd.set_len(identity.size)?;
        // Mapped through a read-only descriptor: a shared mapping that could
        // ever be made writable would make the write seal fail (EBUSY).
        let read_only = File::open(format!("/proc/self/fd/{}", memfd.as_raw_fd()))?;
        let map = MmapOptions::new()
            .len(identity.size as usize)
            .map_raw_read_only(&read_only)?;
        Ok(Self {
            id,
            identity,
            name: name.to_string(),
            memfd,
            map,
            loaded: AtomicU64::new(0),
            cancelled: AtomicBool::new(false),
            stale: AtomicBool::new(false),
        })
    }

    pub fn size(&self) -> u64 {
        self.identity.size
    }

    pub fn loaded(&self) -> u64 {
        self.loaded.load(Ordering::Acquire)
    }

    pub fn is_complete(&self) -> bool {
        self.loaded() == self.size()
    }

    /// The bytes at `offset..offset + len` (clamped to the end of the file)
    /// if they are loaded; `None` sends the reader to the backing file.
    pub fn bytes(&self, offset: u64, len: u32) -> Option<&[u8]> {
        let end = offset.saturating_add(len as u64).min(self.size());
        if offset > end || end > self.loaded() || self.stale.load(Ordering::Acquire) {
            return None;
        }
        // SAFETY: the range lies inside the mapping and below `loaded`, so
        // the loader never writes it again; the mapping lives as long as self.
        Some(unsafe {
            std::slice::from_raw_parts(
                self.map.as_ptr().add(offset as usize),
                (end - offset) as usize,
            )
        })
    }

    /// Stops the load. The bytes loaded so far stay valid for the handles
    /// that still hold the entry (evicted for room, they still match).
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }

    /// The file changed: nothing may be served from these bytes any more.
    pub fn mark_stale(&self) {
        self.stale.store(true, Ordering::Release);
        self.cancel();
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    /// Copies the backing file into the memfd in `chunk`-sized steps, in the
    /// kernel (`sendfile`: backing page cache to memfd pages, one copy), and
    /// drops each copied range from the backing file's page cache so RAM
    /// does not hold the data twice. Stops early when cancelled.
    pub fn fill_from(&self, source: &File, chunk: u64) -> io::Result<()> {
        let size = self.size();
        let mut done = self.loaded();
        // SAFETY: positions the memfd, which only this loader writes.
        if unsafe { libc::lseek(self.memfd.as_raw_fd(), done as libc::off_t, libc::SEEK_SET) } < 0 {
            return Err(io::Error::last_os_error());
        }
        while done < size {
            if self.is_cancelled() {
                return Err(io::Error::new(io::ErrorKind::Interrupted, "load cancelled"));
            }
            let want = chunk.min(size - done);
            let mut copied = 0;
            while copied < want {
                let mut off = (done + copied) as libc::off_t;
                // SAFETY: valid fds; `off` is updated by the kernel.
                let n = unsafe {
                    libc::sendfile(
                        self.memfd.as_raw_fd(),
                        source.as_raw_fd(),
                        &mut off,
                        (want - copied) as usize,
                    )
                };
                match n {
                    n if n > 0 => copied += n as u64,
                    0 => {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the file shrank while loading",
                        ));
                    }
                    _ => {
                        let err = io::Error::last_os_error();
                        if err.kind() != io::ErrorKind::Interrupted {
                            return Err(err);
                        }
                    }
                }
            }
            // SAFETY: advice on a valid fd; failure only means the pages stay.
            unsafe {
                libc::posix_fadvise(
                    source.as_raw_fd(),
                    done as libc::off_t,
                    want as libc::off_t,
                    libc::POSIX_FADV_DONTNEED,
                )
            };
            done += want;
            self.loaded.store(done, Ordering::Release);
        }
        Ok(())
    }

    /// Maps every page of the loaded copy into this process now, so that
    /// the first reads of it do not each take page faults.
    pub fn prefault(&self) {
        // SAFETY: advice on our own mapping; failure only costs the faults.
        unsafe {
            libc::madvise(
                self.map.as_mut_ptr().cast(),
                self.map.len(),
                libc::MADV_POPULATE_READ,
            )
        };
    }

    /// Seals the memfd once loaded: its size and bytes can never change.
    pub fn seal(&self) -> io::Result<()> {
        let seals =
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;
        // SAFETY: fcntl on our own memfd.
        if unsafe { libc::fcntl(self.memfd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The memfd, for handing to the kernel (passthrough).
    pub fn memfd(&self) -> &File {
        &self.memfd
    }
}

#[cfg(test)]
mod tests {
    use super::memfd_name;

    #[test]
    fn memfd_names_fit_the_kernel_limit_and_keep_the_file_name() {
        assert_eq!(memfd_name("vae/a.sft"), "modelcache:vae/a.sft");
        let long = format!("{}/é/model.safetensors", "d".repeat(300));
        let name = memfd_name(&long);
        assert!(name.len() <= 249, "{}", name.len());
        assert!(name.ends_with("/é/model.safetensors"));
    }
}
