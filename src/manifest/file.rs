//! The manifest's file: where it is by default, and how it is read (without
//! blocking, bounded, and by a daemon only if no one else could write it).

use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::Error;
use crate::units::Bytes;

/// Where a root process looks for its manifest when given none: never a
/// user's home, whatever `$HOME` says under `sudo -E` or `su`.
pub const SYSTEM_MANIFEST: &str = "/etc/modelcache/manifest.toml";

/// Who a manifest's reader is, for the checks of [`Manifest::load`](super::Manifest::load).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reader {
    /// `modelcache check`, doctor: only reads and reports.
    Report,
    /// A daemon, which runs the manifest's hook commands as its own user:
    /// the file must be its own or root's, and writable by no one else.
    Daemon,
}

/// The manifest's text, read as [`Manifest::load`](super::Manifest::load) says.
pub(super) fn read_manifest_file(path: &Path, reader: Reader) -> Result<String, Error> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let shown = path.display();
    let failed = |e: std::io::Error| Error(format!("cannot read the manifest {shown}: {e}"));
    let mut file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(failed)?;
    // The checks look at the file that was opened, not at the path again.
    let meta = file.metadata().map_err(failed)?;
    if !meta.file_type().is_file() {
        return Err(Error(format!(
            "the manifest {shown} is not a regular file: give the path of a TOML file"
        )));
    }
    if reader == Reader::Daemon {
        check_trusted(path, meta.uid(), meta.mode())?;
    }
    // A manifest is a few KiB; a bound keeps a huge file from filling RAM.
    const MAX_MANIFEST: u64 = 4 << 20;
    if meta.len() > MAX_MANIFEST {
        return Err(Error(format!(
            "the manifest {shown} is {}, over the {} a manifest may be",
            Bytes(meta.len()),
            Bytes(MAX_MANIFEST)
        )));
    }
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(failed)?;
    Ok(text)
}

/// A daemon runs the manifest's `[hooks.*] exec` commands as itself, so it
/// reads only a manifest that no one else could have written.
fn check_trusted(path: &Path, owner: u32, mode: u32) -> Result<(), Error> {
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    let shown = path.display();
    if owner != me && owner != 0 {
        return Err(Error(format!(
            "the manifest {shown} is owned by uid {owner}, and this daemon runs as uid {me}: \
             a daemon reads only a manifest owned by its own user or root (its hook commands \
             run as uid {me}). Copy it to a file of your own (for root: {SYSTEM_MANIFEST}), \
             or `chown {me} {shown}`"
        )));
    }
    if mode & 0o022 != 0 {
        let who = match (mode & 0o020 != 0, mode & 0o002 != 0) {
            (true, true) => "group and others",
            (true, false) => "its group",
            _ => "others",
        };
        return Err(Error(format!(
            "the manifest {shown} is writable by {who} (mode {:04o}): anyone who can write it \
             could run commands as this daemon's user. Fix: chmod go-w {shown}",
            mode & 0o7777
        )));
    }
    Ok(())
}

pub(super) fn default_path_from(
    xdg_config_home: Option<OsString>,
    home: Option<OsString>,
) -> Option<PathBuf> {
    // The XDG spec says to ignore a relative XDG_CONFIG_HOME.
    let config = xdg_config_home
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| {
            home.map(PathBuf::from)
                .filter(|p| p.is_absolute())
                .map(|h| h.join(".config"))
        })?;
    Some(config.join("modelcache").join("manifest.toml"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_daemon_trusts_only_its_own_or_roots_manifest_that_others_cannot_write() {
        // SAFETY: geteuid cannot fail.
        let me = unsafe { libc::geteuid() };
        let path = Path::new("/x/manifest.toml");
        assert!(check_trusted(path, me, 0o100644).is_ok());
        assert!(check_trusted(path, 0, 0o100600).is_ok());
        let other = if me == 4242 { 4243 } else { 4242 };
        let err = check_trusted(path, other, 0o100644).unwrap_err().0;
        assert!(err.contains(&format!("owned by uid {other}")), "{err}");
        let err = check_trusted(path, me, 0o100664).unwrap_err().0;
        assert!(err.contains("writable by its group (mode 0664)"), "{err}");
        assert!(err.contains("chmod go-w /x/manifest.toml"), "{err}");
    }

    #[test]
    fn default_path_follows_xdg() {
        let p = |xdg: Option<&str>, home: Option<&str>| {
            default_path_from(xdg.map(Into::into), home.map(Into::into))
        };
        assert_eq!(
            p(Some("/cfg"), Some("/home/u")),
            Some(PathBuf::from("/cfg/modelcache/manifest.toml"))
        );
        assert_eq!(
            p(Some("relative"), Some("/home/u")),
            Some(PathBuf::from("/home/u/.config/modelcache/manifest.toml"))
        );
        assert_eq!(
            p(None, Some("/home/u")),
            Some(PathBuf::from("/home/u/.config/modelcache/manifest.toml"))
        );
        assert_eq!(p(None, None), None);
    }
}
