//! The `nix-store --serve` protocol as Nix 2.8 speaks it (version 2.7), in the
//! [`wire`](crate::wire) encoding. The connection opens with
//!
//! ```text
//! client: u64(SERVE_MAGIC_1) u64(client version)
//! server: u64(SERVE_MAGIC_2) u64(server version)
//! ```
//!
//! and each side then uses the lower of the two minor versions to decide which optional
//! fields are sent. Each request is `u64(command)` followed by its arguments; `paths` is
//! `strs` of absolute store paths:
//!
//! ```text
//! 1 QueryValidPaths   bool(lock) bool(substitute) paths       -> paths (the valid ones)
//! 2 QueryPathInfos    paths -> { str(path) str(deriver|"") paths(refs) u64(downloadSize)
//!                                u64(narSize) [>=4: str(narHash "sha256:<base32>")
//!                                str(ca|"") strs(sigs)] }* str("")
//! 3 DumpStorePath     str(path)                               -> <nar>
//! 4 ImportPaths       <export stream>                         -> u64(1)
//! 5 ExportPaths       u64(ignored) paths                      -> <export stream>
//! 6 BuildPaths        strs(path[!out,...]) options            -> u64(0) | u64(status) str(msg)
//! 7 QueryClosure      bool(includeOutputs) paths              -> paths
//! 8 BuildDerivation   str(drvPath) basicDrv options           -> result
//! 9 AddToStoreNar     str(path) str(deriver|"") str(narHash base16) paths(refs)
//!                     u64(registrationTime) u64(narSize) bool(ultimate) strs(sigs)
//!                     str(ca|"") <nar of narSize bytes>       -> u64(1)
//!
//! options   = u64(maxSilentTime) u64(buildTimeout) [>=2: u64(maxLogSize)]
//!             [>=3: u64(nrRepeats) bool(enforceDeterminism)] [>=7: bool(keepFailed)]
//! basicDrv  = u64(n) { str(name) str(path|"") str([r:]algo|"") str(hash base16|"") }*n
//!             paths(inputSrcs) str(platform) str(builder) strs(args)
//!             u64(n) { str(key) str(value) }*n
//! result    = u64(status) str(errorMsg) [>=3: u64(timesBuilt) bool(nonDeterministic)
//!             u64(startTime) u64(stopTime)] [>=6: u64(n) { str(drvOutput) str(json) }*n]
//! ```
//!
//! Quirk kept for compatibility: a Nix 2.8 server sends the built-outputs map whatever
//! the client's minor version (its version test is mis-parenthesised), so a client that
//! announced 2.7 must always read it, and nixb's server always sends it too.
//!
//! The build log is not part of the protocol: the remote `nix-store` writes it to its
//! standard error, which the transport (SSH, or a local child) carries separately.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};

use nixb_store::derivation::{Derivation, DerivationOutput, FixedOutputHash};
use nixb_store::local_store::ValidPathInfo;
use nixb_store::{Encoding, Hash, HashAlgo, StoreDir, StorePath};

use crate::error::ServeError;
use crate::wire::{WireReader, WireWriter};

pub const SERVE_MAGIC_1: u64 = 0x390c_9deb;
pub const SERVE_MAGIC_2: u64 = 0x5452_eecb;
/// 2.7, what Nix 2.8 speaks.
pub const SERVE_PROTOCOL_VERSION: u64 = 0x207;
/// Oldest peer accepted: 2.4 is the first to send NAR hashes with path infos, without
/// which nothing copied back could be verified.
pub const MIN_PROTOCOL_VERSION: u64 = 0x204;

pub fn protocol_minor(v: u64) -> u64 {
    v & 0xff
}

pub fn protocol_major(v: u64) -> u64 {
    v & 0xff00
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum Command {
    QueryValidPaths = 1,
    QueryPathInfos = 2,
    DumpStorePath = 3,
    ImportPaths = 4,
    ExportPaths = 5,
    BuildPaths = 6,
    QueryClosure = 7,
    BuildDerivation = 8,
    AddToStoreNar = 9,
}

impl Command {
    pub fn from_u64(n: u64) -> Option<Command> {
        Some(match n {
            1 => Command::QueryValidPaths,
            2 => Command::QueryPathInfos,
            3 => Command::DumpStorePath,
            4 => Command::ImportPaths,
            5 => Command::ExportPaths,
            6 => Command::BuildPaths,
            7 => Command::QueryClosure,
            8 => Command::BuildDerivation,
            9 => Command::AddToStoreNar,
            _ => return None,
        })
    }
}

/// The build settings a client sends with each build request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BuildOptions {
    /// Seconds without log output before the build is killed; 0 for no limit.
    pub max_silent_time: u64,
    /// Seconds the build may take in all; 0 for no limit.
    pub build_timeout: u64,
    /// Bytes of log before the build is killed; 0 for no limit.
    pub max_log_size: u64,
    /// Extra rounds to check determinism (Nix's `build-repeat`).
    pub nr_repeats: u64,
    pub enforce_determinism: bool,
    pub keep_failed: bool,
}

impl BuildOptions {
    pub fn write<W: Write>(&self, w: &mut WireWriter<W>, version: u64) -> Result<(), ServeError> {
        let minor = protocol_minor(version);
        w.write_u64(self.max_silent_time, "max silent time")?;
        w.write_u64(self.build_timeout, "build timeout")?;
        if minor >= 2 {
            w.write_u64(self.max_log_size, "max log size")?;
        }
        if minor >= 3 {
            w.write_u64(self.nr_repeats, "repeats")?;
            w.write_bool(self.enforce_determinism, "enforce determinism")?;
        }
        if minor >= 7 {
            w.write_bool(self.keep_failed, "keep failed")?;
        }
        Ok(())
    }

    pub fn read<R: Read>(r: &mut WireReader<R>, version: u64) -> Result<BuildOptions, ServeError> {
        let minor = protocol_minor(version);
        let mut o = BuildOptions {
            max_silent_time: r.read_u64("max silent time")?,
            build_timeout: r.read_u64("build timeout")?,
            ..BuildOptions::default()
        };
        if minor >= 2 {
            o.max_log_size = r.read_u64("max log size")?;
        }
        if minor >= 3 {
            o.nr_repeats = r.read_u64("repeats")?;
            o.enforce_determinism = r.read_bool("enforce determinism")?;
        }
        if minor >= 7 {
            o.keep_failed = r.read_bool("keep failed")?;
        }
        Ok(o)
    }
}

/// `BuildResult::Status` of Nix: the numbers are fixed by the protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BuildStatus {
    Built,
    Substituted,
    AlreadyValid,
    PermanentFailure,
    InputRejected,
    OutputRejected,
    TransientFailure,
    CachedFailure,
    TimedOut,
    MiscFailure,
    DependencyFailed,
    LogLimitExceeded,
    NotDeterministic,
    ResolvesToAlreadyValid,
    NoSubstituters,
    /// A status newer than this code knows; treated as a failure.
    Unknown(u64),
}

impl BuildStatus {
    const TABLE: [BuildStatus; 15] = [
        BuildStatus::Built,
        BuildStatus::Substituted,
        BuildStatus::AlreadyValid,
        BuildStatus::PermanentFailure,
        BuildStatus::InputRejected,
        BuildStatus::OutputRejected,
        BuildStatus::TransientFailure,
        BuildStatus::CachedFailure,
        BuildStatus::TimedOut,
        BuildStatus::MiscFailure,
        BuildStatus::DependencyFailed,
        BuildStatus::LogLimitExceeded,
        BuildStatus::NotDeterministic,
        BuildStatus::ResolvesToAlreadyValid,
        BuildStatus::NoSubstituters,
    ];

    pub fn from_u64(n: u64) -> BuildStatus {
        usize::try_from(n)
            .ok()
            .and_then(|i| Self::TABLE.get(i).copied())
            .unwrap_or(BuildStatus::Unknown(n))
    }

    pub fn to_u64(self) -> u64 {
        match self {
            BuildStatus::Unknown(n) => n,
            s => Self::TABLE.iter().position(|t| *t == s).unwrap_or(9) as u64,
        }
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
    pub times_built: u64,
    pub is_non_deterministic: bool,
    /// Seconds since the epoch.
    pub start_time: u64,
    pub stop_time: u64,
    /// `<drv hash>!<output>` to the realisation as JSON, kept as text: only
    /// content-addressed derivations need it, and nixb does not build those.
    pub built_outputs: BTreeMap<String, String>,
}

impl BuildResult {
    pub fn new(status: BuildStatus, error_msg: impl Into<String>) -> BuildResult {
        BuildResult {
            status,
            error_msg: error_msg.into(),
            times_built: 0,
            is_non_deterministic: false,
            start_time: 0,
            stop_time: 0,
            built_outputs: BTreeMap::new(),
        }
    }

    /// The result of one build that `build` runs: `Built`, or the status and message it
    /// failed with; timed in seconds since the epoch, as the client shows it.
    pub fn of_build(build: impl FnOnce() -> Result<(), (BuildStatus, String)>) -> BuildResult {
        fn now() -> u64 {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        }
        let start_time = now();
        let mut res = match build() {
            Ok(()) => BuildResult::new(BuildStatus::Built, ""),
            Err((status, msg)) => BuildResult::new(status, msg),
        };
        res.times_built = 1;
        res.start_time = start_time;
        res.stop_time = now();
        res
    }

    pub fn write<W: Write>(&self, w: &mut WireWriter<W>, version: u64) -> Result<(), ServeError> {
        w.write_u64(self.status.to_u64(), "build status")?;
        w.write_str(&self.error_msg, "build error message")?;
        if protocol_minor(version) >= 3 {
            w.write_u64(self.times_built, "times built")?;
            w.write_bool(self.is_non_deterministic, "non-determinism flag")?;
            w.write_u64(self.start_time, "start time")?;
            w.write_u64(self.stop_time, "stop time")?;
        }
        // Always, as Nix 2.8 does (see the module doc).
        w.write_u64(self.built_outputs.len() as u64, "built outputs")?;
        for (k, v) in &self.built_outputs {
            w.write_str(k, "built output id")?;
            w.write_str(v, "built output realisation")?;
        }
        Ok(())
    }

    /// Reads a result in dialect `version`; the map of built outputs is read from
    /// minor 6 on (a client talking to Nix 2.8 passes at least 2.6, see the module doc).
    pub fn read<R: Read>(r: &mut WireReader<R>, version: u64) -> Result<BuildResult, ServeError> {
        let mut res = BuildResult::new(
            BuildStatus::from_u64(r.read_u64("build status")?),
            r.read_string("build error message")?,
        );
        if protocol_minor(version) >= 3 {
            res.times_built = r.read_u64("times built")?;
            res.is_non_deterministic = r.read_bool("non-determinism flag")?;
            res.start_time = r.read_u64("start time")?;
            res.stop_time = r.read_u64("stop time")?;
        }
        if protocol_minor(version) >= 6 {
            let n = r.read_u64("built outputs")?;
            for _ in 0..n {
                let k = r.read_string("built output id")?;
                let v = r.read_string("built output realisation")?;
                res.built_outputs.insert(k, v);
            }
        }
        Ok(res)
    }
}

pub fn parse_path(store: &StoreDir, s: &str, what: &'static str) -> Result<StorePath, ServeError> {
    store.parse(s).map_err(|source| ServeError::Path {
        what,
        value: s.to_string(),
        source,
    })
}

pub fn read_path<R: Read>(
    r: &mut WireReader<R>,
    store: &StoreDir,
    what: &'static str,
) -> Result<StorePath, ServeError> {
    let s = r.read_string(what)?;
    parse_path(store, &s, what)
}

/// An empty string means "none" (deriver, content address).
pub fn read_opt_path<R: Read>(
    r: &mut WireReader<R>,
    store: &StoreDir,
    what: &'static str,
) -> Result<Option<StorePath>, ServeError> {
    let s = r.read_string(what)?;
    if s.is_empty() {
        Ok(None)
    } else {
        parse_path(store, &s, what).map(Some)
    }
}

pub fn read_paths<R: Read>(
    r: &mut WireReader<R>,
    store: &StoreDir,
    what: &'static str,
) -> Result<BTreeSet<StorePath>, ServeError> {
    r.read_strings(what)?
        .iter()
        .map(|s| parse_path(store, s, what))
        .collect()
}

pub fn write_paths<'a, W: Write>(
    w: &mut WireWriter<W>,
    store: &StoreDir,
    paths: impl IntoIterator<Item = &'a StorePath>,
    what: &'static str,
) -> Result<(), ServeError> {
    let printed: Vec<String> = paths.into_iter().map(|p| store.print(p)).collect();
    w.write_strings(printed.iter().map(|s| s.as_str()), what)?;
    Ok(())
}

/// One entry of a `QueryPathInfos` reply (after its path).
pub fn write_path_info<W: Write>(
    w: &mut WireWriter<W>,
    store: &StoreDir,
    info: &ValidPathInfo,
    version: u64,
) -> Result<(), ServeError> {
    w.write_str(&store.print(&info.path), "path")?;
    w.write_str(
        &info
            .deriver
            .as_ref()
            .map(|d| store.print(d))
            .unwrap_or_default(),
        "deriver",
    )?;
    write_paths(w, store, &info.references, "references")?;
    // No compression on this protocol: the download size is the NAR size.
    w.write_u64(info.nar_size, "download size")?;
    w.write_u64(info.nar_size, "nar size")?;
    if protocol_minor(version) >= 4 {
        w.write_str(&info.nar_hash.to_typed(Encoding::Base32), "nar hash")?;
        w.write_str(info.ca.as_deref().unwrap_or(""), "content address")?;
        w.write_strings(info.sigs.iter().map(|s| s.as_str()), "signatures")?;
    }
    Ok(())
}

/// Reads one entry of a `QueryPathInfos` reply; `None` at the terminating empty string.
pub fn read_path_info<R: Read>(
    r: &mut WireReader<R>,
    store: &StoreDir,
    version: u64,
) -> Result<Option<ValidPathInfo>, ServeError> {
    let p = r.read_string("path")?;
    if p.is_empty() {
        return Ok(None);
    }
    let path = parse_path(store, &p, "path info")?;
    let deriver = read_opt_path(r, store, "deriver")?;
    let references = read_paths(r, store, "references")?;
    let _download_size = r.read_u64("download size")?;
    let nar_size = r.read_u64("nar size")?;
    if protocol_minor(version) < 4 {
        return Err(ServeError::Version(version));
    }
    let hash = r.read_string("nar hash")?;
    let nar_hash = Hash::parse_typed(&hash).map_err(|e| ServeError::Field {
        what: "nar hash",
        path: p.clone(),
        value: hash.clone(),
        reason: e.to_string(),
    })?;
    let ca = r.read_string("content address")?;
    let sigs = r.read_strings("signatures")?;
    Ok(Some(ValidPathInfo {
        path,
        nar_hash,
        nar_size,
        deriver,
        references,
        registration_time: 0,
        ultimate: false,
        sigs,
        ca: (!ca.is_empty()).then_some(ca),
    }))
}

/// Writes the `BasicDerivation` form: no input derivations (the caller has already
/// turned their outputs into input sources, see [`basic_derivation`]).
pub fn write_basic_derivation<W: Write>(
    w: &mut WireWriter<W>,
    store: &StoreDir,
    drv: &Derivation,
) -> Result<(), ServeError> {
    w.write_u64(drv.outputs.len() as u64, "outputs")?;
    for (name, out) in &drv.outputs {
        w.write_str(name, "output name")?;
        w.write_str(
            &out.path
                .as_ref()
                .map(|p| store.print(p))
                .unwrap_or_default(),
            "output path",
        )?;
        match &out.fixed {
            Some(f) => {
                w.write_str(&f.method_algo(), "output hash algorithm")?;
                w.write_str(&f.hash.to_hex(), "output hash")?;
            }
            None => {
                w.write_str("", "output hash algorithm")?;
                w.write_str("", "output hash")?;
            }
        }
    }
    write_paths(w, store, &drv.input_srcs, "input sources")?;
    w.write_str(&drv.platform, "platform")?;
    w.write_str(&drv.builder, "builder")?;
    w.write_strings(drv.args.iter().map(|s| s.as_str()), "arguments")?;
    w.write_u64(drv.env.len() as u64, "environment")?;
    for (k, v) in &drv.env {
        w.write_str(k, "environment name")?;
        w.write_str(v, "environment value")?;
    }
    Ok(())
}

pub fn read_basic_derivation<R: Read>(
    r: &mut WireReader<R>,
    store: &StoreDir,
    drv_path: &StorePath,
) -> Result<Derivation, ServeError> {
    let bad = |reason: String| ServeError::Derivation {
        drv: store.print(drv_path),
        reason,
    };
    let n = r.read_u64("outputs")?;
    let mut outputs = BTreeMap::new();
    for _ in 0..n {
        let name = r.read_string("output name")?;
        let path = read_opt_path(r, store, "output path")?;
        let algo = r.read_string("output hash algorithm")?;
        let hash = r.read_string("output hash")?;
        let fixed = if algo.is_empty() && hash.is_empty() {
            None
        } else {
            Some(
                FixedOutputHash::parse(&algo, &hash)
                    .map_err(|e| bad(format!("output '{name}': {e}")))?,
            )
        };
        if outputs
            .insert(name.clone(), DerivationOutput { path, fixed })
            .is_some()
        {
            return Err(bad(format!("output '{name}' listed twice")));
        }
    }
    let input_srcs = read_paths(r, store, "input sources")?;
    let platform = r.read_string("platform")?;
    let builder = r.read_string("builder")?;
    let args = r.read_strings("arguments")?;
    let n = r.read_u64("environment")?;
    let mut env = BTreeMap::new();
    for _ in 0..n {
        let k = r.read_string("environment name")?;
        let v = r.read_string("environment value")?;
        env.insert(k, v);
    }
    Ok(Derivation {
        outputs,
        input_drvs: BTreeMap::new(),
        input_srcs,
        platform,
        builder,
        args,
        env,
    })
}

/// The `BasicDerivation` a remote builds: `drv` with its input derivations replaced by
/// the output paths it wants of them (`outputs_of` gives a derivation's output paths),
/// so the remote needs neither the `.drv` files nor the derivation graph.
pub fn basic_derivation(
    store: &StoreDir,
    drv: &Derivation,
    mut outputs_of: impl FnMut(&StorePath) -> Result<BTreeMap<String, StorePath>, ServeError>,
) -> Result<Derivation, ServeError> {
    let mut basic = drv.clone();
    basic.input_drvs.clear();
    for (input, wanted) in &drv.input_drvs {
        let outs = outputs_of(input)?;
        for name in wanted {
            let p = outs.get(name).ok_or_else(|| ServeError::Derivation {
                drv: store.print(input),
                reason: format!("has no output '{name}'"),
            })?;
            basic.input_srcs.insert(p.clone());
        }
    }
    Ok(basic)
}

/// `sha256:<base16>` without the prefix, as `AddToStoreNar` sends it.
pub fn nar_hash_base16(h: &Hash) -> String {
    h.to_hex()
}

/// Parses a NAR hash in any form Nix accepts on this protocol (`sha256:` prefixed or
/// bare, base16 or base32).
pub fn parse_nar_hash(s: &str, path: &str) -> Result<Hash, ServeError> {
    let res = if s.contains(':') {
        Hash::parse_typed(s)
    } else {
        Hash::parse_with_algo(s, HashAlgo::Sha256)
    };
    res.map_err(|e| ServeError::Field {
        what: "nar hash",
        path: path.to_string(),
        value: s.to_string(),
        reason: e.to_string(),
    })
}
