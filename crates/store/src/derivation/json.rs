//! Derivations as JSON: the object `nix show-derivation` (Nix 2.8) prints under each
//! `.drv` path.
//!
//! ```text
//! { "outputs":   { <name>: { "path": <abs path>, ["hashAlgo": "[r:]<algo>", "hash": <base16>] } },
//!   "inputSrcs": [ <abs path> ],
//!   "inputDrvs": { <abs drv path>: [ <output name> ] },
//!   "system": <string>, "builder": <string>, "args": [ <string> ], "env": { <key>: <value> } }
//! ```
//!
//! Keys come out in that order, as Nix prints them. An output whose path is not yet known
//! is `{}`, again as Nix prints a deferred output.
//!
//! The reader also takes what later Nix versions print, so that `nixb derivation add` accepts
//! their output too: a top-level `"name"` (checked against `env.name`), outputs with a separate
//! `"method": "flat" | "nar"` and a bare `"hashAlgo"`, and input derivations written as
//! `{"outputs": [...], "dynamicOutputs": {}}`. `inputSrcs`, `inputDrvs`, `args` and `env` may be
//! left out when empty. Unknown keys are errors rather than silently dropped.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value};

use super::{check_output_name, Derivation, DerivationOutput, DrvError, FixedOutputHash};
use crate::path::{StoreDir, StorePath};

pub(super) fn to_json(drv: &Derivation, store: &StoreDir) -> Value {
    let mut outputs = Map::new();
    for (name, out) in &drv.outputs {
        let mut o = Map::new();
        if let Some(p) = &out.path {
            o.insert("path".into(), store.print(p).into());
        }
        if let Some(f) = &out.fixed {
            o.insert("hashAlgo".into(), f.method_algo().into());
            o.insert("hash".into(), f.hash.to_hex().into());
        }
        outputs.insert(name.clone(), Value::Object(o));
    }
    let input_srcs: Vec<Value> = drv
        .input_srcs
        .iter()
        .map(|p| store.print(p).into())
        .collect();
    let input_drvs: Map<String, Value> = drv
        .input_drvs
        .iter()
        .map(|(p, outs)| {
            (
                store.print(p),
                outs.iter().cloned().collect::<Vec<_>>().into(),
            )
        })
        .collect();
    let env: Map<String, Value> = drv
        .env
        .iter()
        .map(|(k, v)| (k.clone(), v.clone().into()))
        .collect();

    let mut top = Map::new();
    top.insert("outputs".into(), Value::Object(outputs));
    top.insert("inputSrcs".into(), input_srcs.into());
    top.insert("inputDrvs".into(), Value::Object(input_drvs));
    top.insert("system".into(), drv.platform.clone().into());
    top.insert("builder".into(), drv.builder.clone().into());
    top.insert("args".into(), drv.args.clone().into());
    top.insert("env".into(), Value::Object(env));
    Value::Object(top)
}

struct Reader<'a> {
    store: &'a StoreDir,
    origin: &'a str,
}

impl Reader<'_> {
    fn err(&self, field: &str, msg: impl Into<String>) -> DrvError {
        DrvError::Json {
            origin: self.origin.to_string(),
            field: field.to_string(),
            msg: msg.into(),
        }
    }

    fn object<'v>(&self, v: &'v Value, field: &str) -> Result<&'v Map<String, Value>, DrvError> {
        v.as_object()
            .ok_or_else(|| self.err(field, format!("expected an object, found {}", kind(v))))
    }

    fn array<'v>(&self, v: &'v Value, field: &str) -> Result<&'v Vec<Value>, DrvError> {
        v.as_array()
            .ok_or_else(|| self.err(field, format!("expected an array, found {}", kind(v))))
    }

    fn string<'v>(&self, v: &'v Value, field: &str) -> Result<&'v str, DrvError> {
        v.as_str()
            .ok_or_else(|| self.err(field, format!("expected a string, found {}", kind(v))))
    }

    fn path(&self, s: &str, field: &str) -> Result<StorePath, DrvError> {
        self.store
            .parse(s)
            .map_err(|e| self.err(field, e.to_string()))
    }

    fn output_names(&self, v: &Value, field: &str) -> Result<BTreeSet<String>, DrvError> {
        let mut outs = BTreeSet::new();
        for (i, o) in self.array(v, field)?.iter().enumerate() {
            let f = format!("{field}[{i}]");
            let o = self.string(o, &f)?;
            check_output_name(o).map_err(|m| self.err(&f, m))?;
            if !outs.insert(o.to_string()) {
                return Err(self.err(&f, format!("duplicate output '{o}'")));
            }
        }
        Ok(outs)
    }

    fn output(&self, v: &Value, field: &str) -> Result<DerivationOutput, DrvError> {
        let o = self.object(v, field)?;
        let mut path = None;
        let (mut method, mut algo, mut hash) = (None, None, None);
        for (k, v) in o {
            let f = format!("{field}.{k}");
            match k.as_str() {
                "path" => {
                    let s = self.string(v, &f)?;
                    if !s.is_empty() {
                        path = Some(self.path(s, &f)?);
                    }
                }
                "method" => method = Some(self.string(v, &f)?),
                "hashAlgo" => algo = Some(self.string(v, &f)?),
                "hash" => hash = Some(self.string(v, &f)?),
                _ => return Err(self.err(&f, "unknown key")),
            }
        }
        let fixed = match (method, algo, hash) {
            (None, None, None) => None,
            (_, Some(_), None) => return Err(self.err(
                field,
                "content-addressed outputs without a fixed hash (ca-derivations) are not supported",
            )),
            (_, None, Some(_)) => return Err(self.err(field, "'hash' without 'hashAlgo'")),
            (Some(_), None, None) => {
                return Err(self.err(field, "'method' without 'hashAlgo' and 'hash'"))
            }
            (method, Some(algo), Some(hash)) => {
                // Later Nix prints the method apart from the algorithm; fold it into the
                // 2.8 form so one parser decides what is valid.
                let method_algo = match method {
                    None => algo.to_string(),
                    Some(_) if algo.contains(':') => {
                        return Err(self.err(
                            &format!("{field}.hashAlgo"),
                            format!("'{algo}' must be a bare algorithm when 'method' is given"),
                        ))
                    }
                    Some("nar") => format!("r:{algo}"),
                    Some("flat") => algo.to_string(),
                    Some(m) => {
                        return Err(self.err(
                            &format!("{field}.method"),
                            format!("unsupported method '{m}'"),
                        ))
                    }
                };
                Some(FixedOutputHash::parse(&method_algo, hash).map_err(|m| self.err(field, m))?)
            }
        };
        Ok(DerivationOutput { path, fixed })
    }
}

pub(super) fn from_json(store: &StoreDir, v: &Value, origin: &str) -> Result<Derivation, DrvError> {
    let r = Reader { store, origin };
    let top = r.object(v, "(top level)")?;
    let mut drv = Derivation {
        outputs: BTreeMap::new(),
        input_drvs: BTreeMap::new(),
        input_srcs: BTreeSet::new(),
        platform: String::new(),
        builder: String::new(),
        args: Vec::new(),
        env: BTreeMap::new(),
    };
    let (mut seen_outputs, mut seen_system, mut seen_builder) = (false, false, false);
    let mut name = None;
    for (k, v) in top {
        match k.as_str() {
            "outputs" => {
                seen_outputs = true;
                for (o, ov) in r.object(v, k)? {
                    let f = format!("outputs.{o}");
                    check_output_name(o).map_err(|m| r.err(&f, m))?;
                    drv.outputs.insert(o.clone(), r.output(ov, &f)?);
                }
            }
            "inputSrcs" => {
                for (i, p) in r.array(v, k)?.iter().enumerate() {
                    let f = format!("inputSrcs[{i}]");
                    let p = r.path(r.string(p, &f)?, &f)?;
                    if !drv.input_srcs.insert(p) {
                        return Err(r.err(&f, "duplicate input source"));
                    }
                }
            }
            "inputDrvs" => {
                for (p, outs) in r.object(v, k)? {
                    let f = format!("inputDrvs.{p}");
                    let path = r.path(p, &f)?;
                    let outs = match outs {
                        Value::Object(m) => {
                            for (mk, mv) in m {
                                match mk.as_str() {
                                    "outputs" => {}
                                    "dynamicOutputs"
                                        if mv.as_object().is_some_and(|d| d.is_empty()) => {}
                                    "dynamicOutputs" => {
                                        return Err(r.err(
                                            &format!("{f}.dynamicOutputs"),
                                            "dynamic derivations are not supported",
                                        ))
                                    }
                                    _ => return Err(r.err(&format!("{f}.{mk}"), "unknown key")),
                                }
                            }
                            let of = format!("{f}.outputs");
                            r.output_names(
                                m.get("outputs").ok_or_else(|| r.err(&of, "missing"))?,
                                &of,
                            )?
                        }
                        _ => r.output_names(outs, &f)?,
                    };
                    drv.input_drvs.insert(path, outs);
                }
            }
            "system" => {
                seen_system = true;
                drv.platform = r.string(v, k)?.to_string();
            }
            "builder" => {
                seen_builder = true;
                drv.builder = r.string(v, k)?.to_string();
            }
            "args" => {
                for (i, a) in r.array(v, k)?.iter().enumerate() {
                    drv.args
                        .push(r.string(a, &format!("args[{i}]"))?.to_string());
                }
            }
            "env" => {
                for (ek, ev) in r.object(v, k)? {
                    drv.env
                        .insert(ek.clone(), r.string(ev, &format!("env.{ek}"))?.to_string());
                }
            }
            "name" => name = Some(r.string(v, k)?),
            _ => return Err(r.err(k, "unknown key")),
        }
    }
    for (seen, key) in [
        (seen_outputs, "outputs"),
        (seen_system, "system"),
        (seen_builder, "builder"),
    ] {
        if !seen {
            return Err(r.err(key, "missing"));
        }
    }
    if let Some(n) = name {
        if drv.env.get("name").map(String::as_str) != Some(n) {
            return Err(r.err("name", format!("'{n}' differs from env.name")));
        }
    }
    Ok(drv)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
