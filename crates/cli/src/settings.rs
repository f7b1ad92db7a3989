//! `nix.conf` and `--option`: Nix 2.x setting names, their Nix 1.x aliases, typed values.
//!
//! ```text
//! file    = { line }
//! line    = [ name "=" value ] [ "#" comment ]
//!         | "include" path | "!include" path      (relative to the including file; "!" = optional)
//! value   = words separated by blanks; lists take all words, scalars the whole rest of the line
//! name    = a setting name, an alias, or "extra-" + a list setting (appends instead of replacing)
//! ```
//!
//! Unknown names are reported as warnings (as Nix does) so that one nix.conf can serve
//! both real Nix and nixb; malformed values are errors naming the file and line.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// `sandbox = true | false | relaxed`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SandboxMode {
    Off,
    On,
    Relaxed,
}

/// Every setting nixb understands, with Nix's defaults.
#[derive(Clone, Debug)]
pub struct Settings {
    pub sandbox: SandboxMode,
    /// `sandbox-fallback`: build unsandboxed (with a warning) where the sandbox cannot be had.
    pub sandbox_fallback: bool,
    /// `use-cgroups`: a cgroup v2 per build.
    pub use_cgroups: bool,
    /// `auto-allocate-uids`, `start-id`, `id-count`: build uids without `nixbld` users.
    pub auto_allocate_uids: bool,
    pub start_id: u32,
    pub id_count: u32,
    pub sandbox_paths: Vec<String>,
    pub max_jobs: usize,
    pub cores: usize,
    pub max_silent_time: Option<Duration>,
    pub timeout: Option<Duration>,
    pub max_build_log_size: Option<u64>,
    pub build_users_group: String,
    pub keep_failed: bool,
    pub keep_going: bool,
    pub keep_build_log: bool,
    pub compress_build_log: bool,
    pub cache_failure: bool,
    pub build_poll_interval: Duration,
    pub auto_optimise_store: bool,
    pub substituters: Vec<String>,
    pub trusted_public_keys: Vec<String>,
    pub require_sigs: bool,
    /// `download-attempts`: tries per binary-cache request, the first included.
    pub download_attempts: u32,
    pub use_substitutes: bool,
    pub fallback: bool,
    pub impersonate_linux_26: bool,
    pub system: String,
    /// `system-features`: what `requiredSystemFeatures` this machine satisfies.
    pub system_features: Vec<String>,
    pub build_hook: Option<String>,
    pub builders: Vec<String>,
    /// `builders-use-substitutes`: remote builders fetch inputs from their own substituters.
    pub builders_use_substitutes: bool,
    pub secret_key_files: Vec<String>,
    /// `keep-outputs` (1.x: `gc-keep-outputs`): a live derivation keeps its outputs.
    pub keep_outputs: bool,
    /// `keep-derivations` (1.x: `gc-keep-derivations`): a live path keeps its deriver.
    pub keep_derivations: bool,
    /// `min-free`: a build that finds less free space in the store collects garbage first.
    pub min_free: u64,
    /// `max-free`: how much free space that collection aims for.
    pub max_free: u64,
    /// `trusted-users` and `allowed-users` (read by `nixb daemon`).
    pub trusted_users: Vec<String>,
    pub allowed_users: Vec<String>,
    /// Warnings collected while loading (unknown names), for the cli to print.
    pub warnings: Vec<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            sandbox: SandboxMode::Off,
            sandbox_fallback: true,
            use_cgroups: false,
            auto_allocate_uids: false,
            start_id: 872_415_232,
            id_count: 128 * 65536,
            sandbox_paths: Vec::new(),
            max_jobs: 1,
            cores: 0,
            max_silent_time: None,
            timeout: None,
            max_build_log_size: None,
            build_users_group: String::new(),
            keep_failed: false,
            keep_going: false,
            keep_build_log: true,
            compress_build_log: true,
            cache_failure: false,
            build_poll_interval: Duration::from_secs(5),
            auto_optimise_store: false,
            substituters: Vec::new(),
            trusted_public_keys: Vec::new(),
            require_sigs: true,
            download_attempts: 5,
            use_substitutes: true,
            fallback: false,
            impersonate_linux_26: false,
            system: default_system().to_string(),
            system_features: nixb_goals::config::default_system_features()
                .into_iter()
                .collect(),
            build_hook: None,
            builders: Vec::new(),
            builders_use_substitutes: false,
            secret_key_files: Vec::new(),
            keep_outputs: false,
            keep_derivations: true,
            min_free: 0,
            max_free: u64::MAX,
            trusted_users: vec!["root".to_string()],
            allowed_users: vec!["*".to_string()],
            warnings: Vec::new(),
        }
    }
}

/// The Nix system type of this machine, as `builtins.currentSystem` says it.
pub fn default_system() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "x86_64-linux",
        "x86" => "i686-linux",
        "aarch64" => "aarch64-linux",
        "riscv64" => "riscv64-linux",
        other => other,
    }
}

/// Nix 1.x names that Nix 2.x still accepts, mapped to the 2.x name.
const ALIASES: &[(&str, &str)] = &[
    ("build-use-chroot", "sandbox"),
    ("build-use-sandbox", "sandbox"),
    ("build-chroot-dirs", "sandbox-paths"),
    ("build-sandbox-paths", "sandbox-paths"),
    ("build-extra-chroot-dirs", "extra-sandbox-paths"),
    ("build-extra-sandbox-paths", "extra-sandbox-paths"),
    ("build-max-jobs", "max-jobs"),
    ("build-cores", "cores"),
    ("build-max-silent-time", "max-silent-time"),
    ("build-timeout", "timeout"),
    ("build-max-log-size", "max-build-log-size"),
    ("build-keep-log", "keep-build-log"),
    ("build-compress-log", "compress-build-log"),
    ("build-cache-failure", "cache-failure"),
    ("build-fallback", "fallback"),
    ("build-use-substitutes", "use-substitutes"),
    ("build-impersonate-linux-26", "impersonate-linux-26"),
    ("binary-caches", "substituters"),
    ("binary-cache-public-keys", "trusted-public-keys"),
    ("gc-keep-outputs", "keep-outputs"),
    ("gc-keep-derivations", "keep-derivations"),
    ("env-keep-derivations", "keep-env-derivations"),
];

/// Settings real Nix knows that do not change what nixb does; accepted silently so a
/// shared nix.conf does not produce noise.
const KNOWN_IGNORED: &[&str] = &[
    "keep-env-derivations",
    "experimental-features",
    "extra-experimental-features",
    "trusted-substituters",
    "extra-trusted-substituters",
    "narinfo-cache-negative-ttl",
    "narinfo-cache-positive-ttl",
    "connect-timeout",
    "show-trace",
    "warn-dirty",
    "filter-syscalls",
    "allow-new-privileges",
];

impl Settings {
    /// Defaults, then `$NIX_CONF_DIR/nix.conf` (default `/etc/nix/nix.conf`) when it exists.
    pub fn load() -> Result<Settings> {
        let mut s = Settings::default();
        let dir = std::env::var_os("NIX_CONF_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/etc/nix"));
        let file = dir.join("nix.conf");
        if file.exists() {
            s.load_file(&file, 0)?;
        }
        Ok(s)
    }

    /// Reads one configuration file (and what it includes).
    pub fn load_file(&mut self, file: &Path, depth: usize) -> Result<()> {
        if depth > 16 {
            bail!(
                "{}: includes nested too deeply (an include loop?)",
                file.display()
            );
        }
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        self.load_str(&text, file, depth)
    }

    fn load_str(&mut self, text: &str, file: &Path, depth: usize) -> Result<()> {
        for (i, raw) in text.lines().enumerate() {
            let origin = format!("{}:{}", file.display(), i + 1);
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            if words[0] == "include" || words[0] == "!include" {
                if words.len() != 2 {
                    bail!("{origin}: expected '{} PATH'", words[0]);
                }
                let inc = file.parent().unwrap_or(Path::new("/")).join(words[1]);
                if inc.exists() {
                    self.load_file(&inc, depth + 1)?;
                } else if words[0] == "include" {
                    bail!("{origin}: included file {} does not exist", inc.display());
                }
                continue;
            }
            let Some((name, value)) = line.split_once('=') else {
                bail!("{origin}: expected 'name = value', got '{line}'");
            };
            self.set(name.trim(), value.trim(), &origin)?;
        }
        Ok(())
    }

    /// Applies one `name = value` (from a file or `--option`); `origin` names where it came from.
    pub fn set(&mut self, name: &str, value: &str, origin: &str) -> Result<()> {
        let canonical = ALIASES
            .iter()
            .find(|(alias, _)| *alias == name)
            .map(|(_, n)| *n)
            .unwrap_or(name);
        let (append, key) = match canonical.strip_prefix("extra-") {
            Some(k) if is_list(k) => (true, k),
            _ => (false, canonical),
        };
        let ctx = || format!("{origin}: setting '{name}'");
        let list = || {
            value
                .split_whitespace()
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        let set_list = |target: &mut Vec<String>| {
            if append {
                target.extend(list());
            } else {
                *target = list();
            }
        };
        match key {
            "sandbox" => {
                self.sandbox = match value {
                    "true" => SandboxMode::On,
                    "false" => SandboxMode::Off,
                    "relaxed" => SandboxMode::Relaxed,
                    _ => bail!(
                        "{}: expected 'true', 'false' or 'relaxed', got '{value}'",
                        ctx()
                    ),
                }
            }
            "sandbox-paths" => set_list(&mut self.sandbox_paths),
            "auto-allocate-uids" => {
                self.auto_allocate_uids = parse_bool(value).with_context(ctx)?
            }
            "start-id" => self.start_id = parse_num(value).with_context(ctx)?,
            "id-count" => self.id_count = parse_num(value).with_context(ctx)?,
            "use-cgroups" => self.use_cgroups = parse_bool(value).with_context(ctx)?,
            "sandbox-fallback" => self.sandbox_fallback = parse_bool(value).with_context(ctx)?,
            "max-jobs" => {
                self.max_jobs = if value == "auto" {
                    std::thread::available_parallelism()
                        .map(|n| n.get())
                        .unwrap_or(1)
                } else {
                    parse_num(value).with_context(ctx)?
                }
            }
            "cores" => self.cores = parse_num(value).with_context(ctx)?,
            "max-silent-time" => self.max_silent_time = parse_secs(value).with_context(ctx)?,
            "timeout" => self.timeout = parse_secs(value).with_context(ctx)?,
            "max-build-log-size" => {
                let n: u64 = parse_num(value).with_context(ctx)?;
                self.max_build_log_size = (n > 0).then_some(n);
            }
            "build-users-group" => self.build_users_group = value.to_string(),
            "keep-failed" => self.keep_failed = parse_bool(value).with_context(ctx)?,
            "keep-going" => self.keep_going = parse_bool(value).with_context(ctx)?,
            "keep-build-log" => self.keep_build_log = parse_bool(value).with_context(ctx)?,
            "compress-build-log" => {
                self.compress_build_log = parse_bool(value).with_context(ctx)?
            }
            "cache-failure" => self.cache_failure = parse_bool(value).with_context(ctx)?,
            "build-poll-interval" => {
                self.build_poll_interval = Duration::from_secs(parse_num(value).with_context(ctx)?)
            }
            "auto-optimise-store" => {
                self.auto_optimise_store = parse_bool(value).with_context(ctx)?
            }
            "substituters" => set_list(&mut self.substituters),
            "trusted-public-keys" => set_list(&mut self.trusted_public_keys),
            "require-sigs" => self.require_sigs = parse_bool(value).with_context(ctx)?,
            "download-attempts" => {
                self.download_attempts = match value.parse::<u32>() {
                    Ok(n) if n >= 1 => n,
                    _ => bail!(
                        "{}: expected a whole number of at least 1, got '{value}'",
                        ctx()
                    ),
                }
            }
            "use-substitutes" | "substitute" => {
                self.use_substitutes = parse_bool(value).with_context(ctx)?
            }
            "fallback" => self.fallback = parse_bool(value).with_context(ctx)?,
            "impersonate-linux-26" => {
                self.impersonate_linux_26 = parse_bool(value).with_context(ctx)?
            }
            "system" => self.system = value.to_string(),
            "system-features" => set_list(&mut self.system_features),
            "build-hook" => self.build_hook = (!value.is_empty()).then(|| value.to_string()),
            "builders" => set_list(&mut self.builders),
            "builders-use-substitutes" => {
                self.builders_use_substitutes = parse_bool(value).with_context(ctx)?
            }
            "secret-key-files" => set_list(&mut self.secret_key_files),
            "keep-outputs" => self.keep_outputs = parse_bool(value).with_context(ctx)?,
            "keep-derivations" => self.keep_derivations = parse_bool(value).with_context(ctx)?,
            "min-free" => self.min_free = parse_num(value).with_context(ctx)?,
            "max-free" => self.max_free = parse_num(value).with_context(ctx)?,
            "trusted-users" => set_list(&mut self.trusted_users),
            "allowed-users" => set_list(&mut self.allowed_users),
            k if KNOWN_IGNORED.contains(&k) => {}
            _ => self
                .warnings
                .push(format!("{origin}: unknown setting '{name}'")),
        }
        Ok(())
    }
}

fn is_list(name: &str) -> bool {
    matches!(
        name,
        "sandbox-paths"
            | "substituters"
            | "trusted-public-keys"
            | "builders"
            | "secret-key-files"
            | "system-features"
    )
}

fn parse_bool(v: &str) -> Result<bool> {
    match v {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => bail!("expected 'true' or 'false', got '{v}'"),
    }
}

fn parse_num<T: std::str::FromStr>(v: &str) -> Result<T> {
    v.parse()
        .map_err(|_| anyhow::anyhow!("expected a non-negative integer, got '{v}'"))
}

/// Seconds, where 0 means "no limit".
fn parse_secs(v: &str) -> Result<Option<Duration>> {
    let n: u64 = parse_num(v)?;
    Ok((n > 0).then(|| Duration::from_secs(n)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Settings> {
        let mut s = Settings::default();
        s.load_str(text, Path::new("/etc/nix/nix.conf"), 0)?;
        Ok(s)
    }

    #[test]
    fn new_names_and_old_aliases_mean_the_same() {
        let a = parse(
            "sandbox = true\nmax-jobs = 4\nmax-silent-time = 30\nsandbox-paths = /bin/sh=/x /usr",
        )
        .unwrap();
        let b = parse("build-use-chroot = true\nbuild-max-jobs = 4\nbuild-max-silent-time = 30\nbuild-chroot-dirs = /bin/sh=/x /usr").unwrap();
        for s in [&a, &b] {
            assert_eq!(s.sandbox, SandboxMode::On);
            assert_eq!(s.max_jobs, 4);
            assert_eq!(s.max_silent_time, Some(Duration::from_secs(30)));
            assert_eq!(s.sandbox_paths, ["/bin/sh=/x", "/usr"]);
        }
    }

    #[test]
    fn extra_appends_and_zero_means_unlimited() {
        let s = parse("sandbox-paths = /a\nextra-sandbox-paths = /b # comment\ntimeout = 0\nmax-build-log-size = 0").unwrap();
        assert_eq!(s.sandbox_paths, ["/a", "/b"]);
        assert_eq!(s.timeout, None);
        assert_eq!(s.max_build_log_size, None);
    }

    #[test]
    fn errors_name_file_line_and_setting() {
        let e = parse("\n\nmax-jobs = lots").unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("/etc/nix/nix.conf:3"), "{msg}");
        assert!(msg.contains("max-jobs"), "{msg}");
        assert!(msg.contains("'lots'"), "{msg}");
        let e = parse("sandbox = maybe").unwrap_err();
        assert!(format!("{e:#}").contains("relaxed"));
        assert!(parse("just words").is_err());
    }

    #[test]
    fn unknown_names_warn_not_fail() {
        let s = parse("frobnicate = yes\nexperimental-features = nix-command").unwrap();
        assert_eq!(s.warnings.len(), 1);
        assert!(s.warnings[0].contains("frobnicate"));
    }

    #[test]
    fn includes_are_relative_and_optional_ones_may_be_missing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("other.conf"), "cores = 3\n").unwrap();
        std::fs::write(
            dir.path().join("nix.conf"),
            "include other.conf\n!include missing.conf\nkeep-going = true\n",
        )
        .unwrap();
        let mut s = Settings::default();
        s.load_file(&dir.path().join("nix.conf"), 0).unwrap();
        assert_eq!(s.cores, 3);
        assert!(s.keep_going);
        std::fs::write(dir.path().join("nix.conf"), "include missing.conf\n").unwrap();
        assert!(Settings::default()
            .load_file(&dir.path().join("nix.conf"), 0)
            .is_err());
    }
}
