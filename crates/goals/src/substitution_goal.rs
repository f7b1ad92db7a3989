//! The substitution goal: make one store path valid without building it, from the
//! `substituters`: external programs speaking the original engine's protocol, and binary
//! caches read in-process by the built-in substituter (`builtin_substituter`).
//!
//! States, in the original's names:
//!
//! ```text
//! init             done if the path is valid (and not being repaired)
//! tryNext          ask the next substituter (`--query`, `info PATH`); none left means
//!                  Failed if one had offered it, else NoSubstituters (the caller builds)
//! referencesValid  the references were substituted first (closure invariant); if one
//!                  could not be: IncompleteClosure (or Failed)
//! tryToRun         a build slot (max(1, max-jobs): substitutes run even when max-jobs is
//!                  0), the path's lock, a re-check, then `--substitute PATH DEST` as a
//!                  child whose stderr is the log and whose stdout carries the hash
//! finished         the child exited: verify the NAR hash of DEST against the one it
//!                  printed, canonicalise, register; on any failure try the next one
//! ```
//!
//! The `--query` programs run for the whole worker ([`QueryPool`]), one per substituter,
//! and are asked synchronously, as in the original: their answers come from local
//! metadata and are quick, whereas fetching runs in the background in a build slot.
//!
//! A binary cache goes the same way with two asynchronous steps, since reading a narinfo
//! may take a network round trip: `tryNext` hands the query to the built-in substituter's
//! threads and waits (`querying`); `tryToRun` takes no build slot, locks and re-checks as
//! above, and hands the fetch to a thread together with the lock (`fetching`). The thread
//! verifies NarHash and NarSize while unpacking and canonicalises; the path is registered
//! with the hash it computed (no second pass over the files), the narinfo's signatures and
//! content address, by the loop together with the other fetches that finished since its
//! last poll (or, when that batch fails or when repairing, by the goal itself). A failure
//! is that substituter failing: the next one is tried.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use nixb_store::locks::PathLocks;
use nixb_store::{Hash, HashAlgo, StoreDir, StorePath};

use crate::builtin_substituter::{Completion, Fetched};
use crate::config::{Substituter, SubstituterCommand};
use crate::error::quoted;
use crate::event::{Event, FailureKind, Level};
use crate::external::{raw_status, spawn_adopted, status_to_string};
use crate::graph::ExitCode;
use crate::outcome::Failure;
use crate::services::Step;
use crate::store::SubstitutedPath;
use crate::substituter_query::SubstitutableInfo;

/// The wait status shown in `@ substituter-failed` for a failure of the built-in
/// substituter: that of a program exiting with 1, which is what `nixb substitute` (which
/// served caches before) would have shown, so tools reading traces see the same lines.
const BUILTIN_FAILURE_STATUS: &str = "256";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Init,
    TryNext,
    /// Waiting for the built-in substituter's answer about the path.
    Querying,
    ReferencesValid,
    TryToRun,
    Finished,
    /// Waiting for the built-in substituter to fetch the path.
    Fetching,
}

pub(crate) struct SubstitutionGoal {
    path: StorePath,
    repair: bool,
    state: State,
    /// Index of the next substituter to ask.
    next_sub: usize,
    /// The substituter being used and what it said about the path.
    current: Option<(usize, SubstitutableInfo)>,
    /// Some substituter offered the path (so running out of them is a failure).
    has_substitute: bool,
    lock: Option<PathLocks>,
    /// Where the substituter unpacks: the path itself, or beside it when repairing.
    dest: PathBuf,
    stdout: Option<ChildStdout>,
    exit: Option<crate::services::ChildStatus>,
    /// What the built-in substituter reported for this goal.
    completion: Option<Box<Completion>>,
    /// Set when the goal is destroyed, so that its queued fetch is skipped.
    cancelled: Arc<AtomicBool>,
}

impl Drop for SubstitutionGoal {
    fn drop(&mut self) {
        self.cancelled.store(true, Ordering::SeqCst);
    }
}

impl SubstitutionGoal {
    pub fn new(path: StorePath, repair: bool) -> SubstitutionGoal {
        SubstitutionGoal {
            path,
            repair,
            state: State::Init,
            next_sub: 0,
            current: None,
            has_substitute: false,
            lock: None,
            dest: PathBuf::new(),
            stdout: None,
            exit: None,
            completion: None,
            cancelled: Arc::new(AtomicBool::new(false)),
        }
    }

    pub fn work(&mut self, cx: &mut Step<'_>) {
        match self.state {
            State::Init => self.init(cx),
            State::TryNext => self.try_next(cx),
            State::Querying => self.query_answered(cx),
            State::ReferencesValid => self.references_valid(cx),
            State::TryToRun => self.try_to_run(cx),
            State::Finished => self.finished(cx),
            State::Fetching => self.fetched(cx),
        }
    }

    /// The built-in substituter finished a job of this goal.
    pub fn builtin_completed(&mut self, c: Completion) {
        self.completion = Some(Box::new(c));
    }

    fn fail_setup(&mut self, cx: &mut Step<'_>, message: String) {
        self.lock = None;
        cx.message(Level::Error, message.clone());
        cx.record_failure(
            Failure {
                path: self.path.clone(),
                kind: FailureKind::SetupFailed,
                message,
            },
            false,
        );
        cx.am_done(ExitCode::Failed);
    }

    fn init(&mut self, cx: &mut Step<'_>) {
        let _ = cx.add_temp_root(&self.path);
        match cx.store.is_valid_path(&self.path) {
            Ok(true) if !self.repair => return cx.am_done(ExitCode::Success),
            Ok(_) => {}
            Err(e) => {
                let message = format!(
                    "checking validity of {}: {e}",
                    quoted(cx.store_dir(), &self.path)
                );
                return self.fail_setup(cx, message);
            }
        }
        self.next_sub = 0;
        self.try_next(cx);
    }

    fn try_next(&mut self, cx: &mut Step<'_>) {
        self.current = None;
        let cfg = cx.cfg;
        let subs = if cfg.use_substitutes {
            cfg.substituters.as_slice()
        } else {
            &[]
        };
        while self.next_sub < subs.len() {
            let idx = self.next_sub;
            self.next_sub += 1;
            match &subs[idx] {
                Substituter::External(sub) => {
                    let dir = cx.store.store_dir().clone();
                    match cx
                        .services
                        .subst_queries()
                        .query_info(idx, sub, &dir, &self.path)
                    {
                        Ok(Some(info)) => {
                            self.current = Some((idx, info));
                            break;
                        }
                        Ok(None) => {}
                        Err(e) => cx.message(Level::Warn, e),
                    }
                }
                Substituter::BinaryCache { .. } => {
                    match cx
                        .services
                        .builtin_subst()
                        .query(cx.id, idx, self.path.clone())
                    {
                        Ok(()) => {
                            self.state = State::Querying;
                            return;
                        }
                        Err(e) => cx.message(Level::Warn, e),
                    }
                }
            }
        }
        self.have_answer(cx);
    }

    /// The built-in substituter answered the query of `substituters[next_sub - 1]`.
    fn query_answered(&mut self, cx: &mut Step<'_>) {
        match self.completion.take().map(|c| *c) {
            Some(Completion::Query { result, .. }) => match result {
                Ok(Some(info)) => {
                    self.current = Some((
                        self.next_sub.saturating_sub(1),
                        SubstitutableInfo::from_narinfo(info),
                    ));
                    return self.have_answer(cx);
                }
                Ok(None) => {}
                Err(e) => cx.message(Level::Warn, e),
            },
            // Woken for another reason: keep waiting for the answer.
            None => return,
            Some(Completion::Fetch { .. }) => cx.message(
                Level::Warn,
                format!(
                    "internal error: unexpected fetch result for {}",
                    quoted(cx.store_dir(), &self.path)
                ),
            ),
        }
        self.try_next(cx);
    }

    /// Asking substituters ended: `current` is the one offering the path, if any.
    fn have_answer(&mut self, cx: &mut Step<'_>) {
        let Some((_, info)) = &self.current else {
            // None left. Without any offer at all this is not a failure: a derivation goal
            // waiting for its outputs then builds them (the original's "hack", kept
            // because it is what makes the fallback to building work).
            let code = if self.has_substitute {
                ExitCode::Failed
            } else {
                ExitCode::NoSubstituters
            };
            return cx.am_done(code);
        };
        self.has_substitute = true;
        // The closure invariant: references first (a self-reference is no dependency).
        let refs: Vec<StorePath> = info
            .references
            .iter()
            .filter(|r| **r != self.path)
            .cloned()
            .collect();
        for r in refs {
            cx.wait_for_substitution(&r, false);
        }
        self.state = State::ReferencesValid;
        if !cx.has_waitees() {
            self.references_valid(cx);
        }
    }

    fn references_valid(&mut self, cx: &mut Step<'_>) {
        let counts = cx.waitee_counts();
        if counts.failed > 0 {
            cx.message(
                Level::Debug,
                format!(
                    "some references of path {} could not be realised",
                    quoted(cx.store_dir(), &self.path)
                ),
            );
            let code = if counts.no_substituters > 0 || counts.incomplete_closure > 0 {
                ExitCode::IncompleteClosure
            } else {
                ExitCode::Failed
            };
            return cx.am_done(code);
        }
        cx.reset_waitee_counts();
        self.state = State::TryToRun;
        cx.wake_up();
    }

    fn try_to_run(&mut self, cx: &mut Step<'_>) {
        let Some(idx) = self.current.as_ref().map(|(idx, _)| *idx) else {
            return self.fail_setup(cx, "internal error: no substituter chosen".into());
        };
        let cfg = cx.cfg;
        let sub = match cfg.substituters.get(idx) {
            Some(Substituter::External(sub)) => Some(sub),
            Some(Substituter::BinaryCache { .. }) => None,
            None => {
                return self.fail_setup(cx, "internal error: no such substituter".into());
            }
        };
        // Substitutes cannot go to another machine through the hook, so one runs even
        // when max-jobs is 0. The built-in substituter's threads are its own limit.
        if sub.is_some() && cx.nr_local_builds() >= cfg.max_jobs.max(1) {
            return cx.wait_for_build_slot();
        }
        self.lock = None;
        if cx.is_locked_by_me(&self.path) {
            return cx.wait_for_any_goal();
        }
        let real = cx.store_dir().to_path(&self.path);
        let lock = match PathLocks::lock(std::slice::from_ref(&real), false, None) {
            Ok(Some(l)) => l,
            Ok(None) => return cx.wait_for_a_while(),
            Err(e) => {
                let message = format!("locking {}: {e}", quoted(cx.store_dir(), &self.path));
                return self.fail_setup(cx, message);
            }
        };
        self.lock = Some(lock);
        match cx.store.is_valid_path(&self.path) {
            Ok(true) if !self.repair => {
                self.release_valid(cx);
                return cx.am_done(ExitCode::Success);
            }
            Ok(_) => {}
            Err(e) => {
                let message = format!(
                    "checking validity of {}: {e}",
                    quoted(cx.store_dir(), &self.path)
                );
                return self.fail_setup(cx, message);
            }
        }
        self.dest = if self.repair {
            let mut d = real.clone().into_os_string();
            d.push(".tmp");
            PathBuf::from(d)
        } else {
            real.clone()
        };
        if std::fs::symlink_metadata(&self.dest).is_ok() {
            if let Err(e) = crate::build_dir::delete_path(&self.dest) {
                let message = format!("removing stale path '{}': {e}", self.dest.display());
                return self.fail_setup(cx, message);
            }
        }
        cx.message(
            Level::Info,
            format!("fetching path {}...", quoted(cx.store_dir(), &self.path)),
        );
        let Some(sub) = sub else {
            return self.start_builtin(cx, idx);
        };
        match self.start(sub, cx.store_dir()) {
            Ok((builder, log, stdout)) => {
                self.stdout = Some(stdout);
                cx.set_locked_outputs(BTreeSet::from([self.path.clone()]));
                cx.start_child(builder, log, true, true);
                self.state = State::Finished;
                cx.emit(Event::SubstituterStarted {
                    path: self.path.clone(),
                    substituter: sub.name.clone(),
                });
            }
            Err(e) => {
                // A program that cannot even start is that substituter failing.
                let message = format!("substituter '{}': {e}", sub.name);
                self.substituter_failed(cx, "-1".into(), message);
            }
        }
    }

    /// Hands the fetch, with the path lock, to the built-in substituter.
    fn start_builtin(&mut self, cx: &mut Step<'_>, idx: usize) {
        let narinfo = self
            .current
            .as_ref()
            .and_then(|(_, info)| info.narinfo.as_deref())
            .cloned();
        let (Some(narinfo), Some(lock)) = (narinfo, self.lock.take()) else {
            return self.fail_setup(cx, "internal error: no narinfo or lock".into());
        };
        let name = cx.cfg.substituters[idx].name().to_string();
        match cx.services.builtin_subst().fetch(
            cx.id,
            idx,
            narinfo,
            self.dest.clone(),
            !self.repair,
            lock,
            self.cancelled.clone(),
        ) {
            Ok(()) => {
                cx.set_locked_outputs(BTreeSet::from([self.path.clone()]));
                self.state = State::Fetching;
                cx.emit(Event::SubstituterStarted {
                    path: self.path.clone(),
                    substituter: name,
                });
            }
            Err((e, lock)) => {
                self.lock = lock;
                self.substituter_failed(cx, BUILTIN_FAILURE_STATUS.into(), e);
            }
        }
    }

    /// The built-in substituter finished fetching: register, or try the next substituter.
    fn fetched(&mut self, cx: &mut Step<'_>) {
        let (result, lock) = match self.completion.take().map(|c| *c) {
            Some(Completion::Fetch { result, lock, .. }) => (result, lock),
            // Woken for another reason: keep waiting.
            None => return,
            Some(Completion::Query { .. }) => {
                return self.fail_setup(cx, "internal error: unexpected query result".into())
            }
        };
        self.lock = Some(lock);
        let fetched = match result {
            Ok(f) => f,
            Err(msg) => return self.substituter_failed(cx, BUILTIN_FAILURE_STATUS.into(), msg),
        };
        if fetched.registered {
            // The loop registered it with the batch it arrived in.
            fetched.keep();
            return self.registered(cx);
        }
        // The thread compared what it hashed while unpacking with the narinfo; the goal
        // checks the pair it is about to register against the offer once more (a cheap
        // comparison, not a second pass over the files).
        let offered = self
            .current
            .as_ref()
            .and_then(|(_, info)| info.narinfo.as_deref())
            .map(|n| (n.nar_hash.clone(), n.nar_size));
        if offered.as_ref() != Some(&(fetched.nar_hash.clone(), fetched.nar_size)) {
            let msg = format!(
                "hash mismatch in downloaded path '{}': expected {}, got {}",
                cx.store_dir().print(&self.path),
                offered.map_or_else(|| "nothing".into(), |(h, _)| h.to_base32_typed()),
                fetched.nar_hash.to_base32_typed()
            );
            drop(fetched);
            return self.substituter_failed(cx, BUILTIN_FAILURE_STATUS.into(), msg);
        }
        let (hash, size) = (fetched.nar_hash.clone(), fetched.nar_size);
        self.register(cx, hash, size, Some(fetched));
    }

    fn start(
        &self,
        sub: &SubstituterCommand,
        dir: &StoreDir,
    ) -> std::io::Result<(nixb_sandbox::Builder, std::os::fd::OwnedFd, ChildStdout)> {
        let (log_read, log_write) = crate::external::log_pipe()?;
        let mut cmd = Command::new(&sub.program);
        cmd.args(&sub.args)
            .arg("--substitute")
            .arg(dir.print(&self.path))
            .arg(&self.dest)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_write));
        let (builder, mut child) = spawn_adopted(&mut cmd)?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| std::io::Error::other("no stdout pipe to the substituter"))?;
        Ok((builder, log_read, stdout))
    }

    pub fn handle_child_output(&mut self, cx: &mut Step<'_>, chunk: &[u8]) {
        cx.emit(Event::SubstituterLog {
            path: self.path.clone(),
            chunk: chunk.to_vec(),
        });
    }

    pub fn child_exited(&mut self, status: crate::services::ChildStatus) {
        self.exit = Some(status);
    }

    /// The worker killed the substituter (a timeout).
    pub fn cancel(&mut self, cx: &mut Step<'_>, reason: String) {
        self.lock = None;
        cx.emit(Event::SubstituterFailed {
            path: self.path.clone(),
            status: "timeout".into(),
            message: reason,
        });
        cx.am_done(ExitCode::Failed);
    }

    fn substituter_failed(&mut self, cx: &mut Step<'_>, status: String, msg: String) {
        cx.message(Level::Info, msg.clone());
        cx.emit(Event::SubstituterFailed {
            path: self.path.clone(),
            status,
            message: msg,
        });
        self.lock = None;
        cx.clear_locked_outputs();
        self.state = State::TryNext;
        cx.wake_up();
    }

    fn finished(&mut self, cx: &mut Step<'_>) {
        let status = self
            .exit
            .take()
            .unwrap_or_else(|| Err("substituter status unknown".into()));
        // The child is gone, so its stdout reads to the end at once.
        let mut out = String::new();
        if let Some(mut s) = self.stdout.take() {
            let _ = s.read_to_string(&mut out);
        }
        let raw = match &status {
            Ok(s) => raw_status(s),
            Err(_) => "-1".into(),
        };
        match self.check(cx, &status, &out) {
            Ok((hash, size)) => self.register(cx, hash, size, None),
            Err(msg) => self.substituter_failed(cx, raw, msg),
        }
    }

    /// Verifies what the substituter produced; the NAR hash and size of DEST.
    fn check(
        &self,
        cx: &Step<'_>,
        status: &crate::services::ChildStatus,
        out: &str,
    ) -> Result<(Hash, u64), String> {
        let shown = cx.store_dir().print(&self.path);
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => return Err(format!("fetching path '{shown}' {}", status_to_string(s))),
            Err(e) => return Err(format!("fetching path '{shown}': {e}")),
        }
        // First the startup line, then the expected hash (empty for none).
        let mut lines = out.lines();
        let _startup = lines.next();
        let expected = lines.next().unwrap_or("").trim();
        if std::fs::symlink_metadata(&self.dest).is_err() {
            return Err(format!(
                "substitute did not produce path '{}'",
                self.dest.display()
            ));
        }
        let (hash, size) = nixb_store::nar::hash_path(&self.dest, HashAlgo::Sha256)
            .map_err(|e| format!("hashing '{}': {e}", self.dest.display()))?;
        if !expected.is_empty() {
            if !expected.contains(':') {
                return Err(format!("bad hash from substituter: '{expected}'"));
            }
            let want = Hash::parse_typed(expected)
                .map_err(|e| format!("bad hash from substituter: '{expected}': {e}"))?;
            let got = if want.algo() == HashAlgo::Sha256 {
                hash.clone()
            } else {
                nixb_store::nar::hash_path(&self.dest, want.algo())
                    .map_err(|e| format!("hashing '{}': {e}", self.dest.display()))?
                    .0
            };
            if want != got {
                return Err(format!(
                    "hash mismatch in downloaded path '{shown}': expected {}, got {}",
                    want.to_base32_typed(),
                    got.to_base32_typed()
                ));
            }
        }
        Ok((hash, size))
    }

    /// Registers the path at `dest` with `hash` and `size`. `fetched` is what the built-in
    /// substituter unpacked (already canonicalised); it is deleted unless registered.
    fn register(&mut self, cx: &mut Step<'_>, hash: Hash, size: u64, fetched: Option<Fetched>) {
        // `try_register` consumes `fetched`, so on failure what was unpacked is gone
        // before `fail_setup` releases the lock.
        if let Err(message) = self.try_register(cx, hash, size, fetched) {
            return self.fail_setup(cx, message);
        }
        self.registered(cx);
    }

    /// Unlocks the path, which is valid: future lockers find it so and never need the
    /// lock file, which is deleted when the worker is done (see `StaleLockFiles`).
    fn release_valid(&mut self, cx: &mut Step<'_>) {
        if self.lock.take().is_some() {
            let real = cx.store_dir().to_path(&self.path);
            cx.services.builtin_subst().stale_locks.defer(real);
        }
    }

    /// The path is valid now: release it and report success.
    fn registered(&mut self, cx: &mut Step<'_>) {
        self.release_valid(cx);
        cx.emit(Event::SubstituterSucceeded {
            path: self.path.clone(),
        });
        cx.am_done(ExitCode::Success);
    }

    fn try_register(
        &mut self,
        cx: &mut Step<'_>,
        hash: Hash,
        size: u64,
        fetched: Option<Fetched>,
    ) -> Result<(), String> {
        let real = cx.store_dir().to_path(&self.path);
        if self.repair {
            replace_valid_path(&real, &self.dest)?;
        }
        if fetched.is_none() {
            let mut seen = nixb_store::canon::InodesSeen::new();
            nixb_store::canon::canonicalise_path_metadata(&real, None, &mut seen)
                .map_err(|e| format!("canonicalising '{}': {e}", real.display()))?;
        }
        let Some((_, info)) = self.current.take() else {
            return Err("internal error: no substituter info".into());
        };
        let (sigs, ca) = match info.narinfo {
            Some(n) => (n.sigs, n.ca),
            None => (Vec::new(), None),
        };
        let entry = SubstitutedPath {
            path: self.path.clone(),
            nar_hash: hash,
            nar_size: size,
            references: info.references,
            deriver: info.deriver,
            sigs,
            ca,
        };
        cx.store
            .register_substitute(&entry)
            .map_err(|e| format!("registering {}: {e}", quoted(cx.store_dir(), &self.path)))?;
        if let Some(f) = fetched {
            f.keep();
        }
        Ok(())
    }
}

/// Repair: puts the fresh copy at `dest` in the place of the (corrupt) `real`, moving the
/// old one aside first so that the path is never missing for longer than two renames.
fn replace_valid_path(real: &Path, dest: &Path) -> Result<(), String> {
    nixb_store::delete::replace_path(real, dest).map_err(|e| {
        format!(
            "replacing '{}' by '{}': {e}",
            real.display(),
            dest.display()
        )
    })
}

/// The substitution goal driven state by state with fake services and an external
/// substituter script (the original's `SubstitutionGoal` in Nix 2.8's
/// `build/substitution-goal.cc`).
#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SubstituterCommand;
    use crate::services::SubGoal;
    use crate::store::BuildStore;
    use crate::testing::{counts, Asked, Harness};

    /// A substituter offering `offer` (with `references`) that unpacks `text` into it
    /// and exits with `status`.
    fn substituter(h: &mut Harness, offer: &StorePath, references: &[StorePath], status: i32) {
        let sd = h.store.store_dir();
        let mut reply = format!("{}\\n\\n{}\\n", sd.print(offer), references.len());
        for r in references {
            reply += &format!("{}\\n", sd.print(r));
        }
        reply += "0\\n0\\n";
        let script = format!(
            "case \"$1\" in\n\
             --query) echo; while read cmd p; do\n\
               if [ \"$p\" = '{}' ]; then printf '{reply}'; fi; echo; done ;;\n\
             --substitute) echo; echo substituted > \"$3\"; echo; exit {status} ;;\n\
             esac\n",
            sd.print(offer)
        );
        let program = h.script("substituter", &script);
        h.cfg.substituters = vec![Substituter::External(SubstituterCommand {
            name: "test".into(),
            program,
            args: Vec::new(),
        })];
    }

    #[test]
    fn valid_path_is_done_at_once() {
        let mut h = Harness::new();
        let p = h.path('a', "p");
        h.make_valid(&p, &[]);
        let mut g = SubstitutionGoal::new(p, false);
        assert_eq!(
            h.step(|cx| g.work(cx)),
            vec![Asked::Done(ExitCode::Success)]
        );
    }

    #[test]
    fn no_substituter_lets_the_caller_build() {
        let mut h = Harness::new();
        let mut g = SubstitutionGoal::new(h.path('a', "p"), false);
        assert_eq!(
            h.step(|cx| g.work(cx)),
            vec![Asked::Done(ExitCode::NoSubstituters)]
        );
    }

    #[test]
    fn references_come_first_and_an_incomplete_closure_is_reported() {
        let mut h = Harness::new();
        let (p, r) = (h.path('a', "p"), h.path('b', "r"));
        substituter(&mut h, &p, std::slice::from_ref(&r), 0);
        let mut g = SubstitutionGoal::new(p, false);
        assert_eq!(
            h.step(|cx| g.work(cx)),
            vec![Asked::WaitFor(SubGoal::Substitution {
                path: r,
                repair: false
            })]
        );
        assert_eq!(g.state, State::ReferencesValid);
        let asked = h.step_with(counts(1, 1, 0), |cx| g.work(cx));
        assert_eq!(asked, vec![Asked::Done(ExitCode::IncompleteClosure)]);
    }

    #[test]
    fn substitute_runs_in_a_slot_and_registers_the_path() {
        let mut h = Harness::new();
        let p = h.path('a', "p");
        substituter(&mut h, &p, &[], 0);
        let mut g = SubstitutionGoal::new(p.clone(), false);
        assert_eq!(h.step(|cx| g.work(cx)), vec![Asked::WakeUp]);
        assert_eq!(g.state, State::TryToRun);
        h.services.nr_local_builds = 1;
        assert_eq!(h.step(|cx| g.work(cx)), vec![Asked::WaitForBuildSlot]);
        h.services.nr_local_builds = 0;
        let asked = h.step(|cx| g.work(cx));
        assert_eq!(
            asked,
            vec![
                Asked::LockedOutputs(BTreeSet::from([p.clone()])),
                Asked::StartChild {
                    in_build_slot: true,
                    respect_timeouts: true
                },
            ]
        );
        let status = h.wait_child();
        g.child_exited(status);
        assert_eq!(
            h.step(|cx| g.work(cx)),
            vec![Asked::Done(ExitCode::Success)]
        );
        assert!(h.store.valid.borrow().contains_key(&p));
        assert_eq!(
            std::fs::read_to_string(h.real(&p)).unwrap(),
            "substituted\n"
        );
    }

    #[test]
    fn failed_substituter_tries_the_next_and_then_fails() {
        let mut h = Harness::new();
        let p = h.path('a', "p");
        substituter(&mut h, &p, &[], 1);
        let mut g = SubstitutionGoal::new(p.clone(), false);
        h.step(|cx| g.work(cx));
        h.step(|cx| g.work(cx));
        let status = h.wait_child();
        g.child_exited(status);
        assert_eq!(
            h.step(|cx| g.work(cx)),
            vec![Asked::UnlockedOutputs, Asked::WakeUp]
        );
        assert_eq!(g.state, State::TryNext);
        // None left, but one had offered the path: a failure, not "no substituters".
        assert_eq!(h.step(|cx| g.work(cx)), vec![Asked::Done(ExitCode::Failed)]);
        assert!(!h.store.valid.borrow().contains_key(&p));
    }
}
