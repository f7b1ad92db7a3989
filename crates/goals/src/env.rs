//! The builder's environment and the small text formats handed to it, as pure functions.
//!
//! The environment is built in the original's order, so later entries win:
//!
//! ```text
//! PATH=/path-not-set  HOME=/homeless-shelter  NIX_STORE=<store dir>  NIX_BUILD_CORES=<cores>
//! <every variable of the derivation>           (may override the four above)
//! NIX_BUILD_TOP = TMPDIR = TEMPDIR = TMP = TEMP = PWD = <build dir>
//! NIX_OUTPUT_CHECKED=1 and each name in impureEnvVars      (fixed-output derivations only)
//! NIX_LOG_FD=2  TERM=xterm-256color                        (as Nix 2.x adds them)
//! ```
//!
//! With `passAsFile = "a b"` each listed variable of the derivation is left out and written
//! to `<build dir>/.attr-<nix-base32 sha256 of its name>` instead, and `<name>Path` names
//! that file (listed names the derivation lacks are ignored).
//!
//! A derivation with `__json` (`__structuredAttrs = true`) exports none of its variables:
//! the builder gets `<build dir>/.attrs.json` (the object with `outputs` replaced by
//! output name -> path) and `<build dir>/.attrs.sh`, named by `NIX_ATTRS_JSON_FILE` and
//! `NIX_ATTRS_SH_FILE`. `.attrs.json` is compact JSON with keys in byte order and no final
//! newline; `.attrs.sh` has one line per top-level key matching `[A-Za-z_][A-Za-z0-9_]*`:
//!
//! ```text
//! declare <k>=<simple>                       string, number, bool or null
//! declare -a <k>=((<simple> " ")*)           array of simple values only
//! declare -A <k>=(("[" <quoted key> "]=" <simple> " ")*)   object of simple values only
//! simple: string -> single-quoted ('\'' for ');  true -> 1;  false -> empty;  null -> ''
//!         number -> its value as a 32-bit C int when a float32 holds it as a whole number
//!                   (so 3000000000 wraps to -1294967296, 1.5 makes the key skipped)
//! ```
//!
//! Keys with other values (nested arrays or objects, fractional numbers) are left out.
//! These are the bytes Nix 2.8 writes, established by dumping its files from a builder.
//!
//! `exportReferencesGraph` files use the validity-registration format with no hashes and
//! empty derivers, one block per path of the closure in sorted order:
//!
//! ```text
//! <path> "\n" "\n" <number of references> "\n" (<reference> "\n")*
//! ```
//!
//! A structured derivation writes no such files. When its `exportReferencesGraph` is an
//! object (any other value is left alone), each key `k` names a path, a list or an object of
//! paths (only its values count; null counts as none), and `k` itself becomes a top-level
//! attribute, replacing any of that name, holding the closure as a list in path order:
//!
//! ```text
//! k: [ { ("ca": <content address>,)? "closureSize": <sum of narSize over the path's own
//!        closure>, "narHash": "sha256:<base32>", "narSize": <n>, "path": <path>,
//!        "references": [<path>, ...] }, ... ]
//! ```
//!
//! The closure is that of the listed paths plus, for every derivation in it, the closures
//! of its outputs. Each listed path is made canonical (`//`, `.`, `..` resolved lexically)
//! and must then be a store path inside the derivation's input closure. Being a list of
//! objects, `k` never appears in `.attrs.sh`. This is what Nix 2.8 does (its
//! `prepareStructuredAttrs`), down to the messages of the errors, which come from Nix's JSON
//! library where an element is not a string.
//!
//! Everything here is a pure function of its arguments except [`export_references`], which
//! reads the closure through [`BuildStore`].

use std::collections::{BTreeMap, BTreeSet};

use nixb_store::hash::{Encoding, Hash, HashAlgo};
use nixb_store::path::PathError;
use nixb_store::{StoreDir, StorePath};
use serde_json::{Map, Value};

use crate::config::HOMELESS_SHELTER;
use crate::store::{BuildStore, StoreFault};

/// The name Nix gives the file holding a structured derivation's attributes as JSON.
pub const ATTRS_JSON: &str = ".attrs.json";
/// The name of the file holding them as bash declarations.
pub const ATTRS_SH: &str = ".attrs.sh";

#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    #[error("parsing the derivation's '__json': {0}")]
    Json(#[from] serde_json::Error),
    #[error("the derivation's '__json' is not a JSON object")]
    NotObject,
    /// A value of the wrong JSON type where Nix reads a string or an object; worded as Nix's
    /// JSON library words it, since that is the message Nix gives.
    #[error("[json.exception.type_error.302] type must be {expected}, but is {found}")]
    JsonType {
        expected: &'static str,
        found: &'static str,
    },
    #[error("not an absolute path: '{0}'")]
    NotAbsolute(String),
    #[error("path '{0}' is not in the Nix store")]
    NotInStore(String),
    #[error("'{0}' is too short to be a valid store path")]
    TooShort(String),
    #[error("store path '{path}' contains illegal base-32 character '{c}'")]
    IllegalBase32 { path: String, c: char },
    #[error(transparent)]
    BadStorePath(#[from] PathError),
    #[error("cannot export references of path '{0}' because it is not in the input closure of the derivation")]
    NotAnInput(String),
    #[error("path '{0}' is not valid")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreFault),
}

impl EnvError {
    /// Whether Nix counts this as the derivation's own fault, a permanent build failure
    /// (exit status 100), rather than an error on the way (exit status 1).
    pub fn rejects_derivation(&self) -> bool {
        matches!(
            self,
            EnvError::Json(_) | EnvError::NotObject | EnvError::NotAnInput(_)
        )
    }
}

/// One path of an `exportReferencesGraph` closure as a structured derivation's attributes
/// list it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphPath {
    pub path: StorePath,
    pub nar_hash: Hash,
    pub nar_size: u64,
    pub references: BTreeSet<StorePath>,
    pub ca: Option<String>,
    /// The sum of `nar_size` over the closure of this path alone.
    pub closure_size: u64,
}

/// A file written into the build directory before the builder starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildDirFile {
    /// Name inside the build directory.
    pub name: String,
    pub contents: String,
}

/// Whether the derivation passes its attributes as files instead of variables.
pub fn is_structured(drv_env: &BTreeMap<String, String>) -> bool {
    drv_env.contains_key("__json")
}

/// The file name under which `passAsFile` hands over variable `name`.
pub fn pass_as_file_name(name: &str) -> String {
    format!(
        ".attr-{}",
        Hash::digest(HashAlgo::Sha256, name.as_bytes()).encode(Encoding::Base32)
    )
}

fn pass_as_file_set(drv_env: &BTreeMap<String, String>) -> BTreeSet<&str> {
    drv_env
        .get("passAsFile")
        .map(|v| v.split_ascii_whitespace().collect())
        .unwrap_or_default()
}

/// What the environment depends on besides the derivation's own variables.
pub struct EnvParams<'a> {
    pub store_dir: &'a str,
    pub cores: usize,
    /// The build directory, as the builder sees it.
    pub build_dir: &'a str,
    pub fixed_output: bool,
    /// The caller's environment, for `impureEnvVars`.
    pub impure_env: &'a BTreeMap<String, String>,
}

/// The complete environment of a builder for a derivation with variables `drv_env`.
pub fn builder_env(
    drv_env: &BTreeMap<String, String>,
    p: &EnvParams<'_>,
) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    let mut set = |k: &str, v: &str| {
        env.insert(k.to_string(), v.to_string());
    };
    // Shells give an unset PATH a default; a dummy value keeps builds from finding host tools.
    set("PATH", "/path-not-set");
    // A HOME that does not exist makes tools skip per-user settings instead of reading
    // /etc/passwd to find a real home.
    set("HOME", HOMELESS_SHELTER);
    set("NIX_STORE", p.store_dir);
    set("NIX_BUILD_CORES", &p.cores.to_string());
    let structured = is_structured(drv_env);
    if !structured {
        let as_file = pass_as_file_set(drv_env);
        // In key order, so a variable of the derivation named `<name>Path` still wins over
        // the one passAsFile makes, as in Nix.
        for (k, v) in drv_env {
            if as_file.contains(k.as_str()) {
                let path = format!("{}/{}", p.build_dir, pass_as_file_name(k));
                set(&format!("{k}Path"), &path);
            } else {
                set(k, v);
            }
        }
    }
    for k in ["NIX_BUILD_TOP", "TMPDIR", "TEMPDIR", "TMP", "TEMP", "PWD"] {
        set(k, p.build_dir);
    }
    if p.fixed_output {
        // Old fetchurl skips its own check when the engine verifies the hash.
        set("NIX_OUTPUT_CHECKED", "1");
        // Only fixed-output builds may see the caller's environment: their result is pinned
        // by its hash, so impurity cannot leak into it.
        if let Some(names) = drv_env.get("impureEnvVars") {
            for name in names.split_ascii_whitespace() {
                let value = p.impure_env.get(name).map(String::as_str).unwrap_or("");
                set(name, value);
            }
        }
    }
    set("NIX_LOG_FD", "2");
    set("TERM", "xterm-256color");
    if structured {
        set(
            "NIX_ATTRS_JSON_FILE",
            &format!("{}/{ATTRS_JSON}", p.build_dir),
        );
        set("NIX_ATTRS_SH_FILE", &format!("{}/{ATTRS_SH}", p.build_dir));
    }
    env
}

/// The files [`builder_env`] promises the builder: `passAsFile` contents, or `.attrs.json`
/// and `.attrs.sh` for a structured derivation whose outputs are at `outputs` (name ->
/// printed path). `export` gives the closure of the paths one `exportReferencesGraph` key
/// lists (see [`export_references`]); paths are printed under `store_dir`. The caller
/// applies any path rewriting to the contents.
pub fn build_dir_files(
    drv_env: &BTreeMap<String, String>,
    store_dir: &StoreDir,
    outputs: &BTreeMap<String, String>,
    mut export: impl FnMut(&BTreeSet<StorePath>) -> Result<Vec<GraphPath>, EnvError>,
) -> Result<Vec<BuildDirFile>, EnvError> {
    if let Some(json) = drv_env.get("__json") {
        let Value::Object(mut attrs) = serde_json::from_str::<Value>(json)? else {
            return Err(EnvError::NotObject);
        };
        let outs = outputs
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        attrs.insert("outputs".to_string(), Value::Object(outs));
        // After `outputs`, as in Nix: a key named `outputs` replaces them, and then fails
        // below unless it is an object.
        // Key by key, each parsed then exported, so the first error is the one Nix meets.
        if let Some(Value::Object(graphs)) = attrs.get("exportReferencesGraph").cloned() {
            for (key, value) in sorted(&graphs) {
                let roots = graph_roots(store_dir, value)?;
                let graph = export(&roots)?;
                attrs.insert(key.clone(), graph_json(store_dir, &graph));
            }
        }
        if let Some(o) = attrs.get("outputs").filter(|o| !o.is_object()) {
            return Err(EnvError::JsonType {
                expected: "object",
                found: json_type(o),
            });
        }
        let attrs = Value::Object(attrs);
        let mut json_text = String::new();
        write_json(&mut json_text, &attrs);
        return Ok(vec![
            BuildDirFile {
                name: ATTRS_JSON.to_string(),
                contents: json_text,
            },
            BuildDirFile {
                name: ATTRS_SH.to_string(),
                contents: attrs_sh(&attrs),
            },
        ]);
    }
    let as_file = pass_as_file_set(drv_env);
    Ok(drv_env
        .iter()
        .filter(|(k, _)| as_file.contains(k.as_str()))
        .map(|(k, v)| BuildDirFile {
            name: pass_as_file_name(k),
            contents: v.clone(),
        })
        .collect())
}

fn sorted(map: &serde_json::Map<String, Value>) -> Vec<(&String, &Value)> {
    // The workspace's serde_json keeps insertion order; Nix's JSON objects are sorted.
    let mut v: Vec<_> = map.iter().collect();
    v.sort_by(|a, b| a.0.cmp(b.0));
    v
}

/// Compact JSON as Nix's JSON library prints it: keys sorted, only `"`, `\\` and control
/// characters escaped.
fn write_json(out: &mut String, v: &Value) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => write_json_string(out, s),
        Value::Array(a) => {
            out.push('[');
            for (i, e) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json(out, e);
            }
            out.push(']');
        }
        Value::Object(m) => {
            out.push('{');
            for (i, (k, e)) in sorted(m).into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json_string(out, k);
                out.push(':');
                write_json(out, e);
            }
            out.push('}');
        }
    }
}

fn write_json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// A number as `.attrs.sh` shows it, `None` when it is not whole as a float32.
fn sh_number(n: &serde_json::Number) -> Option<String> {
    let as_f32 = n.as_f64()? as f32;
    if as_f32.ceil() != as_f32 {
        return None;
    }
    // Integers are truncated to 32 bits (two's complement); a whole float out of the int
    // range converts as x86's cvttsd2si does, to INT_MIN.
    let i = if let Some(i) = n.as_i64() {
        i as i32
    } else if let Some(u) = n.as_u64() {
        u as i32
    } else {
        let f = n.as_f64()?;
        if (-2147483648.0..2147483648.0).contains(&f) {
            f as i32
        } else {
            i32::MIN
        }
    };
    Some(i.to_string())
}

fn sh_simple(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(shell_quote(s)),
        Value::Number(n) => sh_number(n),
        Value::Null => Some("''".to_string()),
        Value::Bool(b) => Some(if *b { "1" } else { "" }.to_string()),
        Value::Array(_) | Value::Object(_) => None,
    }
}

fn is_shell_name(k: &str) -> bool {
    let mut chars = k.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The bash declarations of `.attrs.sh` for the attribute object `attrs`.
fn attrs_sh(attrs: &Value) -> String {
    let Value::Object(m) = attrs else {
        return String::new();
    };
    let mut sh = String::new();
    for (k, v) in sorted(m) {
        if !is_shell_name(k) {
            continue;
        }
        let line = match v {
            Value::Array(a) => a
                .iter()
                .map(|e| sh_simple(e).map(|s| s + " "))
                .collect::<Option<String>>()
                .map(|items| format!("declare -a {k}=({items})")),
            Value::Object(o) => sorted(o)
                .into_iter()
                .map(|(k2, e)| sh_simple(e).map(|s| format!("[{}]={s} ", shell_quote(k2))))
                .collect::<Option<String>>()
                .map(|items| format!("declare -A {k}=({items})")),
            simple => sh_simple(simple).map(|s| format!("declare {k}={s}")),
        };
        if let Some(line) = line {
            sh.push_str(&line);
            sh.push('\n');
        }
    }
    sh
}

/// The name Nix's JSON library gives the type of `v` in its errors.
fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// The store paths one key of a structured `exportReferencesGraph` object lists. Nix
/// iterates the value as its JSON library iterates any value: an array or an object yields
/// its elements, null nothing, and a string (or any other scalar) itself.
fn graph_roots(store_dir: &StoreDir, value: &Value) -> Result<BTreeSet<StorePath>, EnvError> {
    let elements: Vec<&Value> = match value {
        Value::Array(a) => a.iter().collect(),
        Value::Object(o) => sorted(o).into_iter().map(|(_, v)| v).collect(),
        Value::Null => Vec::new(),
        scalar => vec![scalar],
    };
    elements
        .into_iter()
        .map(|e| match e {
            Value::String(s) => parse_graph_path(store_dir, s),
            other => Err(EnvError::JsonType {
                expected: "string",
                found: json_type(other),
            }),
        })
        .collect()
}

/// The JSON list a structured derivation gets for one `exportReferencesGraph` key.
fn graph_json(store_dir: &StoreDir, graph: &[GraphPath]) -> Value {
    let mut sorted_graph: Vec<&GraphPath> = graph.iter().collect();
    sorted_graph.sort_by(|a, b| a.path.cmp(&b.path));
    let entries = sorted_graph
        .into_iter()
        .map(|p| {
            let mut o = Map::new();
            if let Some(ca) = &p.ca {
                o.insert("ca".into(), Value::String(ca.clone()));
            }
            o.insert("closureSize".into(), Value::from(p.closure_size));
            o.insert("narHash".into(), Value::String(p.nar_hash.to_string()));
            o.insert("narSize".into(), Value::from(p.nar_size));
            o.insert("path".into(), Value::String(store_dir.print(&p.path)));
            let refs = p
                .references
                .iter()
                .map(|r| Value::String(store_dir.print(r)))
                .collect();
            o.insert("references".into(), Value::Array(refs));
            Value::Object(o)
        })
        .collect();
    Value::Array(entries)
}

/// `path` with `//`, `.` and `..` resolved lexically, as Nix's `canonPath` does before it
/// looks for the store path.
fn canon_path(path: &str) -> Result<String, EnvError> {
    // Nix asserts on an empty path (the process aborts); an error says the same more kindly.
    if !path.starts_with('/') {
        return Err(EnvError::NotAbsolute(path.to_string()));
    }
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    Ok(format!("/{}", parts.join("/")))
}

/// Parses one path a structured `exportReferencesGraph` lists: exactly a store path once
/// canonical (a path inside one is refused, unlike in the unstructured attribute).
fn parse_graph_path(store_dir: &StoreDir, path: &str) -> Result<StorePath, EnvError> {
    let canon = canon_path(path)?;
    let (dir, base) = canon.rsplit_once('/').unwrap_or(("", &canon));
    let dir = if dir.is_empty() { "/" } else { dir };
    if dir != store_dir.as_str() {
        return Err(EnvError::NotInStore(canon));
    }
    // Nix's own checks come first, for its messages; the name is then checked by ours.
    if base.len() < 32 {
        return Err(EnvError::TooShort(base.to_string()));
    }
    if let Some(c) = base[..32]
        .chars()
        .find(|c| !(c.is_ascii_digit() || c.is_ascii_lowercase()) || "eou".contains(*c))
    {
        return Err(EnvError::IllegalBase32 {
            path: base.to_string(),
            c,
        });
    }
    Ok(StorePath::from_base_name(base)?)
}

/// The closure of the `roots` one structured `exportReferencesGraph` key lists, each of
/// which must be in `inputs` (the derivation's input closure), with what the store knows of
/// every path in it.
pub fn export_references(
    store: &dyn BuildStore,
    inputs: &BTreeSet<StorePath>,
    roots: &BTreeSet<StorePath>,
) -> Result<Vec<GraphPath>, EnvError> {
    let sd = store.store_dir();
    if let Some(p) = roots.iter().find(|p| !inputs.contains(*p)) {
        return Err(EnvError::NotAnInput(sd.print(p)));
    }
    let mut closure = store.compute_closure(roots)?;
    // Derivations bring their outputs' closures along (the original's use: a NixOS image
    // that wants every build-time dependency). An output that is not there is an error here,
    // as in Nix 2.8, where the unstructured attribute skips it.
    let drvs: Vec<StorePath> = closure
        .iter()
        .filter(|p| p.is_derivation())
        .cloned()
        .collect();
    for d in drvs {
        for out in store.read_derivation(&d)?.output_paths().into_values() {
            if !store.is_valid_path(&out)? {
                return Err(EnvError::Invalid(sd.print(&out)));
            }
            closure.extend(store.compute_closure(&BTreeSet::from([out]))?);
        }
    }
    let mut infos = BTreeMap::new();
    for p in &closure {
        let info = store
            .query_path_info(p)?
            .ok_or_else(|| EnvError::Invalid(sd.print(p)))?;
        infos.insert(p.clone(), info);
    }
    let mut graph = Vec::with_capacity(infos.len());
    for (p, info) in &infos {
        let mut closure_size = 0;
        for q in store.compute_closure(&BTreeSet::from([p.clone()]))? {
            closure_size += match infos.get(&q) {
                Some(i) => i.nar_size,
                // Unreachable while the closure above is closed; asked anyway, not assumed.
                None => {
                    store
                        .query_path_info(&q)?
                        .ok_or_else(|| EnvError::Invalid(sd.print(&q)))?
                        .nar_size
                }
            };
        }
        graph.push(GraphPath {
            path: p.clone(),
            nar_hash: info.nar_hash.clone(),
            nar_size: info.nar_size,
            references: info.references.clone(),
            ca: info.ca.clone(),
            closure_size,
        });
    }
    Ok(graph)
}

/// The closure of one `exportReferencesGraph` entry as the builder reads it: `refs` gives
/// each path's references.
pub fn references_graph_text(closure: &BTreeMap<String, BTreeSet<String>>) -> String {
    let mut s = String::new();
    for (path, refs) in closure {
        s.push_str(path);
        s.push_str("\n\n");
        s.push_str(&refs.len().to_string());
        s.push('\n');
        for r in refs {
            s.push_str(r);
            s.push('\n');
        }
    }
    s
}

/// Splits `exportReferencesGraph` into (file name, store path) pairs; `None` when the
/// number of words is odd.
pub fn parse_export_references_graph(value: &str) -> Option<Vec<(String, String)>> {
    let words: Vec<&str> = value.split_ascii_whitespace().collect();
    let pairs = words.chunks_exact(2);
    if !pairs.remainder().is_empty() {
        return None;
    }
    Some(
        pairs
            .map(|c| (c[0].to_string(), c[1].to_string()))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd() -> StoreDir {
        StoreDir::new("/s/store").unwrap()
    }

    fn no_graphs(_: &BTreeSet<StorePath>) -> Result<Vec<GraphPath>, EnvError> {
        panic!("no exportReferencesGraph expected")
    }

    fn params<'a>(fixed: bool, impure: &'a BTreeMap<String, String>) -> EnvParams<'a> {
        EnvParams {
            store_dir: "/s/store",
            cores: 3,
            build_dir: "/tmp/nix-build-x.drv-0",
            fixed_output: fixed,
            impure_env: impure,
        }
    }

    #[test]
    fn build_dir_variables_cannot_be_overridden_but_path_can() {
        let drv: BTreeMap<String, String> = [
            ("PATH", "/mine"),
            ("TMPDIR", "/evil"),
            ("out", "/s/store/o"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let env = builder_env(&drv, &params(false, &BTreeMap::new()));
        assert_eq!(env["PATH"], "/mine");
        assert_eq!(env["TMPDIR"], "/tmp/nix-build-x.drv-0");
        assert_eq!(env["NIX_BUILD_CORES"], "3");
        assert!(!env.contains_key("NIX_OUTPUT_CHECKED"));
    }

    #[test]
    fn impure_variables_only_for_fixed_outputs() {
        let drv: BTreeMap<String, String> = [("impureEnvVars", "http_proxy  MISSING")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let host: BTreeMap<String, String> = [("http_proxy".to_string(), "p:1".to_string())].into();
        let env = builder_env(&drv, &params(true, &host));
        assert_eq!(env["http_proxy"], "p:1");
        assert_eq!(env["MISSING"], "");
        assert_eq!(env["NIX_OUTPUT_CHECKED"], "1");
        let env = builder_env(&drv, &params(false, &host));
        assert!(!env.contains_key("http_proxy"));
    }

    #[test]
    fn pass_as_file_names_and_variables() {
        // File names observed from Nix 2.8 for passAsFile = ["foo" "bar"].
        assert_eq!(
            pass_as_file_name("foo"),
            ".attr-1bp7cri8hplaz6hbz0v4f0nl44rl84q1sg25kgwqzipzd1mv89ic"
        );
        assert_eq!(
            pass_as_file_name("bar"),
            ".attr-1fcgpy7vc4ammr7s17j2xq88scswkgz23dqzc04g8sx5vcp2pppw"
        );
        let drv: BTreeMap<String, String> = [
            ("foo", "x y"),
            ("baz", "keep"),
            ("passAsFile", "foo  missing"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let env = builder_env(&drv, &params(false, &BTreeMap::new()));
        assert_eq!(
            env["fooPath"],
            "/tmp/nix-build-x.drv-0/.attr-1bp7cri8hplaz6hbz0v4f0nl44rl84q1sg25kgwqzipzd1mv89ic"
        );
        assert!(!env.contains_key("foo") && !env.contains_key("missingPath"));
        assert_eq!(env["baz"], "keep");
        let files = build_dir_files(&drv, &sd(), &BTreeMap::new(), no_graphs).unwrap();
        assert_eq!(
            files,
            [BuildDirFile {
                name: pass_as_file_name("foo"),
                contents: "x y".into()
            }]
        );
    }

    #[test]
    fn structured_attrs_files_as_nix_writes_them() {
        // The __json Nix 2.8 wrote into a derivation (keys in insertion order here, to show
        // they get sorted), and the two files it then gave the builder.
        let json = r#"{"s":"it's \"q\" \\ \n\ttab é","a":{"x":"1","b":false,"y z":2},
            "an":{"x":{"y":1}},"bad-name":"v","big":3000000000,"ea":{},"el":[],"f":1.5,
            "fa":false,"fw":2,"i":42,"l":["a",1,true],"ln":["a",[1]],"n":null,"neg":-7,
            "outputs":["out"],"t":true,"ctl":"\rx01\u0001"}"#;
        let drv: BTreeMap<String, String> = [("__json", json), ("out", "/s/o"), ("x", "y")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let env = builder_env(&drv, &params(false, &BTreeMap::new()));
        assert!(!env.contains_key("out") && !env.contains_key("x") && !env.contains_key("__json"));
        assert_eq!(env["NIX_ATTRS_SH_FILE"], "/tmp/nix-build-x.drv-0/.attrs.sh");
        assert_eq!(
            env["NIX_ATTRS_JSON_FILE"],
            "/tmp/nix-build-x.drv-0/.attrs.json"
        );
        let outputs = BTreeMap::from([("out".to_string(), "/s/o".to_string())]);
        let files = build_dir_files(&drv, &sd(), &outputs, no_graphs).unwrap();
        assert_eq!(files[0].name, ".attrs.json");
        assert_eq!(
            files[0].contents,
            r#"{"a":{"b":false,"x":"1","y z":2},"an":{"x":{"y":1}},"bad-name":"v","big":3000000000,"ctl":"\rx01\u0001","ea":{},"el":[],"f":1.5,"fa":false,"fw":2,"i":42,"l":["a",1,true],"ln":["a",[1]],"n":null,"neg":-7,"outputs":{"out":"/s/o"},"s":"it's \"q\" \\ \n\ttab é","t":true}"#
        );
        assert_eq!(files[1].name, ".attrs.sh");
        assert_eq!(
            files[1].contents,
            "declare -A a=(['b']= ['x']='1' ['y z']=2 )\n\
             declare big=-1294967296\n\
             declare ctl='\rx01\u{1}'\n\
             declare -A ea=()\n\
             declare -a el=()\n\
             declare fa=\n\
             declare fw=2\n\
             declare i=42\n\
             declare -a l=('a' 1 1 )\n\
             declare n=''\n\
             declare neg=-7\n\
             declare -A outputs=(['out']='/s/o' )\n\
             declare s='it'\\''s \"q\" \\ \n\ttab é'\n\
             declare t=1\n"
        );
        let bad: BTreeMap<String, String> = [("__json", "[1]")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert!(matches!(
            build_dir_files(&bad, &sd(), &outputs, no_graphs),
            Err(EnvError::NotObject)
        ));
    }

    /// Store paths and hashes copied from Nix 2.8's `.attrs.json` for
    /// `exportReferencesGraph = { g = [ src dep ]; graph = []; }` (store /tmp/xo/r/store).
    const DEP: &str = "bp7qri8k3xd6s2lrfgncdfyfc8f2hibx-dep";
    const SRC: &str = "ndvwwkv9nwsmqhrbzl1q7kalc7xwbczd-src.txt";

    fn xo() -> StoreDir {
        StoreDir::new("/tmp/xo/r/store").unwrap()
    }

    fn structured(json: &str) -> BTreeMap<String, String> {
        BTreeMap::from([("__json".to_string(), json.to_string())])
    }

    fn sp(base: &str) -> StorePath {
        StorePath::from_base_name(base).unwrap()
    }

    /// The closure Nix's store gave for [`DEP`], in an order other than the path order.
    fn dep_closure(roots: &BTreeSet<StorePath>) -> Result<Vec<GraphPath>, EnvError> {
        assert_eq!(roots, &BTreeSet::from([sp(SRC), sp(DEP)]));
        let h = |s: &str| Hash::parse_typed(s).unwrap();
        Ok(vec![
            GraphPath {
                path: sp(SRC),
                nar_hash: h("sha256:0sg9f58l1jj88w6pdrfdpj5x9b1zrwszk84j81zvby36q9whhhqa"),
                nar_size: 120,
                references: BTreeSet::new(),
                ca: Some("text:sha256:094qif9n4cq4fdg459qzbhg1c6wywawwaaivx0k0x8xhbyx4vwic".into()),
                closure_size: 120,
            },
            GraphPath {
                path: sp(DEP),
                nar_hash: h("sha256:1i7ap39y48aly0yiqqn44yszvsy7wnb0ljxxnl71736q45ybasi2"),
                nar_size: 176,
                references: BTreeSet::from([sp(SRC)]),
                ca: None,
                closure_size: 296,
            },
        ])
    }

    #[test]
    fn structured_references_graph_as_nix_writes_it() {
        let json = format!(
            r#"{{"exportReferencesGraph":{{"graph":[],"g":["/tmp/xo/r/store/{SRC}","/tmp/xo/r/store/{DEP}"]}},"name":"empty","outputs":["out"]}}"#
        );
        let outputs = BTreeMap::from([("out".to_string(), "/tmp/xo/r/store/o-empty".to_string())]);
        let mut calls = 0;
        let files = build_dir_files(&structured(&json), &xo(), &outputs, |roots| {
            calls += 1;
            if roots.is_empty() {
                Ok(vec![])
            } else {
                dep_closure(roots)
            }
        })
        .unwrap();
        assert_eq!(calls, 2);
        let expected = format!(
            r#"{{"exportReferencesGraph":{{"g":["/tmp/xo/r/store/{SRC}","/tmp/xo/r/store/{DEP}"],"graph":[]}},"g":[{{"closureSize":296,"narHash":"sha256:1i7ap39y48aly0yiqqn44yszvsy7wnb0ljxxnl71736q45ybasi2","narSize":176,"path":"/tmp/xo/r/store/{DEP}","references":["/tmp/xo/r/store/{SRC}"]}},{{"ca":"text:sha256:094qif9n4cq4fdg459qzbhg1c6wywawwaaivx0k0x8xhbyx4vwic","closureSize":120,"narHash":"sha256:0sg9f58l1jj88w6pdrfdpj5x9b1zrwszk84j81zvby36q9whhhqa","narSize":120,"path":"/tmp/xo/r/store/{SRC}","references":[]}}],"graph":[],"name":"empty","outputs":{{"out":"/tmp/xo/r/store/o-empty"}}}}"#
        );
        assert_eq!(files[0].contents, expected);
        // The graph is a list of objects, so only the empty one shows in .attrs.sh.
        assert_eq!(
            files[1].contents,
            "declare -a graph=()\ndeclare name='empty'\ndeclare -A outputs=(['out']='/tmp/xo/r/store/o-empty' )\n"
        );
    }

    #[test]
    fn structured_references_graph_value_shapes() {
        let roots = |v: &str| graph_roots(&xo(), &serde_json::from_str(v).unwrap());
        let dep = format!("/tmp/xo/r/store/{DEP}");
        // A string, an object's values, null: as Nix 2.8 iterated them.
        assert_eq!(
            roots(&format!("\"{dep}\"")).unwrap(),
            BTreeSet::from([sp(DEP)])
        );
        assert_eq!(
            roots(&format!("{{\"a\":\"{dep}\"}}")).unwrap(),
            BTreeSet::from([sp(DEP)])
        );
        assert_eq!(roots("null").unwrap(), BTreeSet::new());
        // Canonical first: a trailing slash, '//' and '..' are accepted.
        let odd =
            format!("[\"{dep}/\", \"/tmp/xo/r/store//{DEP}\", \"/tmp/xo/r/store/x/../{DEP}\"]");
        assert_eq!(roots(&odd).unwrap(), BTreeSet::from([sp(DEP)]));
        // Nix 2.8's messages for what it refuses.
        let err = |v: &str| roots(v).unwrap_err().to_string();
        assert_eq!(
            err("[1]"),
            "[json.exception.type_error.302] type must be string, but is number"
        );
        assert_eq!(
            err("[true]"),
            "[json.exception.type_error.302] type must be string, but is boolean"
        );
        assert_eq!(
            err("[null]"),
            "[json.exception.type_error.302] type must be string, but is null"
        );
        assert_eq!(
            err("[[1]]"),
            "[json.exception.type_error.302] type must be string, but is array"
        );
        assert_eq!(
            err("[\"/tmp/foo\"]"),
            "path '/tmp/foo' is not in the Nix store"
        );
        assert_eq!(
            err("[\"/tmp/xo/r/store\"]"),
            "path '/tmp/xo/r/store' is not in the Nix store"
        );
        assert_eq!(
            err(&format!("[\"{dep}/x\"]")),
            format!("path '{dep}/x' is not in the Nix store")
        );
        assert_eq!(err("[\"foo\"]"), "not an absolute path: 'foo'");
        assert_eq!(
            err("[\"/tmp/xo/r/store/foo\"]"),
            "'foo' is too short to be a valid store path"
        );
        assert_eq!(
            err("[\"/tmp/xo/r/store/eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee-x\"]"),
            "store path 'eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee-x' contains illegal base-32 character 'e'"
        );
    }

    #[test]
    fn structured_references_graph_replacing_outputs_fails_as_in_nix() {
        let json =
            format!(r#"{{"exportReferencesGraph":{{"outputs":["/tmp/xo/r/store/{DEP}"]}}}}"#);
        let e = build_dir_files(&structured(&json), &xo(), &BTreeMap::new(), |_| Ok(vec![]))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "[json.exception.type_error.302] type must be object, but is array"
        );
        assert!(!e.rejects_derivation());
        // Any other shape of exportReferencesGraph is an ordinary attribute.
        let json = format!(r#"{{"exportReferencesGraph":["graph","/tmp/xo/r/store/{DEP}"]}}"#);
        let files =
            build_dir_files(&structured(&json), &xo(), &BTreeMap::new(), no_graphs).unwrap();
        assert!(files[0]
            .contents
            .starts_with(r#"{"exportReferencesGraph":["graph","#));
    }

    #[test]
    fn references_graph_matches_nix_layout() {
        // Layout observed from Nix 2.8's exportReferencesGraph output.
        let mut g = BTreeMap::new();
        g.insert("/s/b".to_string(), BTreeSet::from(["/s/a".to_string()]));
        g.insert("/s/a".to_string(), BTreeSet::new());
        assert_eq!(references_graph_text(&g), "/s/a\n\n0\n/s/b\n\n1\n/s/a\n");
        assert_eq!(
            parse_export_references_graph("a /s/x"),
            Some(vec![("a".into(), "/s/x".into())])
        );
        assert_eq!(parse_export_references_graph("a /s/x b"), None);
    }
}
