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
//! `exportReferencesGraph` files use the validity-registration format with no hashes and
//! empty derivers, one block per path of the closure in sorted order:
//!
//! ```text
//! <path> "\n" "\n" <number of references> "\n" (<reference> "\n")*
//! ```

use std::collections::{BTreeMap, BTreeSet};

use crate::config::HOMELESS_SHELTER;

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
    for (k, v) in drv_env {
        set(k, v);
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
    env
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
