//! The derivation goal driven state by state with fake services: each test feeds a goal
//! what the scheduler would (waitee counts, a child's exit) and checks the requests it
//! makes against the original's state machine (`DerivationGoal` in Nix 2.8's
//! `build/derivation-goal.cc`).

use std::collections::BTreeSet;

use crate::config::BuildMode;
use crate::event::{Event, FailureKind};
use crate::graph::ExitCode;
use crate::services::{Services, SubGoal};
use crate::testing::{counts, Asked, Harness};

use super::{DerivationGoal, State};

/// A harness with derivation `d` (output `o`, builder script `script`), the `.drv` valid.
fn setup(script: &str) -> (Harness, nixb_store::StorePath, nixb_store::StorePath) {
    let h = Harness::new();
    let d = h.path('d', "x.drv");
    let o = h.path('p', "x");
    h.add_drv(&d, &o, script, &[], &[]);
    h.make_valid(&d, &[]);
    (h, d, o)
}

fn goal(d: &nixb_store::StorePath, mode: BuildMode) -> DerivationGoal {
    DerivationGoal::new(d.clone(), BTreeSet::new(), mode)
}

fn subst(p: &nixb_store::StorePath, repair: bool) -> Asked {
    Asked::WaitFor(SubGoal::Substitution {
        path: p.clone(),
        repair,
    })
}

fn failed(kind: FailureKind, permanent: bool) -> Vec<Asked> {
    vec![
        Asked::UnlockedOutputs,
        Asked::Failed { kind, permanent },
        Asked::Done(ExitCode::Failed),
    ]
}

#[test]
fn init_waits_for_a_missing_derivation_and_fails_without_it() {
    let mut h = Harness::new();
    let d = h.path('d', "x.drv");
    let mut g = goal(&d, BuildMode::Normal);
    assert_eq!(h.step(|cx| g.work(cx)), vec![subst(&d, false)]);
    assert_eq!(g.state, State::HaveDerivation);
    // Its substitution goal failed: haveDerivation gives up.
    let asked = h.step_with(counts(1, 1, 0), |cx| g.work(cx));
    assert_eq!(asked, failed(FailureKind::SetupFailed, false));
    assert!(h.last_failure().contains("cannot build missing derivation"));
}

#[test]
fn valid_outputs_end_the_goal_at_once() {
    let (mut h, d, o) = setup("exit 1");
    h.make_valid(&o, &[]);
    let mut g = goal(&d, BuildMode::Normal);
    assert_eq!(
        h.step(|cx| g.work(cx)),
        vec![Asked::Done(ExitCode::Success)]
    );
}

#[test]
fn invalid_outputs_are_substituted_first_then_valid_ones_end_the_goal() {
    let (mut h, d, o) = setup("exit 1");
    let mut g = goal(&d, BuildMode::Normal);
    assert_eq!(h.step(|cx| g.work(cx)), vec![subst(&o, false)]);
    assert_eq!(g.state, State::OutputsSubstituted);
    h.make_valid(&o, &[]);
    assert_eq!(
        h.step(|cx| g.work(cx)),
        vec![Asked::Done(ExitCode::Success)]
    );
}

#[test]
fn no_substitute_goes_on_to_realise_the_inputs() {
    let mut h = Harness::new();
    let (d, o) = (h.path('d', "x.drv"), h.path('p', "x"));
    let (dep, dep_out, src) = (
        h.path('g', "dep.drv"),
        h.path('f', "dep"),
        h.path('s', "src"),
    );
    h.add_drv(&dep, &dep_out, "exit 1", &[], &[]);
    h.add_drv(
        &d,
        &o,
        "exit 1",
        &[(dep.clone(), "out")],
        std::slice::from_ref(&src),
    );
    h.make_valid(&d, &[]);
    let mut g = goal(&d, BuildMode::Normal);
    assert_eq!(h.step(|cx| g.work(cx)), vec![subst(&o, false)]);
    // The substitution goal found no substituter: build.
    let asked = h.step_with(counts(1, 1, 0), |cx| g.work(cx));
    assert_eq!(
        asked,
        vec![
            Asked::WaitFor(SubGoal::Derivation {
                drv: dep,
                wanted: BTreeSet::from(["out".to_string()]),
                mode: BuildMode::Normal,
            }),
            subst(&src, false),
        ]
    );
    assert_eq!(g.state, State::InputsRealised);
    assert!(h
        .services
        .events
        .contains(&Event::BuildPlanned { drv: d.clone() }));
}

#[test]
fn failed_substitutes_fail_the_goal_without_fallback() {
    let (mut h, d, o) = setup("exit 1");
    let mut g = goal(&d, BuildMode::Normal);
    assert_eq!(h.step(|cx| g.work(cx)), vec![subst(&o, false)]);
    let asked = h.step_with(counts(1, 0, 0), |cx| g.work(cx));
    assert_eq!(asked, failed(FailureKind::SetupFailed, false));
    assert!(h.last_failure().contains("try '--fallback'"));
}

#[test]
fn failed_inputs_fail_the_goal_naming_how_many() {
    let mut h = Harness::new();
    let (d, o, src) = (h.path('d', "x.drv"), h.path('p', "x"), h.path('s', "src"));
    h.add_drv(&d, &o, "exit 1", &[], std::slice::from_ref(&src));
    h.make_valid(&d, &[]);
    h.cfg.use_substitutes = false;
    let mut g = goal(&d, BuildMode::Normal);
    assert_eq!(h.step(|cx| g.work(cx)), vec![subst(&src, false)]);
    let asked = h.step_with(counts(1, 1, 0), |cx| g.work(cx));
    assert_eq!(asked, failed(FailureKind::DependencyFailed, false));
    assert!(h
        .last_failure()
        .contains("1 dependencies couldn't be built"));
}

#[test]
fn incomplete_closure_restarts_substitution_once_the_inputs_are_there() {
    let mut h = Harness::new();
    let (d, o, src) = (h.path('d', "x.drv"), h.path('p', "x"), h.path('s', "src"));
    h.add_drv(&d, &o, "exit 1", &[], std::slice::from_ref(&src));
    h.make_valid(&d, &[]);
    let mut g = goal(&d, BuildMode::Normal);
    assert_eq!(h.step(|cx| g.work(cx)), vec![subst(&o, false)]);
    // A reference of the output could not be substituted: realise the inputs first ...
    let asked = h.step_with(counts(1, 0, 1), |cx| g.work(cx));
    assert_eq!(asked, vec![subst(&src, false)]);
    // ... then try the substitutes again (the original's retrySubstitution).
    assert_eq!(h.step(|cx| g.work(cx)), vec![subst(&o, false)]);
    assert_eq!(g.state, State::OutputsSubstituted);
}

#[test]
fn more_wanted_outputs_restart_from_have_derivation() {
    let (mut h, d, o) = setup("exit 1");
    let dev = h.path('v', "x-dev");
    h.store
        .drvs
        .borrow_mut()
        .get_mut(&d)
        .unwrap()
        .outputs
        .insert(
            "dev".into(),
            nixb_store::derivation::DerivationOutput {
                path: Some(dev.clone()),
                fixed: None,
            },
        );
    let mut g = DerivationGoal::new(d.clone(), BTreeSet::from(["out".into()]), BuildMode::Normal);
    assert_eq!(h.step(|cx| g.work(cx)), vec![subst(&o, false)]);
    // While `out` was substituted, another goal came to want `dev` too: haveDerivation
    // again, which tries substitutes for `dev` rather than building both.
    g.add_wanted_outputs(&BTreeSet::from(["dev".into()]));
    h.make_valid(&o, &[]);
    assert_eq!(h.step(|cx| g.work(cx)), vec![subst(&dev, false)]);
    assert_eq!(g.state, State::OutputsSubstituted);
}

#[test]
fn cached_failure_fails_permanently() {
    let (mut h, d, o) = setup("exit 1");
    h.cfg.cache_failure = true;
    h.store.failed.borrow_mut().insert(o.clone());
    let mut g = goal(&d, BuildMode::Normal);
    let asked = h.step(|cx| g.work(cx));
    assert_eq!(asked, failed(FailureKind::CachedFailure, true));
    assert!(h.last_failure().contains("failed previously (cached)"));
}

#[test]
fn check_needs_valid_outputs() {
    let (mut h, d, _) = setup("exit 1");
    h.cfg.use_substitutes = false;
    let mut g = goal(&d, BuildMode::Check);
    let asked = h.step(|cx| g.work(cx));
    assert_eq!(asked, failed(FailureKind::SetupFailed, false));
    assert!(h.last_failure().contains("checking is not possible"));
}

/// Runs `d` through inputsRealised to tryToBuild (no inputs, no substitutes).
fn to_try_to_build(h: &mut Harness, g: &mut DerivationGoal) {
    h.cfg.use_substitutes = false;
    assert_eq!(h.step(|cx| g.work(cx)), vec![Asked::WakeUp]);
    assert_eq!(g.state, State::TryToBuild);
}

#[test]
fn build_starts_a_child_in_a_slot_and_registers_its_output() {
    let (mut h, d, o) = setup("echo built > $out");
    let mut g = goal(&d, BuildMode::Normal);
    to_try_to_build(&mut h, &mut g);
    let asked = h.step(|cx| g.work(cx));
    assert_eq!(
        asked,
        vec![
            Asked::LockedOutputs(BTreeSet::from([o.clone()])),
            Asked::StartChild {
                in_build_slot: true,
                respect_timeouts: true
            },
        ]
    );
    assert_eq!(g.state, State::BuildDone);
    let status = h.wait_child();
    g.child_exited(status);
    let asked = h.step(|cx| g.work(cx));
    assert_eq!(
        asked,
        vec![Asked::UnlockedOutputs, Asked::Done(ExitCode::Success)]
    );
    assert_eq!(std::fs::read_to_string(h.real(&o)).unwrap(), "built\n");
    let reg = h.store.registered.borrow();
    assert_eq!(reg.len(), 1);
    assert_eq!((&reg[0].path, &reg[0].deriver), (&o, &d));
    assert!(h
        .services
        .events
        .contains(&Event::BuildSucceeded { drv: d.clone() }));
}

#[test]
fn failing_builder_fails_the_goal_permanently() {
    let (mut h, d, _) = setup("exit 3");
    let mut g = goal(&d, BuildMode::Normal);
    to_try_to_build(&mut h, &mut g);
    h.step(|cx| g.work(cx));
    let status = h.wait_child();
    g.child_exited(status);
    let asked = h.step(|cx| g.work(cx));
    assert_eq!(asked, failed(FailureKind::BuilderFailed, true));
    assert!(h.last_failure().ends_with("failed with exit code 3"));
}

#[test]
fn builder_without_output_is_rejected() {
    let (mut h, d, _) = setup("true");
    let mut g = goal(&d, BuildMode::Normal);
    to_try_to_build(&mut h, &mut g);
    h.step(|cx| g.work(cx));
    let status = h.wait_child();
    g.child_exited(status);
    let asked = h.step(|cx| g.work(cx));
    assert_eq!(asked, failed(FailureKind::BuilderFailed, true));
    assert!(h.last_failure().contains("failed to produce output path"));
}

#[test]
fn full_slots_make_the_goal_wait_for_one() {
    let (mut h, d, _) = setup("exit 1");
    let mut g = goal(&d, BuildMode::Normal);
    to_try_to_build(&mut h, &mut g);
    h.services.nr_local_builds = 1;
    assert_eq!(h.step(|cx| g.work(cx)), vec![Asked::WaitForBuildSlot]);
    assert_eq!(g.state, State::TryToBuild);
}

#[test]
fn outputs_locked_by_another_goal_wait_for_any_goal() {
    let (mut h, d, o) = setup("exit 1");
    let mut g = goal(&d, BuildMode::Normal);
    to_try_to_build(&mut h, &mut g);
    h.services.locked_by_me.insert(o);
    assert_eq!(h.step(|cx| g.work(cx)), vec![Asked::WaitForAnyGoal]);
}

#[test]
fn outputs_locked_by_another_process_wait_a_while() {
    let (mut h, d, o) = setup("exit 1");
    let mut g = goal(&d, BuildMode::Normal);
    to_try_to_build(&mut h, &mut g);
    let held = nixb_store::locks::PathLocks::lock(&[h.real(&o)], false, None)
        .unwrap()
        .expect("the lock is free");
    assert_eq!(h.step(|cx| g.work(cx)), vec![Asked::WaitForAWhile]);
    drop(held);
}

#[test]
fn outputs_built_meanwhile_by_another_process_end_the_goal_under_the_lock() {
    let (mut h, d, o) = setup("exit 1");
    let mut g = goal(&d, BuildMode::Normal);
    to_try_to_build(&mut h, &mut g);
    h.make_valid(&o, &[]);
    assert_eq!(
        h.step(|cx| g.work(cx)),
        vec![Asked::Done(ExitCode::Success)]
    );
}

/// The request line the hook reads, then its reply; after `# accept` it reads the two
/// path lists and exits with `status`.
fn hook_script(reply: &str, status: i32) -> String {
    format!("read request\necho '# {reply}'\nread inputs\nread outputs\nexit {status}\n")
}

#[test]
fn hook_decline_builds_locally() {
    let (mut h, d, o) = setup("echo local > $out");
    let hook = h.script("hook", &hook_script("decline", 0));
    h.use_hook(&hook);
    let mut g = goal(&d, BuildMode::Normal);
    to_try_to_build(&mut h, &mut g);
    let asked = h.step(|cx| g.work(cx));
    assert_eq!(
        asked,
        vec![
            Asked::LockedOutputs(BTreeSet::from([o.clone()])),
            Asked::StartChild {
                in_build_slot: true,
                respect_timeouts: true
            },
        ]
    );
    assert!(
        h.services.hook().is_some(),
        "the hook waits for the next request"
    );
    let status = h.wait_child();
    g.child_exited(status);
    h.step(|cx| g.work(cx));
    assert_eq!(std::fs::read_to_string(h.real(&o)).unwrap(), "local\n");
}

#[test]
fn hook_postpone_waits_a_while_without_the_locks() {
    let (mut h, d, o) = setup("exit 1");
    let hook = h.script("hook", &hook_script("postpone", 0));
    h.use_hook(&hook);
    let mut g = goal(&d, BuildMode::Normal);
    to_try_to_build(&mut h, &mut g);
    assert_eq!(h.step(|cx| g.work(cx)), vec![Asked::WaitForAWhile]);
    assert_eq!(g.state, State::TryToBuild);
    let lock = nixb_store::locks::PathLocks::lock(&[h.real(&o)], false, None).unwrap();
    assert!(lock.is_some(), "the output locks were released");
}

/// Runs a build the hook accepts and whose process exits with `status`; returns what the
/// goal asked for in buildDone.
fn hook_accepts(status: i32, outputs_valid: bool) -> (Harness, Vec<Asked>) {
    let (mut h, d, o) = setup("exit 1");
    let hook = h.script("hook", &hook_script("accept", status));
    h.use_hook(&hook);
    let mut g = goal(&d, BuildMode::Normal);
    to_try_to_build(&mut h, &mut g);
    let asked = h.step(|cx| g.work(cx));
    assert_eq!(
        asked,
        vec![
            Asked::StartChild {
                in_build_slot: false,
                respect_timeouts: false
            },
            Asked::LockedOutputs(BTreeSet::from([o.clone()])),
        ]
    );
    assert!(h.services.hook().is_none(), "the goal took the hook over");
    let status = h.wait_child();
    if outputs_valid {
        h.make_valid(&o, &[]);
    }
    g.child_exited(status);
    let asked = h.step(|cx| g.work(cx));
    (h, asked)
}

#[test]
fn hook_accept_and_success_end_the_goal() {
    let (_, asked) = hook_accepts(0, true);
    assert_eq!(
        asked,
        vec![Asked::UnlockedOutputs, Asked::Done(ExitCode::Success)]
    );
}

#[test]
fn hook_success_without_valid_outputs_is_a_hook_failure() {
    let (h, asked) = hook_accepts(0, false);
    assert_eq!(asked, failed(FailureKind::SetupFailed, false));
    assert!(h.last_failure().contains("did not make"));
}

#[test]
fn hook_remote_failure_is_permanent_and_timeout_is_not() {
    let (_, asked) = hook_accepts(100, false);
    assert_eq!(asked, failed(FailureKind::BuilderFailed, true));
    let (_, asked) = hook_accepts(101, false);
    assert_eq!(asked, failed(FailureKind::TimedOut, false));
}

#[test]
fn repair_with_intact_outputs_repairs_their_closure() {
    let (mut h, d, o) = setup("exit 1");
    let dep = h.path('r', "dep");
    std::fs::write(h.real(&o), "intact").unwrap();
    h.make_valid(&o, std::slice::from_ref(&dep));
    // Valid in the database, gone from the disk: corrupt.
    h.make_valid(&dep, &[]);
    h.cfg.use_substitutes = false;
    let mut g = goal(&d, BuildMode::Repair);
    assert_eq!(h.step(|cx| g.work(cx)), vec![subst(&dep, true)]);
    assert_eq!(g.state, State::ClosureRepaired);
    let asked = h.step_with(counts(1, 1, 0), |cx| g.work(cx));
    assert_eq!(asked, failed(FailureKind::DependencyFailed, false));
    assert!(h.last_failure().contains("could not be repaired"));
}

#[test]
fn repair_with_an_intact_closure_is_done() {
    let (mut h, d, o) = setup("exit 1");
    std::fs::write(h.real(&o), "intact").unwrap();
    h.make_valid(&o, &[]);
    h.cfg.use_substitutes = false;
    let mut g = goal(&d, BuildMode::Repair);
    assert_eq!(
        h.step(|cx| g.work(cx)),
        vec![Asked::Done(ExitCode::Success)]
    );
}

#[test]
fn check_rebuilds_and_compares_with_the_registered_output() {
    let (mut h, d, o) = setup("echo other > $out");
    std::fs::write(h.real(&o), "registered\n").unwrap();
    h.make_valid(&o, &[]);
    let mut g = goal(&d, BuildMode::Check);
    to_try_to_build(&mut h, &mut g);
    h.step(|cx| g.work(cx));
    let status = h.wait_child();
    g.child_exited(status);
    let asked = h.step(|cx| g.work(cx));
    assert_eq!(asked, failed(FailureKind::NotDeterministic, false));
    assert!(h.last_failure().contains("may not be deterministic"));
    // The registered output was not touched.
    assert_eq!(std::fs::read_to_string(h.real(&o)).unwrap(), "registered\n");
}

#[test]
fn log_limit_kills_the_builder_and_fails_the_goal() {
    let (mut h, d, _) = setup("exit 0");
    h.cfg.log.max_size = Some(4);
    let mut g = goal(&d, BuildMode::Normal);
    to_try_to_build(&mut h, &mut g);
    h.step(|cx| g.work(cx));
    let asked = h.step(|cx| g.handle_child_output(cx, b"more than four bytes"));
    assert_eq!(asked, failed(FailureKind::LogLimitExceeded, false));
    assert_eq!(h.services.kills, 1);
    let _ = h.wait_child();
}
