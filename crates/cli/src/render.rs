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
use nixb_daemon::activity::Activities;
use nixb_goals::{Event, EventSink, FailureKind, Level};
use nixb_protocol::stderr::{to_internal_json, ActivityType, Field, ResultType, Verbosity};
use nixb_protocol::types::{BuildResult, BuildStatus};
use nixb_protocol::StderrFrame;
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
    /// Nix's structured log (`--log-format internal-json`): `@nix {...}` lines, the
    /// activities a Nix daemon client would see.
    InternalJson,
}

/// The activities `nix-store -r` wraps its builds in, which nix-output-monitor builds its
/// tree from: `Realise`, `Builds` (with its progress) and `CopyPaths`.
struct TopLevel {
    realise: u64,
    builds: u64,
    copy_paths: u64,
    /// The `Builds` progress last printed, so that an unchanged one is not repeated.
    last_progress: [u64; 4],
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
    /// `InternalJson`: the engine's events as Nix's activities (the daemon's translator).
    activities: Option<Activities>,
    /// `InternalJson`, local builds: the enclosing activities, once begun.
    top: Option<TopLevel>,
    /// `InternalJson`: error lines held until the activities are stopped, as Nix prints
    /// a failed build's error after them.
    pending_errors: Vec<String>,
    /// A daemon's frames: its build activities by id, for their log lines.
    remote_builds: HashMap<u64, StorePath>,
    /// A daemon's frames: the id of its `Builds` activity, whose progress moves the bar.
    remote_builds_activity: Option<u64>,
}

/// The base of this process's activity ids, as Nix numbers them (the pid in the high
/// half), so that they do not collide with those of a daemon whose frames are shown too.
fn activity_id_base() -> u64 {
    u64::from(std::process::id()) << 32
}

impl EventRenderer {
    /// `allow_bar: false` never shows the progress line (`--log-format raw`).
    pub fn with_bar(mode: RenderMode, dir: StoreDir, allow_bar: bool) -> EventRenderer {
        let tty = std::io::stderr().is_terminal()
            && std::env::var_os("TERM").is_some_and(|t| t != "dumb");
        let bar = (allow_bar && mode == RenderMode::Human && tty && verbosity() >= 1).then(|| {
            let pb = ProgressBar::new_spinner();
            pb.set_style(
                ProgressStyle::with_template("{spinner} [{elapsed}] {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            pb.enable_steady_tick(std::time::Duration::from_millis(120));
            pb
        });
        let dir_for_activities = dir.clone();
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
            activities: (mode == RenderMode::InternalJson)
                .then(|| Activities::new(dir_for_activities, activity_id_base() + 4)),
            top: None,
            pending_errors: Vec::new(),
            remote_builds: HashMap::new(),
            remote_builds_activity: None,
        }
    }

    /// Local builds in `InternalJson`: starts the activities `nix-store -r` wraps its
    /// builds in (`Realise`, `Builds`, `CopyPaths`), with their first progress.
    pub fn begin(&mut self) {
        if self.mode != RenderMode::InternalJson || self.top.is_some() {
            return;
        }
        let base = activity_id_base();
        let top = TopLevel {
            realise: base + 1,
            builds: base + 2,
            copy_paths: base + 3,
            last_progress: [u64::MAX; 4],
        };
        for (id, kind) in [
            (top.realise, ActivityType::Realise),
            (top.builds, ActivityType::Builds),
            (top.copy_paths, ActivityType::CopyPaths),
        ] {
            emit_json(&StderrFrame::StartActivity {
                id,
                level: Verbosity::Error,
                kind,
                text: String::new(),
                fields: Vec::new(),
                parent: 0,
            });
        }
        emit_json(&StderrFrame::Result {
            id: top.copy_paths,
            kind: ResultType::Progress,
            fields: vec![Field::Int(0); 4],
        });
        // What Nix's worker expects to download and copy: nothing it knows of yet.
        for expected in [ActivityType::FileTransfer, ActivityType::CopyPath] {
            emit_json(&StderrFrame::Result {
                id: top.realise,
                kind: ResultType::SetExpected,
                fields: vec![Field::Int(expected.to_u64()), Field::Int(0)],
            });
        }
        self.top = Some(top);
        self.progress();
    }

    /// `InternalJson`: the `Builds` activity's progress (done, expected, running,
    /// failed), when it changed.
    fn progress(&mut self) {
        let expected = self
            .planned
            .max(self.done + self.failed + self.running.len()) as u64;
        let now = [
            self.done as u64,
            expected,
            self.running.len() as u64,
            self.failed as u64,
        ];
        if let Some(top) = &mut self.top {
            if top.last_progress != now {
                top.last_progress = now;
                emit_json(&StderrFrame::Result {
                    id: top.builds,
                    kind: ResultType::Progress,
                    fields: now.iter().map(|&n| Field::Int(n)).collect(),
                });
            }
        }
    }

    /// An error as Nix's JSON logger prints it (`msg` with its coloured prefix, `raw_msg`
    /// without, no position), held until the activities are stopped.
    fn json_error(&mut self, msg: &str) {
        let colored = format!("\u{1b}[31;1merror:\u{1b}[0m {msg}");
        let line = format!(
            "@nix {{\"action\":\"msg\",\"column\":null,\"file\":null,\"level\":0,\"line\":null,\"msg\":{},\"raw_msg\":{}}}",
            serde_json::Value::String(colored),
            serde_json::Value::String(msg.to_string())
        );
        self.pending_errors.push(line);
    }

    pub fn finish(&mut self) {
        if let Some(a) = &mut self.activities {
            a.finish(&mut |f| emit_json(&f));
        }
        if let Some(top) = self.top.take() {
            for id in [top.copy_paths, top.builds, top.realise] {
                emit_json(&StderrFrame::StopActivity { id });
            }
        }
        for line in std::mem::take(&mut self.pending_errors) {
            eprintln!("{line}");
        }
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
        if !matches!(self.mode, RenderMode::Json | RenderMode::InternalJson) && verbosity() >= 2 {
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

impl EventRenderer {
    /// `InternalJson`: the event as the daemon's translator frames it, with the
    /// `Builds` progress around it and a failed build's error held for the end.
    fn internal_json_event(&mut self, e: Event) {
        match &e {
            Event::BuildSucceeded { drv } => {
                self.running.retain(|p| p != drv);
                self.done += 1;
                self.progress();
            }
            Event::BuildFailed { drv, reason, .. } => {
                self.running.retain(|p| p != drv);
                self.failed += 1;
                self.json_error(&reason.clone());
                self.progress();
            }
            _ => {}
        }
        let after = match &e {
            Event::BuildPlanned { .. } => {
                self.planned += 1;
                true
            }
            Event::BuildStarted { drv, .. } => {
                self.running.push(drv.clone());
                true
            }
            _ => false,
        };
        if let Some(a) = &mut self.activities {
            a.translate(e, &mut |f| emit_json(&f));
        }
        if after {
            self.progress();
        }
    }

    /// One frame of a daemon's stderr channel (client mode), shown in this renderer's
    /// mode: as it is in `InternalJson` (as Nix's client passes a daemon's activities
    /// on); otherwise build activities, their log lines and the daemon's messages as the
    /// engine's own events are shown.
    pub fn frame(&mut self, f: &StderrFrame) {
        if self.mode == RenderMode::InternalJson {
            emit_json(f);
            return;
        }
        match f {
            StderrFrame::Next(text) => {
                let text = String::from_utf8_lossy(text);
                let text = text.strip_suffix('\n').unwrap_or(&text);
                if self.mode == RenderMode::Json {
                    self.json(
                        serde_json::json!({"event": "message", "level": "info", "text": text}),
                    );
                } else if verbosity() >= 1 {
                    self.say(text);
                }
            }
            StderrFrame::StartActivity {
                id,
                level,
                kind,
                text,
                fields,
                ..
            } => {
                if *kind == ActivityType::Builds {
                    self.remote_builds_activity = Some(*id);
                }
                let drv = match (kind, fields.first()) {
                    (ActivityType::Build, Some(Field::String(p))) => {
                        self.dir.parse(&String::from_utf8_lossy(p)).ok()
                    }
                    _ => None,
                };
                if let Some(drv) = drv {
                    let d = self.dir.print(&drv);
                    match self.mode {
                        RenderMode::Json => self.json(serde_json::json!({
                            "event": "build-started", "drv": d,
                        })),
                        mode => {
                            if verbosity() >= 1 && self.bar.is_none() {
                                self.say(&format!("building '{d}'..."));
                            }
                            if mode == RenderMode::Trace {
                                self.say(&format!("@ build-started {d} -"));
                            }
                        }
                    }
                    self.running.push(drv.clone());
                    self.remote_builds.insert(*id, drv);
                    self.update_bar();
                } else if !text.is_empty()
                    && self.mode != RenderMode::Json
                    && (*level as u8) <= nix_verbosity()
                    && self.bar.is_none()
                {
                    // As Nix's plain logger shows an activity it starts.
                    self.say(&format!("{text}..."));
                }
            }
            StderrFrame::Result { id, kind, fields } => match kind {
                ResultType::BuildLogLine | ResultType::PostBuildLogLine => {
                    if let (Some(drv), Some(Field::String(line))) =
                        (self.remote_builds.get(id), fields.first())
                    {
                        self.line(drv, line);
                    }
                }
                ResultType::Progress if Some(*id) == self.remote_builds_activity => {
                    if let [Field::Int(done), Field::Int(expected), _, Field::Int(failed)] =
                        fields.as_slice()
                    {
                        self.done = *done as usize;
                        self.planned = *expected as usize;
                        self.failed = *failed as usize;
                        self.update_bar();
                    }
                }
                _ => {}
            },
            StderrFrame::StopActivity { id } => {
                if let Some(drv) = self.remote_builds.remove(id) {
                    self.running.retain(|p| p != &drv);
                    self.update_bar();
                }
            }
            StderrFrame::Read(_) | StderrFrame::Write(_) | StderrFrame::Last => {}
            StderrFrame::Error(e) => self.say(&format!("error: {}", daemon_text(&e.message))),
        }
    }

    /// What a daemon answered for one target of a build (client mode): a failure's
    /// message in every mode; in `Json` and `Trace` also the target's success or
    /// failure (a daemon says so only for the targets, not for what they depend on).
    pub fn remote_result(&mut self, target: &str, drv: Option<&StorePath>, r: &BuildResult) {
        let ok = r.status.is_success();
        let d = drv.map(|p| self.dir.print(p));
        match self.mode {
            RenderMode::InternalJson => {
                if !ok {
                    self.json_error(&r.error_msg);
                    for line in std::mem::take(&mut self.pending_errors) {
                        eprintln!("{line}");
                    }
                }
            }
            RenderMode::Json => {
                if ok {
                    if let Some(d) = d {
                        self.json(serde_json::json!({"event": "build-succeeded", "drv": d}));
                    }
                } else {
                    self.json(serde_json::json!({
                        "event": "build-failed", "drv": d.unwrap_or_else(|| target.to_string()),
                        "kind": status_kind(r.status), "reason": strip_ansi(&r.error_msg),
                        "permanent": !matches!(r.status, BuildStatus::TransientFailure),
                    }));
                }
            }
            mode => {
                if !ok {
                    self.say(&format!("error: {}", daemon_text(&r.error_msg)));
                }
                if mode == RenderMode::Trace {
                    if let Some(d) = d {
                        if ok {
                            if r.status == BuildStatus::Built {
                                self.say(&format!("@ build-succeeded {d} -"));
                            }
                        } else {
                            let msg = strip_ansi(&r.error_msg);
                            self.say(&format!("@ build-failed {d} - 1 {msg}"));
                        }
                    }
                }
            }
        }
    }
}

/// The `kind` of `--json`'s build-failed event for a daemon's build status.
fn status_kind(s: BuildStatus) -> &'static str {
    match s {
        BuildStatus::TimedOut => "timed-out",
        BuildStatus::LogLimitExceeded => "log-limit-exceeded",
        BuildStatus::OutputRejected => "hash-mismatch",
        BuildStatus::NotDeterministic => "not-deterministic",
        BuildStatus::CachedFailure => "cached-failure",
        BuildStatus::DependencyFailed => "dependency-failed",
        BuildStatus::PermanentFailure => "builder-failed",
        _ => "setup-failed",
    }
}

/// Whether stderr shows colours, as Nix decides (a terminal, `TERM` not `dumb`, no
/// `NO_COLOR`): Nix's messages carry ANSI colour codes, which it strips otherwise.
pub fn ansi_ok() -> bool {
    std::io::stderr().is_terminal()
        && std::env::var_os("TERM").is_some_and(|t| t != "dumb")
        && std::env::var_os("NO_COLOR").is_none()
}

/// `s` without ANSI escape sequences (`ESC [ … final byte`, and two-byte `ESC x`).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        // `ESC x` drops x; `ESC [` also drops parameters and intermediates up to the
        // final byte (@ to ~).
        if chars.next() == Some('[') {
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        }
    }
    out
}

/// A daemon's message as it is shown on stderr: its colours only where Nix would show
/// them.
pub fn daemon_text(s: &str) -> String {
    if ansi_ok() {
        s.to_string()
    } else {
        strip_ansi(s)
    }
}

/// Nix's verbosity level for nixb's (`-q` errors only; normal = info; each `-v` one more).
pub fn nix_verbosity() -> u8 {
    match verbosity() {
        0 => 0,
        v => (v + 2).min(7),
    }
}

/// Prints the frame as a line of Nix's structured log, if it is log output.
fn emit_json(f: &StderrFrame) {
    if let Some(line) = to_internal_json(f) {
        eprintln!("{line}");
    }
}

impl EventSink for EventRenderer {
    fn event(&mut self, e: Event) {
        if self.mode == RenderMode::InternalJson {
            self.internal_json_event(e);
            return;
        }
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
                    RenderMode::Human | RenderMode::InternalJson => {}
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
                    RenderMode::Human | RenderMode::InternalJson => {}
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
                    RenderMode::Human | RenderMode::InternalJson => {}
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
                    RenderMode::Human | RenderMode::InternalJson => {}
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
                    RenderMode::Human | RenderMode::InternalJson => {}
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
                    RenderMode::Human | RenderMode::InternalJson => {}
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ansi_colours_are_stripped_as_nix_strips_them() {
        assert_eq!(
            strip_ansi("\u{1b}[31;1merror:\u{1b}[0m builder for '\u{1b}[35;1m/s/x.drv\u{1b}[0m'"),
            "error: builder for '/s/x.drv'"
        );
        assert_eq!(strip_ansi("plain ☃ text"), "plain ☃ text");
        assert_eq!(strip_ansi("cut \u{1b}[3"), "cut ");
    }
}
