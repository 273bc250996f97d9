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
//! {"version":1,"ok":true,"files":[...]}             warm, evict, pin, unpin
//! {"version":1,"ok":true,"status":{...}}            status (a MountStatus)
//! {"version":1,"ok":true,"message":"...","warnings":[...]}   reload
//! {"version":1,"ok":false,"error":"...","files":[...]}       anything that failed
//! ```
//!
//! `files` says what a verb did to each file ([`FileOutcome`]), also when
//! it failed for others; `warnings` what the daemon warned of while doing
//! it. Both are absent when empty.

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
    /// Not in the cache: listed because it was opened since the mount
    /// (`last_open` says from where, and why not from RAM).
    Uncached,
}

impl FileState {
    pub fn as_str(self) -> &'static str {
        match self {
            FileState::Loading => "loading",
            FileState::Cached => "cached",
            FileState::Pinned => "pinned",
            FileState::Evicted => "evicted",
            FileState::Uncached => "uncached",
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
    /// Opens that found it wholly cached: the same as `opens_from_ram`
    /// (kept for the clients that read it).
    pub hits: u64,
    /// Opens by where they were served from: wholly from RAM, partly
    /// (its load under way), from disk.
    #[serde(default)]
    pub opens_from_ram: u64,
    #[serde(default)]
    pub opens_partial: u64,
    #[serde(default)]
    pub opens_from_disk: u64,
    /// Its size times its opens from RAM.
    #[serde(default)]
    pub bytes_opened_from_ram: u64,
    /// `bytes_opened_from_ram` at the mount's measured read rate: an
    /// estimate of the disk time those opens did not spend (0 before a
    /// load measured the rate).
    #[serde(default)]
    pub disk_seconds_avoided: f64,
    /// Where its latest open was served from; absent when not opened since
    /// the mount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_open: Option<LastOpen>,
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
}

impl FileStatus {
    /// A file in `state` with nothing counted yet.
    pub fn new(path: String, state: FileState) -> FileStatus {
        FileStatus {
            path,
            size: 0,
            state,
            loaded_bytes: 0,
            pinned: false,
            protected: false,
            hits: 0,
            opens_from_ram: 0,
            opens_partial: 0,
            opens_from_disk: 0,
            bytes_opened_from_ram: 0,
            disk_seconds_avoided: 0.0,
            last_open: None,
            bytes_from_backing: 0,
            last_access: None,
            open_handles: 0,
            passthrough_handles: 0,
            reader_classes: Vec::new(),
        }
    }
}

/// Where an open of a model file was served from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LastOpen {
    /// `ram` (wholly cached), `partial` (its load under way) or `disk`.
    pub source: String,
    /// For `partial`: how much of it was in RAM, percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resident_percent: Option<u8>,
    /// For `disk`: why, and the fix where there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Counters since the mount started.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    /// Opens of model files by where they were served from: wholly from
    /// RAM, partly (their load under way), from disk.
    #[serde(default)]
    pub opens_from_ram: u64,
    #[serde(default)]
    pub opens_partial: u64,
    #[serde(default)]
    pub opens_from_disk: u64,
    /// The sizes of the files opened from RAM, summed.
    #[serde(default)]
    pub bytes_opened_from_ram: u64,
    /// `bytes_opened_from_ram` ÷ `read_rate`: an estimate of the seconds of
    /// disk reads the cache saved (0 before a load measured the rate).
    #[serde(default)]
    pub disk_seconds_avoided: f64,
    /// The backing's read rate, bytes per second, as the cache's recent
    /// loads of this mount measured it; absent before a load finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_rate: Option<f64>,
    /// Opens of model files by reader class (`cuda`, `rocm`, `cpu`).
    pub opens_by_class: BTreeMap<String, u64>,
    /// Bytes the daemon read from backing files for readers of model
    /// files, by reader class (see `bytes_from_backing`).
    pub bytes_by_class: BTreeMap<String, u64>,
    /// Bytes the daemon read from backing files for readers of model files:
    /// reads the cache's page cache did not answer (while loading, or not
    /// cached).
    pub bytes_from_backing: u64,
    /// Opens of a model file found wholly cached, and not: the same as
    /// `opens_from_ram`, and `opens_partial + opens_from_disk` (kept for
    /// the clients that read them).
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
