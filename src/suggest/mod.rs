//! `modelcache suggest [MOUNT] [--write FILE]`: a commented manifest made
//! from a live mount's record (asked for over its control socket with the
//! read-only `record` verb), printed, or written to a new file once it
//! passes the checks `modelcache check` makes. What goes in it is
//! [`plan`]'s (pure).

pub mod plan;

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::Error;
use crate::control::client::Context;
use crate::control::protocol::{RecordReport, Request};
use crate::control::render::escape_controls;
use crate::manifest::{CapFrom, Manifest};

/// `modelcache suggest [MOUNT] [--write FILE]`.
pub fn suggest_command(mountpoint: Option<&Path>, write: Option<&Path>) -> Result<(), Error> {
    if let Some(file) = write {
        refuse_existing(file)?;
    }
    let ctx = Context::system();
    let mp = match mountpoint {
        Some(p) => ctx.mount_of(p)?,
        None => only_mount(&ctx)?,
    };
    let (mut client, status) = ctx
        .connect(&mp)
        .map_err(|e| Error(e.message().to_string()))?;
    let shown = mp.display();
    let answer = client.call(&Request::Record).map_err(|e| {
        let e = e.to_string();
        if e.contains("unknown verb") {
            Error(format!(
                "{shown}: its daemon runs an older release, without the record verb: \
                 remount it with this release ({e})"
            ))
        } else {
            Error(format!("{shown}: {e}"))
        }
    })?;
    let report: RecordReport = answer
        .record
        .ok_or_else(|| Error(format!("{shown}: the daemon answered without its record")))?;
    if report.files.is_empty() {
        println!(
            "{shown}: no use recorded yet: open some models through the mount first, then run \
             `modelcache suggest` again"
        );
        return match write {
            Some(file) => Err(Error(format!(
                "nothing written to {}: there is nothing to suggest yet",
                file.display()
            ))),
            None => Ok(()),
        };
    }
    let cap = status.max_size;
    let exists = |path: &str| {
        let through = mp.join(crate::names::path_of(path));
        std::fs::symlink_metadata(through).is_ok()
    };
    let suggestion = plan::plan(&report, cap, exists);
    let origin = plan::Origin {
        mountpoint: &status.mountpoint,
        backing: &status.backing,
        cap,
    };
    let text = suggestion.render(&report, &origin);
    let Some(file) = write else {
        print!("{text}");
        return Ok(());
    };
    validate(&text, file, &crate::names::path_of(&status.backing), cap)?;
    save(file, &text)?;
    println!(
        "wrote {}: {} pinned, {} groups, {} warm; mount with --manifest {} (or merge its rules \
         into your manifest)",
        file.display(),
        suggestion.pins.len(),
        suggestion.groups.len(),
        suggestion.warm.len(),
        file.display()
    );
    Ok(())
}

/// The one reachable mount, when none is named.
fn only_mount(ctx: &Context) -> Result<PathBuf, Error> {
    let mut statuses = ctx.statuses(None)?;
    if statuses.len() > 1 {
        let list: Vec<String> = statuses.iter().map(|s| s.mountpoint.clone()).collect();
        return Err(Error(format!(
            "{} modelcache mounts: name one (modelcache suggest MOUNT): {}",
            list.len(),
            escape_controls(&list.join(", "))
        )));
    }
    let status = statuses.pop().expect("statuses is never empty when Ok");
    Ok(crate::names::path_of(&status.mountpoint))
}

fn refuse_existing(file: &Path) -> Result<(), Error> {
    if std::fs::symlink_metadata(file).is_ok() {
        return Err(Error(format!(
            "{} exists: not overwritten; give a new file name, or remove it first",
            file.display()
        )));
    }
    Ok(())
}

/// The checks `modelcache check` makes, against the mount's backing folder
/// and its cap: the text parses as a manifest, and its pins fit.
fn validate(text: &str, file: &Path, backing: &Path, cap: u64) -> Result<(), Error> {
    let not_written = |e: Error| {
        Error(format!(
            "{} not written: the suggested manifest fails the check: {e}",
            file.display()
        ))
    };
    let manifest = Manifest::parse(text, file).map_err(not_written)?;
    let matches = manifest.matches(backing).map_err(not_written)?;
    for warning in &matches.warnings {
        eprintln!("warning: {}", escape_controls(warning));
    }
    for rule in &matches.rules {
        for warning in &rule.warnings {
            eprintln!("warning: {}: {}", rule.kind, escape_controls(warning));
        }
    }
    let ram = crate::cache::pressure::total_ram();
    manifest
        .pins_fit(&matches, cap, CapFrom::Mounted, ram)
        .map_err(not_written)
}

/// Writes `text` to `file`, a new file (never over one that appeared
/// meanwhile), mode 0644 as the daemon wants a manifest.
fn save(file: &Path, text: &str) -> Result<(), Error> {
    use std::os::unix::fs::OpenOptionsExt;
    let failed = |e: std::io::Error| Error(format!("cannot write {}: {e}", file.display()));
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(file)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                refuse_existing(file).err().unwrap_or_else(|| failed(e))
            } else {
                failed(e)
            }
        })?;
    let written = out.write_all(text.as_bytes()).and_then(|()| out.sync_all());
    written.map_err(|e| {
        // This call made the file (create_new): a part-written one would
        // only make the next try refuse it as existing.
        drop(out);
        match std::fs::remove_file(file) {
            Ok(()) => Error(format!(
                "cannot write {}: {e}; the part written was removed",
                file.display()
            )),
            Err(rm) => Error(format!(
                "cannot write {}: {e}; the part written could not be removed ({rm}): \
                 remove it before trying again",
                file.display()
            )),
        }
    })
}
