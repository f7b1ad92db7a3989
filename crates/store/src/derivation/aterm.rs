//! The ATerm text of a `.drv` file, read and written byte for byte as Nix 2.8 does.
//!
//! ```text
//! drv      = "Derive(" "[" outputs "]" ",[" inputDrvs "]" ",[" inputSrcs "]"
//!            "," platform "," builder ",[" args "]" ",[" env "]" ")"
//! output   = "(" name "," path "," hashAlgo "," hash ")"   hashAlgo = "" | ["r:"] algo
//! inputDrv = "(" path ",[" outputName ("," outputName)* "]" ")"
//! env      = "(" key "," value ")"
//! string   = '"' (char | '\' char)* '"'
//! ```
//!
//! Lists are comma separated. Strings are escaped with `\"`, `\\`, `\n`, `\r` and `\t`;
//! every other byte, including other control characters and UTF-8, is written raw, and a
//! backslash before any other character stands for that character.
//!
//! Nix 2.8 does not escape every string it writes. Only the builder, the arguments and
//! the environment go through the escaping printer; output names, paths, hash fields,
//! input lists and *the platform* are written raw between quotes. For store paths and
//! output names that is harmless (they cannot hold `"` or `\`); for the platform it means
//! a system string with `"` or `\` yields a file Nix cannot read back. nixb prints the
//! same bytes, because output paths and `.drv` paths are hashes of exactly these bytes.
//!
//! Nix 2.8 writes no `DrvWithVersion(` form (that arrived with dynamic derivations), so it
//! is rejected here with its own message. Compared with Nix's reader this one is stricter
//! where leniency would only hide damage: it wants commas between list elements, no
//! duplicate keys, valid UTF-8 and nothing after the closing parenthesis.

use std::collections::{BTreeMap, BTreeSet};

use super::{check_output_name, Derivation, DerivationOutput, DrvError, FixedOutputHash};
use crate::path::{StoreDir, StorePath};

/// Replaces the input derivations when hashing modulo: base16 hash → wanted outputs.
pub(super) type HashedInputs = BTreeMap<String, BTreeSet<String>>;

/// Prints `drv`. With `mask_outputs`, output paths and the env vars named after outputs
/// are blanked; with `inputs`, those replace the input derivations (hashDerivationModulo).
pub(super) fn print(
    drv: &Derivation,
    store: &StoreDir,
    mask_outputs: bool,
    inputs: Option<&HashedInputs>,
) -> String {
    let mut s = String::with_capacity(1024);
    s.push_str("Derive([");
    for (i, (name, out)) in drv.outputs.iter().enumerate() {
        comma(&mut s, i);
        s.push('(');
        raw(&mut s, name);
        s.push(',');
        match (&out.path, mask_outputs) {
            (Some(p), false) => raw(&mut s, &store.print(p)),
            _ => raw(&mut s, ""),
        }
        s.push(',');
        match &out.fixed {
            Some(f) => {
                raw(&mut s, &f.method_algo());
                s.push(',');
                raw(&mut s, &f.hash.to_hex());
            }
            None => s.push_str("\"\",\"\""),
        }
        s.push(')');
    }
    s.push_str("],[");
    match inputs {
        Some(inputs) => {
            for (i, (hash, outs)) in inputs.iter().enumerate() {
                comma(&mut s, i);
                input_drv(&mut s, hash, outs);
            }
        }
        None => {
            for (i, (path, outs)) in drv.input_drvs.iter().enumerate() {
                comma(&mut s, i);
                input_drv(&mut s, &store.print(path), outs);
            }
        }
    }
    s.push_str("],[");
    for (i, p) in drv.input_srcs.iter().enumerate() {
        comma(&mut s, i);
        raw(&mut s, &store.print(p));
    }
    s.push_str("],");
    // Unescaped on purpose: see the module doc.
    raw(&mut s, &drv.platform);
    s.push(',');
    escaped(&mut s, &drv.builder);
    s.push_str(",[");
    for (i, a) in drv.args.iter().enumerate() {
        comma(&mut s, i);
        escaped(&mut s, a);
    }
    s.push_str("],[");
    for (i, (k, v)) in drv.env.iter().enumerate() {
        comma(&mut s, i);
        s.push('(');
        escaped(&mut s, k);
        s.push(',');
        if mask_outputs && drv.outputs.contains_key(k) {
            escaped(&mut s, "");
        } else {
            escaped(&mut s, v);
        }
        s.push(')');
    }
    s.push_str("])");
    s
}

fn comma(s: &mut String, i: usize) {
    if i > 0 {
        s.push(',');
    }
}

fn input_drv(s: &mut String, key: &str, outs: &BTreeSet<String>) {
    s.push('(');
    raw(s, key);
    s.push_str(",[");
    for (i, o) in outs.iter().enumerate() {
        comma(s, i);
        raw(s, o);
    }
    s.push_str("])");
}

fn raw(s: &mut String, v: &str) {
    s.push('"');
    s.push_str(v);
    s.push('"');
}

fn escaped(s: &mut String, v: &str) {
    s.push('"');
    for c in v.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            '\n' => s.push_str("\\n"),
            '\r' => s.push_str("\\r"),
            '\t' => s.push_str("\\t"),
            c => s.push(c),
        }
    }
    s.push('"');
}

/// Parses a whole `.drv` file; `origin` names it in errors.
pub(super) fn parse(store: &StoreDir, text: &[u8], origin: &str) -> Result<Derivation, DrvError> {
    let mut p = Parser {
        s: text,
        pos: 0,
        origin,
        store,
    };
    if text.starts_with(b"DrvWithVersion(") {
        return Err(p.err(0, "'DrvWithVersion(' derivations (dynamic derivations) are not supported, only nix 2.8's 'Derive('"));
    }
    p.literal(b"Derive(")?;

    let mut outputs = BTreeMap::new();
    p.list(|p| {
        let at = p.pos;
        p.byte(b'(')?;
        let name_at = p.pos;
        let name = p.string()?;
        check_output_name(&name).map_err(|m| p.err(name_at, m))?;
        p.byte(b',')?;
        let path_at = p.pos;
        let path = p.string()?;
        p.byte(b',')?;
        let algo_at = p.pos;
        let algo = p.string()?;
        p.byte(b',')?;
        let hash = p.string()?;
        p.byte(b')')?;
        let path = if path.is_empty() {
            None
        } else {
            Some(p.store_path(&path, path_at, "output path")?)
        };
        let fixed = match (algo.is_empty(), hash.is_empty()) {
            (true, true) => None,
            (true, false) => {
                return Err(p.err(
                    algo_at,
                    format!("output '{name}' has a hash but no hash algorithm"),
                ))
            }
            (false, _) => Some(
                FixedOutputHash::parse(&algo, &hash)
                    .map_err(|m| p.err(algo_at, format!("output '{name}': {m}")))?,
            ),
        };
        if outputs
            .insert(name.clone(), DerivationOutput { path, fixed })
            .is_some()
        {
            return Err(p.err(at, format!("duplicate output '{name}'")));
        }
        Ok(())
    })?;

    p.byte(b',')?;
    let mut input_drvs = BTreeMap::new();
    p.list(|p| {
        p.byte(b'(')?;
        let at = p.pos;
        let s = p.string()?;
        let path = p.store_path(&s, at, "input derivation")?;
        p.byte(b',')?;
        let mut outs = BTreeSet::new();
        p.list(|p| {
            let o_at = p.pos;
            let o = p.string()?;
            check_output_name(&o).map_err(|m| p.err(o_at, m))?;
            if !outs.insert(o.clone()) {
                return Err(p.err(o_at, format!("duplicate output '{o}' of input derivation")));
            }
            Ok(())
        })?;
        p.byte(b')')?;
        if input_drvs.insert(path, outs).is_some() {
            return Err(p.err(at, format!("duplicate input derivation '{s}'")));
        }
        Ok(())
    })?;

    p.byte(b',')?;
    let mut input_srcs = BTreeSet::new();
    p.list(|p| {
        let at = p.pos;
        let s = p.string()?;
        if !input_srcs.insert(p.store_path(&s, at, "input source")?) {
            return Err(p.err(at, format!("duplicate input source '{s}'")));
        }
        Ok(())
    })?;

    p.byte(b',')?;
    let platform = p.string()?;
    p.byte(b',')?;
    let builder = p.string()?;
    p.byte(b',')?;
    let mut args = Vec::new();
    p.list(|p| {
        args.push(p.string()?);
        Ok(())
    })?;

    p.byte(b',')?;
    let mut env = BTreeMap::new();
    p.list(|p| {
        p.byte(b'(')?;
        let at = p.pos;
        let k = p.string()?;
        p.byte(b',')?;
        let v = p.string()?;
        p.byte(b')')?;
        if env.contains_key(&k) {
            return Err(p.err(at, format!("duplicate environment variable '{k}'")));
        }
        env.insert(k, v);
        Ok(())
    })?;
    p.byte(b')')?;
    if p.pos != text.len() {
        return Err(p.err(p.pos, "unexpected data after the end of the derivation"));
    }
    Ok(Derivation {
        outputs,
        input_drvs,
        input_srcs,
        platform,
        builder,
        args,
        env,
    })
}

struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
    origin: &'a str,
    store: &'a StoreDir,
}

impl Parser<'_> {
    fn err(&self, offset: usize, msg: impl Into<String>) -> DrvError {
        DrvError::Parse {
            origin: self.origin.to_string(),
            offset,
            msg: msg.into(),
        }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn byte(&mut self, want: u8) -> Result<(), DrvError> {
        match self.peek() {
            Some(b) if b == want => {
                self.pos += 1;
                Ok(())
            }
            Some(b) => Err(self.err(
                self.pos,
                format!(
                    "expected '{}', found '{}'",
                    want as char,
                    (b as char).escape_default()
                ),
            )),
            None => Err(self.err(
                self.pos,
                format!("expected '{}', found end of file", want as char),
            )),
        }
    }

    fn literal(&mut self, lit: &[u8]) -> Result<(), DrvError> {
        for (i, &b) in lit.iter().enumerate() {
            if self.s.get(self.pos + i) != Some(&b) {
                return Err(self.err(
                    self.pos + i,
                    format!("expected '{}'", String::from_utf8_lossy(lit)),
                ));
            }
        }
        self.pos += lit.len();
        Ok(())
    }

    /// `[` item (`,` item)* `]`, or `[]`.
    fn list(
        &mut self,
        mut item: impl FnMut(&mut Self) -> Result<(), DrvError>,
    ) -> Result<(), DrvError> {
        self.byte(b'[')?;
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(());
        }
        loop {
            item(self)?;
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(());
                }
                Some(b) => {
                    return Err(self.err(
                        self.pos,
                        format!(
                            "expected ',' or ']', found '{}'",
                            (b as char).escape_default()
                        ),
                    ))
                }
                None => return Err(self.err(self.pos, "expected ',' or ']', found end of file")),
            }
        }
    }

    fn string(&mut self) -> Result<String, DrvError> {
        let start = self.pos;
        self.byte(b'"')?;
        let mut out = Vec::new();
        loop {
            let rest = &self.s[self.pos..];
            let Some(i) = memchr::memchr2(b'"', b'\\', rest) else {
                return Err(self.err(start, "unterminated string"));
            };
            out.extend_from_slice(&rest[..i]);
            self.pos += i;
            if rest[i] == b'"' {
                self.pos += 1;
                break;
            }
            // A backslash: the next byte is taken literally unless it names an escape.
            match self.s.get(self.pos + 1) {
                Some(b'n') => out.push(b'\n'),
                Some(b'r') => out.push(b'\r'),
                Some(b't') => out.push(b'\t'),
                Some(&c) => out.push(c),
                None => return Err(self.err(start, "unterminated string")),
            }
            self.pos += 2;
        }
        String::from_utf8(out).map_err(|_| self.err(start, "string is not valid utf-8"))
    }

    fn store_path(&self, s: &str, at: usize, what: &str) -> Result<StorePath, DrvError> {
        self.store
            .parse(s)
            .map_err(|e| self.err(at, format!("{what}: {e}")))
    }
}
