//! The derivation goal: make the wanted outputs of one derivation valid.
//!
//! States, in the original's names and order:
//!
//! ```text
//! init                 wait for the .drv itself (a substitution goal)
//! haveDerivation       all wanted outputs valid? done. failed before (cache)? fail.
//!                      otherwise try substitutes for the invalid outputs
//! outputsSubstituted   restart if more outputs became wanted; done if valid now;
//!                      (repair: check the closure → closureRepaired)
//!                      otherwise realise input derivations and input sources
//! inputsRealised       gather the input closure
//! tryToBuild           lock outputs (another goal of ours → wait for any goal; another
//!                      process → poll), re-check validity, delete stale outputs,
//!                      take a build slot, start the builder
//! buildDone            builder exited: check status, register outputs
//! ```
//!
//! Building itself (the builder's environment, hash rewriting, spawning) is in [`build`];
//! output registration in [`register`]; offering the build to the build hook in [`hook`].
//! What they need to know of the goal is its [`plan::BuildPlan`]: they read it and return
//! what happened, and only the goal's states change state or ask the scheduler for work.

use std::collections::{BTreeMap, BTreeSet};

use nixb_store::locks::PathLocks;
use nixb_store::StorePath;

use crate::config::BuildMode;
use crate::error::{quoted, BuildError, Rejection};
use crate::event::{Event, FailureKind, Level};
use crate::graph::ExitCode;
use crate::outcome::Failure;
use crate::services::Step;

use build::RunningBuild;
use hook::{HookBuild, HookReply, HookResult};
use plan::{can_build_locally, BuildPlan};

mod build;
mod hook;
mod plan;
mod register;
#[cfg(test)]
mod tests;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Init,
    HaveDerivation,
    OutputsSubstituted,
    ClosureRepaired,
    InputsRealised,
    TryToBuild,
    BuildDone,
}

pub(crate) struct DerivationGoal {
    plan: BuildPlan,
    /// Outputs to make valid; empty means all.
    wanted: BTreeSet<String>,
    need_restart: bool,
    retry_substitution: bool,
    state: State,
    output_locks: Option<PathLocks>,
    /// Boxed, as the hook's: a goal spends most of its life waiting, without either.
    build: Option<Box<RunningBuild>>,
    /// The build hook took this build (its process is the goal's child).
    hook_build: Option<Box<HookBuild>>,
    exit: Option<crate::services::ChildStatus>,
    /// Told the user once that every build user is busy.
    reported_users_busy: bool,
    /// How many wanted outputs `haveDerivation` found invalid, when it goes straight on to
    /// `outputsSubstituted` (no substitutes tried): nothing can have become valid in
    /// between that `tryToBuild` would not see under the lock, so it is not asked again.
    invalid_just_checked: Option<usize>,
}

impl DerivationGoal {
    /// The derivation this goal builds.
    pub fn drv_path(&self) -> &StorePath {
        &self.plan.drv_path
    }

    pub fn new(drv_path: StorePath, wanted: BTreeSet<String>, mode: BuildMode) -> DerivationGoal {
        DerivationGoal {
            plan: BuildPlan::new(drv_path, mode),
            wanted,
            need_restart: false,
            retry_substitution: false,
            state: State::Init,
            output_locks: None,
            build: None,
            hook_build: None,
            exit: None,
            reported_users_busy: false,
            invalid_just_checked: None,
        }
    }

    /// Another goal wants outputs of this derivation too.
    pub fn add_wanted_outputs(&mut self, outputs: &BTreeSet<String>) {
        if self.wanted.is_empty() {
            return; // already all
        }
        if outputs.is_empty() {
            self.wanted.clear();
            self.need_restart = true;
        } else {
            for o in outputs {
                if self.wanted.insert(o.clone()) {
                    self.need_restart = true;
                }
            }
        }
    }

    pub fn work(&mut self, cx: &mut Step<'_>) {
        let r = match self.state {
            State::Init => self.init(cx),
            State::HaveDerivation => self.have_derivation(cx),
            State::OutputsSubstituted => self.outputs_substituted(cx),
            State::ClosureRepaired => self.closure_repaired(cx),
            State::InputsRealised => self.inputs_realised(cx),
            State::TryToBuild => self.try_to_build(cx),
            State::BuildDone => self.build_done(cx),
        };
        if let Err(e) = r {
            self.fail(cx, FailureKind::SetupFailed, e.to_string(), false);
        }
    }

    /// Ends the goal as failed, reporting why.
    pub fn fail(&mut self, cx: &mut Step<'_>, kind: FailureKind, reason: String, permanent: bool) {
        self.output_locks = None;
        cx.clear_locked_outputs();
        if let Some(b) = self.build.take() {
            b.abandon(cx, self.plan.mode == BuildMode::Normal);
        }
        cx.emit(Event::BuildFailed {
            drv: self.plan.drv_path.clone(),
            kind,
            reason: reason.clone(),
            permanent,
        });
        cx.record_failure(
            Failure {
                path: self.plan.drv_path.clone(),
                kind,
                message: reason,
            },
            permanent,
        );
        cx.am_done(ExitCode::Failed);
    }

    /// The worker killed the builder (a timeout or the log limit).
    pub fn cancel(&mut self, cx: &mut Step<'_>, kind: FailureKind, reason: String) {
        let reason = format!(
            "building of {} {reason}",
            quoted(cx.store_dir(), &self.plan.drv_path)
        );
        self.fail(cx, kind, reason, false);
    }

    fn wants(&self, output: &str) -> bool {
        self.wanted.is_empty() || self.wanted.contains(output)
    }

    /// Wanted outputs that are (`want_valid`) or are not valid; `check_contents` also
    /// requires valid paths to be intact (repair mode).
    fn check_path_validity(
        &self,
        cx: &Step<'_>,
        want_valid: bool,
        check_contents: bool,
    ) -> Result<BTreeSet<StorePath>, BuildError> {
        let mut result = BTreeSet::new();
        for (name, path) in &self.plan.outputs {
            if !self.wants(name) {
                continue;
            }
            let good =
                cx.store.is_valid_path(path)? && (!check_contents || path_contents_good(cx, path)?);
            if good == want_valid {
                result.insert(path.clone());
            }
        }
        Ok(result)
    }

    // --- states -------------------------------------------------------------------------

    fn init(&mut self, cx: &mut Step<'_>) -> Result<(), BuildError> {
        // The derivation must be valid first; a substitution goal may provide it. One that
        // is valid already goes straight on, as in Nix 2.x: the substitution goal would only
        // find it valid (it also asks without repairing), at the cost of a goal, a wake-up
        // and a second query per derivation. The temp root comes first, as that goal's does,
        // so that a collector cannot take the path between the check and its use.
        let _ = cx.add_temp_root(&self.plan.drv_path);
        if cx.store.is_valid_path(&self.plan.drv_path) == Ok(true) {
            self.state = State::HaveDerivation;
            return self.have_derivation(cx);
        }
        cx.wait_for_substitution(&self.plan.drv_path, false);
        self.state = State::HaveDerivation;
        if !cx.has_waitees() {
            cx.wake_up();
        }
        Ok(())
    }

    fn have_derivation(&mut self, cx: &mut Step<'_>) -> Result<(), BuildError> {
        if cx.waitee_counts().failed != 0 {
            let reason = format!(
                "cannot build missing derivation {}",
                quoted(cx.store_dir(), &self.plan.drv_path)
            );
            self.fail(cx, FailureKind::SetupFailed, reason, false);
            return Ok(());
        }
        cx.reset_waitee_counts();
        let _ = cx.add_temp_root(&self.plan.drv_path);
        if self.plan.drv.is_none() {
            let drv = cx.derivation(&self.plan.drv_path)?;
            self.plan.fixed_output = drv.is_fixed_output();
            for (name, out) in &drv.outputs {
                let path = out.path.clone().ok_or_else(|| {
                    BuildError::Misc(format!(
                        "derivation {} has no path for output '{name}'",
                        quoted(cx.store_dir(), &self.plan.drv_path)
                    ))
                })?;
                self.plan.outputs.insert(name.clone(), path);
            }
            self.plan.outputs.shrink_to_fit();
            self.plan.drv = Some(drv);
        }
        for o in &self.wanted {
            if !self.plan.outputs.contains_key(o) {
                let reason = format!(
                    "derivation {} does not have wanted output '{o}'",
                    quoted(cx.store_dir(), &self.plan.drv_path)
                );
                self.fail(cx, FailureKind::SetupFailed, reason, false);
                return Ok(());
            }
        }
        for p in self.plan.outputs.values() {
            let _ = cx.add_temp_root(p);
        }

        let invalid = self.check_path_validity(cx, false, self.plan.mode == BuildMode::Repair)?;
        if invalid.is_empty() && self.plan.mode == BuildMode::Normal {
            cx.am_done(ExitCode::Success);
            return Ok(());
        }
        for p in &invalid {
            if self.path_failed(cx, p)? {
                return Ok(());
            }
        }
        // Substitutes first; preferLocalBuild derivations skip them.
        if cx.cfg.use_substitutes && !self.will_build_locally(cx)? {
            for p in &invalid {
                cx.wait_for_substitution(p, self.plan.mode == BuildMode::Repair);
            }
        }
        self.state = State::OutputsSubstituted;
        if !cx.has_waitees() {
            self.invalid_just_checked = Some(invalid.len());
            return self.outputs_substituted(cx);
        }
        Ok(())
    }

    fn outputs_substituted(&mut self, cx: &mut Step<'_>) -> Result<(), BuildError> {
        let invalid_just_checked = self.invalid_just_checked.take();
        let counts = cx.waitee_counts();
        if counts.failed > 0
            && counts.failed > counts.no_substituters + counts.incomplete_closure
            && !cx.cfg.fallback
        {
            return Err(BuildError::Misc(format!(
                "some substitutes for the outputs of derivation {} failed (usually happens due to networking issues); try '--fallback' to build derivation from source",
                quoted(cx.store_dir(), &self.plan.drv_path)
            )));
        }
        if counts.incomplete_closure > 0 {
            self.retry_substitution = true;
        }
        cx.reset_waitee_counts();

        if self.need_restart {
            self.need_restart = false;
            self.state = State::HaveDerivation;
            return self.have_derivation(cx);
        }

        let nr_invalid = match invalid_just_checked {
            Some(n) => n,
            None => self
                .check_path_validity(cx, false, self.plan.mode == BuildMode::Repair)?
                .len(),
        };
        match self.plan.mode {
            BuildMode::Normal if nr_invalid == 0 => {
                cx.am_done(ExitCode::Success);
                return Ok(());
            }
            BuildMode::Repair if nr_invalid == 0 => return self.repair_closure(cx),
            BuildMode::Check if nr_invalid > 0 => {
                let reason = format!(
                    "some outputs of {} are not valid, so checking is not possible",
                    quoted(cx.store_dir(), &self.plan.drv_path)
                );
                self.fail(cx, FailureKind::SetupFailed, reason, false);
                return Ok(());
            }
            _ => {}
        }

        // Building now: from here on every output counts.
        self.wanted.clear();
        cx.emit(Event::BuildPlanned {
            drv: self.plan.drv_path.clone(),
        });
        let drv = self.plan.drv()?;
        let input_drvs: Vec<(StorePath, BTreeSet<String>)> = drv
            .input_drvs
            .iter()
            .map(|(p, o)| (p.clone(), o.clone()))
            .collect();
        let input_srcs: Vec<StorePath> = drv.input_srcs.iter().cloned().collect();
        let input_mode = if self.plan.mode == BuildMode::Repair {
            BuildMode::Repair
        } else {
            BuildMode::Normal
        };
        for (p, outs) in input_drvs {
            cx.wait_for_derivation(&p, &outs, input_mode);
        }
        for p in input_srcs {
            cx.wait_for_substitution(&p, false);
        }
        self.state = State::InputsRealised;
        if !cx.has_waitees() {
            return self.inputs_realised(cx);
        }
        // Waiting may take long and a wide graph has many goals waiting: the derivation
        // is read again when the inputs are there (the worker's cache lets go of it).
        self.plan.drv = None;
        Ok(())
    }

    /// Repair mode with intact outputs: rebuild whatever is broken in their closure.
    fn repair_closure(&mut self, cx: &mut Step<'_>) -> Result<(), BuildError> {
        let own: BTreeSet<StorePath> = self.plan.outputs.values().cloned().collect();
        let mut closure = cx.store.compute_closure(&own)?;
        for p in &own {
            closure.remove(p);
        }
        // Which derivation produced each path of the closure: look at the derivations in
        // our own input closure.
        let mut outputs_to_drv: BTreeMap<StorePath, StorePath> = BTreeMap::new();
        let input_closure = cx
            .store
            .compute_closure(&BTreeSet::from([self.plan.drv_path.clone()]))?;
        for d in input_closure.iter().filter(|p| p.is_derivation()) {
            let drv = cx.derivation(d)?;
            for p in drv.output_paths().into_values() {
                outputs_to_drv.insert(p, d.clone());
            }
        }
        for p in &closure {
            if path_contents_good(cx, p)? {
                continue;
            }
            cx.message(
                Level::Error,
                format!(
                    "found corrupted or missing path {} in the output closure of {}",
                    quoted(cx.store_dir(), p),
                    quoted(cx.store_dir(), &self.plan.drv_path)
                ),
            );
            match outputs_to_drv.get(p) {
                Some(d) => cx.wait_for_derivation(d, &BTreeSet::new(), BuildMode::Repair),
                None => cx.wait_for_substitution(p, true),
            }
        }
        if !cx.has_waitees() {
            cx.am_done(ExitCode::Success);
            return Ok(());
        }
        self.state = State::ClosureRepaired;
        Ok(())
    }

    fn closure_repaired(&mut self, cx: &mut Step<'_>) -> Result<(), BuildError> {
        if cx.waitee_counts().failed > 0 {
            let reason = format!(
                "some paths in the output closure of derivation {} could not be repaired",
                quoted(cx.store_dir(), &self.plan.drv_path)
            );
            self.fail(cx, FailureKind::DependencyFailed, reason, false);
            return Ok(());
        }
        cx.am_done(ExitCode::Success);
        Ok(())
    }

    fn inputs_realised(&mut self, cx: &mut Step<'_>) -> Result<(), BuildError> {
        let failed = cx.waitee_counts().failed;
        if failed != 0 {
            let reason = format!(
                "cannot build derivation {}: {failed} dependencies couldn't be built",
                quoted(cx.store_dir(), &self.plan.drv_path)
            );
            self.fail(cx, FailureKind::DependencyFailed, reason, false);
            return Ok(());
        }
        if self.retry_substitution {
            self.retry_substitution = false;
            self.state = State::HaveDerivation;
            return self.have_derivation(cx);
        }

        self.plan.all_paths = self.plan.outputs.values().cloned().collect();
        if self.plan.drv.is_none() {
            self.plan.drv = Some(cx.derivation(&self.plan.drv_path)?);
        }
        let drv = self.plan.drv()?;
        let mut roots = BTreeSet::new();
        for (in_drv_path, wanted) in &drv.input_drvs {
            for o in wanted {
                match cx.derivation_output(in_drv_path, o)? {
                    Some(p) => {
                        roots.insert(p);
                    }
                    None => {
                        return Err(BuildError::Build(format!(
                        "derivation {} requires non-existent output '{o}' from input derivation {}",
                        quoted(cx.store_dir(), &self.plan.drv_path),
                        quoted(cx.store_dir(), in_drv_path)
                    )))
                    }
                }
            }
        }
        roots.extend(drv.input_srcs.iter().cloned());
        self.plan.input_paths = cx.store.compute_closure(&roots)?;
        self.plan
            .all_paths
            .extend(self.plan.input_paths.iter().cloned());

        self.state = State::TryToBuild;
        cx.wake_up();
        Ok(())
    }

    fn try_to_build(&mut self, cx: &mut Step<'_>) -> Result<(), BuildError> {
        // Another goal of ours holds an output lock: sleep until some goal finishes.
        if self.plan.outputs.values().any(|p| cx.is_locked_by_me(p)) {
            cx.wait_for_any_goal();
            return Ok(());
        }
        // Without a build hook every build is local, so a goal that would find no free
        // slot below waits for one before locking (with max-jobs 0 it goes on, to fail or
        // find its outputs valid as before): the original locks first and unlocks
        // again, which for a wide graph meant creating, locking and abandoning a lock file
        // (and querying validity) once per waiting goal. Whether another process built the
        // outputs meanwhile is still seen under the lock once a slot is free.
        if cx.cfg.build_hook.is_none() && cx.cfg.max_jobs > 0 {
            let build_locally =
                self.plan.mode != BuildMode::Normal || self.will_build_locally(cx)?;
            let cur = cx.nr_local_builds();
            if cur >= cx.cfg.max_jobs && !(build_locally && cur == 0) {
                cx.wait_for_build_slot();
                return Ok(());
            }
        }
        let paths: Vec<_> = self
            .plan
            .outputs
            .values()
            .map(|p| cx.store_dir().to_path(p))
            .collect();
        let locks = PathLocks::lock(&paths, false, None)
            .map_err(|e| BuildError::misc("locking output paths", e))?;
        let Some(mut locks) = locks else {
            // Another process builds them; poll until it is done.
            cx.wait_for_a_while();
            return Ok(());
        };
        // Now that we hold the locks nobody else can be building these outputs; another
        // process may have finished them while we waited. One database query per output
        // serves both this check and the removal of invalid leftovers below: with the locks
        // held, nothing can register an output in between.
        let mut valid_now = BTreeSet::new();
        for p in self.plan.outputs.values() {
            if cx.store.is_valid_path(p)? {
                valid_now.insert(p.clone());
            }
        }
        self.plan.valid_paths = BTreeSet::new();
        for (name, path) in &self.plan.outputs {
            if self.wants(name)
                && valid_now.contains(path)
                && (self.plan.mode != BuildMode::Repair || path_contents_good(cx, path)?)
            {
                self.plan.valid_paths.insert(path.clone());
            }
        }
        if self.plan.mode != BuildMode::Check
            && self.plan.valid_paths.len() == self.plan.outputs.len()
        {
            locks.set_deletion(true);
            drop(locks);
            cx.am_done(ExitCode::Success);
            return Ok(());
        }
        self.plan.missing_paths = self.plan.outputs.values().cloned().collect();
        if self.plan.mode != BuildMode::Check {
            for p in &self.plan.valid_paths {
                self.plan.missing_paths.remove(p);
            }
        }
        // Invalid leftovers (an interrupted build) would be in the builder's way.
        for p in self.plan.outputs.values() {
            if valid_now.contains(p) {
                continue;
            }
            let real = cx.store_dir().to_path(p);
            crate::build_dir::delete_path(&real).map_err(|e| {
                BuildError::misc(format!("removing invalid path '{}'", real.display()), e)
            })?;
        }
        // Someone may have failed at this while we waited for the lock.
        for p in self.plan.outputs.values().cloned().collect::<Vec<_>>() {
            if self.path_failed(cx, &p)? {
                return Ok(());
            }
        }

        // Check and repair builds are local only, as are preferLocalBuild derivations.
        let build_locally = self.plan.mode != BuildMode::Normal || self.will_build_locally(cx)?;
        if !build_locally {
            match hook::try_build_hook(&self.plan, cx)? {
                HookReply::Accept(hb) => {
                    self.hook_build = Some(hb);
                    cx.set_locked_outputs(self.plan.outputs.values().cloned().collect());
                    self.output_locks = Some(locks);
                    self.state = State::BuildDone;
                    return Ok(());
                }
                HookReply::Postpone => {
                    // Not now: retry after a while, without holding the locks.
                    drop(locks);
                    cx.wait_for_a_while();
                    return Ok(());
                }
                HookReply::Decline => {}
            }
        }
        let cur = cx.nr_local_builds();
        if cur >= cx.cfg.max_jobs && !(build_locally && cur == 0) {
            // Wait for a slot without holding the locks, so that other processes may go on.
            drop(locks);
            cx.wait_for_build_slot();
            return Ok(());
        }

        let user = match crate::sandboxing::acquire_build_user(cx.cfg)? {
            crate::sandboxing::UserSlot::NotNeeded => None,
            crate::sandboxing::UserSlot::Got(u) => Some(u),
            crate::sandboxing::UserSlot::Busy(msg) => {
                // The original failed here; waiting (as Nix 2.x does) lets more builds run
                // than there are users. Say why once, in the original's words, then poll
                // without holding the output locks.
                if !self.reported_users_busy {
                    self.reported_users_busy = true;
                    cx.message(Level::Error, msg);
                }
                drop(locks);
                cx.wait_for_a_while();
                return Ok(());
            }
        };

        cx.set_locked_outputs(self.plan.outputs.values().cloned().collect());
        self.output_locks = Some(locks);
        match build::start_builder(&self.plan, cx, user) {
            Ok(b) => {
                self.build = Some(Box::new(b));
                self.state = State::BuildDone;
                Ok(())
            }
            Err(BuildError::Build(reason)) => {
                self.fail(cx, FailureKind::SetupFailed, reason, true);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    pub fn handle_child_output(&mut self, cx: &mut Step<'_>, chunk: &[u8]) {
        if let Some(h) = self.hook_build.as_mut() {
            h.drain_messages(cx, &self.plan.drv_path, false);
            cx.emit(Event::BuildLog {
                drv: self.plan.drv_path.clone(),
                chunk: chunk.to_vec(),
            });
            if let Some(limit) = h.log_chunk(chunk) {
                cx.kill_child();
                let reason = format!("killed after writing more than {limit} bytes of log output");
                self.cancel(cx, FailureKind::LogLimitExceeded, reason);
            }
            return;
        }
        let Some(b) = self.build.as_mut() else { return };
        cx.emit(Event::BuildLog {
            drv: self.plan.drv_path.clone(),
            chunk: chunk.to_vec(),
        });
        match b.log_chunk(chunk) {
            Ok(None) => {}
            Ok(Some(limit)) => {
                cx.kill_child();
                let reason = format!("killed after writing more than {limit} bytes of log output");
                self.cancel(cx, FailureKind::LogLimitExceeded, reason);
            }
            Err(reason) => {
                // No log to write the output to: stop the build rather than lose it.
                cx.kill_child();
                self.fail(cx, FailureKind::SetupFailed, reason, false);
            }
        }
    }

    pub fn child_exited(&mut self, status: crate::services::ChildStatus) {
        self.exit = Some(status);
    }

    fn build_done(&mut self, cx: &mut Step<'_>) -> Result<(), BuildError> {
        let status = self
            .exit
            .take()
            .unwrap_or_else(|| Err("builder status unknown".into()));
        if let Some(hb) = self.hook_build.take() {
            match hook::build_done(&self.plan, cx, *hb, status)? {
                HookResult::Built => {
                    if let Some(mut locks) = self.output_locks.take() {
                        locks.set_deletion(true);
                    }
                    cx.clear_locked_outputs();
                    cx.emit(Event::BuildSucceeded {
                        drv: self.plan.drv_path.clone(),
                    });
                    cx.am_done(ExitCode::Success);
                }
                HookResult::Failed {
                    kind,
                    message,
                    permanent,
                } => self.fail(cx, kind, message, permanent),
            }
            return Ok(());
        }
        let Some(mut build) = self.build.take() else {
            return Err(BuildError::Misc(
                "internal error: no build to finish".into(),
            ));
        };
        let log_create_error = build.take_log_create_error();
        if let Err(e) = build.close_log(cx) {
            cx.message(Level::Warn, format!("closing the build log: {e}"));
        }
        build.kill_leftovers(cx);
        let result = match (log_create_error, status) {
            // As when the log could not be created before the builder started (the
            // original's order): not the derivation's fault, nothing registered.
            (Some(e), _) => Err(Rejection::misc(e)),
            (None, Ok(s)) if s.success() => build
                .extract_outputs()
                .and_then(|()| register::register_outputs(&self.plan, &mut build, cx)),
            (None, Ok(s)) => Err(build.failure_error(cx, &self.plan.drv_path, s)),
            // The original's message for a builder whose environment could not be set up,
            // as when `start` itself fails (build.rs).
            (None, Err(crate::services::ChildError::Setup(e))) => Err(Rejection::misc(format!(
                "failed to set up the build environment for {}: {e}",
                quoted(cx.store_dir(), &self.plan.drv_path)
            ))),
            (None, Err(e)) => Err(Rejection::misc(format!(
                "waiting for the builder of {}: {e}",
                quoted(cx.store_dir(), &self.plan.drv_path)
            ))),
        };
        match result {
            Ok(()) => {
                build.finish(cx);
                if let Some(mut locks) = self.output_locks.take() {
                    // Future lockers will find the outputs valid and never need the files.
                    locks.set_deletion(true);
                    cx.services.release_later(locks);
                }
                cx.clear_locked_outputs();
                cx.emit(Event::BuildSucceeded {
                    drv: self.plan.drv_path.clone(),
                });
                cx.am_done(ExitCode::Success);
            }
            Err(rej) => {
                let permanent = rej.permanent && !self.plan.fixed_output && !build.disk_full;
                if cx.cfg.cache_failure && rej.permanent && !self.plan.fixed_output {
                    for p in self.plan.outputs.values() {
                        cx.store.register_failed_path(p)?;
                    }
                }
                if build.disk_full {
                    cx.message(
                        Level::Error,
                        "note: build failure may have been caused by lack of free disk space"
                            .into(),
                    );
                }
                self.build = Some(build);
                self.fail(cx, rej.kind, rej.message, permanent);
            }
        }
        Ok(())
    }

    // --- helpers ------------------------------------------------------------------------

    /// Fails the goal if the failed-path cache has `path`.
    fn path_failed(&mut self, cx: &mut Step<'_>, path: &StorePath) -> Result<bool, BuildError> {
        if !cx.cfg.cache_failure || !cx.store.has_path_failed(path)? {
            return Ok(false);
        }
        let reason = format!(
            "builder for {} failed previously (cached)",
            quoted(cx.store_dir(), path)
        );
        self.fail(cx, FailureKind::CachedFailure, reason, true);
        Ok(true)
    }

    fn will_build_locally(&self, cx: &Step<'_>) -> Result<bool, BuildError> {
        let drv = self.plan.drv()?;
        Ok(drv.env.get("preferLocalBuild").is_some_and(|v| v == "1")
            && can_build_locally(drv, &cx.cfg.system))
    }
}

/// A valid path whose contents still hash to what was registered.
pub(crate) fn path_contents_good(cx: &Step<'_>, path: &StorePath) -> Result<bool, BuildError> {
    let Some(info) = cx.store.query_path_info(path)? else {
        return Ok(false);
    };
    let real = cx.store_dir().to_path(path);
    if std::fs::symlink_metadata(&real).is_err() {
        return Ok(false);
    }
    match nixb_store::nar::hash_path(&real, info.nar_hash.algo()) {
        Ok((h, _)) => Ok(h == info.nar_hash),
        Err(_) => Ok(false),
    }
}
