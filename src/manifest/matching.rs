//! Rules and their globs, and what each rule takes of a `Tree`: the pure
//! half of matching, with the totals `check` reports.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use globset::{GlobBuilder, GlobMatcher};

use super::Manifest;
use super::source::Location;
use super::tree::Tree;
use super::values::RuleKind;
use crate::Error;
use crate::units::Bytes;

/// Files named, each with why, when a rule takes none of those it matches.
const SKIPPED_NAMED: usize = 3;
/// A `[[pin]]`, `[[warm]]` or `[[group]]` table.
#[derive(Clone, Debug)]
pub struct Rule {
    pub kind: RuleKind,
    /// As written, relative to the mount root.
    pub globs: Vec<String>,
    /// Of the table's header.
    pub location: Location,
    pub(super) matchers: Vec<GlobMatcher>,
}

impl Rule {
    /// Whether `path` (relative to the mount root) is one of the rule's files.
    pub fn is_match(&self, path: &Path) -> bool {
        self.matchers.iter().any(|m| m.is_match(path))
    }
}

/// A glob that matches the file at `path` (relative to the mount root)
/// and nothing else: its glob metacharacters (`*?[]{}` and the backslash)
/// are escaped with a backslash. `None` when no rule can name it (a path
/// the rules refuse, such as one under a folder named `~`).
pub fn literal_glob(path: &str) -> Option<String> {
    let mut glob = String::with_capacity(path.len());
    for c in path.chars() {
        if matches!(c, '\\' | '*' | '?' | '[' | ']' | '{' | '}') {
            glob.push('\\');
        }
        glob.push(c);
    }
    let matcher = compile_glob(&glob).ok()?;
    matcher.is_match(Path::new(path)).then_some(glob)
}

/// A glob relative to the mount root, `*` not crossing `/`.
pub(super) fn compile_glob(text: &str) -> Result<GlobMatcher, String> {
    if text.trim().is_empty() {
        return Err("the path is empty: give a path or glob relative to the mount root".into());
    }
    if text.starts_with('/') || text.starts_with("~/") || text == "~" {
        return Err(format!(
            "{text:?} is absolute: paths are relative to the mount root, so write \"diffusion_models/x.safetensors\", not \"/home/me/ComfyUI/models/diffusion_models/x.safetensors\""
        ));
    }
    if text.ends_with('/') {
        return Err(format!(
            "{text:?} ends with '/': write \"{}/**\" for every file in the folder",
            text.trim_end_matches('/')
        ));
    }
    for part in text.split('/') {
        match part {
            ".." => {
                return Err(format!(
                    "{text:?} has a '..' component: paths stay inside the mount root, relative to it"
                ));
            }
            "." => {
                return Err(format!(
                    "{text:?} has a '.' component: remove it (paths are relative to the mount root)"
                ));
            }
            "" => {
                return Err(format!(
                    "{text:?} has an empty component ('//'): remove one '/'"
                ));
            }
            _ => {}
        }
    }
    GlobBuilder::new(text)
        .literal_separator(true)
        .backslash_escape(true)
        .build()
        .map(|g| g.compile_matcher())
        .map_err(|e| format!("{text:?} is not a valid glob: {}", e.kind()))
}

/// What each rule takes under a root.
#[derive(Clone, Debug, Default)]
pub struct Matches {
    /// In the manifest's order.
    pub rules: Vec<RuleMatches>,
    /// Problems walking the root.
    pub warnings: Vec<String>,
    pub pinned: Total,
    /// Warm files that are not also pinned.
    pub warm: Total,
    /// Group members that are neither pinned nor warm.
    pub grouped: Total,
}

#[derive(Clone, Debug)]
pub struct RuleMatches {
    pub kind: RuleKind,
    pub location: Location,
    pub globs: Vec<String>,
    /// Files the cache would take, in walk order (sorted by name).
    pub files: Vec<MatchedFile>,
    /// Matched, but not model files (extension, or under min_file_size).
    pub skipped: Vec<MatchedFile>,
    /// Globs matching nothing, symlinks leaving the root.
    pub warnings: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MatchedFile {
    pub path: PathBuf,
    pub size: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Total {
    pub files: usize,
    pub bytes: u64,
}

impl Total {
    fn of(files: &HashMap<(u64, u64), u64>) -> Total {
        Total {
            files: files.len(),
            bytes: files.values().sum(),
        }
    }
}

impl fmt::Display for Total {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = if self.files == 1 { "" } else { "s" };
        write!(f, "{} in {} file{s}", Bytes(self.bytes), self.files)
    }
}

impl Manifest {
    /// The files under `root` that each rule takes.
    pub fn matches(&self, root: &Path) -> Result<Matches, Error> {
        Ok(self.match_tree(&Tree::walk(root)?))
    }

    /// The files of `tree` that each rule takes, and totals (pure).
    pub fn match_tree(&self, tree: &Tree) -> Matches {
        let mut out = Matches {
            warnings: tree.warnings.clone(),
            ..Matches::default()
        };
        // Files by identity, so a file reached by two paths counts once.
        let mut pinned: HashMap<(u64, u64), u64> = HashMap::new();
        let mut warm: HashMap<(u64, u64), u64> = HashMap::new();
        let mut grouped: HashMap<(u64, u64), u64> = HashMap::new();
        for rule in &self.rules {
            let mut found = RuleMatches {
                kind: rule.kind.clone(),
                location: rule.location,
                globs: rule.globs.clone(),
                files: Vec::new(),
                skipped: Vec::new(),
                warnings: Vec::new(),
            };
            let mut listed: HashSet<&Path> = HashSet::new();
            for (glob, matcher) in rule.globs.iter().zip(&rule.matchers) {
                let mut any = false;
                for file in tree.files.iter().filter(|f| matcher.is_match(&f.path)) {
                    any = true;
                    if !listed.insert(&file.path) {
                        continue;
                    }
                    let matched = MatchedFile {
                        path: file.path.clone(),
                        size: file.size,
                    };
                    if self.cache.takes(&file.path, file.size).is_err() {
                        found.skipped.push(matched);
                        continue;
                    }
                    found.files.push(matched);
                    let totals = match rule.kind {
                        RuleKind::Pin => &mut pinned,
                        RuleKind::Warm => &mut warm,
                        RuleKind::Group(_) => &mut grouped,
                    };
                    totals.insert(file.id, file.size);
                }
                let links: Vec<&PathBuf> = tree
                    .outside_links
                    .iter()
                    .filter(|l| matcher.is_match(l))
                    .collect();
                for link in &links {
                    found.warnings.push(format!(
                        "{} is a symlink to outside the root: the cache holds only files inside the mount",
                        link.display()
                    ));
                }
                if any || !links.is_empty() {
                    continue;
                }
                match tree.dirs.iter().find(|d| matcher.is_match(d)) {
                    Some(dir) => found.warnings.push(format!(
                        "{glob:?} matches the folder {} but no file: write \"{}/**\" for every file in it",
                        dir.display(),
                        glob.trim_end_matches('/')
                    )),
                    None => found.warnings.push(format!("{glob:?} matches no file")),
                }
            }
            if found.files.is_empty() && !found.skipped.is_empty() {
                // Each file's own reason (the first few): the extension,
                // or the size.
                let mut each: Vec<String> = found
                    .skipped
                    .iter()
                    .take(SKIPPED_NAMED)
                    .filter_map(|f| {
                        let why = self.cache.takes(&f.path, f.size).err()?;
                        Some(format!("{}: {why}", f.path.display()))
                    })
                    .collect();
                if found.skipped.len() > SKIPPED_NAMED {
                    each.push(format!("{} more", found.skipped.len() - SKIPPED_NAMED));
                }
                found.warnings.push(format!(
                    "the files it matches are not cached: {}",
                    each.join("; ")
                ));
            }
            out.rules.push(found);
        }
        // A pinned file is not also counted as warm, nor a warm one as grouped.
        warm.retain(|id, _| !pinned.contains_key(id));
        grouped.retain(|id, _| !pinned.contains_key(id) && !warm.contains_key(id));
        out.pinned = Total::of(&pinned);
        out.warm = Total::of(&warm);
        out.grouped = Total::of(&grouped);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::testing::parse;

    fn rules(text: &str) -> Manifest {
        parse(&format!("[cache]\nmin_file_size = 0\n{text}")).unwrap()
    }

    #[test]
    fn a_literal_glob_matches_its_file_alone() {
        let names = [
            "plain/a.safetensors",
            "odd/a*b?[c]{d,e}.gguf",
            r"back\slash.gguf",
            "**.gguf",
        ];
        for name in names {
            let glob = literal_glob(name).unwrap();
            let m = compile_glob(&glob).unwrap();
            assert!(m.is_match(Path::new(name)), "{name} by {glob}");
            for other in [
                "odd/axbyczd.gguf",
                "odd/a*b?c{d,e}.gguf",
                r"back\\slash.gguf",
                "x.gguf",
            ] {
                if other != name {
                    assert!(!m.is_match(Path::new(other)), "{glob} matched {other}");
                }
            }
        }
        assert_eq!(literal_glob("a*.gguf").unwrap(), r"a\*.gguf");
        // A path the rules refuse.
        assert_eq!(literal_glob("~/a.gguf"), None);
    }

    fn paths(found: &RuleMatches) -> Vec<&str> {
        found
            .files
            .iter()
            .map(|f| f.path.to_str().unwrap())
            .collect()
    }

    #[test]
    fn globs_match_relative_paths() {
        let tree = Tree::from_files([
            ("top.safetensors", 1),
            ("diffusion_models/wan_high.safetensors", 10),
            ("diffusion_models/wan_low.safetensors", 20),
            ("diffusion_models/nested/deep/wan_x.safetensors", 30),
            ("Loras/Style.SafeTensors", 40),
            ("loras/other.safetensors", 50),
        ]);
        let m = rules(
            r#"
[[pin]]
paths = ["*.safetensors"]
[[pin]]
paths = ["diffusion_models/*.safetensors"]
[[pin]]
paths = ["diffusion_models/**/wan_*.safetensors"]
[[pin]]
paths = ["**/*.safetensors"]
[[pin]]
paths = ["Loras/*"]
[[pin]]
paths = ["loras/*.SAFETENSORS", "diffusion_models/wan_{high,low}.safetensors"]
"#,
        );
        let found = m.match_tree(&tree);
        // `*` does not cross '/'.
        assert_eq!(paths(&found.rules[0]), ["top.safetensors"]);
        assert_eq!(
            paths(&found.rules[1]),
            [
                "diffusion_models/wan_high.safetensors",
                "diffusion_models/wan_low.safetensors"
            ]
        );
        // `**` spans any number of folders, none included.
        assert_eq!(
            paths(&found.rules[2]),
            [
                "diffusion_models/wan_high.safetensors",
                "diffusion_models/wan_low.safetensors",
                "diffusion_models/nested/deep/wan_x.safetensors"
            ]
        );
        // Case-sensitive: not Loras/Style.SafeTensors.
        assert_eq!(found.rules[3].files.len(), 5);
        // Paths match case-sensitively, as the filesystem names them; the
        // extension test of the cache does not care about case.
        assert_eq!(paths(&found.rules[4]), ["Loras/Style.SafeTensors"]);
        assert_eq!(
            paths(&found.rules[5]),
            [
                "diffusion_models/wan_high.safetensors",
                "diffusion_models/wan_low.safetensors"
            ]
        );
        assert_eq!(
            found.rules[5].warnings,
            [r#""loras/*.SAFETENSORS" matches no file"#]
        );
        assert_eq!(
            found.pinned,
            Total {
                files: 6,
                bytes: 151
            }
        );
    }

    #[test]
    fn totals_count_each_file_once_and_pins_win() {
        let tree = Tree::from_files([
            ("a/one.gguf", 100),
            ("a/two.gguf", 200),
            ("b/three.gguf", 400),
            ("c/four.gguf", 800),
        ]);
        let m = rules(
            r#"
[[warm]]
paths = ["a/*", "b/*"]
[[pin]]
paths = ["a/one.gguf"]
[[pin]]
paths = ["a/*"]
[[group]]
name = "g"
paths = ["b/*", "c/*"]
"#,
        );
        let found = m.match_tree(&tree);
        assert_eq!(
            found.pinned,
            Total {
                files: 2,
                bytes: 300
            }
        );
        assert_eq!(
            found.warm,
            Total {
                files: 1,
                bytes: 400
            }
        );
        assert_eq!(
            found.grouped,
            Total {
                files: 1,
                bytes: 800
            }
        );
        // Each rule still lists everything it matches.
        assert_eq!(
            paths(&found.rules[0]),
            ["a/one.gguf", "a/two.gguf", "b/three.gguf"]
        );
    }

    #[test]
    fn files_the_cache_would_not_take_are_set_apart() {
        let tree = Tree::from_files([
            ("m/model.safetensors", 2 << 20),
            ("m/config.json", 2 << 20),
            ("m/tiny.safetensors", 100),
        ]);
        let m = parse("[[pin]]\npaths = [\"m/*\"]\n[[warm]]\npaths = [\"m/*.json\"]\n").unwrap();
        let found = m.match_tree(&tree);
        assert_eq!(paths(&found.rules[0]), ["m/model.safetensors"]);
        let skipped: Vec<_> = found.rules[0]
            .skipped
            .iter()
            .map(|f| f.path.to_str().unwrap())
            .collect();
        assert_eq!(skipped, ["m/config.json", "m/tiny.safetensors"]);
        assert!(found.rules[0].warnings.is_empty());
        // A rule that takes none: each file named with its own reason.
        assert_eq!(
            found.rules[1].warnings,
            [
                "the files it matches are not cached: m/config.json: not a model file: .json is \
              not in [cache] extensions"
            ]
        );
        let m = parse("[[pin]]\npaths = [\"m/tiny*\", \"m/*.json\"]\n").unwrap();
        assert_eq!(
            m.match_tree(&tree).rules[0].warnings,
            [
                "the files it matches are not cached: m/tiny.safetensors: 100 B is under \
              min_file_size 1.0 MiB; m/config.json: not a model file: .json is not in [cache] \
              extensions"
            ]
        );
        assert_eq!(
            found.pinned,
            Total {
                files: 1,
                bytes: 2 << 20
            }
        );
        assert_eq!(found.warm, Total::default());
    }

    #[test]
    fn a_glob_naming_a_folder_gets_a_hint() {
        let tree = Tree::from_files([("vae/wan.safetensors", 1)]);
        let found = rules("[[warm]]\npaths = [\"vae\"]\n").match_tree(&tree);
        assert_eq!(
            found.rules[0].warnings,
            [r#""vae" matches the folder vae but no file: write "vae/**" for every file in it"#]
        );
    }

    #[test]
    fn rule_is_match_for_later_lookups() {
        let m = rules("[[group]]\nname = \"wan\"\npaths = [\"d/wan_*.safetensors\"]\n");
        assert!(m.rules[0].is_match(Path::new("d/wan_low.safetensors")));
        assert!(!m.rules[0].is_match(Path::new("d/x/wan_low.safetensors")));
    }
}
