//! The build hook: offering a build to an external program that may do it elsewhere
//! (the original's `HookInstance` and `DerivationGoal::tryBuildHook`).
//!
//! ```text
//! argv     hook-program <system> <max-silent-time> <print-build-trace 0|1> <timeout>
//! stdin    requests:  "<am willing 0|1> <platform> <drv> <feature>,<feature>...\n"
//!          after "# accept": "<input paths, blank-separated> \n" "<wanted outputs> \n",
//!          then end of file
//! stdout,  replies "# accept" | "# decline" | "# postpone"; any other line is a message
//! stderr   passed on to the user
//! fd 4     the build log (the remote builder's output)
//! exit     0 built (outputs imported and valid here), 100 the remote build failed,
//!          101 it timed out there, anything else: the hook itself failed (reported with
//!          an `@ hook-failed` trace line in place of `@ build-failed`)
//! ```
//!
//! One hook process serves requests until it accepts one; the accepting goal takes the
//! process over as its "builder" and the next request starts a fresh hook. The reply is
//! read synchronously, as in the original: the hook answers after at most connecting to a
//! machine. Once accepted, the worker polls the hook's fd 4 like a builder's log pipe and
//! its exit like a builder's; its timeouts are the hook's business (passed on argv), so
//! the worker does not apply them. The hook's message stream is read without blocking
//! whenever it is woken and once more at the end.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufRead, Read, Write};
use std::os::fd::AsRawFd;

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nixb_logs::LogSink;
use nixb_store::StorePath;

use crate::config::BuildMode;
use crate::error::{quoted, BuildError};
use crate::event::{Event, FailureKind, Level};
use crate::external::{raw_status, status_to_string};
use crate::hook_instance::HookInstance;
use crate::services::{ChildStatus, Step};

use super::plan::{required_system_features, BuildPlan};

/// The exit status of a hook whose remote build failed (as opposed to the hook failing).
pub const REMOTE_BUILD_FAILED: i32 = 100;
/// The exit status of a hook whose remote build ran out of `timeout` or `max-silent-time`
/// (the original's `@ build-failed DRV - timeout`; the run then exits with the timeout bit).
pub const REMOTE_BUILD_TIMED_OUT: i32 = 101;

/// The hook's answer to one request.
pub(crate) enum HookReply {
    /// It builds: its process is the goal's child now.
    Accept(Box<HookBuild>),
    Decline,
    Postpone,
}

/// How a build the hook accepted ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum HookResult {
    /// Every output is valid here now.
    Built,
    Failed {
        kind: FailureKind,
        message: String,
        permanent: bool,
    },
}

/// A build the hook accepted, owned by its derivation goal.
pub(crate) struct HookBuild {
    /// The hook's messages, now read without blocking.
    from_hook: File,
    partial: Vec<u8>,
    log: Option<LogSink>,
    log_error: Option<String>,
}

impl HookBuild {
    /// A chunk of the build log (fd 4); `Some(limit)` when max-build-log-size is exceeded.
    pub fn log_chunk(&mut self, chunk: &[u8]) -> Option<u64> {
        super::build::write_log_chunk(&mut self.log, &mut self.log_error, chunk)
    }

    /// Passes on what the hook said since the last call, line by line.
    pub fn drain_messages(&mut self, cx: &mut Step<'_>, drv: &StorePath, at_end: bool) {
        let mut buf = [0u8; 8192];
        loop {
            match self.from_hook.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => self.partial.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break, // EAGAIN: nothing more for now
            }
        }
        while let Some(nl) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=nl).collect();
            let text = String::from_utf8_lossy(&line[..nl]).into_owned();
            cx.emit(Event::HookOutput {
                drv: drv.clone(),
                text,
            });
        }
        if at_end && !self.partial.is_empty() {
            let text = String::from_utf8_lossy(&self.partial).into_owned();
            self.partial.clear();
            cx.emit(Event::HookOutput {
                drv: drv.clone(),
                text,
            });
        }
    }

    fn close_log(&mut self) -> Result<(), String> {
        if let Some(sink) = self.log.take() {
            sink.finish().map_err(|e| e.to_string())?;
        }
        self.log_error.take().map_or(Ok(()), Err)
    }
}

fn hook_error(drv: &str, what: impl std::fmt::Display) -> BuildError {
    BuildError::Misc(format!("build hook for '{drv}': {what}"))
}

/// `tryBuildHook`: offers the build `g` plans to the hook. On `Accept` the hook runs as
/// the goal's child; the caller keeps the [`HookBuild`] and moves to `buildDone`.
pub(crate) fn try_build_hook(g: &BuildPlan, cx: &mut Step<'_>) -> Result<HookReply, BuildError> {
    let Some(cmd) = cx.cfg.build_hook.clone() else {
        return Ok(HookReply::Decline);
    };
    let drv_shown = cx.store_dir().print(&g.drv_path);
    if cx.services.hook().is_none() {
        let inst = HookInstance::start(&cmd, cx.cfg).map_err(|e| {
            hook_error(
                &drv_shown,
                format!("starting '{}': {e}", cmd.program.display()),
            )
        })?;
        *cx.services.hook() = Some(inst);
    }
    let Some(drv) = g.drv.as_ref() else {
        return Err(BuildError::Misc(
            "internal error: derivation not loaded".into(),
        ));
    };
    let features: Vec<String> = required_system_features(drv).into_iter().collect();
    let am_willing = cx.nr_local_builds() < cx.cfg.max_jobs;
    let request = format!(
        "{} {} {} {}\n",
        am_willing as u8,
        drv.platform,
        drv_shown,
        features.join(",")
    );

    let reply = {
        let Some(inst) = cx.services.hook().as_mut() else {
            return Ok(HookReply::Decline);
        };
        let sent = match inst.to_hook.as_mut() {
            Some(s) => s.write_all(request.as_bytes()).and_then(|()| s.flush()),
            None => Err(std::io::Error::other("its standard input is closed")),
        };
        let mut messages = Vec::new();
        let reply = match sent {
            Err(e) => Err(format!("sending the request: {e}")),
            Ok(()) => loop {
                let mut line = String::new();
                match inst.from_hook.read_line(&mut line) {
                    Ok(0) => break Err("the hook exited without replying".to_string()),
                    Ok(_) => {}
                    Err(e) => break Err(format!("reading its reply: {e}")),
                }
                let line = line.trim_end_matches('\n');
                match line.strip_prefix("# ") {
                    Some(word) => break Ok(word.to_string()),
                    None => messages.push(line.to_string()),
                }
            },
        };
        for text in messages {
            cx.emit(Event::HookOutput {
                drv: g.drv_path.clone(),
                text,
            });
        }
        reply
    };
    let reply = match reply {
        Ok(r) => r,
        Err(e) => {
            // The hook is unusable; the next request starts a new one.
            *cx.services.hook() = None;
            return Err(hook_error(&drv_shown, e));
        }
    };
    match reply.as_str() {
        "decline" => return Ok(HookReply::Decline),
        "postpone" => return Ok(HookReply::Postpone),
        "accept" => {}
        other => {
            *cx.services.hook() = None;
            return Err(hook_error(&drv_shown, format!("bad hook reply '{other}'")));
        }
    }
    cx.message(
        Level::Info,
        format!("using the build hook to build {drv_shown}"),
    );
    let Some(mut inst) = cx.services.hook().take() else {
        return Err(hook_error(&drv_shown, "internal error: hook vanished"));
    };

    // The whole input closure, derivation included, so that the remote side can keep the
    // closure invariant.
    let mut inputs: BTreeSet<StorePath> = g.input_paths.clone();
    inputs.extend(
        cx.store
            .compute_closure(&BTreeSet::from([g.drv_path.clone()]))?,
    );
    let sd = cx.store_dir().clone();
    let line = |paths: &mut dyn Iterator<Item = &StorePath>| -> String {
        let mut s: String = paths.map(|p| format!("{} ", sd.print(p))).collect();
        s.push('\n');
        s
    };
    let text = line(&mut inputs.iter()) + &line(&mut g.missing_paths.iter());
    if let Some(mut s) = inst.to_hook.take() {
        s.write_all(text.as_bytes())
            .map_err(|e| hook_error(&drv_shown, format!("sending the path lists: {e}")))?;
        // Dropping `s` closes the hook's stdin: no more requests.
    }

    let log = LogSink::create(&cx.cfg.log, g.drv_path.base_name()).map_err(|e| {
        BuildError::misc(
            format!("creating the build log of {}", quoted(&sd, &g.drv_path)),
            e,
        )
    })?;
    let log_file = log.path().map(|p| p.to_path_buf());
    // What the reader already took past the reply line is the start of the messages.
    let partial = inst.from_hook.buffer().to_vec();
    let from_hook = inst.from_hook.into_inner();
    fcntl(from_hook.as_raw_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK))
        .map_err(|e| hook_error(&drv_shown, format!("making its pipe non-blocking: {e}")))?;
    let hook_build = HookBuild {
        from_hook,
        partial,
        log: Some(log),
        log_error: None,
    };
    // Builds done by the hook are watched by the hook itself: the worker applies neither
    // max-silent-time nor timeout to its process.
    cx.start_child(inst.process, inst.builder_out, false, false);
    cx.emit(Event::BuildStarted {
        drv: g.drv_path.clone(),
        outputs: g.missing_paths.iter().cloned().collect(),
        mode: BuildMode::Normal,
        platform: drv.platform.clone(),
        log_file,
    });
    Ok(HookReply::Accept(Box::new(hook_build)))
}

/// `buildDone` for a build the hook did: exit 0 with every output valid here is success,
/// 100 a (permanent) remote build failure, anything else a hook failure.
pub(crate) fn build_done(
    g: &BuildPlan,
    cx: &mut Step<'_>,
    mut hb: HookBuild,
    status: ChildStatus,
) -> Result<HookResult, BuildError> {
    let drv_path = g.drv_path.clone();
    hb.drain_messages(cx, &drv_path, true);
    if let Err(e) = hb.close_log() {
        cx.message(Level::Warn, format!("closing the build log: {e}"));
    }
    let shown = quoted(cx.store_dir(), &drv_path);
    let status = match status {
        Ok(s) => s,
        Err(e) => {
            let message = format!("waiting for the build hook of {shown}: {e}");
            cx.emit(Event::HookFailed {
                drv: drv_path.clone(),
                status: "-1".into(),
                message: message.clone(),
            });
            return Ok(HookResult::Failed {
                kind: FailureKind::SetupFailed,
                message,
                permanent: false,
            });
        }
    };
    if status.success() {
        let mut missing = Vec::new();
        for p in &g.missing_paths {
            if !cx.store.is_valid_path(p)? {
                missing.push(cx.store_dir().print(p));
            }
        }
        if missing.is_empty() {
            return Ok(HookResult::Built);
        }
        let message = format!(
            "the build hook for {shown} exited successfully but did not make {} valid",
            missing.join(", ")
        );
        cx.emit(Event::HookFailed {
            drv: drv_path.clone(),
            status: raw_status(&status),
            message: message.clone(),
        });
        return Ok(HookResult::Failed {
            kind: FailureKind::SetupFailed,
            message,
            permanent: false,
        });
    }
    if status.code() == Some(REMOTE_BUILD_TIMED_OUT) {
        // Like a local timeout: not permanent, never cached as a failure.
        let message = format!("remote build of {shown} timed out");
        return Ok(HookResult::Failed {
            kind: FailureKind::TimedOut,
            message,
            permanent: false,
        });
    }
    if status.code() == Some(REMOTE_BUILD_FAILED) {
        let message = format!("remote build of {shown} failed");
        let permanent = !g.fixed_output;
        if cx.cfg.cache_failure && permanent {
            for p in g.outputs.values() {
                cx.store.register_failed_path(p)?;
            }
        }
        return Ok(HookResult::Failed {
            kind: FailureKind::BuilderFailed,
            message,
            permanent,
        });
    }
    // Communication problems and the like: neither permanent nor cached.
    let message = format!("build hook for {shown} {}", status_to_string(&status));
    cx.emit(Event::HookFailed {
        drv: drv_path.clone(),
        status: raw_status(&status),
        message: message.clone(),
    });
    Ok(HookResult::Failed {
        kind: FailureKind::SetupFailed,
        message,
        permanent: false,
    })
}
