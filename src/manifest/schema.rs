//! The manifest as written: the serde structures of its tables, and how a
//! size, a duration and `exec` are read before they are checked.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};
use toml::Spanned;

use super::values::{Admit, Eviction, parse_duration};
use crate::units::SizeSpec;

// The file as written. Values that later checks point at are `Spanned`.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawManifest {
    pub(super) cache: Option<RawCache>,
    #[serde(default)]
    pub(super) pin: Vec<Spanned<RawRule>>,
    #[serde(default)]
    pub(super) warm: Vec<Spanned<RawRule>>,
    #[serde(default)]
    pub(super) group: Vec<Spanned<RawGroup>>,
    pub(super) hooks: Option<RawHooks>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHooks {
    pub(super) cuda: Option<RawHook>,
    pub(super) rocm: Option<RawHook>,
    pub(super) cpu: Option<RawHook>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHook {
    pub(super) protect: Option<bool>,
    pub(super) grace: Option<Spanned<DurationValue>>,
    pub(super) mlock: Option<bool>,
    pub(super) warm_group: Option<bool>,
    pub(super) exec: Option<Spanned<ExecValue>>,
    pub(super) timeout: Option<Spanned<DurationValue>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCache {
    pub(super) max_size: Option<Spanned<SizeValue>>,
    pub(super) min_available: Option<Spanned<SizeValue>>,
    pub(super) critical_available: Option<Spanned<SizeValue>>,
    pub(super) min_file_size: Option<Spanned<SizeValue>>,
    pub(super) extensions: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) admit: Option<Admit>,
    pub(super) policy: Option<Eviction>,
    pub(super) loader_threads: Option<Spanned<i64>>,
    pub(super) mlock: Option<bool>,
    pub(super) pin_budget: Option<Spanned<SizeValue>>,
    pub(super) warm_start: Option<bool>,
}

pub(super) type Globs = Spanned<Vec<Spanned<String>>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRule {
    pub(super) paths: Option<Globs>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGroup {
    pub(super) name: Option<Spanned<String>>,
    pub(super) paths: Option<Globs>,
}

/// A size as written: a string for `SizeSpec`, or a plain integer of bytes.
pub(super) struct SizeValue(pub(super) SizeSpec);

impl<'de> Deserialize<'de> for SizeValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl Visitor<'_> for SizeVisitor {
            type Value = SizeValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#"a size such as "48GiB", "500M" or "20%""#)
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<SizeValue, E> {
                text.parse().map(SizeValue).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<SizeValue, E> {
                u64::try_from(n)
                    .map(|b| SizeValue(SizeSpec::Bytes(b)))
                    .map_err(|_| E::custom(format!("invalid size {n}: a size cannot be negative")))
            }
        }
        deserializer.deserialize_any(SizeVisitor)
    }
}

/// A duration as written: `"10m"`, `"30s"`, `"500ms"`, `"1h30m"`.
pub(super) struct DurationValue(pub(super) Duration);

impl<'de> Deserialize<'de> for DurationValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DurationVisitor;
        impl Visitor<'_> for DurationVisitor {
            type Value = DurationValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#"a duration such as "10m" or "30s""#)
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<DurationValue, E> {
                parse_duration(text).map(DurationValue).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<DurationValue, E> {
                Err(E::custom(format!(
                    r#"{n} has no unit: write a duration as a string with its unit, such as "{n}s" or "{n}m""#
                )))
            }
        }
        deserializer.deserialize_any(DurationVisitor)
    }
}

/// `exec` as written: the program and its arguments, never a shell line.
pub(super) struct ExecValue(pub(super) Vec<String>);

impl<'de> Deserialize<'de> for ExecValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ExecVisitor;
        impl<'de> Visitor<'de> for ExecVisitor {
            type Value = ExecValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#"a list of the program and its arguments, such as ["logger", "-t", "modelcache"]"#)
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<ExecValue, E> {
                Err(E::custom(format!(
                    r#"exec is a list of the program and its arguments, not a command line: write [{}] (no shell runs it; for one, use ["sh", "-c", {text:?}])"#,
                    text.split_whitespace()
                        .map(|w| format!("{w:?}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<ExecValue, A::Error> {
                let mut argv = Vec::new();
                while let Some(arg) = seq.next_element::<String>()? {
                    argv.push(arg);
                }
                Ok(ExecValue(argv))
            }
        }
        deserializer.deserialize_any(ExecVisitor)
    }
}
