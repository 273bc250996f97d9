//! Positions in the manifest's text: `Location`, and `Source`, which turns
//! byte spans and toml's errors into one-line messages with line and column.

use std::fmt;
use std::ops::Range;
use std::path::Path;

use crate::Error;

/// A 1-based position in the manifest's text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    pub line: usize,
    /// Counted in characters, as an editor shows it.
    pub column: usize,
}

impl Location {
    /// The position of byte `offset` of `text` (clamped to the text).
    pub fn of_offset(text: &str, offset: usize) -> Location {
        let mut offset = offset.min(text.len());
        while !text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &text[..offset];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        Location {
            line: before.matches('\n').count() + 1,
            column: before[line_start..].chars().count() + 1,
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}", self.line, self.column)
    }
}

/// The text being parsed, to turn byte spans into messages.
pub(super) struct Source<'a> {
    pub(super) text: &'a str,
    pub(super) origin: &'a Path,
}

impl Source<'_> {
    pub(super) fn at(&self, span: &Range<usize>) -> Location {
        Location::of_offset(self.text, span.start)
    }

    pub(super) fn error(&self, span: &Range<usize>, message: impl fmt::Display) -> Error {
        Error(format!(
            "{}: {}: {message}",
            self.origin.display(),
            self.at(span)
        ))
    }

    /// toml's error, on one line, with the key when it is about a value
    /// (toml names only the value) and a hint where toml gives none.
    pub(super) fn toml_error(&self, err: &toml::de::Error) -> Error {
        let mut message = err.message().trim().to_string();
        for (jargon, plain) in [
            ("expected i64", "expected a whole number"),
            ("expected u64", "expected a whole number of seconds"),
        ] {
            message = message.replace(jargon, plain);
        }
        if message.starts_with("unknown field") {
            message.push_str(": remove it or correct its spelling");
        }
        let Some(span) = err.span() else {
            return Error(format!("{}: {message}", self.origin.display()));
        };
        if message == "duplicate key" {
            let key = self.text.get(span.clone()).unwrap_or_default();
            message = format!("duplicate key `{key}`: a key or table may appear once; merge them");
        } else if let Some(key) = self.key_before(span.start) {
            message = format!("{key}: {message}");
        }
        self.error(&span, message)
    }

    /// The key of a value starting at `offset`, when it is on the same line.
    fn key_before(&self, offset: usize) -> Option<&str> {
        let start = offset.min(self.text.len());
        let line_start = self.text[..start].rfind('\n').map_or(0, |i| i + 1);
        let (left, _) = self.text.get(line_start..start)?.rsplit_once('=')?;
        let key = left.trim_end().rsplit([' ', '{', '[', ',']).next()?;
        let bare = |c: char| c.is_ascii_alphanumeric() || "_-.".contains(c);
        (!key.is_empty() && key.chars().all(bare)).then_some(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_become_lines_and_columns() {
        let text = "ab\ncdé\nf";
        assert_eq!(
            Location::of_offset(text, 0),
            Location { line: 1, column: 1 }
        );
        assert_eq!(
            Location::of_offset(text, 3),
            Location { line: 2, column: 1 }
        );
        // After "cdé" (é is two bytes): column counts characters.
        assert_eq!(
            Location::of_offset(text, 7),
            Location { line: 2, column: 4 }
        );
        assert_eq!(
            Location::of_offset(text, 8),
            Location { line: 3, column: 1 }
        );
        // Inside a character, or past the end: clamped.
        assert_eq!(
            Location::of_offset(text, 6),
            Location { line: 2, column: 3 }
        );
        assert_eq!(
            Location::of_offset(text, 99),
            Location { line: 3, column: 2 }
        );
    }
}
