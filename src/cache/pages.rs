//! The page-level tools of an entry: a locked (or merely populated)
//! mapping of a file, its share of the pin budget, and in-kernel copies and
//! advice on ranges of the backing file.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use memmap2::MmapRaw;
use parking_lot::Mutex;

use super::budget::PinBudget;
use super::policy::EntryId;

/// A read-only shared mapping of a file (the backing file, or the file in
/// the mount), locked in RAM or only populated. It holds no descriptor:
/// the daemon keeps none open on a file it merely caches (one in its own
/// mount would be flushed at exit, a request a killed daemon cannot answer).
pub(super) struct LockedPages {
    pub(super) map: MmapRaw,
    /// Page the file out when the entry goes (evicted for room); not when
    /// it goes because the file changed: its pages are then the file's
    /// current contents, likely read again soon.
    pub(super) page_out: AtomicBool,
}

impl LockedPages {
    pub(super) fn unlock(&self) {
        // SAFETY: our own mapping; unlocking an unlocked range is harmless.
        unsafe { libc::munlock(self.map.as_mut_ptr().cast(), self.map.len()) };
    }
}

impl Drop for LockedPages {
    /// Unlocks the pages and, for an eviction, gives their memory back at
    /// once: paging them out drops clean pages and writes dirty ones first,
    /// so nothing is lost; pages other processes map stay.
    fn drop(&mut self) {
        self.unlock();
        if self.page_out.load(Ordering::Relaxed) {
            // SAFETY: our own mapping, unmapped right after by MmapRaw's drop.
            unsafe {
                libc::madvise(
                    self.map.as_mut_ptr().cast(),
                    self.map.len(),
                    libc::MADV_PAGEOUT,
                )
            };
        }
    }
}

/// An entry's share of the pin budget, given back when dropped: after its
/// pages were unlocked, or with the entry (whose mapping, dropped first,
/// unlocks them).
pub(super) struct Grant {
    pub(super) budget: Arc<Mutex<PinBudget>>,
    pub(super) id: EntryId,
}

impl Drop for Grant {
    fn drop(&mut self) {
        self.budget.lock().release(self.id);
    }
}

/// Copies `len` bytes of `source` from `offset` to `out` (at its position)
/// in the kernel.
pub(super) fn send_range(out: &File, source: &File, offset: u64, len: u64) -> io::Result<()> {
    let mut copied = 0;
    while copied < len {
        let mut off = (offset + copied) as libc::off_t;
        // SAFETY: valid fds; `off` is updated by the kernel.
        let n = unsafe {
            libc::sendfile(
                out.as_raw_fd(),
                source.as_raw_fd(),
                &mut off,
                (len - copied) as usize,
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
    Ok(())
}

/// `posix_fadvise` on a range; failure only means the advice is not taken.
pub(super) fn advise(file: &File, offset: u64, len: u64, advice: libc::c_int) {
    // SAFETY: advice on an open descriptor.
    unsafe {
        libc::posix_fadvise(
            file.as_raw_fd(),
            offset as libc::off_t,
            len as libc::off_t,
            advice,
        )
    };
}

pub(super) fn page_size() -> u64 {
    // SAFETY: no arguments.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).unwrap_or(4096).max(1)
}
