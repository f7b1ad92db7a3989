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
//! Building itself (the builder's environment, hash rewriting, spawning) is in
//! [`crate::build`]; output registration in [`crate::register`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use nixb_store::derivation::Derivation;
use nixb_store::locks::PathLocks;
use nixb_store::StorePath;

use crate::build::RunningBuild;
use crate::config::BuildMode;
use crate::error::{quoted, BuildError};
use crate::event::{Event, FailureKind, Level};
use crate::graph::{ExitCode, GoalId};
use crate::outcome::Failure;
use crate::worker::Worker;

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
    pub drv_path: StorePath,
    /// Outputs to make valid; empty means all.
    wanted: BTreeSet<String>,
    need_restart: bool,
    retry_substitution: bool,
    pub mode: BuildMode,
    state: State,
    pub drv: Option<Arc<Derivation>>,
    /// Output name → path, from the derivation.
    pub outputs: BTreeMap<String, StorePath>,
    pub fixed_output: bool,
    pub output_locks: Option<PathLocks>,
    /// The union of the closures of the inputs.
    pub input_paths: BTreeSet<StorePath>,
    /// What outputs may refer to: inputs and outputs.
    pub all_paths: BTreeSet<StorePath>,
    /// Outputs already valid (and, when repairing, intact).
    pub valid_paths: BTreeSet<StorePath>,
    /// Outputs to build (all of them under --check).
    pub missing_paths: BTreeSet<StorePath>,
    pub build: Option<RunningBuild>,
    /// The build hook took this build (its process is the goal's child).
    pub hook_build: Option<crate::hook::HookBuild>,
    exit: Option<crate::worker::ChildStatus>,
    /// Told the user once that every build user is busy.
    reported_users_busy: bool,
    /// How many wanted outputs `haveDerivation` found invalid, when it goes straight on to
    /// `outputsSubstituted` (no substitutes tried): nothing can have become valid in
    /// between that `tryToBuild` would not see under the lock, so it is not asked again.
    invalid_just_checked: Option<usize>,
}

impl DerivationGoal {
    pub fn new(drv_path: StorePath, wanted: BTreeSet<String>, mode: BuildMode) -> DerivationGoal {
        DerivationGoal {
            drv_path,
            wanted,
            need_restart: false,
            retry_substitution: false,
            mode,
            state: State::Init,
            drv: None,
            outputs: BTreeMap::new(),
            fixed_output: false,
            output_locks: None,
            input_paths: BTreeSet::new(),
            all_paths: BTreeSet::new(),
            valid_paths: BTreeSet::new(),
            missing_paths: BTreeSet::new(),
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

    pub fn work(&mut self, id: GoalId, w: &mut Worker<'_>) {
        let r = match self.state {
            State::Init => self.init(id, w),
            State::HaveDerivation => self.have_derivation(id, w),
            State::OutputsSubstituted => self.outputs_substituted(id, w),
            State::ClosureRepaired => self.closure_repaired(id, w),
            State::InputsRealised => self.inputs_realised(id, w),
            State::TryToBuild => self.try_to_build(id, w),
            State::BuildDone => self.build_done(id, w),
        };
        if let Err(e) = r {
            self.fail(id, w, FailureKind::SetupFailed, e.to_string(), false);
        }
    }

    /// Ends the goal as failed, reporting why.
    pub fn fail(
        &mut self,
        id: GoalId,
        w: &mut Worker<'_>,
        kind: FailureKind,
        reason: String,
        permanent: bool,
    ) {
        self.output_locks = None;
        w.clear_locked_outputs(id);
        if let Some(b) = self.build.take() {
            b.abandon(w, self.mode == BuildMode::Normal);
        }
        w.emit(Event::BuildFailed {
            drv: self.drv_path.clone(),
            kind,
            reason: reason.clone(),
            permanent,
        });
        w.record_failure(
            Failure {
                path: self.drv_path.clone(),
                kind,
                message: reason,
            },
            permanent,
        );
        w.am_done(id, ExitCode::Failed);
    }

    /// The worker killed the builder (a timeout or the log limit).
    pub fn cancel(&mut self, id: GoalId, w: &mut Worker<'_>, kind: FailureKind, reason: String) {
        let reason = format!(
            "building of {} {reason}",
            quoted(w.store_dir(), &self.drv_path)
        );
        self.fail(id, w, kind, reason, false);
    }

    fn wants(&self, output: &str) -> bool {
        self.wanted.is_empty() || self.wanted.contains(output)
    }

    fn drv(&self) -> Result<&Derivation, BuildError> {
        self.drv
            .as_deref()
            .ok_or_else(|| BuildError::Misc("internal error: derivation not loaded".into()))
    }

    /// Wanted outputs that are (`want_valid`) or are not valid; `check_contents` also
    /// requires valid paths to be intact (repair mode).
    fn check_path_validity(
        &self,
        w: &Worker<'_>,
        want_valid: bool,
        check_contents: bool,
    ) -> Result<BTreeSet<StorePath>, BuildError> {
        let mut result = BTreeSet::new();
        for (name, path) in &self.outputs {
            if !self.wants(name) {
                continue;
            }
            let good =
                w.store.is_valid_path(path)? && (!check_contents || path_contents_good(w, path)?);
            if good == want_valid {
                result.insert(path.clone());
            }
        }
        Ok(result)
    }

    // --- states -------------------------------------------------------------------------

    fn init(&mut self, id: GoalId, w: &mut Worker<'_>) -> Result<(), BuildError> {
        // The derivation must be valid first; a substitution goal may provide it. One that
        // is valid already goes straight on, as in Nix 2.x: the substitution goal would only
        // find it valid (it also asks without repairing), at the cost of a goal, a wake-up
        // and a second query per derivation. The temp root comes first, as that goal's does,
        // so that a collector cannot take the path between the check and its use.
        let _ = w.store.add_temp_root(&self.drv_path);
        if w.store.is_valid_path(&self.drv_path) == Ok(true) {
            self.state = State::HaveDerivation;
            return self.have_derivation(id, w);
        }
        let sub = w.make_substitution_goal(&self.drv_path.clone(), false);
        w.graph.add_waitee(id, sub);
        self.state = State::HaveDerivation;
        if !w.graph.has_waitees(id) {
            w.graph.wake_up(id);
        }
        Ok(())
    }

    fn have_derivation(&mut self, id: GoalId, w: &mut Worker<'_>) -> Result<(), BuildError> {
        if w.graph.waitee_counts(id).failed != 0 {
            let reason = format!(
                "cannot build missing derivation {}",
                quoted(w.store_dir(), &self.drv_path)
            );
            self.fail(id, w, FailureKind::SetupFailed, reason, false);
            return Ok(());
        }
        w.graph.reset_waitee_counts(id);
        let _ = w.store.add_temp_root(&self.drv_path);
        if self.drv.is_none() {
            let drv = w.derivation(&self.drv_path)?;
            self.fixed_output = drv.is_fixed_output();
            for (name, out) in &drv.outputs {
                let path = out.path.clone().ok_or_else(|| {
                    BuildError::Misc(format!(
                        "derivation {} has no path for output '{name}'",
                        quoted(w.store_dir(), &self.drv_path)
                    ))
                })?;
                self.outputs.insert(name.clone(), path);
            }
            self.drv = Some(drv);
        }
        for o in &self.wanted {
            if !self.outputs.contains_key(o) {
                let reason = format!(
                    "derivation {} does not have wanted output '{o}'",
                    quoted(w.store_dir(), &self.drv_path)
                );
                self.fail(id, w, FailureKind::SetupFailed, reason, false);
                return Ok(());
            }
        }
        for p in self.outputs.values() {
            let _ = w.store.add_temp_root(p);
        }

        let invalid = self.check_path_validity(w, false, self.mode == BuildMode::Repair)?;
        if invalid.is_empty() && self.mode == BuildMode::Normal {
            w.am_done(id, ExitCode::Success);
            return Ok(());
        }
        for p in &invalid {
            if self.path_failed(id, w, p)? {
                return Ok(());
            }
        }
        // Substitutes first; preferLocalBuild derivations skip them.
        if w.cfg.use_substitutes && !self.will_build_locally(w)? {
            for p in &invalid {
                let sub = w.make_substitution_goal(p, self.mode == BuildMode::Repair);
                w.graph.add_waitee(id, sub);
            }
        }
        self.state = State::OutputsSubstituted;
        if !w.graph.has_waitees(id) {
            self.invalid_just_checked = Some(invalid.len());
            return self.outputs_substituted(id, w);
        }
        Ok(())
    }

    fn outputs_substituted(&mut self, id: GoalId, w: &mut Worker<'_>) -> Result<(), BuildError> {
        let invalid_just_checked = self.invalid_just_checked.take();
        let counts = w.graph.waitee_counts(id);
        if counts.failed > 0
            && counts.failed > counts.no_substituters + counts.incomplete_closure
            && !w.cfg.fallback
        {
            return Err(BuildError::Misc(format!(
                "some substitutes for the outputs of derivation {} failed (usually happens due to networking issues); try '--fallback' to build derivation from source",
                quoted(w.store_dir(), &self.drv_path)
            )));
        }
        if counts.incomplete_closure > 0 {
            self.retry_substitution = true;
        }
        w.graph.reset_waitee_counts(id);

        if self.need_restart {
            self.need_restart = false;
            self.state = State::HaveDerivation;
            return self.have_derivation(id, w);
        }

        let nr_invalid = match invalid_just_checked {
            Some(n) => n,
            None => self
                .check_path_validity(w, false, self.mode == BuildMode::Repair)?
                .len(),
        };
        match self.mode {
            BuildMode::Normal if nr_invalid == 0 => {
                w.am_done(id, ExitCode::Success);
                return Ok(());
            }
            BuildMode::Repair if nr_invalid == 0 => return self.repair_closure(id, w),
            BuildMode::Check if nr_invalid > 0 => {
                let reason = format!(
                    "some outputs of {} are not valid, so checking is not possible",
                    quoted(w.store_dir(), &self.drv_path)
                );
                self.fail(id, w, FailureKind::SetupFailed, reason, false);
                return Ok(());
            }
            _ => {}
        }

        // Building now: from here on every output counts.
        self.wanted.clear();
        w.emit(Event::BuildPlanned {
            drv: self.drv_path.clone(),
        });
        let drv = self.drv()?;
        let input_drvs: Vec<(StorePath, BTreeSet<String>)> = drv
            .input_drvs
            .iter()
            .map(|(p, o)| (p.clone(), o.clone()))
            .collect();
        let input_srcs: Vec<StorePath> = drv.input_srcs.iter().cloned().collect();
        let input_mode = if self.mode == BuildMode::Repair {
            BuildMode::Repair
        } else {
            BuildMode::Normal
        };
        for (p, outs) in input_drvs {
            let g = w.make_derivation_goal(&p, &outs, input_mode);
            w.graph.add_waitee(id, g);
        }
        for p in input_srcs {
            let g = w.make_substitution_goal(&p, false);
            w.graph.add_waitee(id, g);
        }
        self.state = State::InputsRealised;
        if !w.graph.has_waitees(id) {
            return self.inputs_realised(id, w);
        }
        Ok(())
    }

    /// Repair mode with intact outputs: rebuild whatever is broken in their closure.
    fn repair_closure(&mut self, id: GoalId, w: &mut Worker<'_>) -> Result<(), BuildError> {
        let own: BTreeSet<StorePath> = self.outputs.values().cloned().collect();
        let mut closure = w.store.compute_closure(&own)?;
        for p in &own {
            closure.remove(p);
        }
        // Which derivation produced each path of the closure: look at the derivations in
        // our own input closure.
        let mut outputs_to_drv: BTreeMap<StorePath, StorePath> = BTreeMap::new();
        let input_closure = w
            .store
            .compute_closure(&BTreeSet::from([self.drv_path.clone()]))?;
        for d in input_closure.iter().filter(|p| p.is_derivation()) {
            let drv = w.derivation(d)?;
            for p in drv.output_paths().into_values() {
                outputs_to_drv.insert(p, d.clone());
            }
        }
        for p in &closure {
            if path_contents_good(w, p)? {
                continue;
            }
            w.message(
                Level::Error,
                format!(
                    "found corrupted or missing path {} in the output closure of {}",
                    quoted(w.store_dir(), p),
                    quoted(w.store_dir(), &self.drv_path)
                ),
            );
            let g = match outputs_to_drv.get(p) {
                Some(d) => w.make_derivation_goal(&d.clone(), &BTreeSet::new(), BuildMode::Repair),
                None => w.make_substitution_goal(p, true),
            };
            w.graph.add_waitee(id, g);
        }
        if !w.graph.has_waitees(id) {
            w.am_done(id, ExitCode::Success);
            return Ok(());
        }
        self.state = State::ClosureRepaired;
        Ok(())
    }

    fn closure_repaired(&mut self, id: GoalId, w: &mut Worker<'_>) -> Result<(), BuildError> {
        if w.graph.waitee_counts(id).failed > 0 {
            let reason = format!(
                "some paths in the output closure of derivation {} could not be repaired",
                quoted(w.store_dir(), &self.drv_path)
            );
            self.fail(id, w, FailureKind::DependencyFailed, reason, false);
            return Ok(());
        }
        w.am_done(id, ExitCode::Success);
        Ok(())
    }

    fn inputs_realised(&mut self, id: GoalId, w: &mut Worker<'_>) -> Result<(), BuildError> {
        let failed = w.graph.waitee_counts(id).failed;
        if failed != 0 {
            let reason = format!(
                "cannot build derivation {}: {failed} dependencies couldn't be built",
                quoted(w.store_dir(), &self.drv_path)
            );
            self.fail(id, w, FailureKind::DependencyFailed, reason, false);
            return Ok(());
        }
        if self.retry_substitution {
            self.retry_substitution = false;
            self.state = State::HaveDerivation;
            return self.have_derivation(id, w);
        }

        self.all_paths = self.outputs.values().cloned().collect();
        let drv = self.drv()?;
        let mut roots = BTreeSet::new();
        for (in_drv_path, wanted) in &drv.input_drvs {
            let in_drv = w.derivation(in_drv_path)?;
            for o in wanted {
                match in_drv.outputs.get(o).and_then(|x| x.path.clone()) {
                    Some(p) => {
                        roots.insert(p);
                    }
                    None => {
                        return Err(BuildError::Build(format!(
                        "derivation {} requires non-existent output '{o}' from input derivation {}",
                        quoted(w.store_dir(), &self.drv_path),
                        quoted(w.store_dir(), in_drv_path)
                    )))
                    }
                }
            }
        }
        roots.extend(drv.input_srcs.iter().cloned());
        self.input_paths = w.store.compute_closure(&roots)?;
        self.all_paths.extend(self.input_paths.iter().cloned());

        self.state = State::TryToBuild;
        w.graph.wake_up(id);
        Ok(())
    }

    fn try_to_build(&mut self, id: GoalId, w: &mut Worker<'_>) -> Result<(), BuildError> {
        // Another goal of ours holds an output lock: sleep until some goal finishes.
        if self.outputs.values().any(|p| w.is_locked_by_me(p)) {
            w.wait_for_any_goal(id);
            return Ok(());
        }
        // Without a build hook every build is local, so a goal that would find no free
        // slot below waits for one before locking (with max-jobs 0 it goes on, to fail or
        // find its outputs valid as before): the original locks first and unlocks
        // again, which for a wide graph meant creating, locking and abandoning a lock file
        // (and querying validity) once per waiting goal. Whether another process built the
        // outputs meanwhile is still seen under the lock once a slot is free.
        if w.cfg.build_hook.is_none() && w.cfg.max_jobs > 0 {
            let build_locally = self.mode != BuildMode::Normal || self.will_build_locally(w)?;
            let cur = w.nr_local_builds();
            if cur >= w.cfg.max_jobs && !(build_locally && cur == 0) {
                w.wait_for_build_slot(id);
                return Ok(());
            }
        }
        let paths: Vec<_> = self
            .outputs
            .values()
            .map(|p| w.store_dir().to_path(p))
            .collect();
        let locks = PathLocks::lock_with_pool(&paths, false, None, w.lock_pool.as_ref())
            .map_err(|e| BuildError::misc("locking output paths", e))?;
        let Some(mut locks) = locks else {
            // Another process builds them; poll until it is done.
            w.wait_for_a_while(id);
            return Ok(());
        };
        // Now that we hold the locks nobody else can be building these outputs; another
        // process may have finished them while we waited. One database query per output
        // serves both this check and the removal of invalid leftovers below: with the locks
        // held, nothing can register an output in between.
        let mut valid_now = BTreeSet::new();
        for p in self.outputs.values() {
            if w.store.is_valid_path(p)? {
                valid_now.insert(p.clone());
            }
        }
        self.valid_paths = BTreeSet::new();
        for (name, path) in &self.outputs {
            if self.wants(name)
                && valid_now.contains(path)
                && (self.mode != BuildMode::Repair || path_contents_good(w, path)?)
            {
                self.valid_paths.insert(path.clone());
            }
        }
        if self.mode != BuildMode::Check && self.valid_paths.len() == self.outputs.len() {
            locks.set_deletion(true);
            drop(locks);
            w.am_done(id, ExitCode::Success);
            return Ok(());
        }
        self.missing_paths = self.outputs.values().cloned().collect();
        if self.mode != BuildMode::Check {
            for p in &self.valid_paths {
                self.missing_paths.remove(p);
            }
        }
        // Invalid leftovers (an interrupted build) would be in the builder's way.
        for p in self.outputs.values() {
            if valid_now.contains(p) {
                continue;
            }
            let real = w.store_dir().to_path(p);
            crate::build_dir::delete_path(&real).map_err(|e| {
                BuildError::misc(format!("removing invalid path '{}'", real.display()), e)
            })?;
        }
        // Someone may have failed at this while we waited for the lock.
        for p in self.outputs.values().cloned().collect::<Vec<_>>() {
            if self.path_failed(id, w, &p)? {
                return Ok(());
            }
        }

        // Check and repair builds are local only, as are preferLocalBuild derivations.
        let build_locally = self.mode != BuildMode::Normal || self.will_build_locally(w)?;
        if !build_locally {
            match crate::hook::try_build_hook(self, id, w)? {
                crate::hook::HookReply::Accept => {
                    w.set_locked_outputs(id, self.outputs.values().cloned().collect());
                    self.output_locks = Some(locks);
                    self.state = State::BuildDone;
                    return Ok(());
                }
                crate::hook::HookReply::Postpone => {
                    // Not now: retry after a while, without holding the locks.
                    drop(locks);
                    w.wait_for_a_while(id);
                    return Ok(());
                }
                crate::hook::HookReply::Decline => {}
            }
        }
        let cur = w.nr_local_builds();
        if cur >= w.cfg.max_jobs && !(build_locally && cur == 0) {
            // Wait for a slot without holding the locks, so that other processes may go on.
            drop(locks);
            w.wait_for_build_slot(id);
            return Ok(());
        }

        let user = match crate::sandboxing::acquire_build_user(w.cfg)? {
            crate::sandboxing::UserSlot::NotNeeded => None,
            crate::sandboxing::UserSlot::Got(u) => Some(u),
            crate::sandboxing::UserSlot::Busy(msg) => {
                // The original failed here; waiting (as Nix 2.x does) lets more builds run
                // than there are users. Say why once, in the original's words, then poll
                // without holding the output locks.
                if !self.reported_users_busy {
                    self.reported_users_busy = true;
                    w.message(Level::Error, msg);
                }
                drop(locks);
                w.wait_for_a_while(id);
                return Ok(());
            }
        };

        w.set_locked_outputs(id, self.outputs.values().cloned().collect());
        self.output_locks = Some(locks);
        match crate::build::start_builder(self, id, w, user) {
            Ok(()) => {
                self.state = State::BuildDone;
                Ok(())
            }
            Err(BuildError::Build(reason)) => {
                self.fail(id, w, FailureKind::SetupFailed, reason, true);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    pub fn handle_child_output(&mut self, id: GoalId, w: &mut Worker<'_>, chunk: &[u8]) {
        if let Some(h) = self.hook_build.as_mut() {
            h.drain_messages(w, &self.drv_path, false);
            w.emit(Event::BuildLog {
                drv: self.drv_path.clone(),
                chunk: chunk.to_vec(),
            });
            if let Some(limit) = h.log_chunk(chunk) {
                w.child_terminated(id);
                let reason = format!("killed after writing more than {limit} bytes of log output");
                self.cancel(id, w, FailureKind::LogLimitExceeded, reason);
            }
            return;
        }
        let Some(b) = self.build.as_mut() else { return };
        w.emit(Event::BuildLog {
            drv: self.drv_path.clone(),
            chunk: chunk.to_vec(),
        });
        match b.log_chunk(chunk) {
            Ok(None) => {}
            Ok(Some(limit)) => {
                w.child_terminated(id);
                let reason = format!("killed after writing more than {limit} bytes of log output");
                self.cancel(id, w, FailureKind::LogLimitExceeded, reason);
            }
            Err(reason) => {
                // No log to write the output to: stop the build rather than lose it.
                w.child_terminated(id);
                self.fail(id, w, FailureKind::SetupFailed, reason, false);
            }
        }
    }

    pub fn child_exited(&mut self, status: crate::worker::ChildStatus) {
        self.exit = Some(status);
    }

    fn build_done(&mut self, id: GoalId, w: &mut Worker<'_>) -> Result<(), BuildError> {
        let status = self
            .exit
            .take()
            .unwrap_or_else(|| Err("builder status unknown".into()));
        if let Some(hb) = self.hook_build.take() {
            return crate::hook::build_done(self, id, w, hb, status);
        }
        let Some(mut build) = self.build.take() else {
            return Err(BuildError::Misc(
                "internal error: no build to finish".into(),
            ));
        };
        let log_create_error = build.take_log_create_error();
        if let Err(e) = build.close_log(w) {
            w.message(Level::Warn, format!("closing the build log: {e}"));
        }
        build.kill_leftovers(w);
        let result = match (log_create_error, status) {
            // As when the log could not be created before the builder started (the
            // original's order): not the derivation's fault, nothing registered.
            (Some(e), _) => Err(crate::register::Rejection::misc(e)),
            (None, Ok(s)) if s.success() => build
                .extract_outputs()
                .and_then(|()| crate::register::register_outputs(self, &mut build, w)),
            (None, Ok(s)) => Err(build.failure_error(w, &self.drv_path, s)),
            // The original's message for a builder whose environment could not be set up,
            // as when `start` itself fails (build.rs).
            (None, Err(crate::worker::ChildError::Setup(e))) => {
                Err(crate::register::Rejection::misc(format!(
                    "failed to set up the build environment for {}: {e}",
                    quoted(w.store_dir(), &self.drv_path)
                )))
            }
            (None, Err(e)) => Err(crate::register::Rejection::misc(format!(
                "waiting for the builder of {}: {e}",
                quoted(w.store_dir(), &self.drv_path)
            ))),
        };
        match result {
            Ok(()) => {
                build.finish(w);
                if let Some(mut locks) = self.output_locks.take() {
                    // Future lockers will find the outputs valid and never need the files.
                    locks.set_deletion(true);
                    w.release_later(locks);
                }
                w.clear_locked_outputs(id);
                w.emit(Event::BuildSucceeded {
                    drv: self.drv_path.clone(),
                });
                w.am_done(id, ExitCode::Success);
            }
            Err(rej) => {
                let permanent = rej.permanent && !self.fixed_output && !build.disk_full;
                if w.cfg.cache_failure && rej.permanent && !self.fixed_output {
                    for p in self.outputs.values() {
                        w.store.register_failed_path(p)?;
                    }
                }
                if build.disk_full {
                    w.message(
                        Level::Error,
                        "note: build failure may have been caused by lack of free disk space"
                            .into(),
                    );
                }
                self.build = Some(build);
                self.fail(id, w, rej.kind, rej.message, permanent);
            }
        }
        Ok(())
    }

    // --- helpers ------------------------------------------------------------------------

    /// Fails the goal if the failed-path cache has `path`.
    fn path_failed(
        &mut self,
        id: GoalId,
        w: &mut Worker<'_>,
        path: &StorePath,
    ) -> Result<bool, BuildError> {
        if !w.cfg.cache_failure || !w.store.has_path_failed(path)? {
            return Ok(false);
        }
        let reason = format!(
            "builder for {} failed previously (cached)",
            quoted(w.store_dir(), path)
        );
        self.fail(id, w, FailureKind::CachedFailure, reason, true);
        Ok(true)
    }

    fn will_build_locally(&self, w: &Worker<'_>) -> Result<bool, BuildError> {
        let drv = self.drv()?;
        Ok(drv.env.get("preferLocalBuild").is_some_and(|v| v == "1")
            && can_build_locally(&drv.platform, &w.cfg.system))
    }
}

/// Whether this machine can run builders for `platform`.
/// The features a derivation asks of the machine that builds it: `requiredSystemFeatures`,
/// a space-separated string, or a list of strings under `__structuredAttrs`.
pub(crate) fn required_system_features(drv: &Derivation) -> BTreeSet<String> {
    const KEY: &str = "requiredSystemFeatures";
    if let Some(json) = drv.env.get("__json") {
        let parsed: Option<serde_json::Value> = serde_json::from_str(json).ok();
        return match parsed.as_ref().and_then(|v| v.get(KEY)) {
            Some(serde_json::Value::Array(items)) => items
                .iter()
                .filter_map(|i| i.as_str().map(String::from))
                .collect(),
            Some(serde_json::Value::String(s)) => s.split_whitespace().map(String::from).collect(),
            _ => BTreeSet::new(),
        };
    }
    drv.env
        .get(KEY)
        .map(|f| f.split_whitespace().map(String::from).collect())
        .unwrap_or_default()
}

pub(crate) fn can_build_locally(platform: &str, system: &str) -> bool {
    platform == system || (platform == "i686-linux" && system == "x86_64-linux")
}

/// A valid path whose contents still hash to what was registered.
pub(crate) fn path_contents_good(w: &Worker<'_>, path: &StorePath) -> Result<bool, BuildError> {
    let Some(info) = w.store.query_path_info(path)? else {
        return Ok(false);
    };
    let real = w.store_dir().to_path(path);
    if std::fs::symlink_metadata(&real).is_err() {
        return Ok(false);
    }
    match nixb_store::nar::hash_path(&real, info.nar_hash.algo()) {
        Ok((h, _)) => Ok(h == info.nar_hash),
        Err(_) => Ok(false),
    }
}
