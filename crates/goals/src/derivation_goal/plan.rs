//! What a derivation goal knows about the build it is to do: the derivation, its outputs,
//! the input closure, and which outputs are valid and which are to be built. The build,
//! registration and hook halves of the goal read it; only the goal's states fill it in.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use nixb_store::derivation::Derivation;
use nixb_store::StorePath;

use crate::config::BuildMode;
use crate::error::BuildError;

pub(crate) struct BuildPlan {
    pub drv_path: StorePath,
    pub mode: BuildMode,
    /// Loaded in `haveDerivation`.
    pub drv: Option<Arc<Derivation>>,
    /// Output name → path, from the derivation.
    pub outputs: OutputPaths,
    pub fixed_output: bool,
    /// The union of the closures of the inputs.
    pub input_paths: BTreeSet<StorePath>,
    /// What outputs may refer to: inputs and outputs.
    pub all_paths: BTreeSet<StorePath>,
    /// Outputs already valid (and, when repairing, intact).
    pub valid_paths: BTreeSet<StorePath>,
    /// Outputs to build (all of them under --check).
    pub missing_paths: BTreeSet<StorePath>,
}

impl BuildPlan {
    pub fn new(drv_path: StorePath, mode: BuildMode) -> BuildPlan {
        BuildPlan {
            drv_path,
            mode,
            drv: None,
            outputs: OutputPaths::default(),
            fixed_output: false,
            input_paths: BTreeSet::new(),
            all_paths: BTreeSet::new(),
            valid_paths: BTreeSet::new(),
            missing_paths: BTreeSet::new(),
        }
    }

    pub fn drv(&self) -> Result<&Derivation, BuildError> {
        self.drv
            .as_deref()
            .ok_or_else(|| BuildError::Misc("internal error: derivation not loaded".into()))
    }
}

/// A derivation's output names and paths, sorted by name. A goal keeps them for its whole
/// life, most of it waiting, so they are a plain sorted vector: a `BTreeMap` would give even
/// a single output a whole node of eleven slots (about half a KiB a goal).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct OutputPaths(Vec<(String, StorePath)>);

impl OutputPaths {
    /// Sets output `name`'s path.
    pub fn insert(&mut self, name: String, path: StorePath) {
        match self.0.binary_search_by(|(n, _)| n.as_str().cmp(&name)) {
            Ok(i) => self.0[i].1 = path,
            Err(i) => self.0.insert(i, (name, path)),
        }
    }

    pub fn get(&self, name: &str) -> Option<&StorePath> {
        self.0
            .binary_search_by(|(n, _)| n.as_str().cmp(name))
            .ok()
            .map(|i| &self.0[i].1)
    }

    pub fn contains_key(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn values(&self) -> impl Iterator<Item = &StorePath> {
        self.0.iter().map(|(_, p)| p)
    }

    /// The same as a map, for code that takes one.
    pub fn to_map(&self) -> BTreeMap<String, StorePath> {
        self.0.iter().cloned().collect()
    }

    /// No room beyond the outputs themselves.
    pub fn shrink_to_fit(&mut self) {
        self.0.shrink_to_fit();
    }
}

impl<'a> IntoIterator for &'a OutputPaths {
    type Item = (&'a String, &'a StorePath);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (String, StorePath)>,
        fn(&'a (String, StorePath)) -> (&'a String, &'a StorePath),
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(n, p)| (n, p))
    }
}

impl IntoIterator for OutputPaths {
    type Item = (String, StorePath);
    type IntoIter = std::vec::IntoIter<(String, StorePath)>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

/// The features a derivation asks of the machine that builds it: `requiredSystemFeatures`,
/// a space-separated string, or a list of strings under `__structuredAttrs`.
pub(crate) fn required_system_features(drv: &Derivation) -> BTreeSet<String> {
    const KEY: &str = "requiredSystemFeatures";
    if let Some(json) = drv.env.get("__json") {
        let parsed: Option<serde_json::Value> = serde_json::from_str(json).ok();
        return match parsed.as_ref().and_then(|v| v.get(KEY)) {
            Some(serde_json::Value::Array(items)) => items
                .iter()
                .filter_map(|i| i.as_str().map(String::from))
                .collect(),
            Some(serde_json::Value::String(s)) => s.split_whitespace().map(String::from).collect(),
            _ => BTreeSet::new(),
        };
    }
    drv.env
        .get(KEY)
        .map(|f| f.split_whitespace().map(String::from).collect())
        .unwrap_or_default()
}

/// Whether this machine can run `drv`'s builder: one for its own platform, for i686 on
/// x86_64, or a builtin builder (whatever its platform, usually `builtin`).
pub(crate) fn can_build_locally(drv: &Derivation, system: &str) -> bool {
    drv.platform == system
        || (drv.platform == "i686-linux" && system == "x86_64-linux")
        || crate::builtins::builtin_name(&drv.builder).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(c: char, name: &str) -> StorePath {
        StorePath::from_base_name(&format!("{}-{name}", c.to_string().repeat(32))).unwrap()
    }

    #[test]
    fn output_paths_stay_sorted_by_name_as_a_map_would() {
        let mut o = OutputPaths::default();
        let mut m = BTreeMap::new();
        for (name, c) in [
            ("out", 'a'),
            ("dev", 'b'),
            ("lib", 'c'),
            ("dev", 'd'),
            ("bin", 'f'),
        ] {
            o.insert(name.into(), path(c, name));
            m.insert(name.to_string(), path(c, name));
        }
        o.shrink_to_fit();
        assert_eq!(o.to_map(), m);
        assert_eq!(o.len(), 4);
        let names: Vec<&String> = (&o).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, m.keys().collect::<Vec<_>>());
        assert_eq!(
            o.values().collect::<Vec<_>>(),
            m.values().collect::<Vec<_>>()
        );
        assert_eq!(o.get("dev"), Some(&path('d', "dev")));
        assert!(o.contains_key("bin") && !o.contains_key("doc"));
        assert_eq!(o.into_iter().collect::<BTreeMap<_, _>>(), m);
    }
}
