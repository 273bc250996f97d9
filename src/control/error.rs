//! What goes wrong on the control socket, typed: a request the daemon
//! cannot read, a verb it cannot carry out, an answer the client cannot
//! get. Each `Display` is the one line a user reads.

use std::fmt;
use std::time::Duration;

use super::protocol::{FileOutcome, PROTOCOL_VERSION};

/// A request line the daemon does not accept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestError {
    /// Not the shape of a request; what is wrong with it.
    Malformed(String),
    /// Another release's protocol; the version it named.
    Version(String),
    UnknownVerb(String),
    /// A path that could reach outside the mount, or cannot be a name.
    Path {
        path: String,
        problem: PathProblem,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathProblem {
    Absolute,
    Nul,
    DotDot,
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestError::Malformed(what) => write!(f, "malformed request: {what}"),
            RequestError::Version(v) => write!(
                f,
                "unsupported protocol version {v}: this daemon speaks version {PROTOCOL_VERSION} (are modelcache and its daemon the same release?)"
            ),
            RequestError::UnknownVerb(verb) => write!(
                f,
                "unknown verb {verb:?}: expected status, warm, evict, pin, unpin or reload"
            ),
            RequestError::Path { path, problem } => match problem {
                PathProblem::Absolute => write!(
                    f,
                    "path {path:?} is absolute: paths are relative to the mount root"
                ),
                PathProblem::Nul => write!(f, "path {path:?} contains a NUL byte"),
                PathProblem::DotDot => write!(
                    f,
                    "path {path:?} contains \"..\": paths are relative to the mount root"
                ),
            },
        }
    }
}

/// Why the daemon did not (fully) carry out a verb.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VerbError {
    /// A path the request names cannot be used (missing, leading out of
    /// the mount, a folder read only in part): nothing was done.
    Path { path: String, why: String },
    /// A folder the request names could not be walked.
    Walk(String),
    /// Files that were not done, each with its reason, and what was done
    /// to the others.
    Refused {
        refused: Vec<(String, String)>,
        done: Vec<FileOutcome>,
    },
    /// Files `evict` found not cached, and what was done to the others.
    NotCached {
        missing: Vec<String>,
        done: Vec<FileOutcome>,
    },
    /// The manifest could not be applied again; the one in force stays.
    Reload(String),
    /// Runtime pins refused (too many), or applied but not saved, and what
    /// was done to each file.
    Pins { why: String, done: Vec<FileOutcome> },
}

impl fmt::Display for VerbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VerbError::Path { path, why } => write!(f, "{path}: {why}"),
            VerbError::Walk(why) => f.write_str(why),
            VerbError::Refused { refused, .. } => {
                let each: Vec<String> = refused
                    .iter()
                    .map(|(n, why)| format!("{n}: {why}"))
                    .collect();
                f.write_str(&each.join("; "))
            }
            VerbError::NotCached { missing, .. } => {
                write!(f, "not cached: {}", missing.join(", "))
            }
            VerbError::Reload(why) | VerbError::Pins { why, .. } => f.write_str(why),
        }
    }
}

/// Why a client got no usable answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientError {
    Send {
        socket: String,
        error: String,
    },
    Closed {
        socket: String,
    },
    TooLong {
        socket: String,
    },
    NoAnswer {
        socket: String,
        within: Duration,
    },
    Receive {
        socket: String,
        error: String,
    },
    /// The answer is not JSON of the protocol.
    NotUnderstood(String),
    /// The daemon runs another release.
    Version(u32),
    /// The daemon answered `ok: false`, with this reason.
    Failed(String),
    /// A status answer without the status.
    NoStatus,
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Send { socket, error } => {
                write!(f, "cannot send to the control socket {socket}: {error}")
            }
            ClientError::Closed { socket } => {
                write!(f, "the daemon closed the control socket {socket}")
            }
            ClientError::TooLong { socket } => {
                write!(f, "the daemon's answer on {socket} is too long")
            }
            ClientError::NoAnswer { socket, within } => write!(
                f,
                "the daemon did not answer on {socket} within {} s",
                within.as_secs()
            ),
            ClientError::Receive { socket, error } => {
                write!(f, "cannot read from the control socket {socket}: {error}")
            }
            ClientError::NotUnderstood(e) => {
                write!(f, "the daemon's answer is not understood ({e})")
            }
            ClientError::Version(v) => write!(
                f,
                "the daemon speaks protocol version {v}, this modelcache speaks {PROTOCOL_VERSION}: restart the mount with this release"
            ),
            ClientError::Failed(why) => f.write_str(why),
            ClientError::NoStatus => write!(f, "the daemon's status answer has no status"),
        }
    }
}

impl VerbError {
    /// What was done to the files that were not refused: said in the
    /// answer too.
    pub fn done(&self) -> &[FileOutcome] {
        match self {
            VerbError::Refused { done, .. }
            | VerbError::NotCached { done, .. }
            | VerbError::Pins { done, .. } => done,
            VerbError::Path { .. } | VerbError::Walk(_) | VerbError::Reload(_) => &[],
        }
    }
}

impl std::error::Error for RequestError {}
impl std::error::Error for VerbError {}
impl std::error::Error for ClientError {}
