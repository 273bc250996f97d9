//! The mount as copy-mode cache entries see it: files opened through the
//! mount point (their page cache is where the entries keep their bytes)
//! and the FUSE notifications that fill and drop that page cache.

use std::fs::File;
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::Weak;

use fuser::{INodeNo, Notifier};

use crate::cache::{Identity, MountView};
use crate::fs::Overlay;

pub struct MountedFiles {
    mountpoint: PathBuf,
    notifier: Notifier,
    overlay: Weak<Overlay>,
}

impl MountedFiles {
    pub fn new(mountpoint: PathBuf, notifier: Notifier, overlay: Weak<Overlay>) -> Self {
        Self {
            mountpoint,
            notifier,
            overlay,
        }
    }
}

impl MountView for MountedFiles {
    fn open(&self, name: &str, identity: &Identity) -> io::Result<(File, u64)> {
        // Opened by path, so it may be another file by now (renamed over
        // it): the node it reached must be the backing file being cached.
        // Non-blocking and type-checked: a FIFO renamed over it must not
        // hang the loader.
        let file = File::options()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(self.mountpoint.join(crate::names::path_of(name)))?;
        let file = crate::fs::backing::regular_file(file)?;
        let node = file.metadata()?.ino();
        let overlay = self
            .overlay
            .upgrade()
            .ok_or_else(|| io::Error::other("the mount is gone"))?;
        if !overlay.is_node_of(node, identity.key()) {
            return Err(io::Error::other("it was renamed or replaced meanwhile"));
        }
        Ok((file, node))
    }

    fn store(&self, node: u64, offset: u64, data: &[u8]) -> io::Result<()> {
        self.notifier.store(INodeNo(node), offset, data)
    }

    fn drop_pages(&self, node: u64) {
        // Offset 0, length 0: every page. Fails only if the kernel has
        // forgotten the node, whose pages are then gone anyway.
        let _ = self.notifier.inval_inode(INodeNo(node), 0, 0);
    }
}
