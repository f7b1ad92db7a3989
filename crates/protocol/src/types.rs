//! The values operations carry, each reading and writing itself for a negotiated
//! version ([`Ctx`]). Formats (Nix 2.8 `worker_proto::read/write`, daemon.cc and
//! remote-store.cc; later gates from worker-protocol.cc of Nix 2.24):
//!
//! ```text
//! path           = str(<storedir>/<hash>-<name>)
//! opt path       = str(path or "")
//! paths          = u64(n) path*n                          (sorted: Nix sends std::set)
//! ValidPathInfo  = path UnkeyedValidPathInfo
//! Unkeyed…Info   = opt path(deriver) str(nar hash, base16) paths(references)
//!                  u64(registration time) u64(nar size)
//!                  u64(ultimate) strs(sigs) str(content address or "")   (>= 1.16)
//! DerivedPath    >= 1.30: str("path" | "drv!*" | "drv!out1,out2")
//!                <  1.30: str("path" | "drv" (all outputs) | "drv!out1,out2")
//! BuildMode      = u64(0 normal | 1 repair | 2 check)
//! BuildResult    = u64(status) str(error message)
//!                  u64(times built) u64(non-deterministic) u64(start) u64(stop)   (>= 1.29)
//!                  opt-µs(cpu user) opt-µs(cpu system)                          (>= 1.37)
//!                  u64(n) { str(drv output id) str(realisation json) }*n        (>= 1.28)
//! opt-µs         = u64(0) | u64(1) u64(microseconds)
//! BasicDerivation= u64(n) { str(name) str(path or "") str(hash algo) str(hash) }*n
//!                  paths(input sources) str(platform) str(builder) strs(args)
//!                  u64(n) { str(key) str(value) }*n
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};

use nixb_store::derivation::{Derivation, DerivationOutput, FixedOutputHash};
use nixb_store::path::validate_name;
use nixb_store::{Hash, HashAlgo, StoreDir, StorePath};

use crate::error::{ProtocolError, Result};
use crate::version::Version;
use crate::wire::{WireReader, WireWriter};

/// Longest printed store path accepted (a store directory of up to 3800 bytes, the hash,
/// and a 211-byte name).
pub const MAX_PATH_LEN: u64 = 4096;
/// Longest short string accepted: names, hashes, content addresses, signatures, settings.
pub const MAX_SHORT_LEN: u64 = 64 << 10;

/// What a connection agreed on: the version, the features (1.38), and the store
/// directory paths are printed in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ctx {
    pub version: Version,
    pub features: BTreeSet<String>,
    pub store_dir: StoreDir,
}

impl Ctx {
    pub fn new(version: Version, store_dir: StoreDir) -> Ctx {
        Ctx {
            version,
            features: BTreeSet::new(),
            store_dir,
        }
    }

    /// `version >= 1.minor`, to write gates as `if cx.at_least(25)`.
    pub fn at_least(&self, minor: u8) -> bool {
        self.version.at_least(minor)
    }

    pub fn read_path<R: Read>(
        &self,
        r: &mut WireReader<R>,
        what: &'static str,
    ) -> Result<StorePath> {
        let s = r.read_string_max(what, MAX_PATH_LEN)?;
        self.parse_path(&s, what)
    }

    pub fn parse_path(&self, s: &str, what: &'static str) -> Result<StorePath> {
        self.store_dir
            .parse(s)
            .map_err(|source| ProtocolError::Path {
                what,
                value: s.to_string(),
                source,
            })
    }

    pub fn write_path<W: Write>(
        &self,
        w: &mut WireWriter<W>,
        p: &StorePath,
        what: &'static str,
    ) -> Result<()> {
        w.write_str(&self.store_dir.print(p), what)?;
        Ok(())
    }

    pub fn read_opt_path<R: Read>(
        &self,
        r: &mut WireReader<R>,
        what: &'static str,
    ) -> Result<Option<StorePath>> {
        let s = r.read_string_max(what, MAX_PATH_LEN)?;
        if s.is_empty() {
            return Ok(None);
        }
        self.parse_path(&s, what).map(Some)
    }

    pub fn write_opt_path<W: Write>(
        &self,
        w: &mut WireWriter<W>,
        p: Option<&StorePath>,
        what: &'static str,
    ) -> Result<()> {
        match p {
            Some(p) => self.write_path(w, p, what),
            None => Ok(w.write_str("", what)?),
        }
    }

    pub fn read_paths<R: Read>(
        &self,
        r: &mut WireReader<R>,
        what: &'static str,
    ) -> Result<BTreeSet<StorePath>> {
        let n = r.read_count(what, 8)?;
        let mut set = BTreeSet::new();
        for _ in 0..n {
            set.insert(self.read_path(r, what)?);
        }
        Ok(set)
    }

    pub fn write_paths<'a, W: Write>(
        &self,
        w: &mut WireWriter<W>,
        paths: impl ExactSizeIterator<Item = &'a StorePath>,
        what: &'static str,
    ) -> Result<()> {
        w.write_u64(paths.len() as u64, what)?;
        for p in paths {
            self.write_path(w, p, what)?;
        }
        Ok(())
    }
}

/// A set of short strings (signatures, output names).
pub(crate) fn read_short_set<R: Read>(
    r: &mut WireReader<R>,
    what: &'static str,
) -> Result<BTreeSet<String>> {
    Ok(r.read_strings_max(what, MAX_SHORT_LEN)?
        .into_iter()
        .collect())
}

pub(crate) fn write_set<W: Write>(
    w: &mut WireWriter<W>,
    set: &BTreeSet<String>,
    what: &'static str,
) -> Result<()> {
    w.write_strings(set.iter().map(|s| s.as_str()), what)?;
    Ok(())
}

pub(crate) fn read_enum<R: Read>(
    r: &mut WireReader<R>,
    what: &'static str,
    max: u64,
) -> Result<u64> {
    let offset = r.offset();
    let value = r.read_u64(what)?;
    if value > max {
        return Err(ProtocolError::UnknownValue {
            what,
            value,
            offset,
        });
    }
    Ok(value)
}

/// A path's metadata without the path (`UnkeyedValidPathInfo`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathInfo {
    pub deriver: Option<StorePath>,
    /// SHA-256 of the NAR serialisation.
    pub nar_hash: Hash,
    pub references: BTreeSet<StorePath>,
    pub registration_time: u64,
    pub nar_size: u64,
    /// From 1.16 (every version nixb speaks): built here rather than substituted.
    pub ultimate: bool,
    pub sigs: BTreeSet<String>,
    /// Content address (`text:sha256:…`, `fixed:r:sha256:…`), `None` for input-addressed.
    pub ca: Option<String>,
}

impl PathInfo {
    pub fn read<R: Read>(r: &mut WireReader<R>, cx: &Ctx) -> Result<PathInfo> {
        let deriver = cx.read_opt_path(r, "deriver")?;
        let h = r.read_string_max("nar hash", MAX_SHORT_LEN)?;
        let nar_hash =
            Hash::parse_with_algo(&h, HashAlgo::Sha256).map_err(|e| ProtocolError::Field {
                what: "nar hash",
                value: h.clone(),
                reason: e.to_string(),
            })?;
        let references = cx.read_paths(r, "references")?;
        let registration_time = r.read_u64("registration time")?;
        let nar_size = r.read_u64("nar size")?;
        // Gate 1.16 (ultimate, sigs, ca): below nixb's floor, so always present.
        let ultimate = r.read_bool("ultimate")?;
        let sigs = read_short_set(r, "signatures")?;
        let ca = r.read_string_max("content address", MAX_SHORT_LEN)?;
        Ok(PathInfo {
            deriver,
            nar_hash,
            references,
            registration_time,
            nar_size,
            ultimate,
            sigs,
            ca: (!ca.is_empty()).then_some(ca),
        })
    }

    pub fn write<W: Write>(&self, w: &mut WireWriter<W>, cx: &Ctx) -> Result<()> {
        cx.write_opt_path(w, self.deriver.as_ref(), "deriver")?;
        w.write_str(&self.nar_hash.to_hex(), "nar hash")?;
        cx.write_paths(w, self.references.iter(), "references")?;
        w.write_u64(self.registration_time, "registration time")?;
        w.write_u64(self.nar_size, "nar size")?;
        w.write_bool(self.ultimate, "ultimate")?;
        write_set(w, &self.sigs, "signatures")?;
        w.write_str(self.ca.as_deref().unwrap_or(""), "content address")?;
        Ok(())
    }
}

/// `ValidPathInfo`: a path and its metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidPathInfo {
    pub path: StorePath,
    pub info: PathInfo,
}

impl ValidPathInfo {
    pub fn read<R: Read>(r: &mut WireReader<R>, cx: &Ctx) -> Result<ValidPathInfo> {
        let path = cx.read_path(r, "path")?;
        let info = PathInfo::read(r, cx)?;
        Ok(ValidPathInfo { path, info })
    }

    pub fn write<W: Write>(&self, w: &mut WireWriter<W>, cx: &Ctx) -> Result<()> {
        cx.write_path(w, &self.path, "path")?;
        self.info.write(w, cx)
    }
}

/// Which outputs of a derivation are wanted.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum OutputsSpec {
    All,
    /// In the order given (Nix sends them sorted).
    Names(Vec<String>),
}

/// What to build or fetch: a store path as it is, or outputs of a derivation.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DerivedPath {
    Opaque(StorePath),
    Built {
        drv: StorePath,
        outputs: OutputsSpec,
    },
}

impl DerivedPath {
    /// Parses the wire form for `version` (the `^` syntax of newer command lines never
    /// appears on the wire: Nix sends its legacy `!` form at every version).
    pub fn parse(cx: &Ctx, s: &str) -> Result<DerivedPath> {
        match s.split_once('!') {
            None => {
                let p = cx.parse_path(s, "derived path")?;
                // Before 1.30 a bare .drv meant "all its outputs".
                if !cx.at_least(30) && p.is_derivation() {
                    Ok(DerivedPath::Built {
                        drv: p,
                        outputs: OutputsSpec::All,
                    })
                } else {
                    Ok(DerivedPath::Opaque(p))
                }
            }
            Some((drv, outs)) => {
                let drv = cx.parse_path(drv, "derived path")?;
                let outputs = if outs == "*" && cx.at_least(30) {
                    OutputsSpec::All
                } else {
                    let mut names = Vec::new();
                    for o in outs.split(',') {
                        validate_name(o).map_err(|_| ProtocolError::Field {
                            what: "derived path",
                            value: s.to_string(),
                            reason: format!("'{o}' is not a valid output name"),
                        })?;
                        names.push(o.to_string());
                    }
                    OutputsSpec::Names(names)
                };
                Ok(DerivedPath::Built { drv, outputs })
            }
        }
    }

    /// The wire form for `version`; an error where that version cannot say it.
    pub fn to_wire(&self, cx: &Ctx) -> Result<String> {
        let sd = &cx.store_dir;
        match self {
            DerivedPath::Opaque(p) => {
                if !cx.at_least(30) && p.is_derivation() {
                    return Err(ProtocolError::NeedsVersion {
                        what: "asking for a derivation file itself",
                        needs: Version::new(1, 30),
                        version: cx.version,
                    });
                }
                Ok(sd.print(p))
            }
            DerivedPath::Built { drv, outputs } => Ok(match outputs {
                // 1.30 added "!*"; before, a bare .drv meant all outputs.
                OutputsSpec::All if cx.at_least(30) => format!("{}!*", sd.print(drv)),
                OutputsSpec::All => sd.print(drv),
                OutputsSpec::Names(n) => format!("{}!{}", sd.print(drv), n.join(",")),
            }),
        }
    }

    pub fn read<R: Read>(r: &mut WireReader<R>, cx: &Ctx) -> Result<DerivedPath> {
        let s = r.read_string_max("derived path", MAX_SHORT_LEN)?;
        DerivedPath::parse(cx, &s)
    }

    pub fn write<W: Write>(&self, w: &mut WireWriter<W>, cx: &Ctx) -> Result<()> {
        w.write_str(&self.to_wire(cx)?, "derived path")?;
        Ok(())
    }

    pub fn read_list<R: Read>(r: &mut WireReader<R>, cx: &Ctx) -> Result<Vec<DerivedPath>> {
        let n = r.read_count("derived paths", 8)?;
        let mut v = Vec::new();
        for _ in 0..n {
            v.push(DerivedPath::read(r, cx)?);
        }
        Ok(v)
    }

    pub fn write_list<W: Write>(
        w: &mut WireWriter<W>,
        cx: &Ctx,
        paths: &[DerivedPath],
    ) -> Result<()> {
        w.write_u64(paths.len() as u64, "derived paths")?;
        for p in paths {
            p.write(w, cx)?;
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BuildMode {
    #[default]
    Normal = 0,
    Repair = 1,
    Check = 2,
}

impl BuildMode {
    pub fn read<R: Read>(r: &mut WireReader<R>) -> Result<BuildMode> {
        Ok(match read_enum(r, "build mode", 2)? {
            0 => BuildMode::Normal,
            1 => BuildMode::Repair,
            _ => BuildMode::Check,
        })
    }

    pub fn write<W: Write>(self, w: &mut WireWriter<W>) -> Result<()> {
        w.write_u64(self as u64, "build mode")?;
        Ok(())
    }
}

/// `BuildResult::Status` (build-result.hh).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BuildStatus {
    Built = 0,
    Substituted = 1,
    AlreadyValid = 2,
    PermanentFailure = 3,
    InputRejected = 4,
    OutputRejected = 5,
    TransientFailure = 6,
    CachedFailure = 7,
    TimedOut = 8,
    MiscFailure = 9,
    DependencyFailed = 10,
    LogLimitExceeded = 11,
    NotDeterministic = 12,
    ResolvesToAlreadyValid = 13,
    NoSubstituters = 14,
}

impl BuildStatus {
    pub fn from_u64(n: u64) -> Option<BuildStatus> {
        use BuildStatus::*;
        Some(match n {
            0 => Built,
            1 => Substituted,
            2 => AlreadyValid,
            3 => PermanentFailure,
            4 => InputRejected,
            5 => OutputRejected,
            6 => TransientFailure,
            7 => CachedFailure,
            8 => TimedOut,
            9 => MiscFailure,
            10 => DependencyFailed,
            11 => LogLimitExceeded,
            12 => NotDeterministic,
            13 => ResolvesToAlreadyValid,
            14 => NoSubstituters,
            _ => return None,
        })
    }

    pub fn is_success(self) -> bool {
        matches!(
            self,
            BuildStatus::Built
                | BuildStatus::Substituted
                | BuildStatus::AlreadyValid
                | BuildStatus::ResolvesToAlreadyValid
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildResult {
    pub status: BuildStatus,
    pub error_msg: String,
    /// From 1.29.
    pub times_built: u64,
    pub is_non_deterministic: bool,
    pub start_time: u64,
    pub stop_time: u64,
    /// From 1.37: CPU time of the build, in microseconds.
    pub cpu_user: Option<i64>,
    pub cpu_system: Option<i64>,
    /// From 1.28: `sha256:<drv hash>!<output>` to the realisation as JSON (what Nix 2.8
    /// sends; `nix build` reads the output path from it).
    pub built_outputs: BTreeMap<String, String>,
}

impl BuildResult {
    pub fn new(status: BuildStatus) -> BuildResult {
        BuildResult {
            status,
            error_msg: String::new(),
            times_built: 0,
            is_non_deterministic: false,
            start_time: 0,
            stop_time: 0,
            cpu_user: None,
            cpu_system: None,
            built_outputs: BTreeMap::new(),
        }
    }

    /// The realisation JSON Nix 2.8 puts in `built_outputs` for an output of an
    /// input-addressed derivation: `{"dependentRealisations":{},"id":…,"outPath":…,"signatures":[]}`.
    pub fn realisation_json(id: &str, out_path: &StorePath) -> String {
        format!(
            "{{\"dependentRealisations\":{{}},\"id\":{},\"outPath\":{},\"signatures\":[]}}",
            json_string(id),
            json_string(out_path.base_name())
        )
    }

    pub fn read<R: Read>(r: &mut WireReader<R>, cx: &Ctx) -> Result<BuildResult> {
        let offset = r.offset();
        let n = r.read_u64("build status")?;
        let status = BuildStatus::from_u64(n).ok_or(ProtocolError::UnknownValue {
            what: "build status",
            value: n,
            offset,
        })?;
        let mut res = BuildResult::new(status);
        res.error_msg = r.read_string("build error message")?;
        if cx.at_least(29) {
            res.times_built = r.read_u64("times built")?;
            res.is_non_deterministic = r.read_bool("non-deterministic")?;
            res.start_time = r.read_u64("start time")?;
            res.stop_time = r.read_u64("stop time")?;
        }
        if cx.at_least(37) {
            res.cpu_user = read_opt_micros(r, "cpu user")?;
            res.cpu_system = read_opt_micros(r, "cpu system")?;
        }
        if cx.at_least(28) {
            let n = r.read_count("built outputs", 16)?;
            for _ in 0..n {
                let id = r.read_string_max("drv output id", MAX_SHORT_LEN)?;
                let json = r.read_string_max("realisation", MAX_SHORT_LEN)?;
                res.built_outputs.insert(id, json);
            }
        }
        Ok(res)
    }

    pub fn write<W: Write>(&self, w: &mut WireWriter<W>, cx: &Ctx) -> Result<()> {
        w.write_u64(self.status as u64, "build status")?;
        w.write_str(&self.error_msg, "build error message")?;
        if cx.at_least(29) {
            w.write_u64(self.times_built, "times built")?;
            w.write_bool(self.is_non_deterministic, "non-deterministic")?;
            w.write_u64(self.start_time, "start time")?;
            w.write_u64(self.stop_time, "stop time")?;
        }
        if cx.at_least(37) {
            write_opt_micros(w, self.cpu_user, "cpu user")?;
            write_opt_micros(w, self.cpu_system, "cpu system")?;
        }
        if cx.at_least(28) {
            w.write_string_map(&self.built_outputs, "built outputs")?;
        }
        Ok(())
    }
}

fn read_opt_micros<R: Read>(r: &mut WireReader<R>, what: &'static str) -> Result<Option<i64>> {
    Ok(match read_enum(r, what, 1)? {
        0 => None,
        _ => Some(r.read_u64(what)? as i64),
    })
}

fn write_opt_micros<W: Write>(
    w: &mut WireWriter<W>,
    v: Option<i64>,
    what: &'static str,
) -> Result<()> {
    match v {
        None => w.write_u64(0, what)?,
        Some(n) => {
            w.write_u64(1, what)?;
            w.write_u64(n as u64, what)?;
        }
    }
    Ok(())
}

fn json_string(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// A `BuildResult` with the path it answers (`BuildPathsWithResults`, 1.34).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyedBuildResult {
    pub path: DerivedPath,
    pub result: BuildResult,
}

impl KeyedBuildResult {
    pub fn read<R: Read>(r: &mut WireReader<R>, cx: &Ctx) -> Result<KeyedBuildResult> {
        let path = DerivedPath::read(r, cx)?;
        let result = BuildResult::read(r, cx)?;
        Ok(KeyedBuildResult { path, result })
    }

    pub fn write<W: Write>(&self, w: &mut WireWriter<W>, cx: &Ctx) -> Result<()> {
        self.path.write(w, cx)?;
        self.result.write(w, cx)
    }
}

/// One output of a `BasicDerivation` as it travels: path (empty when deferred or
/// floating), hash algorithm (`[r:]sha256`, empty when input-addressed) and hash (base16).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WireOutput {
    pub path: Option<StorePath>,
    pub hash_algo: String,
    pub hash: String,
}

/// A derivation without its input derivations (`BuildDerivation`): the caller has
/// resolved them into input sources.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BasicDerivation {
    pub outputs: BTreeMap<String, WireOutput>,
    pub input_srcs: BTreeSet<StorePath>,
    pub platform: String,
    pub builder: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
}

impl BasicDerivation {
    pub fn read<R: Read>(r: &mut WireReader<R>, cx: &Ctx) -> Result<BasicDerivation> {
        let n = r.read_count("outputs", 32)?;
        let mut outputs = BTreeMap::new();
        for _ in 0..n {
            let name = r.read_string_max("output name", MAX_SHORT_LEN)?;
            let path = cx.read_opt_path(r, "output path")?;
            let hash_algo = r.read_string_max("output hash algorithm", MAX_SHORT_LEN)?;
            let hash = r.read_string_max("output hash", MAX_SHORT_LEN)?;
            if outputs
                .insert(
                    name.clone(),
                    WireOutput {
                        path,
                        hash_algo,
                        hash,
                    },
                )
                .is_some()
            {
                return Err(ProtocolError::Field {
                    what: "derivation output",
                    value: name,
                    reason: "listed twice".into(),
                });
            }
        }
        let input_srcs = cx.read_paths(r, "input sources")?;
        let platform = r.read_string_max("platform", MAX_SHORT_LEN)?;
        let builder = r.read_string("builder")?;
        let args = r.read_strings("arguments")?;
        let n = r.read_count("environment", 16)?;
        let mut env = BTreeMap::new();
        for _ in 0..n {
            let k = r.read_string("environment name")?;
            let v = r.read_string("environment value")?;
            env.insert(k, v);
        }
        Ok(BasicDerivation {
            outputs,
            input_srcs,
            platform,
            builder,
            args,
            env,
        })
    }

    pub fn write<W: Write>(&self, w: &mut WireWriter<W>, cx: &Ctx) -> Result<()> {
        w.write_u64(self.outputs.len() as u64, "outputs")?;
        for (name, o) in &self.outputs {
            w.write_str(name, "output name")?;
            cx.write_opt_path(w, o.path.as_ref(), "output path")?;
            w.write_str(&o.hash_algo, "output hash algorithm")?;
            w.write_str(&o.hash, "output hash")?;
        }
        cx.write_paths(w, self.input_srcs.iter(), "input sources")?;
        w.write_str(&self.platform, "platform")?;
        w.write_str(&self.builder, "builder")?;
        w.write_strings(self.args.iter().map(|s| s.as_str()), "arguments")?;
        w.write_string_map(&self.env, "environment")?;
        Ok(())
    }

    /// The wire form of a store derivation (its input derivations must already be
    /// resolved into `input_srcs` by the caller; they are dropped here).
    pub fn from_derivation(drv: &Derivation) -> BasicDerivation {
        BasicDerivation {
            outputs: drv
                .outputs
                .iter()
                .map(|(name, o)| {
                    let (hash_algo, hash) = match &o.fixed {
                        Some(f) => (f.method_algo(), f.hash.to_hex()),
                        None => (String::new(), String::new()),
                    };
                    (
                        name.clone(),
                        WireOutput {
                            path: o.path.clone(),
                            hash_algo,
                            hash,
                        },
                    )
                })
                .collect(),
            input_srcs: drv.input_srcs.clone(),
            platform: drv.platform.clone(),
            builder: drv.builder.clone(),
            args: drv.args.clone(),
            env: drv.env.clone(),
        }
    }

    /// As a store derivation without input derivations; an error for outputs nixb does
    /// not build (floating content-addressed ones).
    pub fn to_derivation(&self) -> Result<Derivation> {
        let mut outputs = BTreeMap::new();
        for (name, o) in &self.outputs {
            let fixed = if o.hash_algo.is_empty() && o.hash.is_empty() {
                None
            } else {
                Some(
                    FixedOutputHash::parse(&o.hash_algo, &o.hash).map_err(|reason| {
                        ProtocolError::Field {
                            what: "derivation output",
                            value: name.clone(),
                            reason,
                        }
                    })?,
                )
            };
            outputs.insert(
                name.clone(),
                DerivationOutput {
                    path: o.path.clone(),
                    fixed,
                },
            );
        }
        Ok(Derivation {
            outputs,
            input_drvs: BTreeMap::new(),
            input_srcs: self.input_srcs.clone(),
            platform: self.platform.clone(),
            builder: self.builder.clone(),
            args: self.args.clone(),
            env: self.env.clone(),
        })
    }
}

/// The client's settings (`SetOptions`), with the obsolete fields kept as sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientSettings {
    pub keep_failed: bool,
    pub keep_going: bool,
    pub try_fallback: bool,
    pub verbosity: u64,
    pub max_build_jobs: u64,
    pub max_silent_time: u64,
    /// Obsolete `useBuildHook` (clients send 1).
    pub use_build_hook: u64,
    /// `lvlError` (0) when the client wants build output (`-L`), `lvlVomit` (7) otherwise.
    pub build_verbosity: u64,
    /// Obsolete `logType` and `printBuildTrace` (clients send 0).
    pub log_type: u64,
    pub print_build_trace: u64,
    pub build_cores: u64,
    pub use_substitutes: bool,
    /// `--option NAME VALUE` and changed settings.
    pub overrides: BTreeMap<String, String>,
}

impl Default for ClientSettings {
    fn default() -> ClientSettings {
        ClientSettings {
            keep_failed: false,
            keep_going: false,
            try_fallback: false,
            verbosity: 3,
            max_build_jobs: 1,
            max_silent_time: 0,
            use_build_hook: 1,
            build_verbosity: 7,
            log_type: 0,
            print_build_trace: 0,
            build_cores: 0,
            use_substitutes: true,
            overrides: BTreeMap::new(),
        }
    }
}

impl ClientSettings {
    pub fn verbose_build(&self) -> bool {
        self.build_verbosity == 0
    }

    pub fn read<R: Read>(r: &mut WireReader<R>, _cx: &Ctx) -> Result<ClientSettings> {
        let keep_failed = r.read_bool("keep failed")?;
        let keep_going = r.read_bool("keep going")?;
        let try_fallback = r.read_bool("try fallback")?;
        let verbosity = r.read_u64("verbosity")?;
        let max_build_jobs = r.read_u64("max build jobs")?;
        let max_silent_time = r.read_u64("max silent time")?;
        let use_build_hook = r.read_u64("use build hook")?;
        let build_verbosity = r.read_u64("build verbosity")?;
        let log_type = r.read_u64("log type")?;
        let print_build_trace = r.read_u64("print build trace")?;
        let build_cores = r.read_u64("build cores")?;
        let use_substitutes = r.read_bool("use substitutes")?;
        // Gate 1.12 (overrides): below nixb's floor, so always present.
        let n = r.read_count("overrides", 16)?;
        let mut overrides = BTreeMap::new();
        for _ in 0..n {
            let k = r.read_string_max("setting name", MAX_SHORT_LEN)?;
            let v = r.read_string("setting value")?;
            overrides.insert(k, v);
        }
        Ok(ClientSettings {
            keep_failed,
            keep_going,
            try_fallback,
            verbosity,
            max_build_jobs,
            max_silent_time,
            use_build_hook,
            build_verbosity,
            log_type,
            print_build_trace,
            build_cores,
            use_substitutes,
            overrides,
        })
    }

    pub fn write<W: Write>(&self, w: &mut WireWriter<W>, _cx: &Ctx) -> Result<()> {
        w.write_bool(self.keep_failed, "keep failed")?;
        w.write_bool(self.keep_going, "keep going")?;
        w.write_bool(self.try_fallback, "try fallback")?;
        w.write_u64(self.verbosity, "verbosity")?;
        w.write_u64(self.max_build_jobs, "max build jobs")?;
        w.write_u64(self.max_silent_time, "max silent time")?;
        w.write_u64(self.use_build_hook, "use build hook")?;
        w.write_u64(self.build_verbosity, "build verbosity")?;
        w.write_u64(self.log_type, "log type")?;
        w.write_u64(self.print_build_trace, "print build trace")?;
        w.write_u64(self.build_cores, "build cores")?;
        w.write_bool(self.use_substitutes, "use substitutes")?;
        w.write_string_map(&self.overrides, "overrides")?;
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GcAction {
    ReturnLive = 0,
    ReturnDead = 1,
    DeleteDead = 2,
    DeleteSpecific = 3,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GcOptions {
    pub action: GcAction,
    pub paths_to_delete: BTreeSet<StorePath>,
    pub ignore_liveness: bool,
    pub max_freed: u64,
}

impl GcOptions {
    pub fn read<R: Read>(r: &mut WireReader<R>, cx: &Ctx) -> Result<GcOptions> {
        let action = match read_enum(r, "gc action", 3)? {
            0 => GcAction::ReturnLive,
            1 => GcAction::ReturnDead,
            2 => GcAction::DeleteDead,
            _ => GcAction::DeleteSpecific,
        };
        let paths_to_delete = cx.read_paths(r, "paths to delete")?;
        let ignore_liveness = r.read_bool("ignore liveness")?;
        let max_freed = r.read_u64("max freed")?;
        // Three obsolete fields (clients send 0).
        for _ in 0..3 {
            r.read_u64("obsolete gc option")?;
        }
        Ok(GcOptions {
            action,
            paths_to_delete,
            ignore_liveness,
            max_freed,
        })
    }

    pub fn write<W: Write>(&self, w: &mut WireWriter<W>, cx: &Ctx) -> Result<()> {
        w.write_u64(self.action as u64, "gc action")?;
        cx.write_paths(w, self.paths_to_delete.iter(), "paths to delete")?;
        w.write_bool(self.ignore_liveness, "ignore liveness")?;
        w.write_u64(self.max_freed, "max freed")?;
        for _ in 0..3 {
            w.write_u64(0, "obsolete gc option")?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct GcResults {
    /// Printed paths (deleted, or live/dead for the `Return*` actions).
    pub paths: BTreeSet<String>,
    pub bytes_freed: u64,
}

impl GcResults {
    pub fn read<R: Read>(r: &mut WireReader<R>) -> Result<GcResults> {
        let paths = r
            .read_strings_max("gc paths", MAX_PATH_LEN)?
            .into_iter()
            .collect();
        let bytes_freed = r.read_u64("bytes freed")?;
        r.read_u64("obsolete gc result")?;
        Ok(GcResults { paths, bytes_freed })
    }

    pub fn write<W: Write>(&self, w: &mut WireWriter<W>) -> Result<()> {
        write_set(w, &self.paths, "gc paths")?;
        w.write_u64(self.bytes_freed, "bytes freed")?;
        w.write_u64(0, "obsolete gc result")?;
        Ok(())
    }
}

/// What a substituter offers for a path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubstitutablePathInfo {
    pub deriver: Option<StorePath>,
    pub references: BTreeSet<StorePath>,
    pub download_size: u64,
    pub nar_size: u64,
}

/// `QueryMissing`'s answer.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Missing {
    pub will_build: BTreeSet<StorePath>,
    pub will_substitute: BTreeSet<StorePath>,
    pub unknown: BTreeSet<StorePath>,
    pub download_size: u64,
    pub nar_size: u64,
}
