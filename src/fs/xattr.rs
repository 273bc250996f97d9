//! Extended attributes (and so POSIX ACLs) of the backing files, a symlink's
//! included, never handed out for another file than the one asked about.

use std::ffi::OsStr;
use std::io;

use super::inodes::Node;
use super::{Overlay, backing, key};

impl Overlay {
    /// Where xattr calls on node `id` go (see `backing::XattrTarget`). A
    /// symlink is reached by its name in its parent, checked to still be
    /// that symlink before the call, and by `XattrCall::still_there` after a
    /// read: a name swapped in between must not hand out another file's
    /// attributes.
    fn xattr_call(&self, id: u64) -> io::Result<XattrCall> {
        let node = self.inodes.get(id)?;
        if backing::stat(node.fd())?.st_mode & libc::S_IFMT != libc::S_IFLNK {
            return Ok(XattrCall {
                target: backing::XattrTarget::inode(node.fd()),
                link: None,
                node,
            });
        }
        let (parent_id, name) = self
            .inodes
            .place_of(id)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ESTALE))?;
        let parent = self.inodes.get(parent_id)?;
        let call = XattrCall {
            target: backing::XattrTarget::link(parent.fd(), &name),
            link: Some((parent, name)),
            node,
        };
        call.still_there()?;
        Ok(call)
    }

    fn xattr_name(name: &OsStr) -> io::Result<std::ffi::CString> {
        use std::os::unix::ffi::OsStrExt;
        std::ffi::CString::new(name.as_bytes())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
    }

    /// `size == 0` asks for the value's size only.
    pub fn getxattr(&self, id: u64, name: &OsStr, size: u32) -> io::Result<XattrReply> {
        let call = self.xattr_call(id)?;
        let cname = Self::xattr_name(name)?;
        let answer = xattr_query(size, |buf| backing::getxattr(&call.target, &cname, buf));
        call.still_there()?;
        match answer {
            // The kernel asks for ACLs at every permission check (the mount
            // enforces them): on a backing filesystem without ACLs (NFS, an
            // object-store FUSE, `noacl`) the answer must be "no ACL", not
            // "not supported", which the kernel would turn into a refusal.
            Err(e)
                if name.as_encoded_bytes().starts_with(b"system.posix_acl_")
                    && matches!(
                        e.raw_os_error(),
                        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
                    ) =>
            {
                Err(io::Error::from_raw_os_error(libc::ENODATA))
            }
            answer => answer,
        }
    }

    pub fn listxattr(&self, id: u64, size: u32) -> io::Result<XattrReply> {
        let call = self.xattr_call(id)?;
        let answer = xattr_query(size, |buf| backing::listxattr(&call.target, buf));
        call.still_there()?;
        answer
    }

    pub fn setxattr(&self, id: u64, name: &OsStr, value: &[u8], flags: i32) -> io::Result<()> {
        let call = self.xattr_call(id)?;
        backing::setxattr(&call.target, &Self::xattr_name(name)?, value, flags)
    }

    pub fn removexattr(&self, id: u64, name: &OsStr) -> io::Result<()> {
        let call = self.xattr_call(id)?;
        backing::removexattr(&call.target, &Self::xattr_name(name)?)
    }
}

/// One xattr call's target, with the handles it needs held while it runs.
struct XattrCall {
    target: backing::XattrTarget,
    /// A symlink's parent and name, by which it is reached.
    link: Option<(Node, std::ffi::CString)>,
    node: Node,
}

impl XattrCall {
    /// ESTALE unless the symlink's name still leads to the node.
    fn still_there(&self) -> io::Result<()> {
        let Some((parent, name)) = &self.link else {
            return Ok(());
        };
        if key(&backing::stat_at(parent.fd(), name)?) != self.node.key {
            return Err(io::Error::from_raw_os_error(libc::ESTALE));
        }
        Ok(())
    }
}

/// The answer to an xattr query: its size, or its bytes.
pub enum XattrReply {
    Size(u32),
    Data(Vec<u8>),
}

/// Runs an xattr query the way the kernel asks it: its size when `size` is
/// 0, else its bytes (ERANGE from the backing fs when they do not fit).
fn xattr_query(
    size: u32,
    query: impl FnOnce(&mut [u8]) -> io::Result<usize>,
) -> io::Result<XattrReply> {
    let mut buf = vec![0u8; size as usize];
    let n = query(&mut buf)?;
    if size == 0 {
        return Ok(XattrReply::Size(n as u32));
    }
    buf.truncate(n);
    Ok(XattrReply::Data(buf))
}
