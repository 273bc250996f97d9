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

/// For an error that means this process is out of descriptors (EMFILE):
/// the limit and how to raise it, to append to the error's log line.
pub fn shortage_hint(e: &io::Error) -> Option<String> {
    if e.raw_os_error() != Some(libc::EMFILE) {
        return None;
    }
    // SAFETY: a valid out-pointer.
    let limit = unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur
    };
    Some(format!(
        "this daemon has used all {limit} file descriptors it may open (one per file or \
         folder the kernel has looked up through the mount); raise the limit (`LimitNOFILE=` \
         in the service, `ulimit -n` in a shell)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

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
