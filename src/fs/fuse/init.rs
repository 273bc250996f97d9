//! The INIT handshake: the optional kernel capabilities the mount asks
//! for, and what it falls back to where this kernel lacks one.

use fuser::{InitFlags, KernelConfig};

use super::{FuseAdapter, ReadMode};

impl FuseAdapter {
    /// Asks for the optional capabilities at INIT; where this kernel lacks
    /// one, falls back (the read mode) or turns the feature off (passthrough).
    pub(super) fn negotiate(&mut self, config: &mut KernelConfig) {
        // Optional capabilities: each is used only if this kernel has it.
        // READDIRPLUS always (not AUTO): listing a directory then also
        // answers the stat of every entry, which is what ComfyUI's model
        // scan and `find` do next. PARALLEL_DIROPS: lookups in one directory
        // need not be serialized, every backing call is *at-relative.
        // DIRECT_IO_ALLOW_MMAP: mmap of a file opened with FOPEN_DIRECT_IO.
        // ASYNC_DIO: an asynchronous (aio, io_uring) direct read goes out as
        // several requests at once; a plain read() still sends its requests
        // one after another. AUTO_INVAL_DATA: the kernel drops a file's page
        // cache when it sees a new mtime (a file changed behind a --backing
        // mount), which matters for the page cache copy-mode entries keep.
        // POSIX_ACL: with default_permissions the kernel checks each
        // caller against the backing file's ACLs (read through getxattr),
        // not the mode bits alone. DONT_MASK: the kernel leaves the umask to
        // us, so that a directory's default ACL can replace it as on the
        // backing filesystem (creds.rs applies it per create).
        for cap in [
            InitFlags::FUSE_POSIX_ACL,
            InitFlags::FUSE_DONT_MASK,
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP,
            InitFlags::FUSE_ASYNC_DIO,
            InitFlags::FUSE_AUTO_INVAL_DATA,
        ] {
            let _ = config.add_capabilities(cap);
        }
        let mmap_ok = config
            .capabilities()
            .contains(InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP);
        if self.read_mode == ReadMode::Direct && !mmap_ok {
            tracing::warn!(
                "this kernel cannot mmap direct-I/O files (Linux < 6.6): model files are read \
                 through the page cache instead"
            );
            self.read_mode = ReadMode::PageCache;
        }
        if self.backing_files.is_enabled() {
            // Depth 1: backing files must live on a plain filesystem (not
            // overlayfs or another passthrough mount); others are refused at
            // open and served through the daemon.
            let granted = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok();
            if !granted {
                tracing::warn!("this kernel does not offer FUSE passthrough (Linux 6.9+)");
                self.backing_files.disable();
            }
        }
    }
}
