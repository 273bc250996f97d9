//! File names as the cache, status and logs carry them: UTF-8 strings that
//! keep every byte of the real name. Linux names are bytes; a lossy
//! conversion would make two names one (`m\xef` and `m\xee` both `m�`) and
//! lose the way back to the file. Bytes that are not UTF-8 are written
//! `\x{ef}`; a name that itself contains `\x{` has its backslash written
//! `\x{5c}`, so [`path_of`] always gives back the exact name.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

/// `path` as a lossless string (see the module).
pub fn shown(path: &Path) -> String {
    let bytes = path.as_os_str().as_bytes();
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        let valid = chunk.valid();
        if valid.contains("\\x{") {
            out.push_str(&valid.replace("\\x{", "\\x{5c}x{"));
        } else {
            out.push_str(valid);
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{{{b:02x}}}"));
        }
    }
    out
}

/// The real name behind a string made by [`shown`]. Only the escapes
/// `shown` writes are decoded (bytes 0x80 and up, and the backslash), so a
/// request can never smuggle a `/`, a NUL or a `..` past the checks made
/// on its text.
pub fn path_of(shown: &str) -> PathBuf {
    let s = shown.as_bytes();
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i..].starts_with(b"\\x{")
            && let Some(end) = s[i + 3..].iter().position(|&c| c == b'}')
            && let Ok(text) = std::str::from_utf8(&s[i + 3..i + 3 + end])
            && let Ok(byte) = u8::from_str_radix(text, 16)
            && (byte >= 0x80 || byte == b'\\')
        {
            out.push(byte);
            i += 3 + end + 1;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    PathBuf::from(OsString::from_vec(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(bytes: &[u8]) -> PathBuf {
        PathBuf::from(OsString::from_vec(bytes.to_vec()))
    }

    #[test]
    fn utf8_names_are_unchanged() {
        for n in [
            "vae/wan_2.1_vae.safetensors",
            "Flux Ünïcode/模型.gguf",
            "a\\b.pt",
        ] {
            assert_eq!(shown(Path::new(n)), n);
            assert_eq!(path_of(n), Path::new(n));
        }
    }

    #[test]
    fn every_name_comes_back_exactly_and_none_collide() {
        let names = [
            name(b"m\xef.safetensors"),
            name(b"m\xee.safetensors"),
            name(b"m\\x{ef}.safetensors"),
            name(b"\xff\xfe/\\x{5c}x{"),
        ];
        let shown_names: Vec<String> = names.iter().map(|n| shown(n)).collect();
        for (n, s) in names.iter().zip(&shown_names) {
            assert_eq!(&path_of(s), n, "{s}");
        }
        let mut unique = shown_names.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), names.len(), "{shown_names:?}");
        assert_eq!(shown_names[0], "m\\x{ef}.safetensors");
    }

    #[test]
    fn escapes_never_make_a_separator_a_nul_or_a_dot() {
        for s in ["\\x{2f}etc", "a\\x{00}b", "\\x{2e}\\x{2e}/x"] {
            assert_eq!(path_of(s), Path::new(s), "{s}");
        }
    }
}
