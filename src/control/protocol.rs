//! The control protocol: JSON lines over a Unix stream socket.
//!
//! A request is one line, a JSON object with `"version"` (this is version
//! [`PROTOCOL_VERSION`]) and `"verb"`:
//!
//! ```text
//! {"version":1,"verb":"status"}
//! {"version":1,"verb":"warm","paths":["vae/wan_2.1_vae.safetensors"]}
//! {"version":1,"verb":"evict","paths":["loras"]}
//! {"version":1,"verb":"pin","paths":["diffusion_models/a.safetensors"]}
//! {"version":1,"verb":"unpin","paths":["diffusion_models/a.safetensors"]}
//! {"version":1,"verb":"reload"}
//! {"version":1,"verb":"record"}
//! ```
//!
//! Paths are relative to the mount root (`""` is the root itself). Unknown
//! fields are ignored. Each request gets one response line:
//!
//! ```text
//! {"version":1,"ok":true,"files":[...]}             warm, evict, pin, unpin
//! {"version":1,"ok":true,"status":{...}}            status (a MountStatus)
//! {"version":1,"ok":true,"message":"...","warnings":[...]}   reload
//! {"version":1,"ok":true,"record":{...}}            record (a RecordReport)
//! {"version":1,"ok":false,"error":"...","files":[...]}       anything that failed
//! ```
//!
//! `files` says what a verb did to each file ([`FileOutcome`]), also when
//! it failed for others; `warnings` what the daemon warned of while doing
//! it. Both are absent when empty.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::{ClientError, PathProblem, RequestError};

/// The version of the protocol this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// The longest request line a server reads (1 MiB, newline excluded).
pub const MAX_REQUEST_LINE: usize = 1 << 20;

pub use super::record::{RecordReport, RecordedFile, RecordedOpens, RecordedSet};
pub use super::status::{
    Counters, EVICT_CAP, EVICT_INVALIDATED, EVICT_MANUAL, EVICT_PRESSURE, EVICTION_REASONS,
    FileState, FileStatus, LastOpen, LoadingProgress, Mode, MountStatus, OpensBySource, PinOrigin,
    StatusReport,
};

/// A request, as the client sends it and the server understands it.
#[derive(Clone, Debug, PartialEq)]
pub enum Request {
    Status,
    Warm {
        paths: Vec<String>,
    },
    Evict {
        paths: Vec<String>,
    },
    Pin {
        paths: Vec<String>,
    },
    Unpin {
        paths: Vec<String>,
    },
    Reload,
    /// The working-set record, read-only (added within version 1: a daemon
    /// of an older release answers "unknown verb").
    Record,
}

impl Request {
    pub fn verb(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Warm { .. } => "warm",
            Request::Evict { .. } => "evict",
            Request::Pin { .. } => "pin",
            Request::Unpin { .. } => "unpin",
            Request::Reload => "reload",
            Request::Record => "record",
        }
    }

    pub fn paths(&self) -> Option<&[String]> {
        match self {
            Request::Warm { paths }
            | Request::Evict { paths }
            | Request::Pin { paths }
            | Request::Unpin { paths } => Some(paths),
            Request::Status | Request::Reload | Request::Record => None,
        }
    }

    /// The request as one line of JSON, without the newline.
    pub fn to_line(&self) -> String {
        #[derive(Serialize)]
        struct Wire<'a> {
            version: u32,
            verb: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            paths: Option<&'a [String]>,
        }
        let wire = Wire {
            version: PROTOCOL_VERSION,
            verb: self.verb(),
            paths: self.paths(),
        };
        serde_json::to_string(&wire).expect("a request always encodes")
    }

    /// Parses one request line; the error is the message to answer with.
    /// Paths come back normalised (see [`normalize_path`]).
    pub fn parse(line: &str) -> Result<Request, RequestError> {
        let malformed = |what: String| RequestError::Malformed(what);
        let value: Value =
            serde_json::from_str(line.trim()).map_err(|e| malformed(format!("not JSON ({e})")))?;
        let Value::Object(obj) = value else {
            return Err(malformed("not a JSON object".into()));
        };
        match obj.get("version") {
            None => return Err(malformed("no \"version\"".into())),
            Some(v) if v.as_u64() == Some(PROTOCOL_VERSION.into()) => {}
            Some(v) => return Err(RequestError::Version(v.to_string())),
        }
        let verb = match obj.get("verb") {
            Some(Value::String(v)) => v.as_str(),
            Some(_) => return Err(malformed("\"verb\" must be a string".into())),
            None => return Err(malformed("no \"verb\"".into())),
        };
        let paths = || -> Result<Vec<String>, RequestError> {
            let Some(Value::Array(items)) = obj.get("paths") else {
                return Err(malformed(format!(
                    "{verb} needs \"paths\", a list of paths"
                )));
            };
            if items.is_empty() {
                return Err(malformed(format!("{verb} needs at least one path")));
            }
            items
                .iter()
                .map(|p| match p {
                    Value::String(s) => normalize_path(s),
                    _ => Err(malformed("every path must be a string".into())),
                })
                .collect()
        };
        Ok(match verb {
            "status" => Request::Status,
            "reload" => Request::Reload,
            "record" => Request::Record,
            "warm" => Request::Warm { paths: paths()? },
            "evict" => Request::Evict { paths: paths()? },
            "pin" => Request::Pin { paths: paths()? },
            "unpin" => Request::Unpin { paths: paths()? },
            other => return Err(RequestError::UnknownVerb(other.to_string())),
        })
    }
}

/// A path relative to the mount root, normalised: `/`-separated, no empty,
/// `.` or `..` components; `""` for the root. Absolute paths and `..` are
/// refused: a request can never name anything outside the mount.
pub fn normalize_path(path: &str) -> Result<String, RequestError> {
    let refused = |problem| RequestError::Path {
        path: path.to_string(),
        problem,
    };
    if path.starts_with('/') {
        return Err(refused(PathProblem::Absolute));
    }
    if path.contains('\0') {
        return Err(refused(PathProblem::Nul));
    }
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(refused(PathProblem::DotDot)),
            p => parts.push(p),
        }
    }
    Ok(parts.join("/"))
}

/// What a verb did to one file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileOutcome {
    /// Relative to the mount root.
    pub path: String,
    pub size: u64,
    pub action: Action,
    /// Where it stands in the cache now.
    pub state: FileState,
}

/// What a verb did to a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// `warm`: its load is queued (or under way).
    Warming,
    /// `warm`: it was loaded already.
    AlreadyCached,
    Pinned,
    Unpinned,
    /// `unpin`: it was not pinned.
    NotPinned,
    Evicted,
}

/// What a verb did, for its answer: a line for `reload`, each file, and
/// what the daemon warned of meanwhile.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VerbReport {
    pub message: Option<String>,
    pub files: Vec<FileOutcome>,
    pub warnings: Vec<String>,
}

impl VerbReport {
    pub fn files(files: Vec<FileOutcome>) -> VerbReport {
        VerbReport {
            files,
            ..VerbReport::default()
        }
    }
}

/// A response line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub version: u32,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<MountStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FileOutcome>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<RecordReport>,
}

impl Response {
    pub fn ok() -> Response {
        Response {
            version: PROTOCOL_VERSION,
            ok: true,
            error: None,
            status: None,
            message: None,
            files: Vec::new(),
            warnings: Vec::new(),
            record: None,
        }
    }

    pub fn error(message: impl Into<String>) -> Response {
        Response {
            ok: false,
            error: Some(message.into()),
            ..Response::ok()
        }
    }

    /// A status answer. Floats JSON cannot carry (NaN, infinities) are
    /// replaced, so the answer always parses.
    pub fn with_status(mut status: MountStatus) -> Response {
        status.psi_some_avg10 = status.psi_some_avg10.filter(|p| p.is_finite());
        if !status.counters.load_seconds.is_finite() {
            status.counters.load_seconds = 0.0;
        }
        Response {
            status: Some(status),
            ..Response::ok()
        }
    }

    /// A record answer.
    pub fn with_record(record: RecordReport) -> Response {
        Response {
            record: Some(record),
            ..Response::ok()
        }
    }

    /// The answer of a verb that did what `report` says.
    pub fn with_report(report: VerbReport) -> Response {
        Response {
            message: report.message,
            files: report.files,
            warnings: report.warnings,
            ..Response::ok()
        }
    }

    /// The response as one line of JSON, without the newline.
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| {
            // Only a non-finite float could fail; say so rather than hang up.
            format!(
                r#"{{"version":{PROTOCOL_VERSION},"ok":false,"error":"cannot encode the answer: {}"}}"#,
                e.to_string().replace(['"', '\\'], "'")
            )
        })
    }

    /// Parses a response line, checking its version.
    pub fn parse(line: &str) -> Result<Response, ClientError> {
        let r: Response = serde_json::from_str(line.trim())
            .map_err(|e| ClientError::NotUnderstood(e.to_string()))?;
        if r.version != PROTOCOL_VERSION {
            return Err(ClientError::Version(r.version));
        }
        Ok(r)
    }
}

/// What [`read_line_limited`] found.
#[derive(Debug, PartialEq)]
pub enum Line {
    /// A line (without its newline) is in the buffer; the last line of a
    /// stream may lack the newline.
    Complete,
    /// The line was longer than the limit: it was read to its end and
    /// dropped, the buffer is empty.
    TooLong,
    /// The stream ended before any byte of a new line.
    Eof,
}

/// Reads one `\n`-terminated line into `buf` (cleared first), keeping at
/// most `max` bytes: a longer line is consumed and reported as
/// [`Line::TooLong`], so the next line can still be read.
pub fn read_line_limited<R: std::io::BufRead>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<Line> {
    buf.clear();
    let mut too_long = false;
    let mut any = false;
    loop {
        let available = match reader.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            return Ok(match (any, too_long) {
                (false, _) => Line::Eof,
                (true, true) => Line::TooLong,
                (true, false) => Line::Complete,
            });
        }
        any = true;
        let newline = available.iter().position(|&b| b == b'\n');
        let chunk = &available[..newline.unwrap_or(available.len())];
        if !too_long {
            if buf.len() + chunk.len() > max {
                too_long = true;
                buf.clear();
                buf.shrink_to(4096);
            } else {
                buf.extend_from_slice(chunk);
            }
        }
        let used = newline.map_or(available.len(), |i| i + 1);
        reader.consume(used);
        if newline.is_some() {
            return Ok(if too_long {
                Line::TooLong
            } else {
                Line::Complete
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        let paths = vec!["a/b.safetensors".to_string(), "".to_string()];
        for r in [
            Request::Status,
            Request::Warm {
                paths: paths.clone(),
            },
            Request::Evict {
                paths: paths.clone(),
            },
            Request::Pin {
                paths: paths.clone(),
            },
            Request::Unpin { paths },
            Request::Reload,
            Request::Record,
        ] {
            assert_eq!(Request::parse(&r.to_line()), Ok(r.clone()));
        }
        assert_eq!(
            Request::Status.to_line(),
            r#"{"version":1,"verb":"status"}"#
        );
    }

    #[test]
    fn bad_requests_say_why() {
        let cases = [
            ("{", "not JSON"),
            ("[1]", "not a JSON object"),
            (r#"{"verb":"status"}"#, "no \"version\""),
            (r#"{"version":2,"verb":"status"}"#, "version 2"),
            (r#"{"version":"1","verb":"status"}"#, "version \"1\""),
            (r#"{"version":1}"#, "no \"verb\""),
            (r#"{"version":1,"verb":"fly"}"#, "unknown verb \"fly\""),
            (r#"{"version":1,"verb":"warm"}"#, "needs \"paths\""),
            (r#"{"version":1,"verb":"pin","paths":[]}"#, "at least one"),
            (r#"{"version":1,"verb":"pin","paths":[3]}"#, "string"),
            (r#"{"version":1,"verb":"pin","paths":["/etc"]}"#, "absolute"),
            (
                r#"{"version":1,"verb":"pin","paths":["a/../.."]}"#,
                "\"..\"",
            ),
        ];
        for (line, want) in cases {
            let err = Request::parse(line).unwrap_err().to_string();
            assert!(err.contains(want), "{line}: {err}");
        }
    }

    #[test]
    fn paths_are_normalised() {
        assert_eq!(normalize_path("./a//b/./c").unwrap(), "a/b/c");
        assert_eq!(normalize_path(".").unwrap(), "");
        assert_eq!(normalize_path("").unwrap(), "");
    }

    #[test]
    fn lines_are_limited() {
        let input = b"short\nxxxxxxxxxxxxxxxx\nlast";
        let mut r = std::io::BufReader::with_capacity(4, &input[..]);
        let mut buf = Vec::new();
        assert_eq!(
            read_line_limited(&mut r, &mut buf, 8).unwrap(),
            Line::Complete
        );
        assert_eq!(buf, b"short");
        assert_eq!(
            read_line_limited(&mut r, &mut buf, 8).unwrap(),
            Line::TooLong
        );
        assert!(buf.is_empty());
        assert_eq!(
            read_line_limited(&mut r, &mut buf, 8).unwrap(),
            Line::Complete
        );
        assert_eq!(buf, b"last");
        assert_eq!(read_line_limited(&mut r, &mut buf, 8).unwrap(), Line::Eof);
    }

    #[test]
    fn responses_round_trip() {
        for r in [
            Response::ok(),
            Response::error("no such file"),
            Response::with_report(VerbReport {
                message: Some("reloaded".into()),
                files: vec![FileOutcome {
                    path: "a.gguf".into(),
                    size: 7,
                    action: Action::Pinned,
                    state: FileState::Loading,
                }],
                warnings: vec!["rule 2 matches no file".into()],
            }),
        ] {
            assert_eq!(Response::parse(&r.to_line()), Ok(r.clone()));
        }
        assert_eq!(Response::ok().to_line(), r#"{"version":1,"ok":true}"#);
        let pinned = Response::with_report(VerbReport::files(vec![FileOutcome {
            path: "a.gguf".into(),
            size: 7,
            action: Action::AlreadyCached,
            state: FileState::Pinned,
        }]));
        assert_eq!(
            pinned.to_line(),
            r#"{"version":1,"ok":true,"files":[{"path":"a.gguf","size":7,"action":"already_cached","state":"pinned"}]}"#
        );
        assert_eq!(
            Response::error("x").to_line(),
            r#"{"version":1,"ok":false,"error":"x"}"#
        );
        let err = Response::parse(r#"{"version":9,"ok":true}"#).unwrap_err();
        assert_eq!(err, ClientError::Version(9));
        let err = err.to_string();
        assert!(err.contains("version 9"), "{err}");
    }
}
