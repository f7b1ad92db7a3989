//! The operations: their numbers ([`Op`], worker-protocol.hh), what a client sends
//! after the number ([`Request`]) and what the daemon sends after `STDERR_LAST`
//! ([`Response`]). Data that follows a request (a NAR, framed data, input pulled with
//! `STDERR_READ`) is not part of the request: [`Request::data`] says how it travels, and
//! the caller streams it (see [`crate::framed`], [`crate::nar`]).
//!
//! Gates by version, beside their fields below:
//! - `QueryValidPaths`: the substitute flag from 1.27;
//! - `QuerySubstitutablePathInfos`: a path → content-address map from 1.22 (a set before);
//! - `AddToStore`: name, content-address method, references, repair and framed data from
//!   1.25 (answered with a `ValidPathInfo`); before, base name, fixed, recursive, hash
//!   algorithm and a plain NAR (answered with the path);
//! - `AddToStoreNar`: framed data from 1.23; `STDERR_READ` tunnelling for 1.21–1.22;
//! - `BuildPaths`: the build mode from 1.15; derived paths per [`DerivedPath`];
//! - `QueryRealisation`/`RegisterDrvOutput`: realisations as JSON from 1.31, paths before.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};

use nixb_store::StorePath;

use crate::error::{ProtocolError, Result};
use crate::types::{
    read_short_set, write_set, BasicDerivation, BuildMode, BuildResult, ClientSettings, Ctx,
    DerivedPath, GcOptions, GcResults, KeyedBuildResult, Missing, PathInfo, SubstitutablePathInfo,
    ValidPathInfo, MAX_PATH_LEN, MAX_SHORT_LEN,
};
use crate::wire::{WireReader, WireWriter};

macro_rules! ops {
    ($($name:ident = $n:literal,)*) => {
        /// Every worker operation number Nix has used (worker-protocol.hh, Nix 2.8 and
        /// `AddPermRoot` from later versions).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Op { $($name = $n,)* }

        impl Op {
            pub fn from_u64(n: u64) -> Option<Op> {
                match n { $($n => Some(Op::$name),)* _ => None }
            }

            pub fn name(self) -> &'static str {
                match self { $(Op::$name => stringify!($name),)* }
            }

            pub const ALL: &'static [Op] = &[$(Op::$name,)*];
        }
    };
}

ops! {
    IsValidPath = 1,
    HasSubstitutes = 3,
    QueryPathHash = 4,
    QueryReferences = 5,
    QueryReferrers = 6,
    AddToStore = 7,
    AddTextToStore = 8,
    BuildPaths = 9,
    EnsurePath = 10,
    AddTempRoot = 11,
    AddIndirectRoot = 12,
    SyncWithGC = 13,
    FindRoots = 14,
    ExportPath = 16,
    QueryDeriver = 18,
    SetOptions = 19,
    CollectGarbage = 20,
    QuerySubstitutablePathInfo = 21,
    QueryDerivationOutputs = 22,
    QueryAllValidPaths = 23,
    QueryFailedPaths = 24,
    ClearFailedPaths = 25,
    QueryPathInfo = 26,
    ImportPaths = 27,
    QueryDerivationOutputNames = 28,
    QueryPathFromHashPart = 29,
    QuerySubstitutablePathInfos = 30,
    QueryValidPaths = 31,
    QuerySubstitutablePaths = 32,
    QueryValidDerivers = 33,
    OptimiseStore = 34,
    VerifyStore = 35,
    BuildDerivation = 36,
    AddSignatures = 37,
    NarFromPath = 38,
    AddToStoreNar = 39,
    QueryMissing = 40,
    QueryDerivationOutputMap = 41,
    RegisterDrvOutput = 42,
    QueryRealisation = 43,
    AddMultipleToStore = 44,
    AddBuildLog = 45,
    BuildPathsWithResults = 46,
    AddPermRoot = 47,
}

impl Op {
    /// Reads an operation number; an unknown one is an error naming it.
    pub fn read<R: Read>(r: &mut WireReader<R>) -> Result<Op> {
        let n = r.read_u64("operation")?;
        Op::from_u64(n).ok_or(ProtocolError::UnknownOp(n))
    }
}

/// How the data after a request travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataTransfer {
    None,
    /// Framed (u64 length + bytes, ended by 0).
    Framed,
    /// One plain NAR right after the request.
    Nar,
    /// Pulled by the daemon with `STDERR_READ` while it works.
    Tunnelled,
}

/// `AddToStore` from 1.25: the content-address method (`text:sha256`,
/// `fixed:r:sha256`, `fixed:sha1`, ...) says how the framed dump is to be hashed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddToStoreRequest {
    pub name: String,
    pub method: String,
    pub references: BTreeSet<StorePath>,
    pub repair: bool,
}

/// How `AddToStore` (1.25+) says its dump is to be hashed and addressed: the method part
/// of a content address, `text:<algo>`, `fixed:r:<algo>` (a NAR) or `fixed:<algo>` (a
/// flat file), as Nix 2.8's `parseContentAddressMethod` reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaMethod {
    /// Text with references (`.drv` files, `builtins.toFile`); the dump is the flat text.
    Text(nixb_store::HashAlgo),
    /// A flat file; the dump is its contents.
    Flat(nixb_store::HashAlgo),
    /// A NAR serialisation; the dump is the NAR.
    Nar(nixb_store::HashAlgo),
}

impl CaMethod {
    pub fn parse(s: &str) -> Result<CaMethod> {
        let bad = |reason: String| ProtocolError::Field {
            what: "content address method",
            value: s.to_string(),
            reason,
        };
        let algo = |a: &str| {
            a.parse::<nixb_store::HashAlgo>()
                .map_err(|e| bad(format!("hash algorithm '{a}': {e}")))
        };
        if let Some(a) = s.strip_prefix("text:") {
            Ok(CaMethod::Text(algo(a)?))
        } else if let Some(a) = s.strip_prefix("fixed:r:") {
            Ok(CaMethod::Nar(algo(a)?))
        } else if let Some(a) = s.strip_prefix("fixed:") {
            Ok(CaMethod::Flat(algo(a)?))
        } else {
            Err(bad(
                "expected 'text:', 'fixed:r:' or 'fixed:' and a hash algorithm".into(),
            ))
        }
    }
}

impl std::fmt::Display for CaMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CaMethod::Text(a) => write!(f, "text:{a}"),
            CaMethod::Flat(a) => write!(f, "fixed:{a}"),
            CaMethod::Nar(a) => write!(f, "fixed:r:{a}"),
        }
    }
}

/// `AddToStore` before 1.25.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddToStoreOldRequest {
    pub base_name: String,
    pub fixed: bool,
    pub recursive: bool,
    pub hash_algo: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddToStoreNarRequest {
    pub info: ValidPathInfo,
    pub repair: bool,
    pub dont_check_sigs: bool,
}

/// A request: an operation and its arguments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    IsValidPath(StorePath),
    HasSubstitutes(StorePath),
    QueryPathHash(StorePath),
    QueryReferences(StorePath),
    QueryReferrers(StorePath),
    AddToStore(AddToStoreRequest),
    AddToStoreOld(AddToStoreOldRequest),
    AddTextToStore {
        name: String,
        text: Vec<u8>,
        references: BTreeSet<StorePath>,
    },
    BuildPaths {
        paths: Vec<DerivedPath>,
        mode: BuildMode,
    },
    EnsurePath(StorePath),
    AddTempRoot(StorePath),
    AddIndirectRoot(String),
    SyncWithGC,
    FindRoots,
    ExportPath {
        path: StorePath,
        /// Obsolete "sign" flag.
        sign: u64,
    },
    QueryDeriver(StorePath),
    SetOptions(ClientSettings),
    CollectGarbage(GcOptions),
    QuerySubstitutablePathInfo(StorePath),
    QueryDerivationOutputs(StorePath),
    QueryAllValidPaths,
    QueryPathInfo(StorePath),
    ImportPaths,
    QueryDerivationOutputNames(StorePath),
    QueryPathFromHashPart(String),
    /// Path → content address (empty when unknown); only keys travel before 1.22.
    QuerySubstitutablePathInfos(BTreeMap<StorePath, String>),
    QueryValidPaths {
        paths: BTreeSet<StorePath>,
        substitute: bool,
    },
    QuerySubstitutablePaths(BTreeSet<StorePath>),
    QueryValidDerivers(StorePath),
    OptimiseStore,
    VerifyStore {
        check_contents: bool,
        repair: bool,
    },
    BuildDerivation {
        drv_path: StorePath,
        drv: BasicDerivation,
        mode: BuildMode,
    },
    AddSignatures {
        path: StorePath,
        sigs: BTreeSet<String>,
    },
    NarFromPath(StorePath),
    AddToStoreNar(AddToStoreNarRequest),
    QueryMissing(Vec<DerivedPath>),
    QueryDerivationOutputMap(StorePath),
    /// Before 1.31: `sha256:<hash>!<output>` and the output path's base name
    /// (`<hash>-<name>`, as Nix 2.8 reads it); from 1.31: the realisation as JSON
    /// (`output_path` empty).
    RegisterDrvOutput {
        id_or_json: String,
        output_path: String,
    },
    /// `sha256:<hash>!<output>`.
    QueryRealisation(String),
    AddMultipleToStore {
        repair: bool,
        dont_check_sigs: bool,
    },
    AddBuildLog(StorePath),
    BuildPathsWithResults {
        paths: Vec<DerivedPath>,
        mode: BuildMode,
    },
    AddPermRoot {
        path: StorePath,
        gc_root: String,
    },
}

impl Request {
    pub fn op(&self) -> Op {
        use Request as R;
        match self {
            R::IsValidPath(_) => Op::IsValidPath,
            R::HasSubstitutes(_) => Op::HasSubstitutes,
            R::QueryPathHash(_) => Op::QueryPathHash,
            R::QueryReferences(_) => Op::QueryReferences,
            R::QueryReferrers(_) => Op::QueryReferrers,
            R::AddToStore(_) | R::AddToStoreOld(_) => Op::AddToStore,
            R::AddTextToStore { .. } => Op::AddTextToStore,
            R::BuildPaths { .. } => Op::BuildPaths,
            R::EnsurePath(_) => Op::EnsurePath,
            R::AddTempRoot(_) => Op::AddTempRoot,
            R::AddIndirectRoot(_) => Op::AddIndirectRoot,
            R::SyncWithGC => Op::SyncWithGC,
            R::FindRoots => Op::FindRoots,
            R::ExportPath { .. } => Op::ExportPath,
            R::QueryDeriver(_) => Op::QueryDeriver,
            R::SetOptions(_) => Op::SetOptions,
            R::CollectGarbage(_) => Op::CollectGarbage,
            R::QuerySubstitutablePathInfo(_) => Op::QuerySubstitutablePathInfo,
            R::QueryDerivationOutputs(_) => Op::QueryDerivationOutputs,
            R::QueryAllValidPaths => Op::QueryAllValidPaths,
            R::QueryPathInfo(_) => Op::QueryPathInfo,
            R::ImportPaths => Op::ImportPaths,
            R::QueryDerivationOutputNames(_) => Op::QueryDerivationOutputNames,
            R::QueryPathFromHashPart(_) => Op::QueryPathFromHashPart,
            R::QuerySubstitutablePathInfos(_) => Op::QuerySubstitutablePathInfos,
            R::QueryValidPaths { .. } => Op::QueryValidPaths,
            R::QuerySubstitutablePaths(_) => Op::QuerySubstitutablePaths,
            R::QueryValidDerivers(_) => Op::QueryValidDerivers,
            R::OptimiseStore => Op::OptimiseStore,
            R::VerifyStore { .. } => Op::VerifyStore,
            R::BuildDerivation { .. } => Op::BuildDerivation,
            R::AddSignatures { .. } => Op::AddSignatures,
            R::NarFromPath(_) => Op::NarFromPath,
            R::AddToStoreNar(_) => Op::AddToStoreNar,
            R::QueryMissing(_) => Op::QueryMissing,
            R::QueryDerivationOutputMap(_) => Op::QueryDerivationOutputMap,
            R::RegisterDrvOutput { .. } => Op::RegisterDrvOutput,
            R::QueryRealisation(_) => Op::QueryRealisation,
            R::AddMultipleToStore { .. } => Op::AddMultipleToStore,
            R::AddBuildLog(_) => Op::AddBuildLog,
            R::BuildPathsWithResults { .. } => Op::BuildPathsWithResults,
            R::AddPermRoot { .. } => Op::AddPermRoot,
        }
    }

    /// How the data after this request travels at this version.
    pub fn data(&self, cx: &Ctx) -> DataTransfer {
        match self {
            Request::AddToStore(_) => DataTransfer::Framed,
            Request::AddToStoreOld(_) => DataTransfer::Nar,
            // 1.23 framed; 1.21-1.22 pulled through STDERR_READ.
            Request::AddToStoreNar(_) if cx.at_least(23) => DataTransfer::Framed,
            Request::AddToStoreNar(_) => DataTransfer::Tunnelled,
            Request::AddMultipleToStore { .. } | Request::AddBuildLog(_) => DataTransfer::Framed,
            Request::ImportPaths => DataTransfer::Tunnelled,
            _ => DataTransfer::None,
        }
    }

    /// Reads the arguments of `op` (the number has been read already). Errors name the
    /// operation.
    pub fn read<R: Read>(op: Op, r: &mut WireReader<R>, cx: &Ctx) -> Result<Request> {
        Request::read_inner(op, r, cx).map_err(ProtocolError::in_op(op.name()))
    }

    fn read_inner<R: Read>(op: Op, r: &mut WireReader<R>, cx: &Ctx) -> Result<Request> {
        use Request as Q;
        let path = |r: &mut WireReader<R>| cx.read_path(r, "path");
        Ok(match op {
            Op::IsValidPath => Q::IsValidPath(path(r)?),
            Op::HasSubstitutes => Q::HasSubstitutes(path(r)?),
            Op::QueryPathHash => Q::QueryPathHash(path(r)?),
            Op::QueryReferences => Q::QueryReferences(path(r)?),
            Op::QueryReferrers => Q::QueryReferrers(path(r)?),
            Op::AddToStore => {
                if cx.at_least(25) {
                    let name = r.read_string_max("name", MAX_SHORT_LEN)?;
                    let method = r.read_string_max("content address method", MAX_SHORT_LEN)?;
                    let references = cx.read_paths(r, "references")?;
                    let repair = r.read_bool("repair")?;
                    Q::AddToStore(AddToStoreRequest {
                        name,
                        method,
                        references,
                        repair,
                    })
                } else {
                    let base_name = r.read_string_max("base name", MAX_SHORT_LEN)?;
                    let fixed = r.read_bool("fixed")?;
                    let recursive = r.read_bool("recursive")?;
                    let hash_algo = r.read_string_max("hash algorithm", MAX_SHORT_LEN)?;
                    Q::AddToStoreOld(AddToStoreOldRequest {
                        base_name,
                        fixed,
                        recursive,
                        hash_algo,
                    })
                }
            }
            Op::AddTextToStore => {
                let name = r.read_string_max("name", MAX_SHORT_LEN)?;
                let text = r.read_bytes("text")?;
                let references = cx.read_paths(r, "references")?;
                Q::AddTextToStore {
                    name,
                    text,
                    references,
                }
            }
            Op::BuildPaths | Op::BuildPathsWithResults => {
                let paths = DerivedPath::read_list(r, cx)?;
                // Gate 1.15 (build mode): below nixb's floor, so always present.
                let mode = BuildMode::read(r)?;
                if op == Op::BuildPaths {
                    Q::BuildPaths { paths, mode }
                } else {
                    Q::BuildPathsWithResults { paths, mode }
                }
            }
            Op::EnsurePath => Q::EnsurePath(path(r)?),
            Op::AddTempRoot => Q::AddTempRoot(path(r)?),
            Op::AddIndirectRoot => {
                Q::AddIndirectRoot(r.read_string_max("indirect root", MAX_PATH_LEN)?)
            }
            Op::SyncWithGC => Q::SyncWithGC,
            Op::FindRoots => Q::FindRoots,
            Op::ExportPath => {
                let path = path(r)?;
                let sign = r.read_u64("sign")?;
                Q::ExportPath { path, sign }
            }
            Op::QueryDeriver => Q::QueryDeriver(path(r)?),
            Op::SetOptions => Q::SetOptions(ClientSettings::read(r, cx)?),
            Op::CollectGarbage => Q::CollectGarbage(GcOptions::read(r, cx)?),
            Op::QuerySubstitutablePathInfo => Q::QuerySubstitutablePathInfo(path(r)?),
            Op::QueryDerivationOutputs => Q::QueryDerivationOutputs(path(r)?),
            Op::QueryAllValidPaths => Q::QueryAllValidPaths,
            Op::QueryPathInfo => Q::QueryPathInfo(path(r)?),
            Op::ImportPaths => Q::ImportPaths,
            Op::QueryDerivationOutputNames => Q::QueryDerivationOutputNames(path(r)?),
            Op::QueryPathFromHashPart => {
                Q::QueryPathFromHashPart(r.read_string_max("hash part", MAX_SHORT_LEN)?)
            }
            Op::QuerySubstitutablePathInfos => {
                let mut m = BTreeMap::new();
                if cx.at_least(22) {
                    let n = r.read_count("paths", 16)?;
                    for _ in 0..n {
                        let p = cx.read_path(r, "path")?;
                        let ca = r.read_string_max("content address", MAX_SHORT_LEN)?;
                        m.insert(p, ca);
                    }
                } else {
                    for p in cx.read_paths(r, "paths")? {
                        m.insert(p, String::new());
                    }
                }
                Q::QuerySubstitutablePathInfos(m)
            }
            Op::QueryValidPaths => {
                let paths = cx.read_paths(r, "paths")?;
                let substitute = if cx.at_least(27) {
                    r.read_bool("substitute")?
                } else {
                    false
                };
                Q::QueryValidPaths { paths, substitute }
            }
            Op::QuerySubstitutablePaths => Q::QuerySubstitutablePaths(cx.read_paths(r, "paths")?),
            Op::QueryValidDerivers => Q::QueryValidDerivers(path(r)?),
            Op::OptimiseStore => Q::OptimiseStore,
            Op::VerifyStore => {
                let check_contents = r.read_bool("check contents")?;
                let repair = r.read_bool("repair")?;
                Q::VerifyStore {
                    check_contents,
                    repair,
                }
            }
            Op::BuildDerivation => {
                let drv_path = cx.read_path(r, "derivation path")?;
                let drv = BasicDerivation::read(r, cx)?;
                let mode = BuildMode::read(r)?;
                Q::BuildDerivation {
                    drv_path,
                    drv,
                    mode,
                }
            }
            Op::AddSignatures => {
                let path = path(r)?;
                let sigs = read_short_set(r, "signatures")?;
                Q::AddSignatures { path, sigs }
            }
            Op::NarFromPath => Q::NarFromPath(path(r)?),
            Op::AddToStoreNar => {
                let path = path(r)?;
                let deriver = cx.read_opt_path(r, "deriver")?;
                let h = r.read_string_max("nar hash", MAX_SHORT_LEN)?;
                let nar_hash = nixb_store::Hash::parse_with_algo(&h, nixb_store::HashAlgo::Sha256)
                    .map_err(|e| ProtocolError::Field {
                        what: "nar hash",
                        value: h.clone(),
                        reason: e.to_string(),
                    })?;
                let references = cx.read_paths(r, "references")?;
                let registration_time = r.read_u64("registration time")?;
                let nar_size = r.read_u64("nar size")?;
                let ultimate = r.read_bool("ultimate")?;
                let sigs = read_short_set(r, "signatures")?;
                let ca = r.read_string_max("content address", MAX_SHORT_LEN)?;
                let repair = r.read_bool("repair")?;
                let dont_check_sigs = r.read_bool("dont check sigs")?;
                Q::AddToStoreNar(AddToStoreNarRequest {
                    info: ValidPathInfo {
                        path,
                        info: PathInfo {
                            deriver,
                            nar_hash,
                            references,
                            registration_time,
                            nar_size,
                            ultimate,
                            sigs,
                            ca: (!ca.is_empty()).then_some(ca),
                        },
                    },
                    repair,
                    dont_check_sigs,
                })
            }
            Op::QueryMissing => Q::QueryMissing(DerivedPath::read_list(r, cx)?),
            Op::QueryDerivationOutputMap => Q::QueryDerivationOutputMap(path(r)?),
            Op::RegisterDrvOutput => {
                if cx.at_least(31) {
                    Q::RegisterDrvOutput {
                        id_or_json: r.read_string_max("realisation", MAX_SHORT_LEN)?,
                        output_path: String::new(),
                    }
                } else {
                    let id_or_json = r.read_string_max("drv output id", MAX_SHORT_LEN)?;
                    let output_path = r.read_string_max("output path", MAX_PATH_LEN)?;
                    Q::RegisterDrvOutput {
                        id_or_json,
                        output_path,
                    }
                }
            }
            Op::QueryRealisation => {
                Q::QueryRealisation(r.read_string_max("drv output id", MAX_SHORT_LEN)?)
            }
            Op::AddMultipleToStore => {
                let repair = r.read_bool("repair")?;
                let dont_check_sigs = r.read_bool("dont check sigs")?;
                Q::AddMultipleToStore {
                    repair,
                    dont_check_sigs,
                }
            }
            // The derivation's base name (`<hash>-<name>.drv`), not its full path: Nix
            // sends `StorePath::to_string()` here.
            Op::AddBuildLog => {
                let base = r.read_string_max("derivation", MAX_PATH_LEN)?;
                Q::AddBuildLog(StorePath::from_base_name(&base).map_err(|source| {
                    ProtocolError::Path {
                        what: "derivation",
                        value: base.clone(),
                        source,
                    }
                })?)
            }
            Op::AddPermRoot => {
                let path = path(r)?;
                let gc_root = r.read_string_max("gc root", MAX_PATH_LEN)?;
                Q::AddPermRoot { path, gc_root }
            }
            Op::QueryFailedPaths | Op::ClearFailedPaths => {
                return Err(ProtocolError::Field {
                    what: "operation",
                    value: (op as u64).to_string(),
                    reason: "obsolete since Nix 2.0 and not supported".into(),
                })
            }
        })
    }

    /// Writes the operation number and the arguments. A request this version cannot
    /// express is refused before anything is written, so the connection stays usable.
    pub fn write<W: Write>(&self, w: &mut WireWriter<W>, cx: &Ctx) -> Result<()> {
        let op = self.op();
        self.check(cx)
            .and_then(|()| self.write_inner(w, cx))
            .map_err(ProtocolError::in_op(op.name()))
    }

    fn check(&self, cx: &Ctx) -> Result<()> {
        match self {
            Request::BuildPaths { paths, .. }
            | Request::BuildPathsWithResults { paths, .. }
            | Request::QueryMissing(paths) => {
                for p in paths {
                    p.to_wire(cx)?;
                }
            }
            Request::AddToStore(_) if !cx.at_least(25) => {
                return Err(ProtocolError::NeedsVersion {
                    what: "AddToStore with a content-address method",
                    needs: crate::Version::new(1, 25),
                    version: cx.version,
                })
            }
            Request::AddToStoreOld(_) if cx.at_least(25) => {
                return Err(ProtocolError::Field {
                    what: "AddToStore form",
                    value: "base name, fixed, recursive, hash algorithm".into(),
                    reason: format!("protocol {} uses the 1.25 form", cx.version),
                })
            }
            _ => {}
        }
        Ok(())
    }

    fn write_inner<W: Write>(&self, w: &mut WireWriter<W>, cx: &Ctx) -> Result<()> {
        use Request as Q;
        w.write_u64(self.op() as u64, "operation")?;
        let path = |w: &mut WireWriter<W>, p: &StorePath| cx.write_path(w, p, "path");
        match self {
            Q::IsValidPath(p)
            | Q::HasSubstitutes(p)
            | Q::QueryPathHash(p)
            | Q::QueryReferences(p)
            | Q::QueryReferrers(p)
            | Q::EnsurePath(p)
            | Q::AddTempRoot(p)
            | Q::QueryDeriver(p)
            | Q::QuerySubstitutablePathInfo(p)
            | Q::QueryDerivationOutputs(p)
            | Q::QueryPathInfo(p)
            | Q::QueryDerivationOutputNames(p)
            | Q::QueryValidDerivers(p)
            | Q::NarFromPath(p)
            | Q::QueryDerivationOutputMap(p) => path(w, p)?,
            Q::AddBuildLog(p) => w.write_str(p.base_name(), "derivation")?,
            Q::AddToStore(a) => {
                w.write_str(&a.name, "name")?;
                w.write_str(&a.method, "content address method")?;
                cx.write_paths(w, a.references.iter(), "references")?;
                w.write_bool(a.repair, "repair")?;
            }
            Q::AddToStoreOld(a) => {
                w.write_str(&a.base_name, "base name")?;
                w.write_bool(a.fixed, "fixed")?;
                w.write_bool(a.recursive, "recursive")?;
                w.write_str(&a.hash_algo, "hash algorithm")?;
            }
            Q::AddTextToStore {
                name,
                text,
                references,
            } => {
                w.write_str(name, "name")?;
                w.write_bytes(text, "text")?;
                cx.write_paths(w, references.iter(), "references")?;
            }
            Q::BuildPaths { paths, mode } | Q::BuildPathsWithResults { paths, mode } => {
                DerivedPath::write_list(w, cx, paths)?;
                mode.write(w)?;
            }
            Q::AddIndirectRoot(s) => w.write_str(s, "indirect root")?,
            Q::SyncWithGC
            | Q::FindRoots
            | Q::QueryAllValidPaths
            | Q::ImportPaths
            | Q::OptimiseStore => {}
            Q::ExportPath { path: p, sign } => {
                path(w, p)?;
                w.write_u64(*sign, "sign")?;
            }
            Q::SetOptions(s) => s.write(w, cx)?,
            Q::CollectGarbage(o) => o.write(w, cx)?,
            Q::QueryPathFromHashPart(h) => w.write_str(h, "hash part")?,
            Q::QuerySubstitutablePathInfos(m) => {
                if cx.at_least(22) {
                    w.write_u64(m.len() as u64, "paths")?;
                    for (p, ca) in m {
                        path(w, p)?;
                        w.write_str(ca, "content address")?;
                    }
                } else {
                    cx.write_paths(w, m.keys(), "paths")?;
                }
            }
            Q::QueryValidPaths { paths, substitute } => {
                cx.write_paths(w, paths.iter(), "paths")?;
                if cx.at_least(27) {
                    w.write_bool(*substitute, "substitute")?;
                }
            }
            Q::QuerySubstitutablePaths(paths) => cx.write_paths(w, paths.iter(), "paths")?,
            Q::VerifyStore {
                check_contents,
                repair,
            } => {
                w.write_bool(*check_contents, "check contents")?;
                w.write_bool(*repair, "repair")?;
            }
            Q::BuildDerivation {
                drv_path,
                drv,
                mode,
            } => {
                cx.write_path(w, drv_path, "derivation path")?;
                drv.write(w, cx)?;
                mode.write(w)?;
            }
            Q::AddSignatures { path: p, sigs } => {
                path(w, p)?;
                write_set(w, sigs, "signatures")?;
            }
            Q::AddToStoreNar(a) => {
                a.info.write(w, cx)?;
                w.write_bool(a.repair, "repair")?;
                w.write_bool(a.dont_check_sigs, "dont check sigs")?;
            }
            Q::QueryMissing(paths) => DerivedPath::write_list(w, cx, paths)?,
            Q::RegisterDrvOutput {
                id_or_json,
                output_path,
            } => {
                if cx.at_least(31) {
                    w.write_str(id_or_json, "realisation")?;
                } else {
                    w.write_str(id_or_json, "drv output id")?;
                    w.write_str(output_path, "output path")?;
                }
            }
            Q::QueryRealisation(id) => w.write_str(id, "drv output id")?,
            Q::AddMultipleToStore {
                repair,
                dont_check_sigs,
            } => {
                w.write_bool(*repair, "repair")?;
                w.write_bool(*dont_check_sigs, "dont check sigs")?;
            }
            Q::AddPermRoot { path: p, gc_root } => {
                path(w, p)?;
                w.write_str(gc_root, "gc root")?;
            }
        }
        Ok(())
    }
}

/// What the daemon sends after `STDERR_LAST`. Which variant answers which operation
/// is fixed ([`Response::read`] takes the request); a NAR (`NarFromPath`) or the export
/// stream (`ExportPath`, through `STDERR_WRITE`) are streamed, not held here, except in
/// [`Response::Nar`] for replaying fixtures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    /// Nothing (SetOptions, AddToStoreNar, AddMultipleToStore, RegisterDrvOutput).
    Nothing,
    /// The constant 1 many operations answer with (BuildPaths, EnsurePath, AddTempRoot,
    /// AddIndirectRoot, SyncWithGC, OptimiseStore, AddSignatures, ExportPath,
    /// AddBuildLog).
    One,
    /// IsValidPath, HasSubstitutes, VerifyStore (true: errors found).
    Bool(bool),
    /// AddTextToStore, AddToStore before 1.25.
    Path(StorePath),
    /// QueryPathFromHashPart, QueryDeriver.
    OptPath(Option<StorePath>),
    /// QueryValidPaths, QuerySubstitutablePaths, QueryReferrers, QueryReferences,
    /// QueryValidDerivers, QueryDerivationOutputs, QueryAllValidPaths,
    /// QueryRealisation before 1.31.
    Paths(BTreeSet<StorePath>),
    /// ImportPaths: the imported paths in the order they were imported.
    PathList(Vec<StorePath>),
    /// QueryDerivationOutputNames, QueryRealisation from 1.31 (JSON), QueryPathHash
    /// (one element).
    Strings(Vec<String>),
    /// QueryPathInfo (`None`: not valid).
    PathInfo(Option<PathInfo>),
    /// AddToStore from 1.25.
    ValidPathInfo(ValidPathInfo),
    /// QueryDerivationOutputMap.
    OutputMap(BTreeMap<String, Option<StorePath>>),
    /// QuerySubstitutablePathInfos, QuerySubstitutablePathInfo (at most one).
    SubstitutablePathInfos(BTreeMap<StorePath, SubstitutablePathInfo>),
    Missing(Missing),
    /// FindRoots: (link, target) pairs.
    Roots(Vec<(String, StorePath)>),
    GcResults(GcResults),
    BuildResult(BuildResult),
    BuildResults(Vec<KeyedBuildResult>),
    /// AddPermRoot: the root's absolute path.
    PermRoot(String),
    /// NarFromPath: the NAR that follows `STDERR_LAST`.
    Nar(Vec<u8>),
}

impl Response {
    /// Reads the answer to `req`.
    pub fn read<R: Read>(req: &Request, r: &mut WireReader<R>, cx: &Ctx) -> Result<Response> {
        Response::read_inner(req, r, cx).map_err(ProtocolError::in_op(req.op().name()))
    }

    fn read_inner<R: Read>(req: &Request, r: &mut WireReader<R>, cx: &Ctx) -> Result<Response> {
        use Request as Q;
        use Response as A;
        Ok(match req {
            Q::SetOptions(_)
            | Q::AddToStoreNar(_)
            | Q::AddMultipleToStore { .. }
            | Q::RegisterDrvOutput { .. } => A::Nothing,
            Q::BuildPaths { .. }
            | Q::EnsurePath(_)
            | Q::AddTempRoot(_)
            | Q::AddIndirectRoot(_)
            | Q::SyncWithGC
            | Q::OptimiseStore
            | Q::AddSignatures { .. }
            | Q::ExportPath { .. }
            | Q::AddBuildLog(_) => {
                let offset = r.offset();
                match r.read_u64("result")? {
                    1 => A::One,
                    value => {
                        return Err(ProtocolError::UnknownValue {
                            what: "result",
                            value,
                            offset,
                        })
                    }
                }
            }
            Q::IsValidPath(_) | Q::HasSubstitutes(_) | Q::VerifyStore { .. } => {
                A::Bool(r.read_bool("result")?)
            }
            Q::AddTextToStore { .. } | Q::AddToStoreOld(_) => A::Path(cx.read_path(r, "path")?),
            Q::QueryPathFromHashPart(_) | Q::QueryDeriver(_) => {
                A::OptPath(cx.read_opt_path(r, "path")?)
            }
            Q::QueryValidPaths { .. }
            | Q::QuerySubstitutablePaths(_)
            | Q::QueryReferrers(_)
            | Q::QueryReferences(_)
            | Q::QueryValidDerivers(_)
            | Q::QueryDerivationOutputs(_)
            | Q::QueryAllValidPaths => A::Paths(cx.read_paths(r, "paths")?),
            Q::ImportPaths => {
                let n = r.read_count("imported paths", 8)?;
                let mut v = Vec::new();
                for _ in 0..n {
                    v.push(cx.read_path(r, "imported path")?);
                }
                A::PathList(v)
            }
            Q::QueryRealisation(_) if !cx.at_least(31) => A::Paths(cx.read_paths(r, "paths")?),
            Q::QueryRealisation(_) => {
                A::Strings(r.read_strings_max("realisations", MAX_SHORT_LEN)?)
            }
            Q::QueryDerivationOutputNames(_) => {
                A::Strings(r.read_strings_max("output names", MAX_SHORT_LEN)?)
            }
            Q::QueryPathHash(_) => A::Strings(vec![r.read_string_max("hash", MAX_SHORT_LEN)?]),
            Q::QueryPathInfo(_) => {
                // Gate 1.17 (the validity flag): below nixb's floor, so always present.
                if r.read_bool("valid")? {
                    A::PathInfo(Some(PathInfo::read(r, cx)?))
                } else {
                    A::PathInfo(None)
                }
            }
            Q::AddToStore(_) => A::ValidPathInfo(ValidPathInfo::read(r, cx)?),
            Q::QueryDerivationOutputMap(_) => {
                let n = r.read_count("outputs", 16)?;
                let mut m = BTreeMap::new();
                for _ in 0..n {
                    let name = r.read_string_max("output name", MAX_SHORT_LEN)?;
                    let p = cx.read_opt_path(r, "output path")?;
                    m.insert(name, p);
                }
                A::OutputMap(m)
            }
            Q::QuerySubstitutablePathInfo(p) => {
                let mut m = BTreeMap::new();
                if r.read_bool("found")? {
                    m.insert(p.clone(), read_substitutable(r, cx)?);
                }
                A::SubstitutablePathInfos(m)
            }
            Q::QuerySubstitutablePathInfos(_) => {
                let n = r.read_count("substitutable path infos", 40)?;
                let mut m = BTreeMap::new();
                for _ in 0..n {
                    let p = cx.read_path(r, "path")?;
                    m.insert(p, read_substitutable(r, cx)?);
                }
                A::SubstitutablePathInfos(m)
            }
            Q::QueryMissing(_) => A::Missing(Missing {
                will_build: cx.read_paths(r, "will build")?,
                will_substitute: cx.read_paths(r, "will substitute")?,
                unknown: cx.read_paths(r, "unknown")?,
                download_size: r.read_u64("download size")?,
                nar_size: r.read_u64("nar size")?,
            }),
            Q::FindRoots => {
                let n = r.read_count("roots", 16)?;
                let mut v = Vec::new();
                for _ in 0..n {
                    let link = r.read_string_max("root link", MAX_PATH_LEN)?;
                    let target = cx.read_path(r, "root target")?;
                    v.push((link, target));
                }
                A::Roots(v)
            }
            Q::CollectGarbage(_) => A::GcResults(GcResults::read(r)?),
            Q::BuildDerivation { .. } => A::BuildResult(BuildResult::read(r, cx)?),
            Q::BuildPathsWithResults { .. } => {
                let n = r.read_count("build results", 24)?;
                let mut v = Vec::new();
                for _ in 0..n {
                    v.push(KeyedBuildResult::read(r, cx)?);
                }
                A::BuildResults(v)
            }
            Q::AddPermRoot { .. } => A::PermRoot(r.read_string_max("gc root", MAX_PATH_LEN)?),
            Q::NarFromPath(_) => {
                let mut nar = Vec::new();
                crate::nar::copy_nar(r, &mut nar)?;
                A::Nar(nar)
            }
        })
    }

    pub fn write<W: Write>(&self, w: &mut WireWriter<W>, cx: &Ctx) -> Result<()> {
        use Response as A;
        match self {
            A::Nothing => {}
            A::One => w.write_u64(1, "result")?,
            A::Bool(b) => w.write_bool(*b, "result")?,
            A::Path(p) => cx.write_path(w, p, "path")?,
            A::OptPath(p) => cx.write_opt_path(w, p.as_ref(), "path")?,
            A::Paths(ps) => cx.write_paths(w, ps.iter(), "paths")?,
            A::PathList(ps) => cx.write_paths(w, ps.iter(), "imported paths")?,
            A::Strings(v) => {
                // QueryPathHash answers one bare string; everything else a list. The
                // single-string case is told apart by the caller's request in
                // `write_for`.
                w.write_strings(v.iter().map(|s| s.as_str()), "strings")?
            }
            A::PathInfo(None) => w.write_bool(false, "valid")?,
            A::PathInfo(Some(i)) => {
                w.write_bool(true, "valid")?;
                i.write(w, cx)?;
            }
            A::ValidPathInfo(i) => i.write(w, cx)?,
            A::OutputMap(m) => {
                w.write_u64(m.len() as u64, "outputs")?;
                for (name, p) in m {
                    w.write_str(name, "output name")?;
                    cx.write_opt_path(w, p.as_ref(), "output path")?;
                }
            }
            A::SubstitutablePathInfos(m) => {
                w.write_u64(m.len() as u64, "substitutable path infos")?;
                for (p, i) in m {
                    cx.write_path(w, p, "path")?;
                    write_substitutable(w, cx, i)?;
                }
            }
            A::Missing(m) => {
                cx.write_paths(w, m.will_build.iter(), "will build")?;
                cx.write_paths(w, m.will_substitute.iter(), "will substitute")?;
                cx.write_paths(w, m.unknown.iter(), "unknown")?;
                w.write_u64(m.download_size, "download size")?;
                w.write_u64(m.nar_size, "nar size")?;
            }
            A::Roots(v) => {
                w.write_u64(v.len() as u64, "roots")?;
                for (link, target) in v {
                    w.write_str(link, "root link")?;
                    cx.write_path(w, target, "root target")?;
                }
            }
            A::GcResults(g) => g.write(w)?,
            A::BuildResult(b) => b.write(w, cx)?,
            A::BuildResults(v) => {
                w.write_u64(v.len() as u64, "build results")?;
                for k in v {
                    k.write(w, cx)?;
                }
            }
            A::PermRoot(s) => w.write_str(s, "gc root")?,
            A::Nar(n) => w.write_raw(n, "nar")?,
        }
        Ok(())
    }

    /// Writes the answer to `req`: like [`write`](Self::write), with the few answers
    /// whose form depends on the request (QueryPathHash's bare string,
    /// QuerySubstitutablePathInfo's found flag).
    pub fn write_for<W: Write>(
        &self,
        req: &Request,
        w: &mut WireWriter<W>,
        cx: &Ctx,
    ) -> Result<()> {
        match (req, self) {
            (Request::QueryPathHash(_), Response::Strings(v)) => {
                w.write_str(v.first().map(|s| s.as_str()).unwrap_or(""), "hash")?;
                Ok(())
            }
            (Request::QuerySubstitutablePathInfo(_), Response::SubstitutablePathInfos(m)) => {
                match m.values().next() {
                    None => w.write_bool(false, "found")?,
                    Some(i) => {
                        w.write_bool(true, "found")?;
                        write_substitutable(w, cx, i)?;
                    }
                }
                Ok(())
            }
            _ => self.write(w, cx),
        }
        .map_err(ProtocolError::in_op(req.op().name()))
    }
}

fn read_substitutable<R: Read>(r: &mut WireReader<R>, cx: &Ctx) -> Result<SubstitutablePathInfo> {
    Ok(SubstitutablePathInfo {
        deriver: cx.read_opt_path(r, "deriver")?,
        references: cx.read_paths(r, "references")?,
        download_size: r.read_u64("download size")?,
        nar_size: r.read_u64("nar size")?,
    })
}

fn write_substitutable<W: Write>(
    w: &mut WireWriter<W>,
    cx: &Ctx,
    i: &SubstitutablePathInfo,
) -> Result<()> {
    cx.write_opt_path(w, i.deriver.as_ref(), "deriver")?;
    cx.write_paths(w, i.references.iter(), "references")?;
    w.write_u64(i.download_size, "download size")?;
    w.write_u64(i.nar_size, "nar size")?;
    Ok(())
}

/// `AddMultipleToStore`'s payload, inside its framed data (Nix 2.8
/// `Store::addMultipleToStore(Source &)`):
///
/// ```text
/// u64(count) { ValidPathInfo NAR }*count
/// ```
///
/// The path infos travel in the 1.16 form whatever the connection's version (the same
/// bytes as [`ValidPathInfo::write`] at every version nixb speaks). Each NAR follows its
/// info unframed; read it with [`crate::nar::copy_nar`] or restore it directly.
pub fn read_multiple_header<R: Read>(r: &mut WireReader<R>) -> Result<u64> {
    Ok(r.read_count("paths to add", 8)?)
}

pub fn write_multiple_header<W: Write>(w: &mut WireWriter<W>, count: u64) -> Result<()> {
    w.write_u64(count, "paths to add")?;
    Ok(())
}

/// One path's info in `AddMultipleToStore`; its NAR follows.
pub fn read_multiple_item<R: Read>(r: &mut WireReader<R>, cx: &Ctx) -> Result<ValidPathInfo> {
    ValidPathInfo::read(r, cx).map_err(ProtocolError::in_op("AddMultipleToStore"))
}

pub fn write_multiple_item<W: Write>(
    w: &mut WireWriter<W>,
    cx: &Ctx,
    info: &ValidPathInfo,
) -> Result<()> {
    info.write(w, cx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nixb_store::HashAlgo;

    #[test]
    fn content_address_methods_parse_and_print_back() {
        // The methods Nix 2.8 clients send: nix-instantiate's .drv files ("text:sha256",
        // in the instantiate fixture) and nix-store --add ("fixed:r:sha256", add-text).
        for (s, m) in [
            ("text:sha256", CaMethod::Text(HashAlgo::Sha256)),
            ("fixed:r:sha256", CaMethod::Nar(HashAlgo::Sha256)),
            ("fixed:sha1", CaMethod::Flat(HashAlgo::Sha1)),
        ] {
            assert_eq!(CaMethod::parse(s).unwrap(), m);
            assert_eq!(m.to_string(), s);
        }
        let e = CaMethod::parse("fixed:r:sha257").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("bad content address method 'fixed:r:sha257'"),
            "{e}"
        );
        assert!(CaMethod::parse("git:sha1").is_err());
    }
}
