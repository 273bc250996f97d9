//! Command-line definitions.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::fs::fuse::{Passthrough, ReadMode};
use crate::units::SizeSpec;

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
        /// A read-only mount (mount's `ro`): every change gets "Read-only
        /// file system"; reads and the cache work as ever.
        #[arg(long)]
        read_only: bool,
        /// When reads update access times (mount's options of these names).
        #[arg(long, value_enum, default_value = "relatime")]
        atime: crate::mount::Atime,
        /// No access-time updates on directories (mount's `nodiratime`).
        #[arg(long)]
        nodiratime: bool,
        /// FUSE worker threads (default 8, whatever the core count: workers
        /// mostly wait on the disk or on the kernel's copy of a reply).
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
        threads: Option<u16>,
        /// How long the kernel may cache names, attributes and directory
        /// listings, in seconds (default: 60 in place, where every change goes
        /// through the mount; 1 with --backing, whose directory may change
        /// behind the mount).
        #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u32).range(0..=3600))]
        metadata_ttl: Option<u32>,
        /// The cap on RAM used by the cache: bytes with a unit (48GiB, 500M) or a
        /// share of RAM (20%). Default: 50% of RAM. 0 turns the cache off.
        #[arg(long, value_name = "SIZE")]
        max_size: Option<SizeSpec>,
        /// Smaller model files are not cached (default 1MiB).
        #[arg(long, value_name = "SIZE")]
        min_file_size: Option<SizeSpec>,
        /// Threads that load files into the cache (default 2).
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=32))]
        loader_threads: Option<u16>,
        /// Do not load the files recorded at the last mount (the working
        /// set) after the manifest's; overrides `warm_start` in the manifest.
        #[arg(long)]
        no_warm_start: bool,
        /// Copy mode: how the kernel serves reads of model files the cache
        /// does not hold (cached ones are read from the page cache it keeps).
        /// A tuning knob; the default was chosen by measurement, see README.
        #[arg(long, value_enum, default_value = "direct")]
        read_mode: ReadMode,
        /// Kernel passthrough (root, Linux 6.9+): the kernel reads open files
        /// straight from the backing file, whose pages the cache keeps
        /// resident. `auto` uses it when the kernel and privileges allow and
        /// says which mode it chose; `on` refuses to mount without it.
        #[arg(long, value_enum, default_value = "auto")]
        passthrough: Passthrough,
        /// The manifest: cache settings, pinned, warm and grouped files
        /// (default: $XDG_CONFIG_HOME/modelcache/manifest.toml if present).
        /// Flags given here override its settings.
        #[arg(long, value_name = "FILE")]
        manifest: Option<PathBuf>,
        /// Write the counters in Prometheus text format to FILE every few
        /// seconds (for node_exporter's textfile collector).
        #[arg(long, value_name = "FILE")]
        metrics_file: Option<PathBuf>,
        /// Return once the mount is live and keep serving in the background.
        #[arg(long)]
        background: bool,
    },
    /// Check a manifest: list the files each rule takes under a models
    /// directory, with sizes, and whether the pins fit the cache's cap.
    Check {
        /// The manifest (default: $XDG_CONFIG_HOME/modelcache/manifest.toml,
        /// else ~/.config/modelcache/manifest.toml).
        manifest: Option<PathBuf>,
        /// The models directory the manifest's paths are relative to.
        #[arg(long)]
        root: PathBuf,
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
    /// Show what the cache saved since the mount (opens from RAM, disk time
    /// avoided), its files with where each open was served from, memory
    /// and counters (every reachable modelcache mount without MOUNTPOINT).
    Status {
        /// A modelcache mount point (or any path in the mount).
        mountpoint: Option<PathBuf>,
        /// Print JSON ({"version":1,"mounts":[...]}, the schema in README).
        #[arg(long)]
        json: bool,
        /// Redraw in place every second until Ctrl-C.
        #[arg(long)]
        watch: bool,
    },
    /// Load files (or every file under a folder) into the cache and wait
    /// until they are loaded.
    Warm {
        /// Files or folders in modelcache mounts.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Return once the loads are queued.
        #[arg(long)]
        no_wait: bool,
    },
    /// Drop files (or every file under a folder) from the cache, pinned ones
    /// included.
    Evict {
        /// Files or folders in modelcache mounts.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Pin files (loading them if needed): never evicted to make room.
    Pin {
        /// Files or folders in modelcache mounts.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Unpin files: they stay cached and are evicted like any other.
    Unpin {
        /// Files or folders in modelcache mounts.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Read the manifest again and apply it (as SIGHUP does), for one mount
    /// or every reachable one.
    Reload {
        /// A modelcache mount point (or any path in the mount).
        mountpoint: Option<PathBuf>,
    },
    /// Suggest a manifest from what a mount recorded of its use: pins for
    /// the files opened from RAM most, groups for files opened together,
    /// warm files for the rest that fits the cap. Printed, or written with
    /// --write once it passes `check`.
    Suggest {
        /// A modelcache mount point (or any path in the mount); may be left
        /// out when only one mount is reachable.
        mountpoint: Option<PathBuf>,
        /// Write the manifest to FILE (a new file) instead of printing it,
        /// once it passes the checks `modelcache check` makes.
        #[arg(long, value_name = "FILE")]
        write: Option<PathBuf>,
    },
    /// Check what a mount needs (fusermount3, /dev/fuse, fuse.conf, memory
    /// limits) and print one line per check with the fix for each problem.
    /// Exits 1 when something would block a mount.
    Doctor {
        /// The directory to be mounted (in place), checked as a mount point.
        dir: Option<PathBuf>,
        /// Check for a mount with --allow-other.
        #[arg(long)]
        allow_other: bool,
        /// The manifest the mount would use (default: as `mount`).
        #[arg(long, value_name = "FILE")]
        manifest: Option<PathBuf>,
        /// The cap the mount would be given (as `mount --max-size`).
        #[arg(long, value_name = "SIZE")]
        max_size: Option<SizeSpec>,
    },
    /// Write the man pages (DIR/man1/*.1) and shell completions
    /// (DIR/completions: bash, zsh, fish) made from these definitions; for
    /// install.sh and the .deb.
    #[command(hide = true)]
    Generate {
        /// The directory to write into (created if missing).
        dir: PathBuf,
    },
}

/// The shells whose completions `generate` writes, with the file name each
/// one's completion loader looks for.
const COMPLETIONS: [(clap_complete::Shell, &str); 3] = [
    (clap_complete::Shell::Bash, "modelcache.bash"),
    (clap_complete::Shell::Zsh, "_modelcache"),
    (clap_complete::Shell::Fish, "modelcache.fish"),
];

/// Writes the man pages and completions made from the definitions above,
/// so that they can never disagree with `--help`.
pub fn generate(dir: &std::path::Path) -> Result<(), crate::Error> {
    use clap::CommandFactory;
    let failed = |what: &std::path::Path, e: std::io::Error| {
        crate::Error(format!("cannot write {}: {e}", what.display()))
    };
    let man = dir.join("man1");
    let completions = dir.join("completions");
    for d in [&man, &completions] {
        std::fs::create_dir_all(d).map_err(|e| failed(d, e))?;
    }
    let mut cmd = Cli::command();
    cmd.build();
    // One page for modelcache(1), one per verb (modelcache-mount(1), …);
    // none for `help` or hidden verbs.
    let verbs = cmd
        .get_subcommands()
        .filter(|v| !v.is_hide_set() && v.get_name() != "help")
        .map(|v| {
            let name = format!("modelcache-{}", v.get_name());
            v.clone().name(name.clone()).display_name(name)
        });
    for page in std::iter::once(cmd.clone()).chain(verbs) {
        let path = man.join(format!("{}.1", page.get_name()));
        let mut file = std::fs::File::create(&path).map_err(|e| failed(&path, e))?;
        clap_mangen::Man::new(page)
            .render(&mut file)
            .map_err(|e| failed(&path, e))?;
    }
    for (shell, name) in COMPLETIONS {
        let path = completions.join(name);
        let mut file = std::fs::File::create(&path).map_err(|e| failed(&path, e))?;
        clap_complete::generate(shell, &mut cmd, "modelcache", &mut file);
    }
    Ok(())
}
