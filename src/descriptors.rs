//! The daemon's open-file limit: raised at start, and named in the log when
//! it runs out, so that the fix is one line away.

use std::io;

/// Raises the soft open-file limit to the hard one.
pub fn raise_limit() {
    // SAFETY: plain get/set of a resource limit.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// How the open-file limit is shared, so that no table of the daemon can
/// take the descriptors the others (and the daemon itself: /dev/fuse,
/// sockets, /proc) need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// `O_PATH` descriptors of looked-up nodes, an LRU (fs/inodes.rs).
    pub node_fds: usize,
    /// Files open through the mount at once; past it an open gets EMFILE.
    pub open_files: usize,
    /// Directories open through the mount at once; past it EMFILE.
    pub open_dirs: usize,
}

/// Descriptors kept for the daemon's own use: a /dev/fuse clone per FUSE
/// thread, the control socket and its connections, loaders, /proc reads.
pub const RESERVED: u64 = 128;

impl Budget {
    /// The shares of an open-file limit of `limit`. An open file or
    /// directory costs two descriptors: its own, and its node's, which it
    /// holds while open.
    pub fn of(limit: u64) -> Budget {
        // A tiny limit keeps half for the daemon rather than all of it.
        let usable = (limit - RESERVED.min(limit / 2)) as usize;
        let node_fds = (usable / 4).clamp(8, 16384);
        let open_dirs = (usable / 16).max(2);
        let open_files = (usable.saturating_sub(node_fds + 2 * open_dirs) / 2).max(4);
        Budget {
            node_fds,
            open_files,
            open_dirs,
        }
    }

    /// The shares of this process's current limit.
    pub fn current() -> Budget {
        Budget::of(soft_limit())
    }
}

fn soft_limit() -> u64 {
    // SAFETY: a valid out-pointer.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur
    }
}

/// For an error that means this process is out of descriptors (EMFILE):
/// the limit and how to raise it, to append to the error's log line.
pub fn shortage_hint(e: &io::Error) -> Option<String> {
    if e.raw_os_error() != Some(libc::EMFILE) {
        return None;
    }
    let limit = soft_limit();
    Some(format!(
        "this daemon has used all {limit} file descriptors it may open; raise the limit \
         (`LimitNOFILE=` in the service, `ulimit -n` in a shell)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_is_shared_and_never_overspent() {
        for limit in [64, 128, 1024, 20_000, 1 << 20] {
            let b = Budget::of(limit);
            let kept = RESERVED.min(limit / 2);
            let spent = (b.node_fds + 2 * b.open_files + 2 * b.open_dirs) as u64 + kept;
            assert!(spent <= limit, "{limit}: {b:?}");
            assert!(
                b.node_fds >= 8 && b.open_files >= 4 && b.open_dirs >= 2,
                "{b:?}"
            );
        }
        assert_eq!(Budget::of(1024).node_fds, 224);
    }

    #[test]
    fn only_emfile_gets_the_limit_and_the_fix() {
        let hint = shortage_hint(&io::Error::from_raw_os_error(libc::EMFILE)).unwrap();
        assert!(
            hint.contains("file descriptors") && hint.contains("LimitNOFILE="),
            "{hint}"
        );
        assert!(shortage_hint(&io::Error::from_raw_os_error(libc::ENOENT)).is_none());
    }
}
