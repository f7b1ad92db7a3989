//! Starting a builder (the original's `startBuilder`) and the state a running build keeps:
//! its directory, its log, and the hash rewrites of an unsandboxed rebuild.
//!
//! Builds run unsandboxed ([`nixb_sandbox::Isolation::Plain`]), or with `sandbox` in a
//! chroot ([`crate::sandboxing`]), as a build user when `build-users-group` is set. Either
//! way, outputs that are already valid cannot be rebuilt in place (unsandboxed the builder
//! would overwrite them; in the chroot they could not be moved out over them). As the
//! original does, such outputs (every output under `--check`; corrupt ones under
//! `--repair`) are *redirected*: the builder is told a different path of the same length,
//! whose hash part is derived from the derivation and the path, and the result is rewritten
//! back before it is checked or moved over the original.
//!
//! The spec handed to the sandbox crate is built by [`builder_spec`].

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;

use nixb_logs::{LimitState, LogSink};
use nixb_sandbox::{BuildUserIds, Isolation, Personality, SandboxSpec};
use nixb_store::canon::InodesSeen;
use nixb_store::derivation::Derivation;
use nixb_store::{Encoding, Hash, HashAlgo, StoreDir, StorePath};

use crate::build_dir::{delete_path, BuildDir};
use crate::config::BuildMode;
use crate::env::{
    build_dir_files, builder_env, export_references, parse_export_references_graph,
    references_graph_text, EnvError, EnvParams,
};
use crate::error::{quoted, BuildError, Rejection};
use crate::event::{Event, Level};
use crate::sandboxing::{self, Extraction, HeldUser};
use crate::services::Step;

use super::plan::{can_build_locally, required_system_features, BuildPlan};

/// What a started build holds until it is done.
pub(crate) struct RunningBuild {
    pub dir: Option<BuildDir>,
    /// Why the log file could not be created, with the derivation named: the build fails
    /// at the builder's first output or its end, and nothing is registered.
    log_create_error: Option<String>,
    log: Option<LogSink>,
    log_error: Option<String>,
    /// Hash part of a real output → hash part of its redirected path.
    pub rewrites_to_tmp: Vec<(String, String)>,
    pub rewrites_from_tmp: Vec<(String, String)>,
    /// Real output path → the path the builder was told instead.
    pub redirected: BTreeMap<StorePath, StorePath>,
    /// Corrupt outputs being repaired (their redirected result replaces them).
    pub redirected_bad: BTreeSet<StorePath>,
    pub inodes_seen: InodesSeen,
    pub disk_full: bool,
    store_dir: StoreDir,
    /// The chroot directory, when the build runs in one.
    chroot: Option<PathBuf>,
    /// The build user; dropping it kills the user's processes and releases it.
    user: Option<HeldUser>,
    extraction: Extraction,
    /// The output paths the builder was told to create (redirected ones included).
    builder_outputs: Vec<StorePath>,
}

impl RunningBuild {
    /// Writes a chunk of builder output to the log; `Ok(Some(limit))` when it went over
    /// max-build-log-size and the builder must die, `Err` when the log file could not be
    /// created (the build fails: its output would be lost).
    pub fn log_chunk(&mut self, chunk: &[u8]) -> Result<Option<u64>, String> {
        if let Some(e) = &self.log_create_error {
            return Err(e.clone());
        }
        Ok(write_log_chunk(&mut self.log, &mut self.log_error, chunk))
    }

    /// The error of creating the log file, if that failed; taken once.
    pub fn take_log_create_error(&mut self) -> Option<String> {
        self.log_create_error.take()
    }

    /// Ends the log. A compressed log finishes on its writer thread while the worker goes
    /// on (see [`crate::services::Services::finish_log_later`]); errors of earlier writes are returned here.
    pub fn close_log(&mut self, cx: &mut Step<'_>) -> Result<(), String> {
        if let Some(sink) = self.log.take() {
            cx.services.finish_log_later(sink.finish_in_background());
        }
        match self.log_error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The error for a builder that exited unsuccessfully; notes whether the disk is (nearly)
    /// full, since that makes the failure likely transient.
    pub fn failure_error(
        &mut self,
        cx: &Step<'_>,
        drv: &StorePath,
        status: ExitStatus,
    ) -> Rejection {
        const REQUIRED: u64 = 8 * 1024 * 1024;
        let low = |p: &Path| {
            nix::sys::statvfs::statvfs(p)
                .map(|st| st.blocks_available().saturating_mul(st.fragment_size()) < REQUIRED)
                .unwrap_or(false)
        };
        self.disk_full =
            low(cx.store_dir().as_path()) || self.dir.as_ref().is_some_and(|d| low(d.path()));
        Rejection::build(
            crate::event::FailureKind::BuilderFailed,
            format!(
                "builder for {} {}",
                quoted(cx.store_dir(), drv),
                status_to_string(status)
            ),
        )
    }

    /// The builder has exited: kill whatever its user left running (unsandboxed builds can
    /// leave daemons; in the chroot the PID namespace died with the builder).
    pub fn kill_leftovers(&mut self, cx: &mut Step<'_>) {
        if let Some(u) = &self.user {
            if let Err(e) = u.kill_all_processes() {
                cx.message(Level::Warn, e.to_string());
            }
        }
    }

    /// Takes the outputs out of the build (chroot and/or build user) into the store,
    /// checked and, where a descriptor could be held outside, copied (see
    /// [`crate::sandboxing`]).
    pub fn extract_outputs(&mut self) -> Result<(), Rejection> {
        if self.chroot.is_none() && self.extraction == Extraction::Move && self.user.is_none() {
            return Ok(()); // unsandboxed as the caller: outputs are where the builder wrote them
        }
        let uids = self.user.as_ref().map(HeldUser::uids);
        for p in &self.builder_outputs {
            sandboxing::extract_output(
                &self.store_dir,
                self.chroot.as_deref(),
                p,
                self.extraction,
                Some(uids.clone()),
            )?;
        }
        Ok(())
    }

    fn remove_chroot(&mut self, cx: &mut Step<'_>) {
        if let Some(root) = self.chroot.take() {
            if let Err(e) = delete_path(&root) {
                cx.message(
                    Level::Warn,
                    format!("deleting chroot directory '{}': {e}", root.display()),
                );
            }
        }
    }

    /// A failed build: keep the directory with keep-failed, delete it otherwise.
    pub fn abandon(mut self, cx: &mut Step<'_>, _normal_mode: bool) {
        let _ = self.close_log(cx);
        self.kill_leftovers(cx);
        if cx.cfg.keep_failed {
            // Unchecked and not registered: the outputs are only there to look at.
            for p in &self.builder_outputs {
                if let Err(e) = sandboxing::extract_output(
                    &self.store_dir,
                    self.chroot.as_deref(),
                    p,
                    Extraction::Move,
                    None,
                ) {
                    cx.message(Level::Warn, e.message);
                }
            }
        }
        self.remove_chroot(cx);
        if let Some(dir) = self.dir.take() {
            if cx.cfg.keep_failed {
                match dir.keep() {
                    Ok(p) => cx.message(
                        Level::Error,
                        format!("note: keeping build directory '{}'", p.display()),
                    ),
                    Err(e) => cx.message(Level::Warn, e.to_string()),
                }
            } else if let Err(e) = cx.services.build_dirs().remove(dir) {
                cx.message(Level::Warn, e.to_string());
            }
        }
        self.remove_redirected(cx);
    }

    /// A successful build: delete the directory and redirected leftovers. The directory
    /// is deleted once the loop has nothing better to do (see
    /// [`crate::services::Services::remove_later`]).
    pub fn finish(mut self, cx: &mut Step<'_>) {
        let _ = self.close_log(cx);
        self.remove_chroot(cx);
        if let Some(dir) = self.dir.take() {
            cx.services.remove_later(dir);
        }
        self.remove_redirected(cx);
    }

    fn remove_redirected(&mut self, cx: &mut Step<'_>) {
        for tmp in self.redirected.values() {
            let p = self.store_dir.to_path(tmp);
            if let Err(e) = delete_path(&p) {
                cx.message(Level::Warn, format!("deleting '{}': {e}", p.display()));
            }
        }
        self.redirected.clear();
    }

    /// Redirects output `path`: the builder is told another path of the same length.
    fn add_hash_rewrite(
        &mut self,
        drv: &StorePath,
        path: &StorePath,
    ) -> Result<StorePath, BuildError> {
        let sd = &self.store_dir;
        let seed = format!("rewrite:{}:{}", sd.print(drv), sd.print(path));
        let h = Hash::digest(HashAlgo::Sha256, seed.as_bytes()).encode(Encoding::Base32);
        let h2 = &h[..nixb_store::path::HASH_CHARS];
        let tmp = StorePath::from_base_name(&format!("{h2}-{}", path.name()))
            .map_err(|e| BuildError::misc("making a temporary output path", e))?;
        let real = sd.to_path(&tmp);
        delete_path(&real)
            .map_err(|e| BuildError::misc(format!("removing '{}'", real.display()), e))?;
        self.rewrites_to_tmp
            .push((path.hash_part().to_string(), h2.to_string()));
        self.rewrites_from_tmp
            .push((h2.to_string(), path.hash_part().to_string()));
        self.redirected.insert(path.clone(), tmp.clone());
        Ok(tmp)
    }

    pub fn rewriter(pairs: &[(String, String)]) -> Result<nixb_hashrewrite::Rewriter, BuildError> {
        nixb_hashrewrite::Rewriter::new(
            pairs
                .iter()
                .map(|(a, b)| (a.as_bytes().to_vec(), b.as_bytes().to_vec())),
        )
        .map_err(|e| BuildError::misc("preparing hash rewrites", e))
    }
}

/// `failed with exit code N` / `failed due to signal N`, as Nix words it.
fn status_to_string(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = status.code() {
        format!("failed with exit code {code}")
    } else if let Some(sig) = status.signal() {
        let name = nix::sys::signal::Signal::try_from(sig)
            .map(|s| s.as_str())
            .unwrap_or("unknown signal");
        format!("failed due to signal {sig} ({name})")
    } else {
        "failed abnormally".into()
    }
}

/// Everything `spawn` needs, prepared by the goal.
pub(crate) struct BuilderInvocation {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub build_dir: PathBuf,
    pub platform: String,
    pub system: String,
    pub impersonate_linux_26: bool,
    pub user: Option<BuildUserIds>,
    pub isolation: Isolation,
}

/// The sandbox spec for an invocation.
pub(crate) fn builder_spec(inv: BuilderInvocation, log_fd: OwnedFd) -> SandboxSpec {
    SandboxSpec {
        program: inv.program,
        args: inv.args.into_iter().map(OsString::from).collect(),
        env: inv
            .env
            .into_iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)))
            .collect(),
        cwd: inv.build_dir,
        log_fd,
        user: inv.user,
        personality: Personality::for_platform(
            &inv.platform,
            &inv.system,
            inv.impersonate_linux_26,
        ),
        isolation: inv.isolation,
        announce: None,
        cgroup: None,
    }
}

/// Prepares and starts the builder of the build `g` plans, handing it to the scheduler;
/// the running build is returned. A
/// [`BuildError::Build`] is the derivation's fault (a permanent failure).
pub(crate) fn start_builder(
    g: &BuildPlan,
    cx: &mut Step<'_>,
    user: Option<HeldUser>,
) -> Result<RunningBuild, BuildError> {
    let sd = cx.store_dir().clone();
    let drv = g
        .drv
        .as_ref()
        .ok_or_else(|| BuildError::Misc("internal error: derivation not loaded".into()))?;
    // Not the derivation's fault but this machine's: like Nix, an error (exit 1) rather
    // than a permanent build failure, and nothing goes into the failed-path cache.
    let required = required_system_features(drv);
    if !can_build_locally(drv, &cx.cfg.system) {
        return Err(BuildError::Misc(format!(
            "a '{}' is required to build {}, but I am a '{}'",
            drv.platform,
            quoted(&sd, &g.drv_path),
            cx.cfg.system
        )));
    }
    if !required.is_subset(&cx.cfg.system_features) {
        let list = |s: &BTreeSet<String>| s.iter().cloned().collect::<Vec<_>>().join(", ");
        return Err(BuildError::Misc(format!(
            "a '{}' with features {{{}}} is required to build {}, but I am a '{}' with features {{{}}}",
            drv.platform,
            list(&required),
            quoted(&sd, &g.drv_path),
            cx.cfg.system,
            list(&cx.cfg.system_features)
        )));
    }

    // A builtin builder runs in a nixb executable, outside the chroot (see `crate::builtins`).
    let builtin = match crate::builtins::builtin_name(&drv.builder) {
        Some(name) => Some(builtin_program(g, cx, drv, name)?),
        None => None,
    };

    let mut chroot = sandboxing::use_chroot(
        cx.cfg.sandbox,
        drv.env.get("__noChroot").is_some_and(|v| v == "1"),
        &sd.print(&g.drv_path),
    )?;
    if builtin.is_some() {
        chroot = false;
    }
    if chroot {
        if let Some(warning) = sandboxing::sandbox_unavailable(cx.cfg, &sd.print(&g.drv_path))? {
            cx.message(Level::Warn, warning);
            chroot = false;
        }
    }

    // A log that cannot be created fails the build at the builder's first output (or its
    // end), as a write error does, and its outputs are not registered.
    let (log, log_create_error) = match LogSink::create(&cx.cfg.log, g.drv_path.base_name()) {
        Ok(sink) => (Some(sink), None),
        Err(e) => (
            None,
            Some(format!(
                "creating the build log of {}: {e}",
                quoted(&sd, &g.drv_path)
            )),
        ),
    };
    let log_file = log.as_ref().and_then(LogSink::path).map(Path::to_path_buf);

    let dir = cx
        .services
        .build_dirs()
        .create(g.drv_path.name())
        .map_err(|e| BuildError::Misc(e.to_string()))?;
    if let Some(u) = &user {
        sandboxing::prepare_for_user(u, sd.as_path(), dir.path())?;
    }
    let build_dir = dir.path().to_path_buf();
    let build_dir_str = build_dir
        .to_str()
        .ok_or_else(|| {
            BuildError::Misc(format!(
                "build directory '{}' is not valid UTF-8",
                build_dir.display()
            ))
        })?
        .to_string();
    let mut build = RunningBuild {
        dir: Some(dir),
        log_create_error,
        log,
        log_error: None,
        rewrites_to_tmp: Vec::new(),
        rewrites_from_tmp: Vec::new(),
        redirected: BTreeMap::new(),
        redirected_bad: BTreeSet::new(),
        inodes_seen: InodesSeen::new(),
        disk_full: false,
        store_dir: sd.clone(),
        chroot: None,
        extraction: sandboxing::extraction_for(chroot, g.fixed_output, user.is_some()),
        user,
        builder_outputs: Vec::new(),
    };

    let env = builder_env(
        &drv.env,
        &EnvParams {
            store_dir: sd.as_str(),
            cores: cx.cfg.cores,
            build_dir: &build_dir_str,
            fixed_output: g.fixed_output,
            impure_env: &cx.cfg.impure_env,
        },
    );

    if let Some(value) = drv.env.get("exportReferencesGraph") {
        write_references_graphs(cx, &build_dir, value)?;
    }

    // Unsandboxed, HOME is the host's file system: make sure the promise that it does not
    // exist holds.
    if !chroot && builtin.is_none() && cx.cfg.homeless_shelter.exists() {
        return Err(BuildError::Misc(format!(
            "home directory '{}' exists; please remove it to assure purity of builds without sandboxing",
            cx.cfg.homeless_shelter.display()
        )));
    }

    // Valid outputs cannot be overwritten in place: build them elsewhere (see module doc).
    for p in g.valid_paths.clone() {
        build.add_hash_rewrite(&g.drv_path, &p)?;
    }
    if g.mode == BuildMode::Repair {
        for p in g.missing_paths.clone() {
            if cx.store.is_valid_path(&p)? && sd.to_path(&p).symlink_metadata().is_ok() {
                build.add_hash_rewrite(&g.drv_path, &p)?;
                build.redirected_bad.insert(p);
            }
        }
    }
    let to_tmp = RunningBuild::rewriter(&build.rewrites_to_tmp)?;
    // Nothing is redirected in the common case: then the environment is used as it is
    // rather than copied string by string (allocations showed up per build).
    let rewriting = !build.rewrites_to_tmp.is_empty();
    let rw = |s: &str| -> String {
        if !rewriting {
            return s.to_owned();
        }
        String::from_utf8_lossy(&to_tmp.rewrite_all(s.as_bytes())).into_owned()
    };
    let env: BTreeMap<String, String> = if rewriting {
        env.iter().map(|(k, v)| (k.clone(), rw(v))).collect()
    } else {
        env
    };
    let args: Vec<String> = drv.args.iter().map(|a| rw(a)).collect();
    // passAsFile and structured attributes: written like the variables, rewritten alike.
    let outputs = drv
        .output_paths()
        .into_iter()
        .map(|(n, p)| (n, sd.print(&p)))
        .collect();
    let files = build_dir_files(&drv.env, &sd, &outputs, |roots| {
        export_references(cx.store, &g.input_paths, roots)
    })
    .map_err(|e| match e {
        EnvError::Json(_) | EnvError::NotObject => {
            BuildError::Build(format!("{}: {e}", quoted(&sd, &g.drv_path)))
        }
        e if e.rejects_derivation() => BuildError::Build(e.to_string()),
        e => BuildError::Misc(e.to_string()),
    })?;
    for f in files {
        let file = build_dir.join(&f.name);
        std::fs::write(&file, rw(&f.contents))
            .map_err(|e| BuildError::misc(format!("writing '{}'", file.display()), e))?;
    }

    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| BuildError::misc("creating the log pipe", e))?;
    nix::fcntl::fcntl(
        read.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .map_err(|e| BuildError::misc("making the log pipe non-blocking", e))?;

    build.builder_outputs = g
        .missing_paths
        .iter()
        .map(|p| build.redirected.get(p).unwrap_or(p).clone())
        .collect();

    let isolation = if chroot {
        let root = sandboxing::chroot_root(&sd, &g.drv_path);
        let (uid, gid) = match &build.user {
            Some(u) => (u.uid(), u.gid()),
            None => (
                nix::unistd::geteuid().as_raw(),
                nix::unistd::getegid().as_raw(),
            ),
        };
        let netns = if g.fixed_output {
            None
        } else {
            cx.services.prepared_netns()
        };
        let spec = sandboxing::chroot_spec(
            sandboxing::ChrootPlan {
                root: root.clone(),
                build_dir: &build_dir,
                inputs: &g.input_paths,
                fixed_output: g.fixed_output,
                netns,
                uid,
                gid,
                user_namespace: build
                    .user
                    .as_ref()
                    .and_then(|u| u.user_namespace(required.contains("uid-range"))),
            },
            cx.cfg,
            cx.store,
        )?;
        build.chroot = Some(root);
        Isolation::Chroot(spec)
    } else {
        Isolation::Plain
    };

    let (program, args) = match builtin {
        Some((exe, name)) => (exe, vec![crate::builtins::BUILTIN_ARG.to_owned(), name]),
        None => (PathBuf::from(&drv.builder), args),
    };
    let inv = BuilderInvocation {
        program,
        args,
        env,
        build_dir: build_dir.clone(),
        platform: drv.platform.clone(),
        system: cx.cfg.system.clone(),
        impersonate_linux_26: cx.cfg.impersonate_linux_26,
        user: match (&isolation, &build.user) {
            // The namespace's maps make the builder its user; no switch of its own.
            (Isolation::Chroot(c), Some(_)) if c.user_namespace.is_some() => None,
            (_, user) => user.as_ref().map(HeldUser::ids).transpose()?,
        },
        isolation,
    };
    let outputs: Vec<StorePath> = g.missing_paths.iter().cloned().collect();
    let platform = drv.platform.clone();
    // `start` returns while a chroot builder still sets up its sandbox, so the worker goes on
    // meanwhile; a step that fails later comes back from the builder's wait as the error of
    // its exit status, naming the step.
    let mut spec = builder_spec(inv, write);
    spec.cgroup = sandboxing::build_cgroup(cx.cfg).unwrap_or_else(|warning| {
        cx.message(Level::Warn, warning);
        None
    });
    // The builder announces itself to the watchdog before the clone returns here.
    spec.announce = cx.services.ensure_watchdog();
    let builder = match nixb_sandbox::start(spec) {
        Ok(b) => {
            if let Some(entry) = b.cgroup_entry() {
                cx.message(
                    Level::Debug,
                    format!("builder {} of {}: {entry}", b.pid, quoted(&sd, &g.drv_path)),
                );
            }
            b
        }
        Err(e) => {
            let msg = format!(
                "failed to set up the build environment for {}: {e}",
                quoted(&sd, &g.drv_path)
            );
            build.abandon(cx, true);
            return Err(BuildError::Misc(msg));
        }
    };
    cx.start_child(builder, read, true, true);
    cx.emit(Event::BuildStarted {
        drv: g.drv_path.clone(),
        outputs,
        mode: g.mode,
        platform,
        log_file,
    });
    Ok(build)
}

/// The executable and name of the builtin builder `name` of `drv`, after checking that it
/// exists, that this worker can run it, and that it reads nothing but inputs of `drv` (the
/// promise the chroot, which it runs outside of, would otherwise keep).
fn builtin_program(
    g: &BuildPlan,
    cx: &Step<'_>,
    drv: &Derivation,
    name: &str,
) -> Result<(PathBuf, String), BuildError> {
    let sd = cx.store_dir();
    let which = quoted(sd, &g.drv_path);
    if !crate::builtins::KNOWN.contains(&name) {
        return Err(BuildError::Build(format!(
            "{which}: unsupported builtin builder '{name}' (nixb has builtin:{})",
            crate::builtins::KNOWN.join(", builtin:")
        )));
    }
    let exe = cx.cfg.builtin_builder.clone().ok_or_else(|| {
        BuildError::Misc(format!(
            "{which} has the builder 'builtin:{name}', which runs in a nixb executable, and \
             none was given to this worker (WorkerConfig::builtin_builder)"
        ))
    })?;
    let paths = crate::builtins::paths_read(name, &drv.env)
        .map_err(|e| BuildError::Build(format!("{which}: builtin:{name}: {e}")))?;
    for p in paths {
        let input = sd.parse(&p).ok().filter(|sp| g.input_paths.contains(sp));
        if input.is_none() {
            return Err(BuildError::Build(format!(
                "{which}: builtin:{name} would read '{p}', which is not an input of the derivation"
            )));
        }
    }
    Ok((exe, name.to_owned()))
}

/// Writes each `exportReferencesGraph` file into the build directory.
fn write_references_graphs(cx: &Step<'_>, build_dir: &Path, value: &str) -> Result<(), BuildError> {
    let sd = cx.store_dir();
    let pairs = parse_export_references_graph(value).ok_or_else(|| {
        BuildError::Build(format!(
            "odd number of tokens in 'exportReferencesGraph': '{value}'"
        ))
    })?;
    for (file_name, path) in pairs {
        nixb_store::path::validate_name(&file_name)
            .map_err(|e| BuildError::Build(format!("'exportReferencesGraph': {e}")))?;
        let sp = sd.parse_prefix(&path).map_err(|_| {
            BuildError::Build(format!(
                "'exportReferencesGraph' contains a non-store path '{path}'"
            ))
        })?;
        if !cx.store.is_valid_path(&sp)? {
            return Err(BuildError::Build(format!(
                "'exportReferencesGraph' contains an invalid path '{path}'"
            )));
        }
        let mut closure = cx.store.compute_closure(&BTreeSet::from([sp]))?;
        // Derivations in the graph bring their outputs' closures along.
        let mut outputs = BTreeSet::new();
        for d in closure.iter().filter(|p| p.is_derivation()) {
            for p in cx.store.read_derivation(d)?.output_paths().into_values() {
                if cx.store.is_valid_path(&p)? {
                    outputs.insert(p);
                }
            }
        }
        closure.extend(cx.store.compute_closure(&outputs)?);
        let mut graph = BTreeMap::new();
        for p in &closure {
            let refs = cx.store.query_references(p)?;
            graph.insert(sd.print(p), refs.iter().map(|r| sd.print(r)).collect());
        }
        let file = build_dir.join(&file_name);
        std::fs::write(&file, references_graph_text(&graph))
            .map_err(|e| BuildError::misc(format!("writing '{}'", file.display()), e))?;
    }
    Ok(())
}

/// Writes a chunk of build output to `log` (if it is kept); `Some(limit)` when it went over
/// max-build-log-size and the build must die. A log that cannot be written is no reason to
/// kill the build: the first error is kept in `log_error` and reported when the log ends.
pub(crate) fn write_log_chunk(
    log: &mut Option<LogSink>,
    log_error: &mut Option<String>,
    chunk: &[u8],
) -> Option<u64> {
    match log.as_mut()?.write(chunk) {
        Ok(LimitState::Within) => None,
        Ok(LimitState::Exceeded { limit }) => Some(limit),
        Err(e) => {
            log_error.get_or_insert_with(|| e.to_string());
            None
        }
    }
}
