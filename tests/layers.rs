//! The house rules, checked on the source tree itself:
//!
//! * every file of `src/` is listed once in the "What is where" table of
//!   `docs/design.md`, and every listed file exists;
//! * that table is the layer order: a library file may name (through a
//!   `crate::`, `super::` or `self::` path in its code) only files listed
//!   before it, so no import points up a layer and there is no import
//!   circle; a child never imports from its parent's `mod.rs`;
//! * no function in `src/` is longer than 150 lines.
//!
//! Comments and string literals are not read as code, so a doc link to a
//! higher layer is allowed; a `#[cfg(test)] mod tests` block's `super::`
//! is the file itself.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

const MAX_FN_LINES: usize = 150;

/// `src/`-relative paths of every `.rs` file under `src/`, sorted.
fn source_files() -> Vec<String> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).expect("src/ is readable") {
            let p = e.expect("a directory entry").path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(Path::new("src"), &mut files);
    let mut v: Vec<String> = files.iter().map(|p| p.to_string_lossy().replace('\\', "/")).collect();
    v.sort();
    v
}

/// The files of the "What is where" table of docs/design.md, in order.
fn layer_table() -> Vec<String> {
    let text = std::fs::read_to_string("docs/design.md").expect("docs/design.md is readable");
    let start = text
        .find("## What is where")
        .expect("docs/design.md has a `## What is where` section");
    let section = &text[start..];
    let end = section[3..].find("\n## ").map_or(section.len(), |e| e + 3);
    let mut files = Vec::new();
    for line in section[..end].lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // | layer | `src/...rs` | what |
        if cells.len() < 4 {
            continue;
        }
        for cell in &cells[1..cells.len() - 1] {
            if let Some(path) = cell.strip_prefix('`').and_then(|c| c.strip_suffix('`')) {
                if path.starts_with("src/") && path.ends_with(".rs") {
                    files.push(path.to_string());
                }
            }
        }
    }
    files
}

/// The source with comments, string and char literals blanked out (line
/// structure kept).
fn code_only(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    let blank = |s: &[u8], out: &mut String| {
        for &c in s {
            out.push(if c == b'\n' { '\n' } else { ' ' });
        }
    };
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if c == b'/' && next == Some(b'/') {
            let end = src[i..].find('\n').map_or(b.len(), |e| i + e);
            blank(&b[i..end], &mut out);
            i = end;
        } else if c == b'/' && next == Some(b'*') {
            let mut depth = 0usize;
            let mut j = i;
            while j < b.len() {
                if b[j] == b'/' && b.get(j + 1) == Some(&b'*') {
                    depth += 1;
                    j += 2;
                } else if b[j] == b'*' && b.get(j + 1) == Some(&b'/') {
                    depth -= 1;
                    j += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    j += 1;
                }
            }
            blank(&b[i..j.min(b.len())], &mut out);
            i = j;
        } else if c == b'r' && (next == Some(b'"') || next == Some(b'#')) && !prev_is_ident(b, i) {
            let hashes = b[i + 1..].iter().take_while(|&&h| h == b'#').count();
            if b.get(i + 1 + hashes) != Some(&b'"') {
                out.push(c as char);
                i += 1;
                continue;
            }
            let close: String = std::iter::once('"').chain(std::iter::repeat_n('#', hashes)).collect();
            let body = i + 2 + hashes;
            let end = src[body..].find(&close).map_or(b.len(), |e| body + e + close.len());
            blank(&b[i..end], &mut out);
            i = end;
        } else if c == b'"' {
            let mut j = i + 1;
            while j < b.len() && b[j] != b'"' {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            blank(&b[i..(j + 1).min(b.len())], &mut out);
            i = j + 1;
        } else if c == b'\'' {
            // A char literal ('x', '\n', '\u{1F600}'), not a lifetime.
            let len = if next == Some(b'\\') {
                src[i + 2..].find('\'').map(|e| e + 3)
            } else {
                let ch = src[i + 1..].chars().next().map_or(1, char::len_utf8);
                (b.get(i + 1 + ch) == Some(&b'\'')).then_some(ch + 2)
            };
            match len {
                Some(n) => {
                    blank(&b[i..i + n], &mut out);
                    i += n;
                }
                None => {
                    out.push('\'');
                    i += 1;
                }
            }
        } else {
            let ch = src[i..].chars().next().expect("a char");
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

fn prev_is_ident(b: &[u8], i: usize) -> bool {
    i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')
}

/// The module path of a library file: `src/a/b.rs` and `src/a/b/mod.rs` are
/// `a::b`; `src/lib.rs` is the root.
fn module_of(file: &str) -> Vec<String> {
    let rel = file.strip_prefix("src/").expect("a src/ path").trim_end_matches(".rs");
    let mut parts: Vec<String> = rel.split('/').map(String::from).collect();
    if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
        parts.pop();
    }
    parts
}

/// The file that a path of module segments lands in: the longest prefix
/// that is a module file.
fn file_of(path: &[String], modules: &HashMap<Vec<String>, String>) -> String {
    (0..=path.len())
        .rev()
        .find_map(|k| modules.get(&path[..k]).cloned())
        .expect("the crate root is a module")
}

/// The leading identifier segments of a path tail (`a::b::C` of
/// `a::b::C(x)`), and for a group (`{A, b::C}`) each item's segments.
fn tails(rest: &str) -> Vec<Vec<String>> {
    let ident = |s: &str| -> String { s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect() };
    let mut segs = Vec::new();
    let mut r = rest;
    loop {
        let r2 = r.trim_start();
        if let Some(group) = r2.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            let mut out = Vec::new();
            for item in group[..end].split(',') {
                for t in tails(item.trim()) {
                    out.push(segs.iter().cloned().chain(t).collect());
                }
            }
            return if out.is_empty() { vec![segs] } else { out };
        }
        let s = ident(r2);
        if s.is_empty() {
            break;
        }
        r = &r2[s.len()..];
        segs.push(s);
        match r.strip_prefix("::") {
            Some(next) => r = next,
            None => break,
        }
    }
    vec![segs]
}

/// The `crate::`/`prelu::`/`super::`/`self::` paths of a file's code, resolved to
/// module segments, with their line numbers.
fn references(code: &str, module: &[String]) -> Vec<(usize, Vec<String>)> {
    let mut refs = Vec::new();
    // From an inline `mod name {` on (a test module), `super` is the file.
    let inline_mod = code.lines().scan(0usize, |pos, l| {
        let at = *pos;
        *pos += l.len() + 1;
        let t = l.trim_start();
        Some(((t.starts_with("mod ") || t.starts_with("pub mod ")) && t.trim_end().ends_with('{')).then_some(at))
    });
    let inline_from = inline_mod.flatten().next().unwrap_or(usize::MAX);
    for (start, _) in code.match_indices("::") {
        let head_start = code[..start]
            .rfind(|c: char| !(c.is_alphanumeric() || c == '_' || c == '$'))
            .map_or(0, |p| p + 1);
        if code[..head_start].ends_with("::") {
            continue; // the middle of a longer path
        }
        let base: Vec<String> = match &code[head_start..start] {
            // `prelu::` is the crate itself inside it (`extern crate self as prelu`).
            "crate" | "$crate" | "prelu" => Vec::new(),
            "super" if start > inline_from => module.to_vec(),
            "super" => module[..module.len().saturating_sub(1)].to_vec(),
            "self" if start > inline_from => module.to_vec(),
            "self" => module.to_vec(),
            _ => continue,
        };
        let line = code[..start].matches('\n').count() + 1;
        for tail in tails(&code[start + 2..]) {
            let mut path = base.clone();
            for seg in tail {
                if seg == "super" {
                    path.pop();
                } else {
                    path.push(seg);
                }
            }
            refs.push((line, path));
        }
    }
    refs
}

#[test]
fn the_layer_table_lists_every_source_file_once() {
    let table = layer_table();
    let files = source_files();
    let mut seen = HashMap::new();
    for f in &table {
        *seen.entry(f.clone()).or_insert(0) += 1;
    }
    let twice: Vec<&String> = seen.iter().filter(|(_, &n)| n > 1).map(|(f, _)| f).collect();
    let missing: Vec<&String> = files.iter().filter(|f| !seen.contains_key(*f)).collect();
    let gone: Vec<&String> = table.iter().filter(|f| !files.contains(f)).collect();
    assert!(twice.is_empty(), "listed more than once in docs/design.md: {twice:?}");
    assert!(
        missing.is_empty(),
        "not in the What-is-where table of docs/design.md: {missing:?}"
    );
    assert!(gone.is_empty(), "in docs/design.md but not in src/: {gone:?}");
}

#[test]
fn every_import_points_down_the_layers() {
    let table = layer_table();
    // The binary's root (main.rs) names only the library; every other file
    // is a library module (the command line too, under `cli`).
    let is_bin = |f: &str| f == "src/main.rs";
    let order: HashMap<&str, usize> = table.iter().enumerate().map(|(i, f)| (f.as_str(), i)).collect();
    let mut lib = HashMap::new();
    for f in table.iter().filter(|f| !is_bin(f)) {
        lib.insert(module_of(f), f.clone());
    }
    let mut upward = Vec::new();
    for f in &table {
        let Ok(src) = std::fs::read_to_string(f) else { continue };
        if is_bin(f) {
            continue;
        }
        let module = module_of(f);
        let modules = &lib;
        for (line, path) in references(&code_only(&src), &module) {
            let target = file_of(&path, modules);
            if target != *f && order[target.as_str()] > order[f.as_str()] {
                upward.push(format!(
                    "{f}:{line} names {} (in {target}, a later layer)",
                    path.join("::")
                ));
            }
        }
    }
    assert!(
        upward.is_empty(),
        "imports that point up the layer order of docs/design.md:\n{}",
        upward.join("\n")
    );
}

/// Functions in `code` longer than `max` lines: (name, first line, lines).
fn long_functions(code: &str, max: usize) -> Vec<(String, usize, usize)> {
    let lines: Vec<&str> = code.lines().collect();
    let starts: Vec<usize> = std::iter::once(0)
        .chain(code.match_indices('\n').map(|(i, _)| i + 1))
        .collect();
    let line_of = |pos: usize| starts.partition_point(|&s| s <= pos);
    let b = code.as_bytes();
    let mut out = Vec::new();
    for (pos, _) in code.match_indices("fn ") {
        if pos > 0 && (b[pos - 1].is_ascii_alphanumeric() || b[pos - 1] == b'_') {
            continue;
        }
        let name: String = code[pos + 3..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if name.is_empty() {
            continue;
        }
        // The body: the first `{` outside parentheses, unless a `;` comes first.
        let (mut depth, mut i, mut open) = (0i32, pos, None);
        while i < b.len() {
            match b[i] {
                b'(' | b'[' => depth += 1,
                b')' | b']' => depth -= 1,
                b';' if depth == 0 => break,
                b'{' if depth == 0 => {
                    open = Some(i);
                    break;
                }
                _ => {}
            }
            i += 1;
        }
        let Some(open) = open else { continue };
        let mut d = 0i32;
        let mut close = open;
        for (j, &c) in b.iter().enumerate().skip(open) {
            match c {
                b'{' => d += 1,
                b'}' => {
                    d -= 1;
                    if d == 0 {
                        close = j;
                        break;
                    }
                }
                _ => {}
            }
        }
        let (first, last) = (line_of(pos), line_of(close));
        let n = last - first + 1;
        if n > max && first <= lines.len() {
            out.push((name, first, n));
        }
    }
    out
}

#[test]
fn no_function_is_longer_than_150_lines() {
    let mut long = Vec::new();
    for f in source_files() {
        let src = std::fs::read_to_string(&f).expect("a readable source file");
        for (name, line, n) in long_functions(&code_only(&src), MAX_FN_LINES) {
            long.push(format!("{f}:{line} fn {name}: {n} lines"));
        }
    }
    assert!(
        long.is_empty(),
        "functions over {MAX_FN_LINES} lines:\n{}",
        long.join("\n")
    );
}

#[test]
fn the_checks_see_what_they_check() {
    // A comment or a string never counts as code; a lifetime is not a char.
    let code = code_only("let a = \"crate::up\"; // crate::up\nfn f<'a>(x: &'a str) -> char { 'x' }\n");
    assert!(!code.contains("crate::up"));
    assert!(code.contains("fn f<'a>(x: &'a str)"));
    // super:: in a child file is its parent; in an inline test module, itself.
    let m = vec!["a".to_string(), "b".to_string()];
    let refs = references(
        "use super::X;\nuse crate::c::{D, e::F};\nmod tests {\n use super::Y;\n}\n",
        &m,
    );
    let paths: Vec<Vec<String>> = refs.into_iter().map(|r| r.1).collect();
    let want = [vec!["a", "X"], vec!["c", "D"], vec!["c", "e", "F"], vec!["a", "b", "Y"]];
    assert_eq!(paths, want.map(|v| v.into_iter().map(String::from).collect::<Vec<_>>()));
    let long: String = format!("fn big() {{\n{}}}\nfn small() {{}}\n", "x;\n".repeat(200));
    let found = long_functions(&long, 150);
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].0, "big");
}
