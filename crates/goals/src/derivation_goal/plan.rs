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
    pub outputs: BTreeMap<String, StorePath>,
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
            outputs: BTreeMap::new(),
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
