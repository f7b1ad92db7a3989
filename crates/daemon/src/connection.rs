//! One client connection: the greeting, then each request mapped onto the store or the
//! engine, its answer, or an error the client prints. An error inside an operation ends
//! only that operation; a request that cannot be read (unknown operation, malformed field,
//! data that broke off) ends the connection, as in Nix, because the stream is out of step.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use nixb_goals::WorkerConfig;
use nixb_protocol::handshake::TrustedFlag;
use nixb_protocol::ops::{
    read_multiple_header, read_multiple_item, AddToStoreNarRequest, AddToStoreOldRequest,
    AddToStoreRequest, CaMethod, DataTransfer,
};
use nixb_protocol::types::{
    BuildMode as WireBuildMode, ClientSettings, DerivedPath as WireDerivedPath, Missing,
    OutputsSpec, PathInfo, ValidPathInfo as WireValidPathInfo,
};
use nixb_protocol::wire::WireReader;
use nixb_protocol::{RemoteError, Request, Response, ServerConnection, StderrFrame, Version};
use nixb_store::local_store::ValidPathInfo;
use nixb_store::temproots::RootsOwner;
use nixb_store::{StoreDir, StorePath};

use crate::add;
use crate::build;
use crate::error::{DaemonError, Result};
use crate::Daemon;

/// Settings a client that is not trusted may still set through `SetOptions` (Nix 2.8's
/// list); every other override from such a client is ignored with a warning.
const UNTRUSTED_SETTINGS: &[&str] = &[
    "build-timeout",
    "timeout",
    "max-silent-time",
    "build-max-silent-time",
    "build-poll-interval",
    "connect-timeout",
];

/// What one connection has negotiated and set.
pub(crate) struct Session<'d> {
    pub daemon: &'d Daemon,
    pub trusted: bool,
    pub worker: WorkerConfig,
    /// Activity ids are per connection; the client keys its display by them.
    pub next_activity: u64,
    /// What each builder of the last build request used (for BuildResult's CPU times).
    pub build_usage: std::collections::HashMap<nixb_store::StorePath, nixb_goals::ResourceUsage>,
    /// The client's verbosity (Nix's levels: 3 shows informational lines).
    pub verbosity: u64,
    /// This connection's temporary roots (`temproots/<pid>-<connection>`), created on
    /// first use and removed when the connection ends, as a Nix daemon's per-connection
    /// process takes its own with it: those of `AddTempRoot`, of the paths it adds, and
    /// (through its requests' event sinks) of the goals that build for it.
    pub temp_roots: Arc<RootsOwner>,
    /// The client's end, polled for a hang-up while its builds run.
    pub hangup: Option<crate::hangup::Hangup>,
}

/// Numbers the daemon's connections, for their temporary roots files.
static CONNECTIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Serves one client until it disconnects.
pub(crate) fn serve<R: Read, W: Write>(
    daemon: &Daemon,
    r: R,
    w: W,
    trusted: bool,
    hangup: Option<crate::hangup::Hangup>,
) -> Result<()> {
    let info = nixb_protocol::ServerInfo {
        version: Version::MAX,
        nix_version: daemon.config().nix_version.clone(),
        trusted: Some(if trusted {
            TrustedFlag::Trusted
        } else {
            TrustedFlag::NotTrusted
        }),
        features: BTreeSet::new(),
    };
    let mut conn = ServerConnection::accept(r, w, daemon.store().store_dir().clone(), &info)?;
    let config = daemon.store().config();
    let temp_roots = Arc::new(RootsOwner::new(
        &config.state_dir,
        config.store_dir.clone(),
        CONNECTIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
    ));
    // What the store roots while serving this connection is the connection's.
    let _roots = daemon.store().roots_of_this_thread(temp_roots.clone());
    let mut session = Session {
        daemon,
        trusted,
        worker: daemon.config().worker.clone(),
        next_activity: 1,
        build_usage: Default::default(),
        verbosity: 3,
        temp_roots,
        hangup,
    };
    loop {
        let req = match conn.read_request() {
            Ok(Some(req)) => req,
            Ok(None) => return Ok(()),
            Err(e) if e.is_eof() => return Ok(()),
            Err(e) => {
                // Out of step: say why, then hang up.
                let _ = conn.fail(&RemoteError::new(e.to_string()));
                return Err(e.into());
            }
        };
        match session.handle(&mut conn, &req) {
            Ok(Some(resp)) => conn.finish(&req, &resp)?,
            Ok(None) => {}
            Err(e @ DaemonError::Broken(_)) => return Err(e),
            Err(e @ (DaemonError::Protocol(_) | DaemonError::Wire(_))) => {
                let _ = conn.fail(&RemoteError::new(e.to_string()));
                return Err(e);
            }
            Err(e) => {
                let mut err = RemoteError::new(e.to_string());
                if let DaemonError::Build { status, .. } = &e {
                    err.status = *status;
                }
                conn.fail(&err)?;
                // Tunnelled data that was not read to its end leaves the stream out of
                // step; nothing tells where the next request starts.
                if req.data(conn.ctx()) == DataTransfer::Tunnelled {
                    return Err(e);
                }
            }
        }
    }
}

fn to_wire_info(i: ValidPathInfo) -> PathInfo {
    PathInfo {
        deriver: i.deriver,
        nar_hash: i.nar_hash,
        references: i.references,
        registration_time: u64::try_from(i.registration_time).unwrap_or(0),
        nar_size: i.nar_size,
        ultimate: i.ultimate,
        sigs: i.sigs.into_iter().collect(),
        ca: i.ca,
    }
}

pub(crate) fn from_wire_info(i: &WireValidPathInfo) -> ValidPathInfo {
    ValidPathInfo {
        path: i.path.clone(),
        nar_hash: i.info.nar_hash.clone(),
        nar_size: i.info.nar_size,
        deriver: i.info.deriver.clone(),
        references: i.info.references.clone(),
        registration_time: i64::try_from(i.info.registration_time).unwrap_or(0),
        ultimate: i.info.ultimate,
        sigs: i.info.sigs.iter().cloned().collect(),
        ca: i.info.ca.clone(),
    }
}

fn io_err(
    step: &'static str,
    path: &std::path::Path,
) -> impl FnOnce(std::io::Error) -> DaemonError {
    let path = path.display().to_string();
    move |source| DaemonError::Io { step, path, source }
}

impl Session<'_> {
    fn store(&self) -> &nixb_store::local_store::LocalStore {
        self.daemon.store()
    }

    pub(crate) fn dir(&self) -> &StoreDir {
        self.daemon.store().store_dir()
    }

    /// Protects `p` from every collector until this connection ends.
    pub(crate) fn add_temp_root(&mut self, p: &StorePath) -> Result<()> {
        Ok(self.temp_roots.add(p)?)
    }

    fn refuse_untrusted(&self, what: &str) -> Result<()> {
        if self.trusted {
            Ok(())
        } else {
            Err(DaemonError::Refused(format!(
                "{what} is not allowed because you are not in 'trusted-users'"
            )))
        }
    }

    /// Answers one request; `None` when the answer has been sent already.
    fn handle<R: Read, W: Write>(
        &mut self,
        conn: &mut ServerConnection<R, W>,
        req: &Request,
    ) -> Result<Option<Response>> {
        use Request as Q;
        use Response as A;
        let store = self.daemon.store();
        Ok(Some(match req {
            Q::SetOptions(s) => {
                let warnings = self.set_options(s);
                for w in warnings {
                    conn.frame(&StderrFrame::Next(format!("warning: {w}\n").into_bytes()))?;
                }
                A::Nothing
            }
            Q::IsValidPath(p) => A::Bool(store.is_valid_path(p)?),
            Q::QueryValidPaths { paths, .. } => {
                let mut valid = BTreeSet::new();
                for p in paths {
                    if store.is_valid_path(p)? {
                        valid.insert(p.clone());
                    }
                }
                A::Paths(valid)
            }
            Q::QueryPathInfo(p) => A::PathInfo(store.query_path_info(p)?.map(to_wire_info)),
            Q::QueryPathHash(p) => {
                let i = self.valid_info(p)?;
                A::Strings(vec![i.nar_hash.to_hex()])
            }
            Q::QueryReferences(p) => A::Paths(self.valid_info(p)?.references),
            Q::QueryDeriver(p) => A::OptPath(self.valid_info(p)?.deriver),
            Q::QueryReferrers(p) => A::Paths(store.query_referrers(p)?),
            Q::QueryValidDerivers(p) => {
                A::Paths(store.query_valid_derivers(p)?.into_iter().collect())
            }
            Q::QueryDerivationOutputs(drv) => A::Paths(
                store
                    .read_derivation(drv)?
                    .output_paths()
                    .into_values()
                    .collect(),
            ),
            Q::QueryDerivationOutputNames(drv) => {
                A::Strings(store.read_derivation(drv)?.outputs.into_keys().collect())
            }
            Q::QueryDerivationOutputMap(drv) => A::OutputMap(
                store
                    .read_derivation(drv)?
                    .output_paths()
                    .into_iter()
                    .map(|(name, p)| (name, Some(p)))
                    .collect(),
            ),
            Q::QueryPathFromHashPart(hash) => A::OptPath(self.path_from_hash_part(hash)?),
            Q::QueryAllValidPaths => A::Paths(self.all_valid_paths()?),
            Q::HasSubstitutes(_) => A::Bool(false),
            Q::QuerySubstitutablePaths(_) => A::Paths(BTreeSet::new()),
            Q::QuerySubstitutablePathInfo(_) | Q::QuerySubstitutablePathInfos(_) => {
                A::SubstitutablePathInfos(BTreeMap::new())
            }
            Q::QueryMissing(targets) => A::Missing(self.query_missing(targets)?),
            Q::AddToStore(r) => A::ValidPathInfo(self.add_to_store(conn, r)?),
            Q::AddToStoreOld(r) => A::Path(self.add_to_store_old(conn, r)?),
            Q::AddTextToStore {
                name,
                text,
                references,
            } => A::Path(store.add_text_to_store(name, text, references)?),
            Q::AddToStoreNar(r) => {
                self.add_to_store_nar(conn, r)?;
                A::Nothing
            }
            Q::AddMultipleToStore {
                dont_check_sigs, ..
            } => {
                self.add_multiple_to_store(conn, *dont_check_sigs)?;
                A::Nothing
            }
            Q::NarFromPath(p) => {
                self.valid_info(p)?;
                conn.frame(&StderrFrame::Last)?;
                // Past STDERR_LAST no error can be sent: a failed dump ends the connection.
                nixb_serve::import::dump_nar(store, p, conn.writer())
                    .map_err(|e| DaemonError::Broken(e.to_string()))?;
                conn.writer().flush()?;
                return Ok(None);
            }
            Q::ExportPath { path, .. } => {
                self.valid_info(path)?;
                let paths = BTreeSet::from([path.clone()]);
                let mut bytes = Vec::new();
                {
                    let mut w = nixb_protocol::wire::WireWriter::new(&mut bytes);
                    nixb_serve::import::export_paths(store, &paths, &mut w)?;
                    w.flush()?;
                }
                let mut sink = conn.tunnel_sink();
                sink.write_all(&bytes)
                    .and_then(|()| sink.flush())
                    .map_err(|e| DaemonError::Socket {
                        path: "client".into(),
                        source: e,
                    })?;
                A::One
            }
            Q::ImportPaths => {
                self.refuse_untrusted("importing paths without signatures")?;
                let mut src = WireReader::new(conn.tunnel());
                let paths = nixb_serve::import::import_paths(store, &mut src)?;
                A::PathList(paths)
            }
            Q::EnsurePath(p) => {
                if !store.is_valid_path(p)? {
                    build::realise(
                        self,
                        conn,
                        &[WireDerivedPath::Opaque(p.clone())],
                        WireBuildMode::Normal,
                    )?;
                }
                A::One
            }
            Q::BuildPaths { paths, mode } => {
                self.check_build_mode(*mode)?;
                build::build_paths(self, conn, paths, *mode)?;
                A::One
            }
            Q::BuildPathsWithResults { paths, mode } => {
                self.check_build_mode(*mode)?;
                A::BuildResults(build::build_paths_with_results(self, conn, paths, *mode)?)
            }
            Q::BuildDerivation { drv_path, mode, .. } => {
                self.check_build_mode(*mode)?;
                // The derivation that is built is the one in the store: a client cannot
                // have an arbitrary one built under a path of its choosing.
                if !store.is_valid_path(drv_path)? {
                    return Err(DaemonError::Refused(format!(
                        "derivation '{}' is not in the store; building a derivation sent \
                         over the connection is not supported yet",
                        self.dir().print(drv_path)
                    )));
                }
                A::BuildResult(build::build_derivation(self, conn, drv_path, *mode)?)
            }
            Q::AddTempRoot(p) => {
                self.add_temp_root(p)?;
                A::One
            }
            Q::AddIndirectRoot(link) => {
                self.add_indirect_root(link)?;
                A::One
            }
            // Nix 2.x answers this obsolete operation without doing anything: temporary
            // roots reach a running collector through its socket.
            Q::SyncWithGC => A::One,
            Q::FindRoots => A::Roots(self.find_roots()?),
            Q::CollectGarbage(o) => A::GcResults(self.collect_garbage(conn, o)?),
            Q::AddPermRoot { path, gc_root } => A::PermRoot(self.add_perm_root(path, gc_root)?),
            Q::OptimiseStore => {
                self.optimise_store(conn)?;
                A::One
            }
            Q::AddSignatures { path, sigs } => {
                self.add_signatures(path, sigs)?;
                A::One
            }
            Q::VerifyStore {
                check_contents,
                repair,
            } => {
                if *repair && !self.trusted {
                    return Err(DaemonError::Refused(
                        "you are not privileged to repair paths".into(),
                    ));
                }
                A::Bool(self.verify_store(conn, *check_contents, *repair)?)
            }
            // Without the ca-derivations feature Nix answers an empty set.
            Q::QueryRealisation(_) if conn.ctx().at_least(31) => A::Strings(Vec::new()),
            Q::QueryRealisation(_) => A::Paths(BTreeSet::new()),
            Q::AddBuildLog(drv) => {
                let log_dir = self.worker.log.log_dir.clone();
                let trusted = self.trusted;
                let printed = self.dir().print(drv);
                // The log is read to its end marker whatever happens, so the connection
                // stays in step.
                let mut framed = conn.framed();
                let added = if trusted {
                    add::add_build_log(&log_dir, drv, &printed, &mut framed)
                } else {
                    Err(DaemonError::Refused(
                        "you are not privileged to add logs".into(),
                    ))
                };
                let drained = framed.finish();
                added?;
                drained?;
                A::One
            }
            Q::RegisterDrvOutput { .. } => {
                return Err(DaemonError::Refused(format!(
                    "{} through the nixb daemon is not supported yet",
                    req.op().name()
                )))
            }
        }))
    }

    /// Why a path a client sends may not be added, as Nix's daemon decides: only a
    /// trusted client may waive the signature check; a checked path needs a valid
    /// signature by a trusted key or a content address (unless `require-sigs` is off).
    fn signature_refusal(
        &self,
        info: &ValidPathInfo,
        dont_check_sigs: bool,
    ) -> Option<DaemonError> {
        let check = !(self.trusted && dont_check_sigs);
        let cache = &self.daemon.config().worker.cache_options;
        (check && !add::has_valid_signature(self.store(), cache, info)).then(|| {
            DaemonError::Refused(format!(
                "cannot add path '{}' because it lacks a valid signature",
                self.dir().print(&info.path)
            ))
        })
    }

    /// `VerifyStore`, as Nix's `verifyStore` goes: a valid path gone from disk is
    /// removed from the database when nothing valid refers to it (else it is an error);
    /// with `check_contents`, one line per modified path. With `repair`, each modified or
    /// still-referred missing path is rebuilt from its deriver (there are no substitutes
    /// to fetch it from). True when errors remain.
    fn verify_store<R: Read, W: Write>(
        &mut self,
        conn: &mut ServerConnection<R, W>,
        check_contents: bool,
        repair: bool,
    ) -> Result<bool> {
        self.info_line(conn, "reading the Nix store...")?;
        let mut errors = false;
        self.info_line(conn, "checking path existence...")?;
        let all = self.store().query_all_valid_paths()?;
        let mut done = BTreeSet::new();
        let mut present = BTreeSet::new();
        for p in &all {
            self.verify_existence(conn, p, &mut done, &mut present, repair, &mut errors)?;
        }
        // What is missing now is what was reported above.
        let report = self.store().verify(check_contents)?;
        if check_contents {
            self.info_line(conn, "checking link hashes...")?;
            self.info_line(conn, "checking store hashes...")?;
        }
        errors |= !report.broken_references.is_empty() || !report.unreadable.is_empty();
        let mismatched: BTreeSet<&StorePath> =
            report.hash_mismatches.iter().map(|(p, _, _)| p).collect();
        if report
            .size_mismatches
            .iter()
            .any(|(p, _, _)| !mismatched.contains(p))
        {
            errors = true;
        }
        for (p, expected, got) in &report.hash_mismatches {
            self.line(
                conn,
                &format!(
                    "path '{}' was modified! expected hash '{}', got '{}'",
                    self.dir().print(p),
                    expected.to_base32_typed(),
                    got.to_base32_typed()
                ),
            )?;
            // Short-circuits: without `repair` nothing is rebuilt.
            if !repair || !self.repair_path(conn, p)? {
                errors = true;
            }
        }
        Ok(errors)
    }

    /// Nix's `verifyPath`: a path missing from disk is invalidated once every referrer
    /// has been found missing (and invalidated) too.
    fn verify_existence<R: Read, W: Write>(
        &mut self,
        conn: &mut ServerConnection<R, W>,
        p: &StorePath,
        done: &mut BTreeSet<StorePath>,
        present: &mut BTreeSet<StorePath>,
        repair: bool,
        errors: &mut bool,
    ) -> Result<()> {
        if !done.insert(p.clone()) {
            return Ok(());
        }
        if std::fs::symlink_metadata(self.dir().to_path(p)).is_ok() {
            present.insert(p.clone());
            return Ok(());
        }
        let mut can_invalidate = true;
        for r in self.store().query_referrers(p)? {
            if r != *p {
                self.verify_existence(conn, &r, done, present, repair, errors)?;
                if present.contains(&r) {
                    can_invalidate = false;
                }
            }
        }
        let printed = self.dir().print(p);
        if can_invalidate {
            self.info_line(
                conn,
                &format!("path '{printed}' disappeared, removing from database..."),
            )?;
            self.store().invalidate_path(p)?;
        } else {
            self.line(
                conn,
                &format!("path '{printed}' disappeared, but it still has valid referrers!"),
            )?;
            if !repair {
                *errors = true;
            } else {
                match self.repair_path(conn, p) {
                    Ok(true) => {}
                    Ok(false) => *errors = true,
                    Err(e) => {
                        self.line(conn, &format!("warning: {e}"))?;
                        *errors = true;
                    }
                }
            }
        }
        Ok(())
    }

    /// Nix's `repairPath` without substituters: rebuilds `p`'s deriver in repair mode.
    /// False when that build failed; an error when there is no valid deriver.
    fn repair_path<R: Read, W: Write>(
        &mut self,
        conn: &mut ServerConnection<R, W>,
        p: &StorePath,
    ) -> Result<bool> {
        let deriver = self.store().query_path_info(p)?.and_then(|i| i.deriver);
        let deriver = match deriver {
            Some(d) if self.store().is_valid_path(&d)? => d,
            _ => {
                return Err(DaemonError::Refused(format!(
                    "cannot repair path '{}'",
                    self.dir().print(p)
                )))
            }
        };
        let target = WireDerivedPath::Built {
            drv: deriver,
            outputs: OutputsSpec::All,
        };
        let outcome = build::realise(self, conn, &[target], WireBuildMode::Repair)?;
        Ok(outcome.exit_status == 0)
    }

    /// A line the client prints whatever its verbosity (Nix's `printError`).
    fn line<R: Read, W: Write>(&self, conn: &mut ServerConnection<R, W>, text: &str) -> Result<()> {
        conn.frame(&StderrFrame::Next(format!("{text}\n").into_bytes()))?;
        Ok(())
    }

    /// A line at Nix's `lvlInfo` (3): shown unless the client asked for less.
    fn info_line<R: Read, W: Write>(
        &self,
        conn: &mut ServerConnection<R, W>,
        text: &str,
    ) -> Result<()> {
        if self.verbosity >= 3 {
            self.line(conn, text)?;
        }
        Ok(())
    }

    fn valid_info(&self, p: &StorePath) -> Result<ValidPathInfo> {
        self.store().query_path_info(p)?.ok_or_else(|| {
            DaemonError::Refused(format!("path '{}' is not valid", self.dir().print(p)))
        })
    }

    fn check_build_mode(&self, mode: WireBuildMode) -> Result<()> {
        if mode == WireBuildMode::Repair && !self.trusted {
            return Err(DaemonError::Refused(
                "repairing is not allowed because you are not in 'trusted-users'".into(),
            ));
        }
        Ok(())
    }

    /// Applies a client's settings to this connection's worker config; returns the
    /// warnings for what was ignored: restricted overrides of an untrusted client, and a
    /// `max-jobs` above the daemon's.
    fn set_options(&mut self, s: &ClientSettings) -> Vec<String> {
        let w = &mut self.worker;
        w.keep_failed = s.keep_failed;
        w.keep_going = s.keep_going;
        w.fallback = s.try_fallback;
        if let Ok(n) = usize::try_from(s.max_build_jobs) {
            w.max_jobs = n;
        }
        w.max_silent_time = (s.max_silent_time > 0).then(|| Duration::from_secs(s.max_silent_time));
        if s.build_cores > 0 {
            if let Ok(n) = usize::try_from(s.build_cores) {
                w.cores = n;
            }
        }
        w.use_substitutes = s.use_substitutes;
        self.verbosity = s.verbosity;
        let mut warnings = Vec::new();
        let mut asked_jobs = usize::try_from(s.max_build_jobs).ok();
        for (name, value) in &s.overrides {
            if !self.trusted && !UNTRUSTED_SETTINGS.contains(&name.as_str()) {
                warnings.push(format!(
                    "ignoring the client-specified setting '{name}', because it is a \
                     restricted setting and you are not a trusted user"
                ));
                continue;
            }
            let secs = || value.parse::<u64>().ok();
            let w = &mut self.worker;
            match name.as_str() {
                "timeout" | "build-timeout" => {
                    if let Some(t) = secs() {
                        w.timeout = (t > 0).then(|| Duration::from_secs(t));
                    }
                }
                "max-silent-time" | "build-max-silent-time" => {
                    if let Some(t) = secs() {
                        w.max_silent_time = (t > 0).then(|| Duration::from_secs(t));
                    }
                }
                "max-jobs" | "build-max-jobs" => {
                    if let Ok(n) = value.parse() {
                        w.max_jobs = n;
                        asked_jobs = Some(n);
                    }
                }
                "cores" | "build-cores" => {
                    if let Ok(n) = value.parse::<usize>() {
                        if n > 0 {
                            w.cores = n;
                        }
                    }
                }
                "keep-going" => w.keep_going = value == "true",
                "keep-failed" => w.keep_failed = value == "true",
                "fallback" => w.fallback = value == "true",
                // Other settings keep the daemon's own values.
                _ => {}
            }
        }
        // The engine is shared: its slots are the daemon's to set, not a client's (unlike
        // `nix-daemon`, whose per-connection engine takes a trusted client's value). Say
        // so rather than build more slowly than the client asked without a word.
        let machine = self.daemon.config().worker.max_jobs;
        if let Some(n) = asked_jobs.filter(|&n| n > machine) {
            let limit = match machine {
                0 => "builds nothing locally".to_string(),
                1 => "runs at most 1 build at a time for all its clients".to_string(),
                m => format!("runs at most {m} builds at a time for all its clients"),
            };
            warnings.push(format!(
                "the daemon {limit} ('max-jobs' in the daemon's nix.conf); the client's \
                 max-jobs {n} does not raise that"
            ));
        }
        warnings
    }

    fn path_from_hash_part(&self, hash: &str) -> Result<Option<StorePath>> {
        Ok(self.store().query_path_from_hash_part(hash)?)
    }

    /// Every valid path in the database, as Nix's daemon answers.
    fn all_valid_paths(&self) -> Result<BTreeSet<StorePath>> {
        Ok(self.store().query_all_valid_paths()?)
    }

    /// What building `targets` would take: every derivation with an invalid wanted
    /// output (and, recursively, its inputs'), and paths that can be neither built nor
    /// substituted. Substitution is not predicted in this version.
    fn query_missing(&self, targets: &[WireDerivedPath]) -> Result<Missing> {
        let store = self.store();
        let mut m = Missing {
            will_build: BTreeSet::new(),
            will_substitute: BTreeSet::new(),
            unknown: BTreeSet::new(),
            download_size: 0,
            nar_size: 0,
        };
        // What is still to look at: a path, or a derivation with the outputs wanted of it
        // (empty: all). What was looked at is kept by path, with the outputs looked at for
        // a derivation: a request's closure can be large, and a set of (path, outputs)
        // pairs would hold a copy of the output names for every edge of the graph.
        let mut todo: Vec<(StorePath, Option<BTreeSet<String>>)> = Vec::new();
        let mut seen_paths: HashSet<StorePath> = HashSet::new();
        let mut seen_drvs: HashMap<StorePath, LookedAt> = HashMap::new();
        for t in targets {
            match t {
                WireDerivedPath::Opaque(p) => todo.push((p.clone(), None)),
                WireDerivedPath::Built { drv, outputs } => todo.push((
                    drv.clone(),
                    Some(match outputs {
                        OutputsSpec::All => BTreeSet::new(),
                        OutputsSpec::Names(n) => n.iter().cloned().collect(),
                    }),
                )),
            }
        }
        while let Some((p, wanted)) = todo.pop() {
            let Some(wanted) = wanted else {
                if !seen_paths.contains(&p) {
                    if !store.is_valid_path(&p)? {
                        m.unknown.insert(p.clone());
                    }
                    seen_paths.insert(p);
                }
                continue;
            };
            match seen_drvs.get_mut(&p) {
                Some(looked) if looked.covers(&wanted) => continue,
                Some(looked) => looked.add(&wanted),
                None => {
                    seen_drvs.insert(p.clone(), LookedAt::new(&wanted));
                }
            }
            if !store.is_valid_path(&p)? {
                m.unknown.insert(p);
                continue;
            }
            let drv = store.read_derivation(&p)?;
            let mut missing = false;
            for (name, out) in drv.output_paths() {
                if (wanted.is_empty() || wanted.contains(&name)) && !store.is_valid_path(&out)? {
                    missing = true;
                }
            }
            if !missing {
                continue;
            }
            m.will_build.insert(p);
            for (input, outs) in drv.input_drvs {
                todo.push((input, Some(outs)));
            }
            for src in drv.input_srcs {
                todo.push((src, None));
            }
        }
        Ok(m)
    }

    /// `AddToStore` from 1.25: the dump comes framed; nothing is read by path.
    fn add_to_store<R: Read, W: Write>(
        &mut self,
        conn: &mut ServerConnection<R, W>,
        r: &AddToStoreRequest,
    ) -> Result<WireValidPathInfo> {
        let method = CaMethod::parse(&r.method);
        let mut framed = conn.framed();
        let added = match method {
            Ok(method) => {
                add::add_from_dump(self.store(), &r.name, method, &r.references, &mut framed)
            }
            Err(e) => Err(e.into()),
        };
        // Whatever happened, read to the end marker so the connection stays in step.
        let drained = framed.finish();
        let info = added?;
        drained?;
        Ok(WireValidPathInfo {
            path: info.path.clone(),
            info: to_wire_info(info),
        })
    }

    /// `AddToStore` before 1.25: a plain NAR follows the request.
    fn add_to_store_old<R: Read, W: Write>(
        &mut self,
        conn: &mut ServerConnection<R, W>,
        r: &AddToStoreOldRequest,
    ) -> Result<StorePath> {
        let algo = if r.fixed {
            r.hash_algo.as_str()
        } else {
            "sha256"
        };
        let method = if !r.fixed || r.recursive {
            format!("fixed:r:{algo}")
        } else {
            format!("fixed:{algo}")
        };
        let method = CaMethod::parse(&method)?;
        let info = add::add_from_old_nar(self.store(), &r.base_name, method, conn.reader())?;
        Ok(info.path)
    }

    fn add_to_store_nar<R: Read, W: Write>(
        &mut self,
        conn: &mut ServerConnection<R, W>,
        r: &AddToStoreNarRequest,
    ) -> Result<()> {
        let info = from_wire_info(&r.info);
        let refusal = self.signature_refusal(&info, r.dont_check_sigs);
        if conn.ctx().at_least(23) {
            let mut framed = conn.framed().with_max_total(info.nar_size);
            let added = match refusal {
                Some(e) => Err(e),
                None => nixb_serve::import::add_nar_to_store(self.store(), &info, &mut framed)
                    .map(|_| ())
                    .map_err(DaemonError::from),
            };
            let drained = framed.finish();
            added?;
            drained?;
            Ok(())
        } else {
            if let Some(e) = refusal {
                return Err(e);
            }
            let mut src = conn.tunnel();
            nixb_serve::import::add_nar_to_store(self.store(), &info, &mut src)?;
            Ok(())
        }
    }

    fn add_multiple_to_store<R: Read, W: Write>(
        &mut self,
        conn: &mut ServerConnection<R, W>,
        dont_check_sigs: bool,
    ) -> Result<()> {
        let cx = conn.ctx().clone();
        let store = self.daemon.store();
        let this = &*self;
        let mut framed = conn.framed();
        let added = (|| -> Result<()> {
            let mut r = WireReader::new(&mut framed);
            let n = read_multiple_header(&mut r)?;
            for _ in 0..n {
                let info = read_multiple_item(&mut r, &cx)?;
                let info = from_wire_info(&info);
                if let Some(e) = this.signature_refusal(&info, dont_check_sigs) {
                    return Err(e);
                }
                // A NAR that runs past its declared size is cut off there, not written
                // to the store in full before the size check refuses it.
                r.set_limit(Some(info.nar_size));
                nixb_serve::import::add_nar_to_store(store, &info, &mut r)?;
                r.set_limit(None);
            }
            Ok(())
        })();
        let drained = framed.finish();
        added?;
        drained?;
        Ok(())
    }

    /// Nix's indirect root: `gcroots/auto/<sha1 of the link, base32>` pointing at the
    /// link the client made.
    pub(crate) fn add_indirect_root(&self, link: &str) -> Result<()> {
        let state = &self.store().config().state_dir;
        let auto = state.join("gcroots").join("auto");
        std::fs::create_dir_all(&auto).map_err(io_err("creating", &auto))?;
        let hash = nixb_store::Hash::digest(nixb_store::HashAlgo::Sha1, link.as_bytes())
            .encode(nixb_store::Encoding::Base32);
        let root = auto.join(hash);
        let tmp = auto.join(format!(".tmp-{}-{}", std::process::id(), fastrand_suffix()));
        std::os::unix::fs::symlink(link, &tmp).map_err(io_err("creating", &tmp))?;
        std::fs::rename(&tmp, &root).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            io_err("renaming into", &root)(e)
        })?;
        Ok(())
    }
}

/// A per-call suffix for temporary names (the thread id keeps concurrent calls apart).
fn fastrand_suffix() -> String {
    format!("{:?}", std::thread::current().id())
        .chars()
        .filter(|c| c.is_ascii_digit())
        .collect()
}

/// The outputs of a derivation that `QueryMissing` has looked at: all, or these.
enum LookedAt {
    All,
    Names(Vec<String>),
}

impl LookedAt {
    /// Outputs `wanted` (empty: all) looked at.
    fn new(wanted: &BTreeSet<String>) -> LookedAt {
        if wanted.is_empty() {
            LookedAt::All
        } else {
            LookedAt::Names(wanted.iter().cloned().collect())
        }
    }

    fn covers(&self, wanted: &BTreeSet<String>) -> bool {
        match self {
            LookedAt::All => true,
            LookedAt::Names(n) => !wanted.is_empty() && wanted.iter().all(|w| n.contains(w)),
        }
    }

    fn add(&mut self, wanted: &BTreeSet<String>) {
        match self {
            LookedAt::All => {}
            LookedAt::Names(_) if wanted.is_empty() => *self = LookedAt::All,
            LookedAt::Names(n) => {
                for w in wanted {
                    if !n.contains(w) {
                        n.push(w.clone());
                    }
                }
            }
        }
    }
}
