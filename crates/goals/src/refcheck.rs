//! Reference restrictions a derivation may put on its outputs, in Nix 2.x's environment
//! variable forms (each a whitespace-separated list of store paths or output names):
//!
//! ```text
//! allowedReferences      every direct reference must be listed
//! disallowedReferences   no direct reference may be listed
//! allowedRequisites      every path of the output's closure must be listed
//! disallowedRequisites   no path of the output's closure may be listed
//! ```
//!
//! An output's own path is part of its closure; a self-reference counts as a reference.

use std::collections::{BTreeMap, BTreeSet};

use nixb_store::{StoreDir, StorePath};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RefCheckError {
    #[error("derivation contains an illegal reference specifier '{0}'")]
    BadSpecifier(String),
    #[error("output '{output}' is not allowed to refer to the following paths:{}", list(.bad))]
    NotAllowed { output: String, bad: Vec<String> },
}

fn list(paths: &[String]) -> String {
    paths.iter().map(|p| format!("\n  {p}")).collect()
}

/// Which of the four restrictions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Restriction {
    pub var: &'static str,
    pub allowed: bool,
    pub recursive: bool,
}

pub const RESTRICTIONS: [Restriction; 4] = [
    Restriction {
        var: "allowedReferences",
        allowed: true,
        recursive: false,
    },
    Restriction {
        var: "allowedRequisites",
        allowed: true,
        recursive: true,
    },
    Restriction {
        var: "disallowedReferences",
        allowed: false,
        recursive: false,
    },
    Restriction {
        var: "disallowedRequisites",
        allowed: false,
        recursive: true,
    },
];

/// Store paths named by a specifier list: absolute store paths or output names.
pub fn parse_specifiers(
    store: &StoreDir,
    value: &str,
    outputs: &BTreeMap<String, StorePath>,
) -> Result<BTreeSet<StorePath>, RefCheckError> {
    let mut set = BTreeSet::new();
    for word in value.split_ascii_whitespace() {
        if let Ok(p) = store.parse(word) {
            set.insert(p);
        } else if let Some(p) = outputs.get(word) {
            set.insert(p.clone());
        } else {
            return Err(RefCheckError::BadSpecifier(word.to_string()));
        }
    }
    Ok(set)
}

/// Checks one output against the restrictions in `env`. `references` are its direct
/// references, `closure` (only needed when a requisites variable is set) is its closure.
pub fn check_output(
    store: &StoreDir,
    env: &BTreeMap<String, String>,
    outputs: &BTreeMap<String, StorePath>,
    output: &StorePath,
    references: &BTreeSet<StorePath>,
    closure: &dyn Fn() -> BTreeSet<StorePath>,
) -> Result<(), RefCheckError> {
    for r in RESTRICTIONS {
        let Some(value) = env.get(r.var) else {
            continue;
        };
        let spec = parse_specifiers(store, value, outputs)?;
        let used = if r.recursive {
            closure()
        } else {
            references.clone()
        };
        let bad: Vec<String> = used
            .iter()
            .filter(|p| spec.contains(*p) != r.allowed)
            .map(|p| store.print(p))
            .collect();
        if !bad.is_empty() {
            return Err(RefCheckError::NotAllowed {
                output: store.print(output),
                bad,
            });
        }
    }
    Ok(())
}

/// Does the derivation restrict references at all (so the caller knows whether a closure
/// may be needed)?
pub fn needs_closure(env: &BTreeMap<String, String>) -> bool {
    RESTRICTIONS
        .iter()
        .any(|r| r.recursive && env.contains_key(r.var))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sp(c: char, name: &str) -> StorePath {
        StorePath::from_base_name(&format!("{}-{name}", c.to_string().repeat(32))).unwrap()
    }

    #[test]
    fn each_restriction_rejects_what_it_should() {
        let store = StoreDir::new("/s").unwrap();
        let (out, dep, other) = (sp('a', "out"), sp('b', "dep"), sp('c', "other"));
        let outputs = BTreeMap::from([("out".to_string(), out.clone())]);
        let refs = BTreeSet::from([dep.clone(), out.clone()]);
        let closure = || BTreeSet::from([out.clone(), dep.clone(), other.clone()]);
        let check = |var: &str, val: String| {
            let env = BTreeMap::from([(var.to_string(), val)]);
            check_output(&store, &env, &outputs, &out, &refs, &closure)
        };
        let dep_s = store.print(&dep);
        let other_s = store.print(&other);
        assert!(check("allowedReferences", format!("out {dep_s}")).is_ok());
        let e = check("allowedReferences", "out".into()).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "output '{}' is not allowed to refer to the following paths:\n  {dep_s}",
                store.print(&out)
            )
        );
        // The closure holds `other` through dep: fine for references, not for requisites.
        assert!(check("allowedRequisites", format!("out {dep_s}")).is_err());
        assert!(check("disallowedReferences", other_s.clone()).is_ok());
        assert!(check("disallowedRequisites", other_s).is_err());
        assert!(check("disallowedReferences", "out".into()).is_err());
        assert_eq!(
            check("allowedReferences", "bogus".into()),
            Err(RefCheckError::BadSpecifier("bogus".into()))
        );
    }
}
