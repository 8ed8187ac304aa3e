//! The layers of reptrace-analyze (the table in the crate documentation):
//! every `crate::<module>` a module's code names (comments and doc comments
//! aside) is in the same or a lower layer, and the modules never name each
//! other in a circle.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Module → layer: 0 the run, 1 the arithmetic, 2 the DataFusion adapter.
const LAYERS: &[(&str, u8)] = &[
    ("error", 0),
    ("memory", 0),
    ("limits", 0),
    ("interrupt", 0),
    ("run", 0),
    ("records", 1),
    ("weights", 1),
    ("probes", 1),
    ("kernel", 1),
    ("precondition", 1),
    ("replay", 1),
    ("shard", 1),
    ("attribution", 1),
    ("verify", 1),
    ("writer", 1),
    ("computed", 2),
    ("session", 2),
    ("sql", 2),
    ("query", 2),
    ("export", 2),
];

/// `text` without comments, string and character literals (their contents
/// become spaces, so that a `crate::` inside them is not code).
fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let rest = &b[i..];
        if rest.starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if rest.starts_with(b"/*") {
            let mut depth = 0;
            while i < b.len() {
                if b[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                } else if b[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            out.push(b' ');
        } else if rest.starts_with(b"r#\"") || rest.starts_with(b"r\"") {
            let hashes = rest[1..].iter().take_while(|&&c| c == b'#').count();
            let close: Vec<u8> = std::iter::once(b'"')
                .chain(std::iter::repeat_n(b'#', hashes))
                .collect();
            i += 2 + hashes;
            while i < b.len() && !b[i..].starts_with(&close) {
                i += 1;
            }
            i += close.len();
            out.push(b' ');
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push(b' ');
        } else if b[i] == b'\'' && rest.len() > 2 && (rest[2] == b'\'' || rest[1] == b'\\') {
            // A character literal ('x' or an escape), not a lifetime.
            i += 1;
            while i < b.len() && b[i] != b'\'' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push(b' ');
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).expect("code is UTF-8")
}

fn ident_at(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// The first names of the paths in a `{ … }` group that starts `s` (after
/// the `{`), e.g. `kernel::{self, Geometry}, Error` → kernel, Error.
fn group_heads(s: &str) -> Vec<String> {
    let mut heads = vec![];
    let mut depth = 0;
    let mut start = true;
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => start = true,
            c if start && (c.is_alphanumeric() || c == '_') => {
                heads.push(ident_at(&s[i..]).to_owned());
                start = false;
            }
            _ => {}
        }
    }
    heads
}

/// The crate-level names the code of one file refers to: what follows
/// `crate::`, and a `super::` that climbs out of its top-level module
/// (`depth`: how deep the file lies below it, 0 for `src/<module>.rs`).
fn references(code: &str, depth: usize) -> Vec<String> {
    let mut refs = vec![];
    let mut inline_mods: Vec<usize> = vec![];
    let mut braces = 0usize;
    let b = code.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let rest = &code[i..];
        let word_start = i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_');
        if b[i] == b'{' {
            braces += 1;
        } else if b[i] == b'}' {
            braces = braces.saturating_sub(1);
            if inline_mods.last() == Some(&braces) {
                inline_mods.pop();
            }
        } else if word_start && rest.starts_with("mod ") {
            let name = ident_at(rest[4..].trim_start());
            let after = rest[4..].trim_start()[name.len()..].trim_start();
            if after.starts_with('{') {
                inline_mods.push(braces);
            }
        }
        let climb = if word_start && rest.starts_with("crate::") && !code[..i].ends_with('$') {
            Some("crate::".len())
        } else if word_start && rest.starts_with("super::") {
            let mut n = 0;
            let mut at = 0;
            while rest[at..].starts_with("super::") {
                n += 1;
                at += "super::".len();
            }
            // Out of the top-level module only past the file's own depth and
            // the inline modules (`mod tests { use super::*; }`) it is in.
            (n > depth + inline_mods.len()).then_some(at)
        } else {
            None
        };
        if let Some(at) = climb {
            let path = &rest[at..];
            if let Some(group) = path.strip_prefix('{') {
                refs.extend(group_heads(group));
            } else {
                refs.push(ident_at(path).to_owned());
            }
            i += at;
            continue;
        }
        i += 1;
    }
    refs
}

/// The modules the names at the crate root come from (`pub use module::…`
/// in lib.rs), plus every module as itself.
fn root_names(src: &Path, modules: &BTreeSet<String>) -> BTreeMap<String, Option<String>> {
    let lib = code_only(&std::fs::read_to_string(src.join("lib.rs")).expect("lib.rs"));
    let mut names: BTreeMap<String, Option<String>> = modules
        .iter()
        .map(|m| (m.clone(), Some(m.clone())))
        .collect();
    for stmt in lib.split(';') {
        let Some(rest) = stmt.trim().strip_prefix("pub use ") else {
            continue;
        };
        let module = ident_at(rest);
        let owner = modules.contains(module).then(|| module.to_owned());
        match rest[module.len()..].strip_prefix("::") {
            Some(tail) => match tail.strip_prefix('{') {
                Some(group) => {
                    for name in group_heads(group) {
                        names.insert(name, owner.clone());
                    }
                }
                None => {
                    names.insert(ident_at(tail).to_owned(), owner.clone());
                }
            },
            // `pub use datafusion;`: another crate.
            None => {
                names.insert(module.to_owned(), owner);
            }
        }
    }
    names
}

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("source directory") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Module → the modules its code names, read from `src`.
fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = vec![];
    sources(src, &mut files);
    let module_of = |path: &Path| -> (String, usize) {
        let rel = path.strip_prefix(src).expect("under src");
        let parts: Vec<_> = rel.iter().map(|p| p.to_string_lossy()).collect();
        let top = parts[0].trim_end_matches(".rs").to_owned();
        let is_mod_rs = parts.len() > 1 && parts[parts.len() - 1] == "mod.rs";
        (top, parts.len() - 1 - usize::from(is_mod_rs))
    };
    let modules: BTreeSet<String> = files
        .iter()
        .map(|f| module_of(f).0)
        .filter(|m| m != "lib")
        .collect();
    let names = root_names(src, &modules);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let (module, depth) = module_of(file);
        if module == "lib" {
            continue;
        }
        let code = code_only(&std::fs::read_to_string(file).expect("source"));
        let edges = graph.entry(module.clone()).or_default();
        for name in references(&code, depth) {
            let target = names.get(&name).unwrap_or_else(|| {
                panic!(
                    "{}: crate::{name} is not a module or a name of lib.rs",
                    file.display()
                )
            });
            if let Some(target) = target
                && *target != module
            {
                edges.insert(target.clone());
            }
        }
    }
    graph
}

/// A circle of modules in `graph`, if there is one.
fn circle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        m: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == m) {
            let mut c = path[at..].to_vec();
            c.push(m.to_owned());
            return Some(c);
        }
        if done.contains(m) {
            return None;
        }
        path.push(m.to_owned());
        for next in graph.get(m).into_iter().flatten() {
            if let Some(c) = visit(next, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(m.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|m| visit(m, graph, &mut vec![], &mut done))
}

#[test]
fn modules_import_only_their_own_layer_or_lower_and_never_in_a_circle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = graph(&src);
    let layers: BTreeMap<&str, u8> = LAYERS.iter().copied().collect();
    let layer = |m: &str| {
        *layers.get(m).unwrap_or_else(|| {
            panic!("module {m} has no layer: add it to LAYERS and the crate doc")
        })
    };
    let mut upward = vec![];
    for (module, targets) in &graph {
        for target in targets {
            if layer(target) > layer(module) {
                upward.push(format!(
                    "{module} (layer {}) imports {target} (layer {})",
                    layer(module),
                    layer(target)
                ));
            }
        }
    }
    assert!(upward.is_empty(), "imports up the layers: {upward:?}");
    if let Some(c) = circle(&graph) {
        panic!("modules import each other in a circle: {}", c.join(" → "));
    }
}

#[test]
fn references_skip_comments_and_strings_and_read_groups() {
    let code = code_only(
        "//! [`crate::session`]\n/// crate::computed\nuse crate::{kernel::{self, G}, Error};\n\
         let s = \"crate::sql\"; /* crate::query */ crate::interrupt::check();\n\
         mod tests { use super::*; use super::super::run; }",
    );
    assert_eq!(
        references(&code, 0),
        ["kernel", "Error", "interrupt", "run"]
    );
    assert_eq!(references("use super::Chart;", 1), Vec::<String>::new());
    assert_eq!(references("use super::super::Run;", 1), ["Run"]);
}
