use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use modelcache::cli::{Cli, Command};
use modelcache::control;
use modelcache::manifest;
use modelcache::mount::{self, MountConfig};

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_level);
    let result = match cli.command {
        Command::Mount {
            background: true, ..
        } => mount::run_in_background(std::env::args_os().skip(1).collect()),
        Command::Mount {
            mountpoint,
            backing,
            allow_other,
            read_only,
            atime,
            nodiratime,
            threads,
            metadata_ttl,
            max_size,
            min_file_size,
            loader_threads,
            no_warm_start,
            read_mode,
            passthrough,
            manifest,
            metrics_file,
            background: false,
        } => {
            let flags = mount::CacheFlags {
                max_size,
                min_file_size,
                loader_threads: loader_threads.map(usize::from),
                no_warm_start,
            };
            mount::Settings::resolve(flags, manifest).and_then(|settings| {
                mount::run(MountConfig {
                    backing,
                    mountpoint,
                    allow_other,
                    vfs: mount::VfsOptions {
                        read_only,
                        atime,
                        nodiratime,
                    },
                    threads: threads.map_or(mount::DEFAULT_THREADS, usize::from),
                    metadata_ttl: metadata_ttl.map(|s| Duration::from_secs(s.into())),
                    settings,
                    read_mode,
                    passthrough,
                    metrics_file,
                })
            })
        }
        Command::Check { manifest, root } => manifest::check_command(manifest, &root),
        Command::Umount { path, lazy } => mount::umount_command(&path, lazy),
        Command::Status {
            mountpoint,
            json,
            watch,
        } => control::client::status_command(mountpoint.as_deref(), json, watch),
        Command::Warm { paths, no_wait } => control::client::warm_command(&paths, no_wait),
        Command::Evict { paths } => control::client::evict_command(&paths),
        Command::Pin { paths } => control::client::pin_command(&paths),
        Command::Unpin { paths } => control::client::unpin_command(&paths),
        Command::Reload { mountpoint } => control::client::reload_command(mountpoint.as_deref()),
        Command::Suggest { mountpoint, write } => {
            modelcache::suggest::suggest_command(mountpoint.as_deref(), write.as_deref())
        }
        Command::Doctor {
            dir,
            allow_other,
            manifest,
            max_size,
        } => modelcache::doctor::doctor_command(dir.as_deref(), allow_other, manifest, max_size),
        Command::Generate { dir } => modelcache::cli::generate(&dir),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Messages may carry names another user chose (a socket path,
            // a file name): control characters are escaped.
            eprintln!(
                "modelcache: {}",
                modelcache::control::render::escape_controls(&e.to_string())
            );
            ExitCode::FAILURE
        }
    }
}
