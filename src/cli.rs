//! Command-line definitions.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "modelcache",
    version,
    about = "A FUSE overlay of an AI models directory that serves model files from RAM"
)]
pub struct Cli {
    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info")]
    pub log_level: String,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Mount a models directory: in place (`mount DIR`) or from a separate
    /// backing directory (`mount --backing SRC DIR`). Runs until unmounted,
    /// Ctrl-C or SIGTERM.
    Mount {
        /// Where to mount; also the backing directory unless --backing is given.
        mountpoint: PathBuf,
        /// The directory whose files the mount shows (default: the mount point itself).
        #[arg(long)]
        backing: Option<PathBuf>,
        /// Let other users (and root) use the mount. A non-root daemon needs
        /// `user_allow_other` in /etc/fuse.conf.
        #[arg(long)]
        allow_other: bool,
        /// FUSE worker threads (default: the number of cores, clamped to 2..8).
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
        threads: Option<u16>,
        /// How long the kernel may cache names, attributes and directory
        /// listings, in seconds (default: 60 in place, where every change goes
        /// through the mount; 1 with --backing, whose directory may change
        /// behind the mount).
        #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u32).range(0..=3600))]
        metadata_ttl: Option<u32>,
        /// Return once the mount is live and keep serving in the background.
        #[arg(long)]
        background: bool,
    },
    /// Unmount a modelcache mount.
    Umount {
        /// The mount point.
        path: PathBuf,
        /// Detach even while files are open: the mount disappears at once and
        /// is released when the last user closes it.
        #[arg(long)]
        lazy: bool,
    },
}
