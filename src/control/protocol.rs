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
//! ```
//!
//! Paths are relative to the mount root (`""` is the root itself). Unknown
//! fields are ignored. Each request gets one response line:
//!
//! ```text
//! {"version":1,"ok":true}                           warm, evict, pin, unpin
//! {"version":1,"ok":true,"status":{...}}            status (a MountStatus)
//! {"version":1,"ok":true,"message":"..."}           reload
//! {"version":1,"ok":false,"error":"..."}            anything that failed
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::{ClientError, PathProblem, RequestError};

/// The version of the protocol this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// The longest request line a server reads (1 MiB, newline excluded).
pub const MAX_REQUEST_LINE: usize = 1 << 20;

/// Eviction reasons, the keys of [`Counters::evictions`].
pub const EVICT_CAP: &str = "cap";
pub const EVICT_PRESSURE: &str = "pressure";
pub const EVICT_INVALIDATED: &str = "invalidated";
pub const EVICT_MANUAL: &str = "manual";
pub const EVICTION_REASONS: [&str; 4] =
    [EVICT_CAP, EVICT_PRESSURE, EVICT_INVALIDATED, EVICT_MANUAL];

/// How the mount serves reads of cached files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Copy,
    Passthrough,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Copy => "copy",
            Mode::Passthrough => "passthrough",
        }
    }
}

/// Where a file stands in the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileState {
    /// Being loaded: `loaded_bytes` of `size` are in RAM.
    Loading,
    /// Loaded, unpinned.
    Cached,
    /// Loaded and pinned.
    Pinned,
    /// Dropped from the cache; listed while open handles still hold it.
    Evicted,
}

impl FileState {
    pub fn as_str(self) -> &'static str {
        match self {
            FileState::Loading => "loading",
            FileState::Cached => "cached",
            FileState::Pinned => "pinned",
            FileState::Evicted => "evicted",
        }
    }
}

/// One mount and its cache: the `status` answer, and one element of
/// `modelcache status --json`'s `mounts`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MountStatus {
    /// The canonical mount point.
    pub mountpoint: String,
    /// The backing directory.
    pub backing: String,
    pub mode: Mode,
    /// The cache's cap, bytes.
    pub max_size: u64,
    /// Bytes of files in the cache (loaded or loading).
    pub cached_bytes: u64,
    /// Of which pinned.
    pub pinned_bytes: u64,
    /// Of which protected by a reader (open by a protecting class, or
    /// within the grace after).
    #[serde(default)]
    pub protected_bytes: u64,
    /// Bytes locked in RAM with mlock within the pin budget (copy mode).
    #[serde(default)]
    pub locked_bytes: u64,
    /// Bytes of evicted files still held by open handles (counted against
    /// the cap until their last close).
    pub held_bytes: u64,
    /// MemAvailable, bytes.
    pub mem_available: u64,
    /// `some avg10` of /proc/pressure/memory, when the kernel has PSI.
    #[serde(default)]
    pub psi_some_avg10: Option<f64>,
    pub files: Vec<FileStatus>,
    pub counters: Counters,
}

/// One file the cache knows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileStatus {
    /// Relative to the mount root.
    pub path: String,
    pub size: u64,
    pub state: FileState,
    /// Bytes in RAM: `size` once loaded.
    pub loaded_bytes: u64,
    pub pinned: bool,
    /// Kept by a protecting reader (`[hooks.CLASS] protect`): open by one,
    /// or within the grace after; not evicted for room meanwhile.
    #[serde(default)]
    pub protected: bool,
    /// Opens served from the cache.
    pub hits: u64,
    /// Bytes the daemon read from the backing file for its readers: reads
    /// the cache's page cache did not answer (while loading, or not cached).
    pub bytes_from_backing: u64,
    /// The last open or read, in seconds since the Unix epoch.
    #[serde(default)]
    pub last_access: Option<u64>,
    pub open_handles: u64,
    /// Of which served by kernel passthrough.
    pub passthrough_handles: u64,
    /// The classes (`cuda`, `rocm`, `cpu`) of the processes that opened it.
    pub reader_classes: Vec<String>,
    /// Why it is pinned (absent when it is not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin_origin: Option<PinOrigin>,
}

/// Who pinned a file: the manifest's `[[pin]]`, or `modelcache pin`
/// (kept in the mount's state file).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PinOrigin {
    Manifest,
    Runtime,
}

impl PinOrigin {
    pub fn as_str(self) -> &'static str {
        match self {
            PinOrigin::Manifest => "manifest",
            PinOrigin::Runtime => "runtime",
        }
    }
}

/// Counters since the mount started.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    /// Opens of model files by reader class (`cuda`, `rocm`, `cpu`).
    pub opens_by_class: BTreeMap<String, u64>,
    /// Bytes read from model files by reader class.
    pub bytes_by_class: BTreeMap<String, u64>,
    /// Bytes the daemon read from backing files for readers of model files:
    /// reads the cache's page cache did not answer (while loading, or not
    /// cached).
    pub bytes_from_backing: u64,
    /// Opens of a cacheable file found in the cache, and not.
    pub file_hits: u64,
    pub file_misses: u64,
    /// Whole-file loads finished, their bytes and time.
    pub loads: u64,
    pub load_bytes: u64,
    pub load_seconds: f64,
    /// Files evicted, by reason: `cap`, `pressure`, `invalidated`, `manual`.
    pub evictions: BTreeMap<String, u64>,
    /// Times the pressure monitor had to free memory.
    pub pressure_events: u64,
}

/// `modelcache status --json`: every reachable mount.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub version: u32,
    pub mounts: Vec<MountStatus>,
}

/// A request, as the client sends it and the server understands it.
#[derive(Clone, Debug, PartialEq)]
pub enum Request {
    Status,
    Warm { paths: Vec<String> },
    Evict { paths: Vec<String> },
    Pin { paths: Vec<String> },
    Unpin { paths: Vec<String> },
    Reload,
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
        }
    }

    pub fn paths(&self) -> Option<&[String]> {
        match self {
            Request::Warm { paths }
            | Request::Evict { paths }
            | Request::Pin { paths }
            | Request::Unpin { paths } => Some(paths),
            Request::Status | Request::Reload => None,
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
}

impl Response {
    pub fn ok() -> Response {
        Response {
            version: PROTOCOL_VERSION,
            ok: true,
            error: None,
            status: None,
            message: None,
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

    pub fn with_message(message: impl Into<String>) -> Response {
        Response {
            message: Some(message.into()),
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
            Response::with_message("reloaded"),
        ] {
            assert_eq!(Response::parse(&r.to_line()), Ok(r.clone()));
        }
        assert_eq!(Response::ok().to_line(), r#"{"version":1,"ok":true}"#);
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
