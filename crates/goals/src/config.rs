//! The worker's settings, taken from the caller (the cli maps nix.conf and flags onto
//! [`WorkerConfig`]); nothing here reads global state.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

/// What `realise` does with outputs that are already valid.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum BuildMode {
    /// Build what is missing.
    #[default]
    Normal,
    /// Rebuild and compare with the registered outputs (`--check`).
    Check,
    /// Rebuild outputs in the closure that are missing or corrupt (`--repair`).
    Repair,
}

/// `sandbox = false | true | relaxed` (1.x: `build-use-chroot`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SandboxMode {
    /// Builders see the host file system.
    #[default]
    Off,
    /// Every build runs in a chroot inside new namespaces; `__noChroot` is an error.
    On,
    /// Like `On`, but a derivation with `__noChroot = "1"` is built outside the chroot.
    Relaxed,
}

#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Builds run at once (`max-jobs`). 0 means no local builds at all.
    pub max_jobs: usize,
    /// `NIX_BUILD_CORES` handed to builders (`cores`).
    pub cores: usize,
    /// Kill a builder that writes nothing for this long (`max-silent-time`).
    pub max_silent_time: Option<Duration>,
    /// Kill a builder that runs longer than this (`timeout`).
    pub timeout: Option<Duration>,
    /// Go on with other goals after a failure (`keep-going`).
    pub keep_going: bool,
    /// Keep the build directory of failed builds (`keep-failed`).
    pub keep_failed: bool,
    pub build_mode: BuildMode,
    /// Remember failed derivations and refuse to rebuild them (`build-cache-failure`).
    pub cache_failure: bool,
    /// How often to retry an output lock held by another process (`build-poll-interval`).
    pub build_poll_interval: Duration,
    /// Build logs: where, compressed or not, kept or not, size limit.
    pub log: nixb_logs::LogConfig,
    /// Hard-link identical files after each build (`auto-optimise-store`).
    pub auto_optimise: bool,
    /// Try substitutes before building (`substitute`).
    pub use_substitutes: bool,
    /// The platform this machine builds for (`system`), e.g. `x86_64-linux`.
    pub system: String,
    /// Features this machine offers to derivations that name them in
    /// `requiredSystemFeatures` (`system-features`, Nix 2.x); a derivation needing one that is
    /// missing is not built locally.
    pub system_features: BTreeSet<String>,
    /// Values of the caller's environment offered to fixed-output derivations that name
    /// them in `impureEnvVars` (a missing name gets the empty string, as in Nix).
    pub impure_env: BTreeMap<String, String>,
    /// Where build directories `nix-build-<name>-<n>` are made (`TMPDIR`, default /tmp).
    pub build_dir_root: PathBuf,
    /// The `HOME` given to builders; an unsandboxed build refuses to start if it exists.
    /// Always `/homeless-shelter` in use; a field so that tests can exercise the refusal.
    pub homeless_shelter: PathBuf,
    /// `sandbox`.
    pub sandbox: SandboxMode,
    /// `sandbox-fallback`: where the sandbox cannot be had (without root: no user
    /// namespaces), build without it after a warning saying why (`true`, Nix's default), or
    /// fail saying why (`false`).
    pub sandbox_fallback: bool,
    /// `use-cgroups`: each builder in a cgroup v2 of its own, killed as one and removed
    /// afterwards, its figures in the resource report. Where cgroups cannot be made here, a
    /// warning and the process-group kill.
    pub use_cgroups: bool,
    /// `auto-allocate-uids` (as root): builds take blocks of uids from `start-id` on
    /// (`id-count` ids in all) instead of `build-users-group` members; chroot builds run as
    /// 1000:100 (or, with the `uid-range` feature, as root with 65536 ids) in a user
    /// namespace mapped onto the block.
    pub auto_allocate_uids: bool,
    /// `start-id`.
    pub start_id: u32,
    /// `id-count`.
    pub id_count: u32,
    /// `sandbox-paths`: `target=source`, `path` (same inside) or either with a trailing `?`
    /// (skipped when the source is missing). Store paths bring their closure along.
    pub sandbox_paths: Vec<String>,
    /// `build-users-group`: when set and the worker runs as root, every builder runs as a
    /// member of this group, one build per user.
    pub build_users_group: Option<String>,
    /// `impersonate-linux-26`: builders see a 2.6 kernel in uname.
    pub impersonate_linux_26: bool,
    /// `NIX_STATE_DIR`: the build users' lock files live in `<state_dir>/userpool/`.
    pub state_dir: PathBuf,
    /// `substituters`, in order of preference: programs speaking the original's external
    /// protocol, and binary caches read in-process by the built-in substituter.
    pub substituters: Vec<Substituter>,
    /// How the built-in substituter reads binary caches: `trusted-public-keys`,
    /// `require-sigs`, timeouts and retries.
    pub cache_options: nixb_binarycache::CacheOptions,
    /// Threads of the built-in substituter: how many narinfo queries and NAR downloads run
    /// at once. Unlike external substituters, these take no build slot (so `max-jobs = 0`
    /// does not serialise them, as in Nix 2.13's `max-substitution-jobs`).
    pub substitution_jobs: usize,
    /// `fallback`: build a derivation whose output substitutes failed, instead of failing.
    pub fallback: bool,
    /// `build-hook` / `NIX_BUILD_HOOK`: the program offered every build that may go
    /// elsewhere. `None`: every build is local.
    pub build_hook: Option<HookCommand>,
    /// The nixb executable that runs `builtin:` builders (`builtin:buildenv`, which
    /// `nix-env` uses for profiles), as `<program> __nixb-builtin <name>`; see
    /// [`crate::builtins`]. `None`: such derivations fail, saying so.
    pub builtin_builder: Option<PathBuf>,
}

/// One entry of `substituters`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Substituter {
    /// A program speaking the original's external protocol.
    External(SubstituterCommand),
    /// A binary cache (`file://DIR`, `http(s)://HOST/PREFIX`), read in-process by the
    /// built-in substituter's threads.
    BinaryCache {
        /// The cache URL, as written in `substituters`; traces name the substituter by it.
        url: String,
    },
}

impl Substituter {
    /// How traces and messages name it.
    pub fn name(&self) -> &str {
        match self {
            Substituter::External(c) => &c.name,
            Substituter::BinaryCache { url } => url,
        }
    }
}

/// One external substituter: run as `program args... --query` and `program args... --substitute
/// PATH DEST`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubstituterCommand {
    /// How traces and messages name it (the program, or the cache URL it serves).
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<String>,
}

/// The build hook: run as `program args... <system> <max silent time> <print build trace>
/// <timeout>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookCommand {
    pub program: PathBuf,
    pub args: Vec<String>,
}

impl WorkerConfig {
    /// Nix's defaults for a store whose logs go to `log_dir`.
    pub fn new(log_dir: PathBuf) -> WorkerConfig {
        WorkerConfig {
            max_jobs: 1,
            cores: 1,
            max_silent_time: None,
            timeout: None,
            keep_going: false,
            keep_failed: false,
            build_mode: BuildMode::Normal,
            cache_failure: false,
            build_poll_interval: Duration::from_secs(5),
            log: nixb_logs::LogConfig {
                log_dir,
                compress: true,
                keep: true,
                max_size: None,
            },
            auto_optimise: false,
            use_substitutes: true,
            system: default_system(),
            system_features: default_system_features(),
            impure_env: std::env::vars().collect(),
            build_dir_root: std::env::var_os("TMPDIR")
                .filter(|d| !d.is_empty())
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/tmp")),
            homeless_shelter: PathBuf::from(HOMELESS_SHELTER),
            sandbox: SandboxMode::Off,
            sandbox_fallback: true,
            use_cgroups: false,
            auto_allocate_uids: false,
            start_id: nixb_userpool::DEFAULT_START_ID,
            id_count: nixb_userpool::DEFAULT_ID_COUNT,
            sandbox_paths: Vec::new(),
            build_users_group: None,
            impersonate_linux_26: false,
            state_dir: std::env::var_os("NIX_STATE_DIR")
                .filter(|d| !d.is_empty())
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/nix/var/nix")),
            substituters: Vec::new(),
            cache_options: nixb_binarycache::CacheOptions::default(),
            substitution_jobs: default_substitution_jobs(),
            fallback: false,
            build_hook: None,
            builtin_builder: None,
        }
    }
}

/// Threads for the built-in substituter when the caller does not say: two per core, at
/// least 4 and at most 16. Fetching is part CPU (decompression, sha256, many small file
/// writes) and part waiting (network round trips, one per narinfo and NAR), so two threads
/// a core keep the cores busy while the others wait; the cap keeps the number of
/// connections to one cache modest (Nix's `http-connections` defaults to 25).
pub fn default_substitution_jobs() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (2 * cores).clamp(4, 16)
}

/// `HOME` for builders: a path that must not exist, so tools do not find settings there.
pub const HOMELESS_SHELTER: &str = "/homeless-shelter";

/// `<arch>-<os>` as Nix names this machine's platform.
/// Nix 2.8's default `system-features` on Linux: `benchmark big-parallel nixos-test`, plus
/// `kvm` when `/dev/kvm` can be opened for reading and writing.
pub fn default_system_features() -> BTreeSet<String> {
    let mut f: BTreeSet<String> = ["benchmark", "big-parallel", "nixos-test"]
        .into_iter()
        .map(String::from)
        .collect();
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if kvm {
        f.insert("kvm".into());
    }
    f
}

pub fn default_system() -> String {
    let arch = std::env::consts::ARCH;
    let os = std::env::consts::OS;
    format!("{arch}-{os}")
}
