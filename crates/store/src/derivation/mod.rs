//! Derivations: the build recipes stored as `.drv` files, their ATerm and JSON forms, and
//! the hashing that gives them and their outputs their store paths.
//!
//! A [`Derivation`] is plain data; `aterm` reads and writes the `.drv` text byte for byte
//! as Nix 2.8 does and `json` the shape `nix show-derivation` prints. The paths follow
//! Nix 2.x:
//!
//! ```text
//! drv path        = makeTextPath("<name>.drv", ATerm, inputSrcs ∪ inputDrvs)
//! fixed output    = makeFixedOutputPath(recursive, hash, name)
//! other outputs   = makeOutputPath(output, hashDerivationModulo(drv, masked), name)
//! hashDerivationModulo(drv) =
//!     fixed output: sha256("fixed:out:" ["r:"] algo ":" hex ":" <output path>)
//!     otherwise:    sha256(ATerm with each input drv replaced by the base16 of its
//!                          own hashDerivationModulo, unmasked)
//! ```
//!
//! Replacing inputs by their modulo hash is what lets a fixed-output derivation change
//! (a new mirror URL, say) without changing the output paths of everything built on it.
//!
//! Strings are Rust strings: a `.drv` holding bytes that are not UTF-8 is rejected.

mod aterm;
mod json;

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;

use crate::hash::{Hash, HashAlgo};
use crate::path::{PathError, StoreDir, StorePath};

/// A derivation as a `.drv` file holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Derivation {
    pub outputs: BTreeMap<String, DerivationOutput>,
    /// Input derivations and which of their outputs are wanted.
    pub input_drvs: BTreeMap<StorePath, BTreeSet<String>>,
    pub input_srcs: BTreeSet<StorePath>,
    /// `system`, e.g. `x86_64-linux`.
    pub platform: String,
    pub builder: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
}

/// One output. `path` is `None` while not yet computed (Nix's "deferred" output, printed
/// as `""`); `fixed` is set for a fixed-output (content-addressed by a known hash) output.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct DerivationOutput {
    pub path: Option<StorePath>,
    pub fixed: Option<FixedOutputHash>,
}

/// The expected hash of a fixed output: printed in a `.drv` as `("out",<path>,"r:sha256","<hex>")`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FixedOutputHash {
    /// Hash of the NAR serialisation (`r:`) rather than of the flat file.
    pub recursive: bool,
    pub hash: Hash,
}

impl FixedOutputHash {
    /// `[r:]<algo>`, the hashAlgo field.
    pub fn method_algo(&self) -> String {
        format!(
            "{}{}",
            if self.recursive { "r:" } else { "" },
            self.hash.algo()
        )
    }

    /// Parses the hashAlgo and hash fields of a `.drv` output. The digest may be in any
    /// encoding Nix accepts; it is printed back as base16.
    pub fn parse(method_algo: &str, hash: &str) -> Result<FixedOutputHash, String> {
        let (recursive, algo) = match method_algo.strip_prefix("r:") {
            Some(a) => (true, a),
            None => (false, method_algo),
        };
        if algo.starts_with("text:") {
            return Err("text-hashed outputs (ca-derivations) are not supported".into());
        }
        let algo: HashAlgo = algo
            .parse()
            .map_err(|e| format!("hash algorithm '{method_algo}': {e}"))?;
        if hash.is_empty() {
            return Err(
                "content-addressed outputs without a fixed hash (ca-derivations) are not supported"
                    .into(),
            );
        }
        let hash = Hash::parse_with_algo(hash, algo).map_err(|e| e.to_string())?;
        Ok(FixedOutputHash { recursive, hash })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DrvError {
    #[error("derivation {origin}: {msg} at byte {offset}")]
    Parse {
        origin: String,
        offset: usize,
        msg: String,
    },
    #[error("derivation {origin}: json {field}: {msg}")]
    Json {
        origin: String,
        field: String,
        msg: String,
    },
    #[error("reading derivation {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("derivation has no name (no 'name' in env, nor in env.__json)")]
    NoName,
    /// The derivation is well formed but not valid, e.g. mixes fixed and other outputs.
    #[error("derivation '{drv}': {msg}")]
    Invalid { drv: String, msg: String },
    #[error("derivation '{drv}': {source}")]
    Path {
        drv: String,
        #[source]
        source: PathError,
    },
    #[error("derivation {0}: input derivations form a cycle")]
    Cycle(String),
}

/// Checks an output name: it becomes part of a store path name, and Nix 2.8 prints it
/// unescaped, so it must be a legal store path name of its own.
pub(crate) fn check_output_name(name: &str) -> Result<(), String> {
    crate::path::validate_name(name)
        .map_err(|_| format!("invalid output name '{}'", name.escape_default()))
}

impl Derivation {
    /// Parses the ATerm text of a `.drv`; `origin` (usually its path) names it in errors.
    pub fn parse(store: &StoreDir, text: &[u8], origin: &str) -> Result<Derivation, DrvError> {
        aterm::parse(store, text, origin)
    }

    /// Reads and parses a `.drv` file.
    pub fn read(store: &StoreDir, file: &Path) -> Result<Derivation, DrvError> {
        let origin = file.display().to_string();
        let text = std::fs::read(file).map_err(|source| DrvError::Io {
            path: origin.clone(),
            source,
        })?;
        Self::parse(store, &text, &origin)
    }

    /// The ATerm text, byte-identical to what Nix 2.8 writes.
    pub fn to_aterm(&self, store: &StoreDir) -> String {
        aterm::print(self, store, false, None)
    }

    /// The object `nix show-derivation` prints under the `.drv` path.
    pub fn to_json(&self, store: &StoreDir) -> serde_json::Value {
        json::to_json(self, store)
    }

    pub fn from_json(
        store: &StoreDir,
        v: &serde_json::Value,
        origin: &str,
    ) -> Result<Derivation, DrvError> {
        json::from_json(store, v, origin)
    }

    /// The derivation's name, which names the `.drv` and the outputs: the `name`
    /// environment variable, or with structured attrs (`__structuredAttrs = true`, where
    /// the attributes travel as one JSON object in `env.__json`) the `name` in there.
    pub fn name(&self) -> Result<Cow<'_, str>, DrvError> {
        if let Some(n) = self.env.get("name") {
            return Ok(Cow::Borrowed(n));
        }
        let json = self.env.get("__json").ok_or(DrvError::NoName)?;
        let v: serde_json::Value =
            serde_json::from_str(json).map_err(|e| self.invalid(format!("env.__json: {e}")))?;
        match v.get("name") {
            Some(serde_json::Value::String(n)) => Ok(Cow::Owned(n.clone())),
            _ => Err(DrvError::NoName),
        }
    }

    fn display_name(&self) -> String {
        self.name()
            .map(Cow::into_owned)
            .unwrap_or_else(|_| "<unnamed>".to_string())
    }

    fn invalid(&self, msg: impl Into<String>) -> DrvError {
        DrvError::Invalid {
            // Not display_name(): name() itself reports a bad __json through here.
            drv: self
                .env
                .get("name")
                .cloned()
                .unwrap_or_else(|| "<unnamed>".to_string()),
            msg: msg.into(),
        }
    }

    fn path_err(&self, source: PathError) -> DrvError {
        DrvError::Path {
            drv: self.display_name(),
            source,
        }
    }

    /// Exactly one output, `out`, with a fixed hash.
    pub fn is_fixed_output(&self) -> bool {
        self.outputs.len() == 1 && self.outputs.get("out").is_some_and(|o| o.fixed.is_some())
    }

    /// The fixed hash if this is a fixed-output derivation; an error when a fixed output
    /// appears in any other layout (Nix allows one fixed output, named `out`, alone).
    pub fn fixed_output(&self) -> Result<Option<&FixedOutputHash>, DrvError> {
        if self.outputs.values().all(|o| o.fixed.is_none()) {
            return Ok(None);
        }
        match (self.outputs.len(), self.outputs.get("out")) {
            (1, Some(DerivationOutput { fixed: Some(f), .. })) => Ok(Some(f)),
            _ => Err(self.invalid(
                "a fixed-output derivation must have exactly one output, named 'out' (cannot mix fixed and other outputs)",
            )),
        }
    }

    /// What the `.drv` file refers to: its input sources and input derivations.
    pub fn references(&self) -> BTreeSet<StorePath> {
        self.input_srcs
            .iter()
            .chain(self.input_drvs.keys())
            .cloned()
            .collect()
    }

    /// Where this derivation is stored: a text path named `<name>.drv`.
    pub fn drv_path(&self, store: &StoreDir) -> Result<StorePath, DrvError> {
        let name = format!("{}.drv", self.name()?);
        let refs = self.references();
        store
            .make_text_path(&name, self.to_aterm(store).as_bytes(), &refs)
            .map_err(|e| self.path_err(e))
    }

    /// The outputs whose paths are known (all of them once computed).
    pub fn output_paths(&self) -> BTreeMap<String, StorePath> {
        self.outputs
            .iter()
            .filter_map(|(n, o)| o.path.clone().map(|p| (n.clone(), p)))
            .collect()
    }
}

/// Memoised `hashDerivationModulo` of input derivations (unmasked), by `.drv` path, with the
/// output names each has, so a dependant asking for a missing output is caught.
#[derive(Clone, Debug, Default)]
pub struct DrvHashCache {
    hashes: HashMap<StorePath, (Hash, BTreeSet<String>)>,
}

impl DrvHashCache {
    pub fn new() -> DrvHashCache {
        DrvHashCache::default()
    }

    /// The modulo hash of the derivation at `drv_path`, if already computed.
    pub fn get(&self, drv_path: &StorePath) -> Option<&Hash> {
        self.hashes.get(drv_path).map(|(h, _)| h)
    }

    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }
}

/// `hashDerivationModulo` with Nix 2.x semantics (see the module doc). `resolve` loads an
/// input derivation by path; every input is resolved at most once per `cache`, and the
/// walk is iterative, so deep chains cannot overflow the stack.
pub fn hash_derivation_modulo(
    store: &StoreDir,
    drv: &Derivation,
    mask_outputs: bool,
    resolve: &mut dyn FnMut(&StorePath) -> Result<Derivation, DrvError>,
    cache: &mut DrvHashCache,
) -> Result<Hash, DrvError> {
    if drv.fixed_output()?.is_none() {
        fill_cache(store, drv, resolve, cache)?;
    }
    modulo_with_cached_inputs(store, drv, mask_outputs, cache)
}

/// Computes (depth first, children before parents) the modulo hash of every input
/// derivation reachable from `root` that the cache lacks.
fn fill_cache(
    store: &StoreDir,
    root: &Derivation,
    resolve: &mut dyn FnMut(&StorePath) -> Result<Derivation, DrvError>,
    cache: &mut DrvHashCache,
) -> Result<(), DrvError> {
    let mut stack: Vec<(StorePath, Derivation)> = Vec::new();
    let mut on_stack: HashSet<StorePath> = HashSet::new();
    for start in root.input_drvs.keys() {
        if cache.hashes.contains_key(start) {
            continue;
        }
        stack.push((start.clone(), resolve(start)?));
        on_stack.insert(start.clone());
        while let Some((_, top)) = stack.last() {
            // Fixed-output derivations hash without their inputs, so they need none resolved.
            let next = if top.fixed_output()?.is_some() {
                None
            } else {
                top.input_drvs
                    .keys()
                    .find(|p| !cache.hashes.contains_key(*p))
                    .cloned()
            };
            match next {
                Some(p) => {
                    if !on_stack.insert(p.clone()) {
                        return Err(DrvError::Cycle(store.print(&p)));
                    }
                    let d = resolve(&p)?;
                    stack.push((p, d));
                }
                None => {
                    let Some((path, d)) = stack.pop() else { break };
                    on_stack.remove(&path);
                    let h = modulo_with_cached_inputs(store, &d, false, cache)?;
                    cache
                        .hashes
                        .insert(path, (h, d.outputs.keys().cloned().collect()));
                }
            }
        }
    }
    Ok(())
}

/// One step of hashDerivationModulo, for a derivation whose inputs are all in the cache.
fn modulo_with_cached_inputs(
    store: &StoreDir,
    drv: &Derivation,
    mask_outputs: bool,
    cache: &DrvHashCache,
) -> Result<Hash, DrvError> {
    if let Some(f) = drv.fixed_output()? {
        // Nix 2.8 uses the output path computed from the hash, not the one written in the file.
        let path = store
            .make_fixed_output_path(f.recursive, &f.hash, &drv.name()?)
            .map_err(|e| drv.path_err(e))?;
        let s = format!(
            "fixed:out:{}:{}:{}",
            f.method_algo(),
            f.hash.to_hex(),
            store.print(&path)
        );
        return Ok(Hash::digest(HashAlgo::Sha256, s.as_bytes()));
    }
    let mut inputs = aterm::HashedInputs::new();
    for (path, wanted) in &drv.input_drvs {
        let Some((h, has)) = cache.hashes.get(path) else {
            return Err(drv.invalid(format!(
                "internal: input {} was not hashed",
                store.print(path)
            )));
        };
        if let Some(missing) = wanted.difference(has).next() {
            return Err(drv.invalid(format!(
                "wants output '{missing}' of {}, which has no such output",
                store.print(path)
            )));
        }
        // Two inputs may share a modulo hash (fixed outputs with equal paths): Nix merges
        // the wanted output sets.
        inputs
            .entry(h.to_hex())
            .or_default()
            .extend(wanted.iter().cloned());
    }
    let text = aterm::print(drv, store, mask_outputs, Some(&inputs));
    Ok(Hash::digest(HashAlgo::Sha256, text.as_bytes()))
}

/// Fills in the output paths, and the env vars named after the outputs, of a derivation
/// whose outputs may be blank, the way Nix's `derivation` builtin does; paths and env
/// vars already given must equal the computed ones. Used by `nixb derivation add`.
pub fn compute_output_paths(
    store: &StoreDir,
    drv: &mut Derivation,
    resolve: &mut dyn FnMut(&StorePath) -> Result<Derivation, DrvError>,
    cache: &mut DrvHashCache,
) -> Result<(), DrvError> {
    let name = drv.name()?.to_string();
    if drv.outputs.is_empty() {
        return Err(drv.invalid("has no outputs"));
    }
    if drv.platform.contains(['"', '\\']) {
        // Nix 2.8 writes the platform unescaped; such a .drv could not be read back.
        return Err(drv.invalid(format!(
            "system '{}' contains '\"' or '\\', which nix writes unescaped into the .drv",
            drv.platform.escape_default()
        )));
    }
    let computed: BTreeMap<String, StorePath> = if let Some(f) = drv.fixed_output()? {
        let p = store
            .make_fixed_output_path(f.recursive, &f.hash, &name)
            .map_err(|e| drv.path_err(e))?;
        BTreeMap::from([("out".to_string(), p)])
    } else {
        // Nix hashes with every output's env var present and blank, so a derivation
        // that lacks them must get them before hashing, or the hash would differ.
        let mut masked = drv.clone();
        for o in drv.outputs.keys() {
            masked.env.insert(o.clone(), String::new());
        }
        let h = hash_derivation_modulo(store, &masked, true, resolve, cache)?;
        let mut m = BTreeMap::new();
        for o in drv.outputs.keys() {
            let p = store
                .make_output_path(o, &h, &name)
                .map_err(|e| drv.path_err(e))?;
            m.insert(o.clone(), p);
        }
        m
    };
    for (o, p) in computed {
        let printed = store.print(&p);
        if let Some(given) = drv.outputs.get(&o).and_then(|x| x.path.as_ref()) {
            if *given != p {
                return Err(drv.invalid(format!(
                    "output '{o}' is {}, but should be {printed}",
                    store.print(given)
                )));
            }
        }
        if let Some(v) = drv.env.get(&o) {
            if !v.is_empty() && *v != printed {
                return Err(drv.invalid(format!(
                    "environment variable '{o}' is '{}', but should be '{printed}'",
                    v.escape_default()
                )));
            }
        }
        drv.env.insert(o.clone(), printed);
        if let Some(out) = drv.outputs.get_mut(&o) {
            out.path = Some(p);
        }
    }
    Ok(())
}
