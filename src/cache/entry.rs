//! One cached file: its bytes in a memfd (copy mode) or the backing file's
//! locked page cache (passthrough), loaded from the start by a loader and
//! readable up to how far the load has come.
//!
//! A copy-mode entry's pages are locked (mlock) on top when it is pinned
//! under `[cache] mlock = true` or a reader class's hook asks for it,
//! within the pin budget (`budget`). A passthrough entry needs no such
//! option: locking its pages is how it stays resident at all.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use memmap2::{MmapOptions, MmapRaw};
use parking_lot::Mutex;

use super::budget::{PinBudget, Settle};
use super::policy::{EntryId, Key};
use crate::fs::Stat;
use crate::size::Bytes;

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

/// Where an entry's bytes live.
enum Storage {
    /// Copy mode: a memfd the loader fills, sealed once complete; the
    /// daemon answers reads from its mapping.
    Memfd { memfd: File, map: MmapRaw },
    /// Passthrough mode: the backing file's own page cache, which the kernel
    /// reads directly; the loader maps and locks it so that nothing (memory
    /// reclaim, drop_caches, a reader's POSIX_FADV_DONTNEED) drops it.
    Locked(LockedPages),
}

/// A read-only shared mapping of the backing file, locked in RAM (or only
/// populated where locking is not allowed). It holds no descriptor: the
/// daemon keeps none open on a file it merely caches.
struct LockedPages {
    map: MmapRaw,
    /// Page the file out when the entry goes (evicted for room); not when
    /// it goes because the file changed: its pages are then the file's
    /// current contents, likely read again soon.
    page_out: AtomicBool,
}

impl LockedPages {
    fn unlock(&self) {
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

/// Warns once per process that pages cannot be locked.
static MLOCK_WARNED: AtomicBool = AtomicBool::new(false);
/// Warns once per process that a pinned entry could not be locked: by
/// the memory-lock limit, or for want of pin budget.
static PIN_LOCK_WARNED: AtomicBool = AtomicBool::new(false);
static BUDGET_WARNED: AtomicBool = AtomicBool::new(false);

/// Why a copy-mode entry's pages should be locked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockReason {
    /// Pinned, with `[cache] mlock = true`.
    Pin,
    /// Opened by a reader class whose hook has `mlock = true`.
    Reader,
}

/// An entry's share of the pin budget, given back when dropped: after its
/// pages were unlocked, or with the entry (whose mapping, dropped first,
/// unlocks them).
struct Grant {
    budget: Arc<Mutex<PinBudget>>,
    id: EntryId,
}

impl Drop for Grant {
    fn drop(&mut self) {
        self.budget.lock().release(self.id);
    }
}

fn page_size() -> u64 {
    // SAFETY: no arguments.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).unwrap_or(4096).max(1)
}

pub struct Entry {
    pub id: EntryId,
    pub identity: Identity,
    /// The file's path in the mount when it was cached (for logs, status).
    pub name: String,
    storage: Storage,
    /// Bytes loaded from the start of the file (Release by the loader,
    /// Acquire by readers: a reader sees every byte below it).
    loaded: AtomicU64,
    /// Set when the entry is dropped from the cache: its load stops.
    cancelled: AtomicBool,
    /// Set when the file changed: open handles stop reading these bytes and
    /// go to the backing file.
    stale: AtomicBool,
    /// Reasons to lock a copy-mode entry's pages (`LockReason`).
    lock_for_pin: AtomicBool,
    lock_for_reader: AtomicBool,
    /// Whether the pages are locked, readable while `lock` is held (by a
    /// loader in a long mlock).
    locked: AtomicBool,
    /// Held while its pages are locked. After `storage`, so that dropping
    /// the entry unmaps (unlocks) before the budget is given back.
    lock: Mutex<Option<Grant>>,
}

impl Entry {
    /// An empty copy-mode entry of the file's size: a sealable memfd, not
    /// yet filled.
    pub fn in_memfd(id: EntryId, identity: Identity, name: &str) -> io::Result<Self> {
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
        Ok(Self::new(id, identity, name, Storage::Memfd { memfd, map }))
    }

    /// A passthrough-mode entry: the backing file (`file`, open for
    /// reading), mapped but not yet locked.
    pub fn in_page_cache(
        id: EntryId,
        identity: Identity,
        name: &str,
        file: &File,
    ) -> io::Result<Self> {
        let map = MmapOptions::new()
            .len(identity.size as usize)
            .map_raw_read_only(file)?;
        Ok(Self::new(
            id,
            identity,
            name,
            Storage::Locked(LockedPages {
                map,
                page_out: AtomicBool::new(true),
            }),
        ))
    }

    fn new(id: EntryId, identity: Identity, name: &str, storage: Storage) -> Self {
        Self {
            id,
            identity,
            name: name.to_string(),
            storage,
            loaded: AtomicU64::new(0),
            cancelled: AtomicBool::new(false),
            stale: AtomicBool::new(false),
            lock_for_pin: AtomicBool::new(false),
            lock_for_reader: AtomicBool::new(false),
            locked: AtomicBool::new(false),
            lock: Mutex::new(None),
        }
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
    /// if they are loaded into a memfd; `None` sends the reader to the
    /// backing file (which, for a passthrough entry, is where the locked
    /// pages are: this process never touches that mapping, as the file
    /// could shrink under it).
    pub fn bytes(&self, offset: u64, len: u32) -> Option<&[u8]> {
        let Storage::Memfd { map, .. } = &self.storage else {
            return None;
        };
        let end = offset.saturating_add(len as u64).min(self.size());
        if offset > end || end > self.loaded() || self.stale.load(Ordering::Acquire) {
            return None;
        }
        // SAFETY: the range lies inside the mapping and below `loaded`, so
        // the loader never writes it again; the mapping lives as long as self.
        Some(unsafe {
            std::slice::from_raw_parts(map.as_ptr().add(offset as usize), (end - offset) as usize)
        })
    }

    /// Stops the load. The bytes loaded so far stay valid for the handles
    /// that still hold the entry (evicted for room, they still match).
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }

    /// The file changed: nothing may be served from these bytes any more.
    /// Locked pages are unlocked now and kept in the page cache (they are
    /// the file's current contents).
    pub fn mark_stale(&self) {
        self.stale.store(true, Ordering::Release);
        self.cancel();
        if let Storage::Locked(pages) = &self.storage {
            pages.page_out.store(false, Ordering::Relaxed);
            pages.unlock();
        }
    }

    /// Evicted for room while open handles still hold it: the load stops,
    /// and locked pages are unlocked now, so memory reclaim may take them
    /// (a memfd's pages stay until the last handle closes).
    pub fn release(&self) {
        self.cancel();
        if let Storage::Locked(pages) = &self.storage {
            pages.unlock();
        }
    }

    /// Whether the entry's memory is free to reclaim once it is evicted,
    /// even while handles hold it (unlocked page cache).
    pub fn reclaimable_when_evicted(&self) -> bool {
        matches!(self.storage, Storage::Locked(_))
    }

    /// Whether the entry still serves the backing file now described by
    /// `identity`. A copy (memfd) must match every field. Locked pages are
    /// the file's own page cache, current whatever is written: the same
    /// file at the same size will do (a `touch` or `chmod` changes ctime
    /// and must not cost a reload from disk).
    pub fn serves(&self, identity: &Identity) -> bool {
        match self.storage {
            Storage::Memfd { .. } => self.identity == *identity,
            Storage::Locked(_) => {
                (self.identity.key(), self.identity.size) == (identity.key(), identity.size)
            }
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    fn check_cancelled(&self) -> io::Result<()> {
        if self.is_cancelled() {
            return Err(io::Error::new(io::ErrorKind::Interrupted, "load cancelled"));
        }
        Ok(())
    }

    /// Loads the whole file from `source` (the backing file, open for
    /// reading) in `chunk`-sized steps, so readers find the start loaded
    /// early. Stops when cancelled. The caller checks the file's identity
    /// afterwards, then calls `finish`.
    pub fn load(&self, source: &File, chunk: u64) -> io::Result<()> {
        match &self.storage {
            Storage::Memfd { memfd, .. } => self.fill_memfd(memfd, source, chunk),
            Storage::Locked(pages) => self.lock_pages(&pages.map, source, chunk),
        }
    }

    /// Copies the backing file into the memfd, in the kernel (`sendfile`:
    /// backing page cache to memfd pages, one copy), and drops each copied
    /// range from the backing file's page cache so RAM does not hold the
    /// data twice.
    fn fill_memfd(&self, memfd: &File, source: &File, chunk: u64) -> io::Result<()> {
        let size = self.size();
        let mut done = self.loaded();
        // SAFETY: positions the memfd, which only this loader writes.
        if unsafe { libc::lseek(memfd.as_raw_fd(), done as libc::off_t, libc::SEEK_SET) } < 0 {
            return Err(io::Error::last_os_error());
        }
        while done < size {
            self.check_cancelled()?;
            let want = chunk.min(size - done);
            send_range(memfd, source, done, want)?;
            advise(source, done, want, libc::POSIX_FADV_DONTNEED);
            done += want;
            self.loaded.store(done, Ordering::Release);
        }
        Ok(())
    }

    /// Reads the backing file into its page cache and locks each chunk
    /// there. The chunk is read first by `sendfile` to /dev/null: an
    /// ordinary sequential read, whose readahead streams from the disk and
    /// fills the page cache with large folios (2 MiB on ext4 here), which
    /// later reads walk at 15-17 GB/s; pages brought in by
    /// POSIX_FADV_WILLNEED or by faulting the mapping are 4 KiB ones, read
    /// at ~10.5 GB/s. Where locking is refused (RLIMIT_MEMLOCK without
    /// CAP_IPC_LOCK) the pages are only mapped: mapped pages survive
    /// drop_caches and POSIX_FADV_DONTNEED, not memory reclaim.
    fn lock_pages(&self, map: &MmapRaw, source: &File, chunk: u64) -> io::Result<()> {
        let size = self.size();
        let mut done = self.loaded();
        let mut lock = true;
        let null = File::options().write(true).open("/dev/null")?;
        while done < size {
            self.check_cancelled()?;
            let want = chunk.min(size - done);
            send_range(&null, source, done, want)?;
            // SAFETY: the range lies inside our mapping.
            let ptr = unsafe { map.as_mut_ptr().add(done as usize) }.cast::<libc::c_void>();
            // SAFETY: locking / populating our own mapping; a range past a
            // shrunken file's end fails with an error, never a signal.
            if lock && unsafe { libc::mlock(ptr, want as usize) } != 0 {
                let err = io::Error::last_os_error();
                if !MLOCK_WARNED.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "cannot lock cached files in RAM ({err}); they are kept mapped instead, \
                         which memory reclaim can undo. Raise the limit: LimitMEMLOCK=infinity \
                         in the systemd unit, or memlock in /etc/security/limits.conf"
                    );
                }
                lock = false;
            }
            if !lock && unsafe { libc::madvise(ptr, want as usize, libc::MADV_POPULATE_READ) } != 0
            {
                return Err(io::Error::last_os_error());
            }
            done += want;
            self.loaded.store(done, Ordering::Release);
        }
        Ok(())
    }

    /// Sets or clears one reason to lock the pages; returns whether that
    /// changed it. `settle_lock` then locks or unlocks.
    pub fn want_lock(&self, reason: LockReason, on: bool) -> bool {
        let flag = match reason {
            LockReason::Pin => &self.lock_for_pin,
            LockReason::Reader => &self.lock_for_reader,
        };
        flag.swap(on, Ordering::Relaxed) != on
    }

    /// Whether its pages are locked within the pin budget.
    pub fn is_locked(&self) -> bool {
        self.locked.load(Ordering::Relaxed)
    }

    /// Locks or unlocks a copy-mode entry's pages as its reasons say:
    /// locked once fully loaded while a reason stands, within `budget`.
    /// Slow for a large file (the kernel walks every page): the loader
    /// threads call it, never a FUSE thread. Passthrough entries are left
    /// alone (all their pages are locked already).
    ///
    /// Neither a failed mlock nor a spent budget is an error: the entry
    /// stays cached, unlocked, and the first of each is a warning saying
    /// what to raise.
    pub fn settle_lock(&self, budget: &Arc<Mutex<PinBudget>>) {
        let Storage::Memfd { map, .. } = &self.storage else {
            return;
        };
        let mut held = self.lock.lock();
        let wanted = (self.lock_for_pin.load(Ordering::Relaxed)
            || self.lock_for_reader.load(Ordering::Relaxed))
            && self.is_complete()
            && !self.is_cancelled();
        let bytes = self.size().next_multiple_of(page_size());
        let decision = budget.lock().settle(self.id, bytes, wanted);
        let (ptr, len) = (map.as_ptr().cast::<libc::c_void>(), map.len());
        match decision {
            Settle::Keep => {}
            Settle::OverBudget => {
                let (limit, granted) = {
                    let b = budget.lock();
                    (b.limit(), b.granted())
                };
                let message = format!(
                    "not locking {} ({}) in RAM: the pin budget of {} (pin_budget, or the \
                     memory-lock limit if lower) has {} locked already; it stays cached, \
                     unlocked. Raise pin_budget, or LimitMEMLOCK= in the systemd unit",
                    self.name,
                    Bytes(self.size()),
                    Bytes(limit),
                    Bytes(granted)
                );
                if BUDGET_WARNED.swap(true, Ordering::Relaxed) {
                    tracing::info!("{message}");
                } else {
                    tracing::warn!("{message}");
                }
            }
            Settle::Lock => {
                let grant = Grant {
                    budget: budget.clone(),
                    id: self.id,
                };
                // SAFETY: locking our own mapping of the sealed memfd.
                if unsafe { libc::mlock(ptr, len) } != 0 {
                    let err = io::Error::last_os_error();
                    // SAFETY: as above; undoes whatever part got locked.
                    unsafe { libc::munlock(ptr, len) };
                    drop(grant);
                    let message = format!(
                        "cannot lock {} in RAM ({err}); it stays cached, unlocked. Raise the \
                         memory-lock limit: LimitMEMLOCK=infinity in the systemd unit, or \
                         memlock in /etc/security/limits.conf",
                        self.name
                    );
                    if PIN_LOCK_WARNED.swap(true, Ordering::Relaxed) {
                        tracing::debug!("{message}");
                    } else {
                        tracing::warn!("{message}");
                    }
                    return;
                }
                *held = Some(grant);
                self.locked.store(true, Ordering::Relaxed);
                tracing::info!("locked {} ({}) in RAM", self.name, Bytes(self.size()));
            }
            Settle::Unlock => {
                // SAFETY: unlocking our own mapping.
                unsafe { libc::munlock(ptr, len) };
                *held = None;
                self.locked.store(false, Ordering::Relaxed);
                tracing::info!("unlocked {} ({})", self.name, Bytes(self.size()));
            }
        }
    }

    /// After a complete load whose identity still matches: a memfd is
    /// sealed (its size and bytes can never change) and mapped in whole so
    /// the first reads take no page faults.
    pub fn finish(&self) -> io::Result<()> {
        let Storage::Memfd { memfd, map } = &self.storage else {
            return Ok(());
        };
        let seals =
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;
        // SAFETY: fcntl on our own memfd.
        if unsafe { libc::fcntl(memfd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: advice on our own mapping; failure only costs the faults.
        unsafe { libc::madvise(map.as_mut_ptr().cast(), map.len(), libc::MADV_POPULATE_READ) };
        Ok(())
    }
}

/// Copies `len` bytes of `source` from `offset` to `out` (at its position)
/// in the kernel.
fn send_range(out: &File, source: &File, offset: u64, len: u64) -> io::Result<()> {
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
fn advise(file: &File, offset: u64, len: u64, advice: libc::c_int) {
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
