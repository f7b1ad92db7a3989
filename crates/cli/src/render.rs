//! Everything nixb prints on stderr: diagnostics now, the worker's events in `realise`.

use std::sync::atomic::{AtomicU8, Ordering};

static VERBOSITY: AtomicU8 = AtomicU8::new(1);

/// 0 = quiet (errors only), 1 = normal, 2+ = verbose.
///
/// Also installs the `tracing` subscriber through which the library crates report
/// (a cache's retries, a lock being waited for): errors only with `-q`, warnings by
/// default, then info, debug and trace with each `-v`. `NIXB_LOG` (an `EnvFilter`
/// directive such as `nixb_binarycache=debug`) replaces the level chosen by the flags.
pub fn init(verbose: u8, quiet: bool) {
    let level = if quiet { 0 } else { 1 + verbose };
    VERBOSITY.store(level, Ordering::Relaxed);
    let max = match level {
        0 => tracing::Level::ERROR,
        1 => tracing::Level::WARN,
        2 => tracing::Level::INFO,
        3 => tracing::Level::DEBUG,
        _ => tracing::Level::TRACE,
    };
    let filter = match std::env::var("NIXB_LOG") {
        Ok(spec) => tracing_subscriber::EnvFilter::new(spec),
        Err(_) => tracing_subscriber::EnvFilter::default().add_directive(max.into()),
    };
    // A second subscriber (a test calling init twice) is not an error worth reporting.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .event_format(NixStyle)
        .try_init();
}

/// Formats a `tracing` event as nixb's own diagnostics look: `warning: …`, `error: …`,
/// plain text for info, `debug: …` below that.
struct NixStyle;

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for NixStyle
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut w: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let prefix = match *event.metadata().level() {
            tracing::Level::ERROR => "error: ",
            tracing::Level::WARN => "warning: ",
            tracing::Level::INFO => "",
            tracing::Level::DEBUG => "debug: ",
            tracing::Level::TRACE => "trace: ",
        };
        w.write_str(prefix)?;
        ctx.field_format().format_fields(w.by_ref(), event)?;
        writeln!(w)
    }
}

pub fn verbosity() -> u8 {
    VERBOSITY.load(Ordering::Relaxed)
}

/// `error: <message>: <cause>: <cause>` on one line, as Nix does.
pub fn error(e: &anyhow::Error) {
    eprintln!("error: {e:#}");
}

pub fn warn(msg: &str) {
    if verbosity() >= 1 {
        eprintln!("warning: {msg}");
    }
}

pub fn info(msg: &str) {
    if verbosity() >= 2 {
        eprintln!("{msg}");
    }
}

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use nixb_goals::{Event, EventSink, FailureKind, Level};
use nixb_store::{StoreDir, StorePath};

/// How `realise` shows what the worker does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RenderMode {
    /// A progress line on a terminal, plain lines otherwise; builder output echoed.
    Human,
    /// As Human, plus the original engine's `@ build-…` lines.
    Trace,
    /// One JSON object a line, for tools.
    Json,
}

/// Renders the worker's events on stderr.
pub struct EventRenderer {
    mode: RenderMode,
    dir: StoreDir,
    bar: Option<ProgressBar>,
    start: Instant,
    running: Vec<StorePath>,
    done: usize,
    failed: usize,
    /// Builds the worker has said it will run, so far (the total grows as it explores).
    planned: usize,
    /// Builder output not yet ended by a newline, per derivation, so that lines of
    /// concurrent builds do not interleave mid-line.
    partial: HashMap<StorePath, Vec<u8>>,
    /// Derivations whose hook failed: the original prints `@ hook-failed` *instead of*
    /// `@ build-failed` for them.
    hook_failed: std::collections::HashSet<StorePath>,
    /// What each finished builder used, for the closing summary of `-v`.
    resources: Vec<(StorePath, nixb_goals::ResourceUsage)>,
}

impl EventRenderer {
    pub fn new(mode: RenderMode, dir: StoreDir) -> EventRenderer {
        let tty = std::io::stderr().is_terminal()
            && std::env::var_os("TERM").is_some_and(|t| t != "dumb");
        let bar = (mode == RenderMode::Human && tty && verbosity() >= 1).then(|| {
            let pb = ProgressBar::new_spinner();
            pb.set_style(
                ProgressStyle::with_template("{spinner} [{elapsed}] {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            pb.enable_steady_tick(std::time::Duration::from_millis(120));
            pb
        });
        EventRenderer {
            mode,
            dir,
            bar,
            start: Instant::now(),
            running: Vec::new(),
            done: 0,
            failed: 0,
            planned: 0,
            partial: HashMap::new(),
            hook_failed: Default::default(),
            resources: Vec::new(),
        }
    }

    pub fn finish(&mut self) {
        let drvs: Vec<StorePath> = self.partial.keys().cloned().collect();
        for d in drvs {
            if let Some(rest) = self.partial.remove(&d) {
                if !rest.is_empty() {
                    self.line(&d, &rest);
                }
            }
        }
        if let Some(pb) = self.bar.take() {
            pb.finish_and_clear();
        }
        if self.mode != RenderMode::Json && verbosity() >= 2 {
            for (drv, u) in &self.resources {
                eprintln!(
                    "resources of '{}': cpu {:.2}s user + {:.2}s system, peak memory {}, read {}, written {}",
                    self.dir.print(drv),
                    u.user.as_secs_f64(),
                    u.system.as_secs_f64(),
                    human_bytes(u.peak_memory),
                    human_bytes(u.read_bytes),
                    human_bytes(u.written_bytes)
                );
            }
            eprintln!(
                "{} built, {} failed in {:.1}s",
                self.done,
                self.failed,
                self.start.elapsed().as_secs_f64()
            );
        }
    }

    fn say(&self, text: &str) {
        match &self.bar {
            Some(pb) => pb.println(text),
            None => eprintln!("{text}"),
        }
    }

    fn update_bar(&self) {
        if let Some(pb) = &self.bar {
            let names: Vec<&str> = self.running.iter().map(drv_name).collect();
            let total = self
                .planned
                .max(self.done + self.failed + self.running.len());
            let failed = if self.failed > 0 {
                format!(", {} failed", self.failed)
            } else {
                String::new()
            };
            pb.set_message(format!(
                "[{}/{} built{}] {}{}",
                self.done,
                total,
                failed,
                if names.is_empty() { "" } else { "building " },
                names.join(", ")
            ));
        }
    }

    fn json(&self, v: serde_json::Value) {
        eprintln!("{v}");
    }

    /// One complete line of builder output.
    fn line(&self, drv: &StorePath, line: &[u8]) {
        let text = String::from_utf8_lossy(line);
        match self.mode {
            RenderMode::Json => self.json(serde_json::json!({
                "event": "log", "drv": self.dir.print(drv), "line": text,
            })),
            _ if verbosity() == 0 => {}
            _ => match &self.bar {
                Some(pb) => pb.println(format!("{}> {}", drv_name(drv), text)),
                None => {
                    let mut err = std::io::stderr().lock();
                    let _ = err.write_all(line);
                    let _ = err.write_all(b"\n");
                }
            },
        }
    }
}

/// `1.5 MiB` (binary units, one decimal), `512 B` below a KiB.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// `hello-2.12` for `/nix/store/…-hello-2.12.drv`.
fn drv_name(drv: &StorePath) -> &str {
    drv.name().strip_suffix(".drv").unwrap_or(drv.name())
}

fn kind_name(k: FailureKind) -> &'static str {
    match k {
        FailureKind::BuilderFailed => "builder-failed",
        FailureKind::TimedOut => "timed-out",
        FailureKind::LogLimitExceeded => "log-limit-exceeded",
        FailureKind::HashMismatch => "hash-mismatch",
        FailureKind::NotDeterministic => "not-deterministic",
        FailureKind::CachedFailure => "cached-failure",
        FailureKind::DependencyFailed => "dependency-failed",
        FailureKind::SetupFailed => "setup-failed",
    }
}

impl EventSink for EventRenderer {
    fn event(&mut self, e: Event) {
        match e {
            Event::BuildStarted {
                drv,
                outputs,
                platform,
                log_file,
                ..
            } => {
                let d = self.dir.print(&drv);
                match self.mode {
                    RenderMode::Json => self.json(serde_json::json!({
                        "event": "build-started", "drv": d, "platform": platform,
                        "outputs": outputs.iter().map(|o| self.dir.print(o)).collect::<Vec<_>>(),
                        "log": log_file.as_ref().map(|p| p.display().to_string()),
                    })),
                    mode => {
                        if verbosity() >= 1 && self.bar.is_none() {
                            self.say(&format!("building '{d}'..."));
                        }
                        if mode == RenderMode::Trace {
                            let log = log_file
                                .map(|p| p.display().to_string())
                                .unwrap_or_default();
                            self.say(&format!("@ build-started {d} - {platform} {log}"));
                        }
                    }
                }
                self.running.push(drv);
                self.update_bar();
            }
            Event::BuildLog { drv, chunk } => {
                let mut buf = self.partial.remove(&drv).unwrap_or_default();
                buf.extend_from_slice(&chunk);
                let mut start = 0;
                while let Some(nl) = memchr(b'\n', &buf[start..]) {
                    self.line(&drv, &buf[start..start + nl]);
                    start += nl + 1;
                }
                buf.drain(..start);
                if !buf.is_empty() {
                    self.partial.insert(drv, buf);
                }
            }
            Event::BuildResources { drv, usage: u } => {
                let d = self.dir.print(&drv);
                let (user_us, system_us) = (u.user.as_micros(), u.system.as_micros());
                match self.mode {
                    RenderMode::Json => self.json(serde_json::json!({
                        "event": "build-resources", "drv": d,
                        "cpu-user-us": user_us, "cpu-system-us": system_us,
                        "peak-memory-bytes": u.peak_memory,
                        "read-bytes": u.read_bytes, "written-bytes": u.written_bytes,
                    })),
                    RenderMode::Trace => self.say(&format!(
                        "@ build-resources {d} {user_us} {system_us} {} {} {}",
                        u.peak_memory, u.read_bytes, u.written_bytes
                    )),
                    RenderMode::Human => {}
                }
                self.resources.push((drv, u));
            }
            Event::BuildSucceeded { drv } => {
                if let Some(rest) = self.partial.remove(&drv).filter(|r| !r.is_empty()) {
                    self.line(&drv, &rest);
                }
                self.running.retain(|p| p != &drv);
                self.done += 1;
                let d = self.dir.print(&drv);
                match self.mode {
                    RenderMode::Json => {
                        self.json(serde_json::json!({"event": "build-succeeded", "drv": d}))
                    }
                    RenderMode::Trace => self.say(&format!("@ build-succeeded {d} -")),
                    RenderMode::Human => {}
                }
                self.update_bar();
            }
            Event::BuildFailed {
                drv,
                kind,
                reason,
                permanent,
            } => {
                if let Some(rest) = self.partial.remove(&drv).filter(|r| !r.is_empty()) {
                    self.line(&drv, &rest);
                }
                self.running.retain(|p| p != &drv);
                self.failed += 1;
                let d = self.dir.print(&drv);
                match self.mode {
                    RenderMode::Json => self.json(serde_json::json!({
                        "event": "build-failed", "drv": d, "kind": kind_name(kind),
                        "reason": reason, "permanent": permanent,
                    })),
                    mode => {
                        self.say(&format!("error: {reason}"));
                        if mode == RenderMode::Trace && !self.hook_failed.contains(&drv) {
                            let status = match kind {
                                FailureKind::TimedOut => "timeout".to_string(),
                                FailureKind::CachedFailure => "cached".to_string(),
                                FailureKind::SetupFailed => format!("0 {reason}"),
                                _ => format!("1 {reason}"),
                            };
                            self.say(&format!("@ build-failed {d} - {status}"));
                        }
                    }
                }
                self.update_bar();
            }
            Event::SubstituterStarted { path, substituter } => {
                let p = self.dir.print(&path);
                match self.mode {
                    RenderMode::Json => self.json(serde_json::json!({
                        "event": "substituter-started", "path": p, "substituter": substituter,
                    })),
                    RenderMode::Trace => {
                        self.say(&format!("@ substituter-started {p} {substituter}"))
                    }
                    RenderMode::Human => {}
                }
            }
            Event::SubstituterLog { path, chunk } => match self.mode {
                RenderMode::Json => self.json(serde_json::json!({
                    "event": "substituter-log", "path": self.dir.print(&path),
                    "text": String::from_utf8_lossy(&chunk),
                })),
                _ => {
                    // Whole lines only: a chunk may end mid-line.
                    let mut buf = self.partial.remove(&path).unwrap_or_default();
                    buf.extend_from_slice(&chunk);
                    let mut start = 0;
                    while let Some(nl) = memchr(b'\n', &buf[start..]) {
                        if verbosity() >= 1 {
                            self.say(&String::from_utf8_lossy(&buf[start..start + nl]));
                        }
                        start += nl + 1;
                    }
                    buf.drain(..start);
                    if !buf.is_empty() {
                        self.partial.insert(path, buf);
                    }
                }
            },
            Event::SubstituterSucceeded { path } => {
                let p = self.dir.print(&path);
                match self.mode {
                    RenderMode::Json => {
                        self.json(serde_json::json!({"event": "substituter-succeeded", "path": p}))
                    }
                    RenderMode::Trace => self.say(&format!("@ substituter-succeeded {p}")),
                    RenderMode::Human => {}
                }
            }
            Event::SubstituterFailed {
                path,
                status,
                message,
            } => {
                let p = self.dir.print(&path);
                match self.mode {
                    RenderMode::Json => self.json(serde_json::json!({
                        "event": "substituter-failed", "path": p, "status": status, "message": message,
                    })),
                    RenderMode::Trace => self.say(&format!("@ substituter-failed {p} {status} {message}")),
                    RenderMode::Human => {}
                }
            }
            Event::HookOutput { drv, text } => match self.mode {
                RenderMode::Json => self.json(serde_json::json!({
                    "event": "hook-output", "drv": self.dir.print(&drv), "text": text,
                })),
                _ => self.say(&text),
            },
            Event::HookFailed {
                drv,
                status,
                message,
            } => {
                let d = self.dir.print(&drv);
                match self.mode {
                    RenderMode::Json => self.json(serde_json::json!({
                        "event": "hook-failed", "drv": d, "status": status, "message": message,
                    })),
                    RenderMode::Trace => {
                        self.say(&format!("@ hook-failed {d} - {status} {message}"));
                        self.hook_failed.insert(drv);
                    }
                    RenderMode::Human => {}
                }
            }
            Event::BuildPlanned { drv } => {
                self.planned += 1;
                if self.mode == RenderMode::Json {
                    self.json(
                        serde_json::json!({"event": "build-planned", "drv": self.dir.print(&drv)}),
                    );
                }
                self.update_bar();
            }
            Event::WaitingForLocks => {
                if self.mode == RenderMode::Json {
                    self.json(serde_json::json!({"event": "waiting-for-locks"}));
                }
            }
            Event::Message { level, text } => {
                if self.mode == RenderMode::Json {
                    let l = match level {
                        Level::Error => "error",
                        Level::Warn => "warn",
                        Level::Info => "info",
                        Level::Debug => "debug",
                    };
                    self.json(serde_json::json!({"event": "message", "level": l, "text": text}));
                    return;
                }
                let show = match level {
                    Level::Error => true,
                    Level::Warn => verbosity() >= 1,
                    Level::Info => verbosity() >= 1,
                    Level::Debug => verbosity() >= 3,
                };
                if show {
                    let prefix = match level {
                        Level::Error => "error: ",
                        Level::Warn => "warning: ",
                        _ => "",
                    };
                    self.say(&format!("{prefix}{text}"));
                }
            }
        }
    }
}

fn memchr(b: u8, s: &[u8]) -> Option<usize> {
    s.iter().position(|&c| c == b)
}
