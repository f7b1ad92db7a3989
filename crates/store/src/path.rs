//! Store paths and how Nix computes them.
//!
//! ```text
//! store path   = <store dir> "/" <hash> "-" <name>
//! hash         = 32 characters of nix-base32 = 160 bits
//! name         = 1..211 of [A-Za-z0-9+-._?=], not starting with '.'
//! ```
//!
//! The 160-bit hash is the sha256 of a *fingerprint* folded to 20 bytes by XOR:
//!
//! ```text
//! <type>:sha256:<base16 inner hash>:<store dir>:<name>
//! type = "text" (":" ref)*                       derivations and other text files
//!      | "source" (":" ref)* [":self"]           nix-store --add, recursive sha256 fixed outputs
//!      | "output:" <output name>                 input-addressed outputs, other fixed outputs
//! ```

use std::fmt;
use std::path::{Path, PathBuf};

use crate::hash::{compress_hash, Hash, HashAlgo};

/// Length of the base-32 hash part of a store path's base name.
pub const HASH_CHARS: usize = 32;
/// Longest name Nix accepts (255 minus the hash and the dash, minus room for `.lock`/`.chroot`).
pub const MAX_NAME_LEN: usize = 211;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    #[error("path '{0}' is not in the Nix store {1}")]
    NotInStore(String, String),
    #[error("store path '{path}': {reason}")]
    BadStorePath { path: String, reason: String },
    #[error("store path name '{name}': {reason}")]
    BadName { name: String, reason: String },
    #[error("store directory '{0}' must be an absolute path without a trailing slash")]
    BadStoreDir(String),
}

/// Checks a store path name against Nix's rules.
pub fn validate_name(name: &str) -> Result<(), PathError> {
    let bad = |reason: String| PathError::BadName {
        name: name.to_string(),
        reason,
    };
    if name.is_empty() {
        return Err(bad("name is empty".into()));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(bad(format!(
            "name is longer than {MAX_NAME_LEN} characters"
        )));
    }
    if name.starts_with('.') {
        return Err(bad("name must not begin with a period".into()));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "+-._?=".contains(*c)))
    {
        return Err(bad(format!("illegal character '{}'", c.escape_default())));
    }
    Ok(())
}

/// A store path relative to its store directory: the 20-byte hash and the name.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePath {
    // Kept as the printed base-32 string: it is what is compared, sorted and printed.
    base_name: String,
}

impl StorePath {
    /// Parses `<hash>-<name>` (a store path's base name).
    pub fn from_base_name(base: &str) -> Result<StorePath, PathError> {
        let bad = |reason: &str| PathError::BadStorePath {
            path: base.to_string(),
            reason: reason.to_string(),
        };
        if base.len() < HASH_CHARS + 2 || base.as_bytes()[HASH_CHARS] != b'-' {
            return Err(bad("expected '<32-character hash>-<name>'"));
        }
        let (hash, name) = (&base[..HASH_CHARS], &base[HASH_CHARS + 1..]);
        if !hash.bytes().all(|c| nix_base32_alphabet().contains(&c)) {
            return Err(bad("hash part is not nix-base32"));
        }
        validate_name(name)?;
        Ok(StorePath {
            base_name: base.to_string(),
        })
    }

    /// Builds a path from its 20-byte hash and name.
    pub fn from_hash_and_name(hash: &[u8; 20], name: &str) -> Result<StorePath, PathError> {
        validate_name(name)?;
        Ok(StorePath {
            base_name: format!("{}-{}", nix_base32::to_nix_base32(hash), name),
        })
    }

    /// `<hash>-<name>`.
    pub fn base_name(&self) -> &str {
        &self.base_name
    }

    /// The 32-character base-32 hash part, which is what reference scanning looks for.
    pub fn hash_part(&self) -> &str {
        &self.base_name[..HASH_CHARS]
    }

    pub fn name(&self) -> &str {
        &self.base_name[HASH_CHARS + 1..]
    }

    pub fn is_derivation(&self) -> bool {
        self.name().ends_with(".drv")
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.base_name)
    }
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePath({})", self.base_name)
    }
}

fn nix_base32_alphabet() -> &'static [u8] {
    b"0123456789abcdfghijklmnpqrsvwxyz"
}

/// The store directory (`NIX_STORE_DIR`, default `/nix/store`) and the path arithmetic that
/// depends on it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct StoreDir(String);

impl Default for StoreDir {
    fn default() -> Self {
        StoreDir("/nix/store".into())
    }
}

impl StoreDir {
    pub fn new(dir: impl Into<String>) -> Result<StoreDir, PathError> {
        let dir = dir.into();
        if !dir.starts_with('/') || (dir.len() > 1 && dir.ends_with('/')) || dir.contains("//") {
            return Err(PathError::BadStoreDir(dir));
        }
        Ok(StoreDir(dir))
    }

    /// `NIX_STORE_DIR` or `/nix/store`.
    pub fn from_env() -> Result<StoreDir, PathError> {
        match std::env::var("NIX_STORE_DIR") {
            Ok(d) if !d.is_empty() => StoreDir::new(d),
            _ => Ok(StoreDir::default()),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn as_path(&self) -> &Path {
        Path::new(&self.0)
    }

    /// The absolute file name of `path`.
    pub fn to_path(&self, path: &StorePath) -> PathBuf {
        PathBuf::from(self.print(path))
    }

    /// The absolute path as a string, as it appears in `.drv` files and the database.
    pub fn print(&self, path: &StorePath) -> String {
        format!("{}/{}", self.0, path.base_name)
    }

    /// Parses an absolute store path (exactly `<store dir>/<hash>-<name>`).
    pub fn parse(&self, s: &str) -> Result<StorePath, PathError> {
        let base = s
            .strip_prefix(self.0.as_str())
            .and_then(|r| r.strip_prefix('/'))
            .filter(|b| !b.contains('/'))
            .ok_or_else(|| PathError::NotInStore(s.to_string(), self.0.clone()))?;
        StorePath::from_base_name(base)
    }

    /// Like [`parse`](Self::parse), but accepts a path *inside* a store path
    /// (`/nix/store/<hash>-foo/bin/foo`) and returns the store path it is in.
    pub fn parse_prefix(&self, s: &str) -> Result<StorePath, PathError> {
        let rest = s
            .strip_prefix(self.0.as_str())
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(|| PathError::NotInStore(s.to_string(), self.0.clone()))?;
        StorePath::from_base_name(rest.split('/').next().unwrap_or(""))
    }

    /// `makeStorePath`: the store path whose fingerprint is
    /// `<ty>:sha256:<hex of inner>:<store dir>:<name>`.
    pub fn make_store_path(
        &self,
        ty: &str,
        inner: &Hash,
        name: &str,
    ) -> Result<StorePath, PathError> {
        validate_name(name)?;
        let fingerprint = format!("{ty}:{}:{}:{}:{name}", inner.algo(), inner.to_hex(), self.0);
        let digest = Hash::digest(HashAlgo::Sha256, fingerprint.as_bytes());
        let folded = compress_hash(digest.as_bytes(), 20);
        let mut h = [0u8; 20];
        h.copy_from_slice(&folded);
        StorePath::from_hash_and_name(&h, name)
    }

    /// The path of an input-addressed output `output` of a derivation whose
    /// `hashDerivationModulo` is `drv_hash`. Outputs other than `out` get `-<output>`
    /// appended to the name.
    pub fn make_output_path(
        &self,
        output: &str,
        drv_hash: &Hash,
        drv_name: &str,
    ) -> Result<StorePath, PathError> {
        let name = output_path_name(drv_name, output);
        self.make_store_path(&format!("output:{output}"), drv_hash, &name)
    }

    /// `makeTextPath`: where a text file (such as a `.drv`) with these contents and
    /// references lives.
    pub fn make_text_path<'a>(
        &self,
        name: &str,
        contents: &[u8],
        references: impl IntoIterator<Item = &'a StorePath>,
    ) -> Result<StorePath, PathError> {
        let inner = Hash::digest(HashAlgo::Sha256, contents);
        self.make_store_path(
            &self.type_with_refs("text", references, false),
            &inner,
            name,
        )
    }

    /// Where `nix-store --add` puts a path whose NAR sha256 is `nar_hash`.
    pub fn make_source_path<'a>(
        &self,
        name: &str,
        nar_hash: &Hash,
        references: impl IntoIterator<Item = &'a StorePath>,
        self_reference: bool,
    ) -> Result<StorePath, PathError> {
        self.make_store_path(
            &self.type_with_refs("source", references, self_reference),
            nar_hash,
            name,
        )
    }

    /// `makeFixedOutputPath`: recursive sha256 outputs share the layout of source paths;
    /// every other fixed output is addressed through `fixed:out:[r:]<algo>:<hex>:`.
    pub fn make_fixed_output_path(
        &self,
        recursive: bool,
        hash: &Hash,
        name: &str,
    ) -> Result<StorePath, PathError> {
        if recursive && hash.algo() == HashAlgo::Sha256 {
            self.make_source_path(name, hash, [], false)
        } else {
            let inner = format!(
                "fixed:out:{}{}:{}:",
                if recursive { "r:" } else { "" },
                hash.algo(),
                hash.to_hex()
            );
            let inner = Hash::digest(HashAlgo::Sha256, inner.as_bytes());
            self.make_store_path("output:out", &inner, name)
        }
    }

    fn type_with_refs<'a>(
        &self,
        base: &str,
        references: impl IntoIterator<Item = &'a StorePath>,
        self_reference: bool,
    ) -> String {
        // Nix sorts references as printed absolute paths; within one store dir that
        // equals sorting base names, but sort the printed form to be exact.
        let mut refs: Vec<String> = references.into_iter().map(|p| self.print(p)).collect();
        refs.sort();
        let mut ty = base.to_string();
        for r in refs {
            ty.push(':');
            ty.push_str(&r);
        }
        if self_reference {
            ty.push_str(":self");
        }
        ty
    }
}

/// Name of an output's store path: `name` for `out`, `name-output` otherwise.
pub fn output_path_name(drv_name: &str, output: &str) -> String {
    if output == "out" {
        drv_name.to_string()
    } else {
        format!("{drv_name}-{output}")
    }
}

/// What the command line asks to realise: a plain store path, or a derivation with an
/// optional set of wanted outputs (`/nix/store/…-foo.drv!out,dev`; no list means all).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum DerivedPath {
    Opaque(StorePath),
    Built {
        drv: StorePath,
        outputs: Vec<String>,
    },
}

impl DerivedPath {
    pub fn parse(store: &StoreDir, s: &str) -> Result<DerivedPath, PathError> {
        match s.split_once('!') {
            Some((drv, outs)) => {
                let drv = store.parse(drv)?;
                let mut outputs = Vec::new();
                for o in outs.split(',') {
                    validate_name(o).map_err(|_| PathError::BadStorePath {
                        path: s.to_string(),
                        reason: format!("'{o}' is not a valid output name"),
                    })?;
                    if !outputs.iter().any(|x| x == o) {
                        outputs.push(o.to_string());
                    }
                }
                Ok(DerivedPath::Built { drv, outputs })
            }
            None => {
                let p = store.parse(s)?;
                if p.is_derivation() {
                    Ok(DerivedPath::Built {
                        drv: p,
                        outputs: vec![],
                    })
                } else {
                    Ok(DerivedPath::Opaque(p))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_nix_rules() {
        assert!(validate_name("hello-2.10").is_ok());
        assert!(validate_name("a+b=c?d_e.f").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name(".hidden").is_err());
        assert!(validate_name("has space").is_err());
        assert!(validate_name("has/slash").is_err());
        assert!(validate_name(&"x".repeat(211)).is_ok());
        assert!(validate_name(&"x".repeat(212)).is_err());
    }

    #[test]
    fn parse_rejects_foreign_and_malformed_paths() {
        let sd = StoreDir::new("/nix/store").unwrap();
        let good = "/nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-net-tools-1.60_p20170221182432";
        let p = sd.parse(good).unwrap();
        assert_eq!(p.name(), "net-tools-1.60_p20170221182432");
        assert_eq!(sd.print(&p), good);
        assert!(sd
            .parse("/nix/store2/00bgd045z0d4icpbc2yyz4gx48ak44la-x")
            .is_err());
        assert!(sd
            .parse("/nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-x/bin")
            .is_err());
        assert!(sd
            .parse("/nix/store/00bgd045z0d4icpbc2yyz4gx48ak44le-x")
            .is_err()); // 'e'
        assert_eq!(
            sd.parse_prefix("/nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-x/bin/x")
                .unwrap()
                .name(),
            "x"
        );
        assert!(StoreDir::new("relative").is_err());
        assert!(StoreDir::new("/nix/store/").is_err());
    }

    #[test]
    fn derived_path_syntax() {
        let sd = StoreDir::default();
        let d = "/nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-foo.drv";
        match DerivedPath::parse(&sd, &format!("{d}!out,dev,out")).unwrap() {
            DerivedPath::Built { outputs, .. } => assert_eq!(outputs, ["out", "dev"]),
            x => panic!("{x:?}"),
        }
        assert!(
            matches!(DerivedPath::parse(&sd, d).unwrap(), DerivedPath::Built { outputs, .. } if outputs.is_empty())
        );
        assert!(DerivedPath::parse(&sd, &format!("{d}!")).is_err());
    }
}
