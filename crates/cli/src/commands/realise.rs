//! `nixb realise`: build (or find valid) the outputs of derivations and print their paths.

use std::time::Duration;

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use nixb_goals::{BuildMode, HookCommand, Substituter, SubstituterCommand, WorkerConfig};
use nixb_protocol::types::{
    BuildMode as WireBuildMode, BuildResult, BuildStatus, ClientSettings,
    DerivedPath as WireDerivedPath, KeyedBuildResult, OutputsSpec,
};
use nixb_protocol::{Request, Response};
use nixb_store::{DerivedPath, StoreDir, StorePath};

use crate::remote::{Remote, StoreUri};
use crate::render::{EventRenderer, RenderMode};
use crate::settings::Settings;

/// Nix's `--log-format` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Plain lines: what is built, the builders' output, errors
    Raw,
    /// The same as raw (realise always shows the builders' output, as nix-store -r)
    RawWithLogs,
    /// Nix's structured log: one `@nix {...}` line per activity start, result and stop
    /// (what nix-output-monitor reads)
    InternalJson,
    /// Plain lines under a progress line when stderr is a terminal (the default)
    Bar,
    /// The same as bar
    BarWithLogs,
}

#[derive(Args)]
pub struct RealiseArgs {
    /// Derivations (`DRV` or `DRV!OUT,OUT`) or store paths to realise
    #[arg(required = true)]
    pub targets: Vec<String>,
    /// Builds to run at once (setting `max-jobs`)
    #[arg(long, short = 'j')]
    pub max_jobs: Option<usize>,
    /// Cores each builder may use, as NIX_BUILD_CORES (setting `cores`; 0 = all)
    #[arg(long)]
    pub cores: Option<usize>,
    /// Keep building other derivations after one fails (setting `keep-going`)
    #[arg(long, short = 'k')]
    pub keep_going: bool,
    /// Keep the build directory of failed builds (setting `keep-failed`)
    #[arg(long, short = 'K')]
    pub keep_failed: bool,
    /// Rebuild and compare with the registered outputs
    #[arg(long, conflicts_with = "repair")]
    pub check: bool,
    /// Rebuild outputs in the closure that are missing or corrupt
    #[arg(long)]
    pub repair: bool,
    /// Kill a builder that writes nothing for SECS seconds (setting `max-silent-time`)
    #[arg(long, value_name = "SECS")]
    pub max_silent_time: Option<u64>,
    /// Kill a builder that runs longer than SECS seconds (setting `timeout`)
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
    /// Print `@ build-started` / `@ build-succeeded` / `@ build-failed` lines on stderr
    #[arg(long)]
    pub print_build_trace: bool,
    /// Report progress as one JSON object a line on stderr, for tools
    #[arg(long, conflicts_with = "print_build_trace")]
    pub json: bool,
    /// Build from source when substituting a derivation's outputs fails (setting `fallback`)
    #[arg(long)]
    pub fallback: bool,
    /// How progress is shown on stderr, as Nix's --log-format
    #[arg(long, value_enum, value_name = "FORMAT", conflicts_with_all = ["json", "print_build_trace"])]
    pub log_format: Option<LogFormat>,
}

/// The renderer's mode, and whether it may show a progress line.
fn render_mode(args: &RealiseArgs) -> (RenderMode, bool) {
    match args.log_format {
        Some(LogFormat::InternalJson) => (RenderMode::InternalJson, false),
        Some(LogFormat::Raw | LogFormat::RawWithLogs) => (RenderMode::Human, false),
        Some(LogFormat::Bar | LogFormat::BarWithLogs) => (RenderMode::Human, true),
        None if args.json => (RenderMode::Json, false),
        None if args.print_build_trace => (RenderMode::Trace, true),
        None => (RenderMode::Human, true),
    }
}

pub fn run(args: RealiseArgs, options: &[String], store: &StoreUri) -> Result<u8> {
    let mut settings = super::settings(options)?;
    apply_flags(&mut settings, &args)?;
    if let StoreUri::Daemon { socket, origin } = store {
        return run_remote(&args, options, &settings, socket, origin);
    }
    let store = super::open_store()?;
    let dir = store.store_dir().clone();
    let targets: Vec<DerivedPath> = args
        .targets
        .iter()
        .map(|t| {
            // `./result` or a relative .drv path stand for the store path they lead to.
            let (path, outputs) = match t.split_once('!') {
                Some((p, o)) => (p, Some(o)),
                None => (t.as_str(), None),
            };
            let p = super::parse_store_path(&store, path)?;
            let full = match outputs {
                Some(o) => format!("{}!{o}", dir.print(&p)),
                None => dir.print(&p),
            };
            DerivedPath::parse(&dir, &full).with_context(|| format!("argument '{t}'"))
        })
        .collect::<Result<_>>()?;

    super::gc::auto_gc(&store, &settings, &targets)?;
    let cfg = worker_config(&settings, &store, &args);
    let (mode, bar) = render_mode(&args);
    let mut renderer = EventRenderer::with_bar(mode, dir.clone(), bar);
    renderer.begin();
    let outcome = nixb_goals::realise(&store, &targets, &cfg, &mut renderer)?;
    renderer.finish();
    for (_, outputs) in &outcome.outputs {
        for p in outputs.values() {
            println!("{}", dir.print(p));
        }
    }
    Ok(u8::try_from(outcome.exit_status).unwrap_or(1))
}

/// `realise` through a daemon: `BuildPathsWithResults` (`BuildPaths` before 1.34), the
/// daemon's stderr frames shown as the engine's events are, then each realised target's
/// outputs, as the daemon's store lists them.
fn run_remote(
    args: &RealiseArgs,
    options: &[String],
    settings: &Settings,
    socket: &Path,
    origin: &str,
) -> Result<u8> {
    let dir = crate::remote::store_dir()?;
    let targets: Vec<WireDerivedPath> = args
        .targets
        .iter()
        .map(|t| remote_target(&dir, t))
        .collect::<Result<_>>()?;
    let (mode, bar) = render_mode(args);
    let mut renderer = EventRenderer::with_bar(mode, dir.clone(), bar);
    let mut remote = Remote::connect(
        socket,
        origin,
        &client_settings(settings, args, options),
        &mut |f| renderer.frame(f),
    )?;
    let build_mode = if args.check {
        WireBuildMode::Check
    } else if args.repair {
        WireBuildMode::Repair
    } else {
        WireBuildMode::Normal
    };
    let results = if remote.client.ctx().version.at_least(34) {
        remote
            .client
            .build_paths_with_results(&targets, build_mode, &mut |f| renderer.frame(f))
            .map_err(|e| crate::remote::op_error(&remote, "build", e))?
    } else {
        // All or nothing: a failure is the operation's error, its status Nix's (the
        // daemon sends one before 1.26; after, a failure is a build's, 100).
        match remote
            .client
            .build_paths(&targets, build_mode, &mut |f| renderer.frame(f))
        {
            Ok(()) => targets
                .iter()
                .map(|t| KeyedBuildResult {
                    path: t.clone(),
                    result: BuildResult::new(BuildStatus::Built),
                })
                .collect(),
            Err(e) => match crate::remote::remote_error(&e) {
                Some(r) => {
                    let mut failed = BuildResult::new(BuildStatus::MiscFailure);
                    failed.error_msg = r.message.clone();
                    renderer.remote_result("", None, &failed);
                    renderer.finish();
                    let status = if remote.client.ctx().version.at_least(26) {
                        100
                    } else {
                        r.status
                    };
                    return Ok(u8::try_from(status).unwrap_or(1).max(1));
                }
                None => return Err(crate::remote::op_error(&remote, "build", e)),
            },
        }
    };
    for r in &results {
        let drv = match &r.path {
            WireDerivedPath::Built { drv, .. } => Some(drv),
            WireDerivedPath::Opaque(_) => None,
        };
        let target = r.path.to_wire(remote.client.ctx()).unwrap_or_default();
        renderer.remote_result(&target, drv, &r.result);
    }
    renderer.finish();
    let by_target: BTreeMap<&WireDerivedPath, &BuildResult> =
        results.iter().map(|r| (&r.path, &r.result)).collect();
    for t in &targets {
        if !by_target.get(t).is_some_and(|r| r.status.is_success()) {
            continue;
        }
        for p in target_outputs(&mut remote, t)? {
            println!("{}", dir.print(&p));
        }
    }
    Ok(remote_exit_status(results.iter().map(|r| r.result.status)))
}

/// A command-line target as the daemon takes it: `DRV` (every output), `DRV!OUT,…`, or
/// a store path (a symlink into the store stands for its target).
fn remote_target(dir: &StoreDir, t: &str) -> Result<WireDerivedPath> {
    let (path, outputs) = match t.split_once('!') {
        Some((p, o)) => (p, Some(o)),
        None => (t, None),
    };
    let p = super::parse_store_path_in(dir, path)?;
    Ok(match outputs {
        Some(o) => {
            let names: Vec<String> = o.split(',').map(str::to_string).collect();
            if names.iter().any(|n| n.is_empty()) {
                anyhow::bail!("argument '{t}': an output name is empty");
            }
            WireDerivedPath::Built {
                drv: p,
                outputs: OutputsSpec::Names(names),
            }
        }
        None if p.is_derivation() => WireDerivedPath::Built {
            drv: p,
            outputs: OutputsSpec::All,
        },
        None => WireDerivedPath::Opaque(p),
    })
}

/// The paths a realised target stands for: itself, or the wanted outputs of the
/// derivation as the daemon's store maps them (in output-name order, as a local
/// realise prints them).
fn target_outputs(remote: &mut Remote, t: &WireDerivedPath) -> Result<Vec<StorePath>> {
    let (drv, wanted) = match t {
        WireDerivedPath::Opaque(p) => return Ok(vec![p.clone()]),
        WireDerivedPath::Built { drv, outputs } => (drv, outputs),
    };
    let printed = remote.dir.print(drv);
    let map = match remote
        .client
        .request(
            &Request::QueryDerivationOutputMap(drv.clone()),
            None,
            &mut |_| {},
        )
        .map_err(|e| {
            crate::remote::op_error(remote, &format!("list the outputs of {printed}"), e)
        })? {
        Response::OutputMap(m) => m,
        r => anyhow::bail!("the daemon answered {r:?} when asked for the outputs of {printed}"),
    };
    let mut paths = Vec::new();
    for (name, path) in map {
        if let OutputsSpec::Names(n) = wanted {
            if !n.contains(&name) {
                continue;
            }
        }
        paths.push(path.with_context(|| {
            format!("the daemon knows no path for output '{name}' of {printed}")
        })?);
    }
    Ok(paths)
}

/// Nix's exit status for these results: 0 when all succeeded; for build failures 100,
/// plus 1 if one timed out, 2 for a fixed-output hash mismatch, 4 for a `--check`
/// mismatch; 1 for any other failure.
fn remote_exit_status(statuses: impl Iterator<Item = BuildStatus>) -> u8 {
    let (mut build_failure, mut other, mut bits) = (false, false, 0u8);
    for s in statuses {
        match s {
            BuildStatus::TimedOut => bits |= 1,
            BuildStatus::OutputRejected => bits |= 2,
            BuildStatus::NotDeterministic => bits |= 4,
            BuildStatus::PermanentFailure
            | BuildStatus::CachedFailure
            | BuildStatus::DependencyFailed
            | BuildStatus::LogLimitExceeded => build_failure = true,
            s if s.is_success() => {}
            _ => other = true,
        }
    }
    if build_failure || bits != 0 {
        100 + bits
    } else if other {
        1
    } else {
        0
    }
}

/// What `SetOptions` tells the daemon: the settings Nix's client sends in their own
/// fields, and `--option` pairs (and `--timeout`) as overrides.
fn client_settings(s: &Settings, a: &RealiseArgs, options: &[String]) -> ClientSettings {
    let mut overrides = BTreeMap::new();
    for pair in options.chunks(2) {
        if let [name, value] = pair {
            overrides.insert(name.clone(), value.clone());
        }
    }
    if let Some(t) = a.timeout {
        overrides.insert("timeout".into(), t.to_string());
    }
    ClientSettings {
        keep_failed: s.keep_failed,
        keep_going: s.keep_going,
        try_fallback: s.fallback,
        verbosity: u64::from(crate::render::nix_verbosity()),
        max_build_jobs: s.max_jobs as u64,
        max_silent_time: s.max_silent_time.map_or(0, |d| d.as_secs()),
        // lvlError: show the builders' output, as nix-store -r does.
        build_verbosity: 0,
        build_cores: s.cores as u64,
        use_substitutes: s.use_substitutes,
        overrides,
        ..ClientSettings::default()
    }
}

fn apply_flags(s: &mut Settings, a: &RealiseArgs) -> Result<()> {
    if let Some(n) = a.max_jobs {
        s.max_jobs = n;
    }
    if let Some(n) = a.cores {
        s.cores = n;
    }
    if a.keep_going {
        s.keep_going = true;
    }
    if a.keep_failed {
        s.keep_failed = true;
    }
    if let Some(t) = a.max_silent_time {
        s.max_silent_time = (t > 0).then(|| Duration::from_secs(t));
    }
    if let Some(t) = a.timeout {
        s.timeout = (t > 0).then(|| Duration::from_secs(t));
    }
    if a.fallback {
        s.fallback = true;
    }
    Ok(())
}

/// Maps the settings the worker cares about onto its own config struct.
fn worker_config(
    s: &Settings,
    store: &nixb_store::local_store::LocalStore,
    a: &RealiseArgs,
) -> WorkerConfig {
    let mut cfg = settings_worker_config(s, store);
    cfg.build_mode = if a.check {
        BuildMode::Check
    } else if a.repair {
        BuildMode::Repair
    } else {
        BuildMode::Normal
    };
    cfg
}

/// The worker config of the settings alone (`nixb serve` builds with it too).
pub fn settings_worker_config(
    s: &Settings,
    store: &nixb_store::local_store::LocalStore,
) -> WorkerConfig {
    let mut cfg = WorkerConfig::new(store.config().log_dir.clone());
    cfg.max_jobs = s.max_jobs;
    cfg.cores = if s.cores == 0 {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    } else {
        s.cores
    };
    cfg.max_silent_time = s.max_silent_time;
    cfg.timeout = s.timeout;
    cfg.keep_going = s.keep_going;
    cfg.keep_failed = s.keep_failed;
    cfg.cache_failure = s.cache_failure;
    cfg.build_poll_interval = s.build_poll_interval;
    cfg.log.compress = s.compress_build_log;
    cfg.log.keep = s.keep_build_log;
    cfg.log.max_size = s.max_build_log_size;
    cfg.auto_optimise = s.auto_optimise_store;
    cfg.use_substitutes = s.use_substitutes;
    cfg.system = s.system.clone();
    cfg.system_features = s.system_features.iter().cloned().collect();
    if s.auto_allocate_uids {
        // As Nix 2.12: a block of uids per build lets a build have all of them.
        cfg.system_features.insert("uid-range".into());
    }
    cfg.sandbox = match s.sandbox {
        crate::settings::SandboxMode::Off => nixb_goals::SandboxMode::Off,
        crate::settings::SandboxMode::On => nixb_goals::SandboxMode::On,
        crate::settings::SandboxMode::Relaxed => nixb_goals::SandboxMode::Relaxed,
    };
    cfg.sandbox_fallback = s.sandbox_fallback;
    cfg.use_cgroups = s.use_cgroups;
    cfg.auto_allocate_uids = s.auto_allocate_uids;
    cfg.start_id = s.start_id;
    cfg.id_count = s.id_count;
    cfg.sandbox_paths = s.sandbox_paths.clone();
    cfg.build_users_group = Some(s.build_users_group.clone()).filter(|g| !g.is_empty());
    cfg.impersonate_linux_26 = s.impersonate_linux_26;
    cfg.state_dir = store.config().state_dir.clone();
    cfg.fallback = s.fallback;
    // Builtin builders run in this very executable (see `nixb_goals::builtins`).
    cfg.builtin_builder = std::env::current_exe().ok();
    cfg.substituters = substituters(s);
    cfg.cache_options = match super::substitute::cache_options(s) {
        Ok(o) => o,
        Err(e) => {
            // Fail closed: with no trusted key, every signed path is refused too.
            crate::render::warn(&format!("{e:#}; no binary cache path will be trusted"));
            nixb_binarycache::CacheOptions {
                require_sigs: true,
                ..Default::default()
            }
        }
    };
    // The built-in substituter's threads: at least as many as builds may run.
    cfg.substitution_jobs = cfg.substitution_jobs.max(s.max_jobs);
    cfg.build_hook = hook_command(s);
    cfg
}

/// `nixb` itself, to run as `nixb substitute` / `nixb build-remote`.
fn self_exe() -> std::path::PathBuf {
    std::env::current_exe().unwrap_or_else(|_| "nixb".into())
}

/// `substituters`: cache URLs are read in-process by the worker's built-in substituter
/// (with `trusted-public-keys` and `require-sigs` in `cache_options`); anything else is an
/// external program speaking the original's protocol.
fn substituters(s: &Settings) -> Vec<Substituter> {
    s.substituters
        .iter()
        .map(|sub| {
            if super::substitute::is_cache_url(sub) {
                Substituter::BinaryCache { url: sub.clone() }
            } else {
                Substituter::External(SubstituterCommand {
                    name: sub.clone(),
                    program: sub.into(),
                    args: Vec::new(),
                })
            }
        })
        .collect()
}

/// `build-hook` (or NIX_BUILD_HOOK, as the original); otherwise `nixb build-remote` when
/// `builders` names machines; otherwise none.
fn hook_command(s: &Settings) -> Option<HookCommand> {
    let explicit = s.build_hook.clone().or_else(|| {
        std::env::var("NIX_BUILD_HOOK")
            .ok()
            .filter(|h| !h.is_empty())
    });
    if let Some(h) = explicit {
        return Some(HookCommand {
            program: h.into(),
            args: Vec::new(),
        });
    }
    if s.builders.is_empty() {
        return None;
    }
    Some(HookCommand {
        program: self_exe(),
        args: vec![
            "build-remote".into(),
            "--option".into(),
            "builders".into(),
            s.builders.join(" "),
            "--option".into(),
            "builders-use-substitutes".into(),
            s.builders_use_substitutes.to_string(),
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use nixb_protocol::handshake::ServerInfo;
    use nixb_protocol::{RemoteError, ServerConnection, Version};
    use std::os::unix::net::UnixListener;

    /// A daemon of protocol 1.33 (before `BuildPathsWithResults`) on `socket` for one
    /// connection: answers `SetOptions`, then `BuildPaths` with `build` (an error, or
    /// success and the output map `outputs`), and returns the requests it read.
    fn old_daemon(
        socket: &Path,
        build: Result<(), String>,
        outputs: BTreeMap<String, Option<StorePath>>,
    ) -> std::thread::JoinHandle<Vec<Request>> {
        let listener = UnixListener::bind(socket).unwrap();
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let info = ServerInfo {
                version: Version::new(1, 33),
                nix_version: "old".into(),
                trusted: None,
                features: Default::default(),
            };
            let dir = crate::remote::store_dir().unwrap();
            let mut conn =
                ServerConnection::accept(stream.try_clone().unwrap(), stream, dir, &info).unwrap();
            let mut seen = Vec::new();
            while let Some(req) = conn.read_request().unwrap() {
                seen.push(req.clone());
                match &req {
                    Request::SetOptions(_) => conn.finish(&req, &Response::Nothing).unwrap(),
                    Request::BuildPaths { .. } => match &build {
                        Ok(()) => conn.finish(&req, &Response::One).unwrap(),
                        Err(msg) => conn.fail(&RemoteError::new(msg.clone())).unwrap(),
                    },
                    Request::QueryDerivationOutputMap(_) => conn
                        .finish(&req, &Response::OutputMap(outputs.clone()))
                        .unwrap(),
                    other => panic!("unexpected request {other:?}"),
                }
            }
            seen
        })
    }

    fn args(target: String) -> RealiseArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct Wrap {
            #[command(flatten)]
            a: RealiseArgs,
        }
        Wrap::parse_from(["realise", &target]).a
    }

    /// Below 1.34 the build goes through `BuildPaths`: its error is the build's failure
    /// (status 100 from 1.26, where the error carries no status), and on success the
    /// outputs are asked for with `QueryDerivationOutputMap`.
    #[test]
    fn daemons_before_1_34_build_with_build_paths() {
        let dir = crate::remote::store_dir().unwrap();
        let drv = dir
            .parse(&format!(
                "{}/0c7n2dq0zp8f7j3y4dn9wz5d2w8w6gqz-x.drv",
                dir.as_str()
            ))
            .unwrap();
        let out = dir
            .parse(&format!(
                "{}/1c7n2dq0zp8f7j3y4dn9wz5d2w8w6gqz-x",
                dir.as_str()
            ))
            .unwrap();
        let tmp = tempfile::tempdir().unwrap();
        for (i, build) in [Err("builder failed".to_string()), Ok(())]
            .into_iter()
            .enumerate()
        {
            let socket = tmp.path().join(format!("s{i}"));
            let ok = build.is_ok();
            let server = old_daemon(
                &socket,
                build,
                BTreeMap::from([("out".to_string(), Some(out.clone()))]),
            );
            let code = run_remote(
                &args(dir.print(&drv)),
                &[],
                &Settings::default(),
                &socket,
                "test",
            )
            .unwrap();
            let seen = server.join().unwrap();
            assert!(matches!(seen[0], Request::SetOptions(_)), "{seen:?}");
            assert_eq!(
                seen[1],
                Request::BuildPaths {
                    paths: vec![WireDerivedPath::Built {
                        drv: drv.clone(),
                        outputs: OutputsSpec::All
                    }],
                    mode: WireBuildMode::Normal,
                }
            );
            if ok {
                assert_eq!(code, 0);
                assert_eq!(seen[2], Request::QueryDerivationOutputMap(drv.clone()));
            } else {
                assert_eq!(code, 100);
                assert_eq!(seen.len(), 2, "{seen:?}");
            }
        }
    }

    /// Nix's `Worker::exitStatus`: 0x60 | 0x04 for a build failure, | 0x01 timed out,
    /// | 0x02 hash mismatch, | 0x08 check mismatch; 1 for other failures.
    #[test]
    fn exit_status_of_daemon_results_is_nix_s() {
        use BuildStatus::*;
        let status = |s: &[BuildStatus]| remote_exit_status(s.iter().copied());
        assert_eq!(status(&[Built, AlreadyValid, Substituted]), 0);
        assert_eq!(status(&[Built, PermanentFailure]), 0x60 | 0x04);
        assert_eq!(status(&[DependencyFailed]), 100);
        assert_eq!(status(&[TimedOut]), 101);
        assert_eq!(status(&[OutputRejected, Built]), 102);
        assert_eq!(status(&[TimedOut, OutputRejected]), 103);
        assert_eq!(status(&[NotDeterministic]), 104);
        assert_eq!(status(&[MiscFailure]), 1);
        assert_eq!(status(&[MiscFailure, PermanentFailure]), 100);
    }
}
