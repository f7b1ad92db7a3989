//! Fakes for driving goals step by step in unit tests: an in-memory store, services that
//! record what they were asked, and a harness that takes one step of a goal and returns
//! the requests it made, in a form tests can compare.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use nixb_store::derivation::{Derivation, DerivationOutput};
use nixb_store::{HashAlgo, StoreDir, StorePath};

use crate::build_dir::{BuildDir, BuildDirs};
use crate::builtin_substituter::BuiltinSubstituter;
use crate::config::{HookCommand, WorkerConfig};
use crate::event::{Event, FailureKind};
use crate::graph::{ExitCode, GoalId, WaiteeCounts};
use crate::hook_instance::HookInstance;
use crate::outcome::Failure;
use crate::services::{ChildStatus, Request, Services, Step, SubGoal};
use crate::store::{BuildStore, NewOutput, PathInfo, StoreFault, SubstitutedPath};
use crate::substituter_query::QueryPool;

/// A store in memory (the files of its paths are real, under a temporary directory).
pub(crate) struct FakeStore {
    dir: StoreDir,
    pub valid: RefCell<BTreeMap<StorePath, PathInfo>>,
    pub drvs: RefCell<BTreeMap<StorePath, Derivation>>,
    pub failed: RefCell<BTreeSet<StorePath>>,
    pub registered: RefCell<Vec<NewOutput>>,
    /// The paths rooted for the whole process, in order.
    pub temp_roots: RefCell<Vec<StorePath>>,
}

impl BuildStore for FakeStore {
    fn store_dir(&self) -> &StoreDir {
        &self.dir
    }

    fn is_valid_path(&self, p: &StorePath) -> Result<bool, StoreFault> {
        Ok(self.valid.borrow().contains_key(p))
    }

    fn query_path_info(&self, p: &StorePath) -> Result<Option<PathInfo>, StoreFault> {
        Ok(self.valid.borrow().get(p).cloned())
    }

    fn query_references(&self, p: &StorePath) -> Result<BTreeSet<StorePath>, StoreFault> {
        Ok(self
            .valid
            .borrow()
            .get(p)
            .map(|i| i.references.clone())
            .unwrap_or_default())
    }

    fn compute_closure(
        &self,
        paths: &BTreeSet<StorePath>,
    ) -> Result<BTreeSet<StorePath>, StoreFault> {
        let mut seen = BTreeSet::new();
        let mut todo: Vec<StorePath> = paths.iter().cloned().collect();
        while let Some(p) = todo.pop() {
            if seen.insert(p.clone()) {
                todo.extend(self.query_references(&p)?);
            }
        }
        Ok(seen)
    }

    fn read_derivation(&self, drv: &StorePath) -> Result<Derivation, StoreFault> {
        self.drvs
            .borrow()
            .get(drv)
            .cloned()
            .ok_or_else(|| StoreFault(format!("no derivation {}", self.dir.print(drv))))
    }

    fn register_outputs(&self, outputs: &[NewOutput]) -> Result<(), StoreFault> {
        for o in outputs {
            self.valid.borrow_mut().insert(
                o.path.clone(),
                PathInfo {
                    nar_hash: o.nar_hash.clone(),
                    nar_size: o.nar_size,
                    references: o.references.clone(),
                    deriver: Some(o.deriver.clone()),
                    ca: o.ca.clone(),
                },
            );
        }
        self.registered.borrow_mut().extend(outputs.iter().cloned());
        Ok(())
    }

    fn has_path_failed(&self, p: &StorePath) -> Result<bool, StoreFault> {
        Ok(self.failed.borrow().contains(p))
    }

    fn register_failed_path(&self, p: &StorePath) -> Result<(), StoreFault> {
        self.failed.borrow_mut().insert(p.clone());
        Ok(())
    }

    fn add_temp_root(&self, p: &StorePath) -> Result<(), StoreFault> {
        self.temp_roots.borrow_mut().push(p.clone());
        Ok(())
    }

    fn register_substitute(&self, info: &SubstitutedPath) -> Result<(), StoreFault> {
        self.valid.borrow_mut().insert(
            info.path.clone(),
            PathInfo {
                nar_hash: info.nar_hash.clone(),
                nar_size: info.nar_size,
                references: info.references.clone(),
                deriver: info.deriver.clone(),
                ca: info.ca.clone(),
            },
        );
        Ok(())
    }
}

/// Services that record the events and kills, with real build directories and no
/// watchdog or network namespaces.
pub(crate) struct FakeServices {
    store: Rc<FakeStore>,
    pub events: Vec<Event>,
    pub nr_local_builds: usize,
    pub locked_by_me: BTreeSet<StorePath>,
    pub kills: usize,
    /// The temporary roots taken, in order.
    pub temp_roots: Vec<StorePath>,
    build_dirs: BuildDirs,
    hook: Option<HookInstance>,
    queries: QueryPool,
    builtin: BuiltinSubstituter,
}

impl Services for FakeServices {
    fn emit(&mut self, event: Event) {
        self.events.push(event);
    }
    fn add_temp_root(&mut self, p: &StorePath) -> Result<(), StoreFault> {
        self.temp_roots.push(p.clone());
        Ok(())
    }
    fn derivation(&mut self, drv: &StorePath) -> Result<Arc<Derivation>, StoreFault> {
        self.store.read_derivation(drv).map(Arc::new)
    }
    fn derivation_output(
        &mut self,
        drv: &StorePath,
        output: &str,
    ) -> Result<Option<StorePath>, StoreFault> {
        let d = self.store.read_derivation(drv)?;
        Ok(d.outputs.get(output).and_then(|o| o.path.clone()))
    }
    fn nr_local_builds(&self) -> usize {
        self.nr_local_builds
    }
    fn is_locked_by_me(&self, path: &StorePath) -> bool {
        self.locked_by_me.contains(path)
    }
    fn kill_child(&mut self, _: GoalId) {
        self.kills += 1;
    }
    fn build_dirs(&mut self) -> &mut BuildDirs {
        &mut self.build_dirs
    }
    fn ensure_watchdog(&mut self) -> Option<RawFd> {
        None
    }
    fn prepared_netns(&mut self) -> Option<OwnedFd> {
        None
    }
    fn finish_log_later(&mut self, log: nixb_logs::FinishingLog) {
        let _ = log.wait();
    }
    fn release_later(&mut self, _: nixb_store::locks::PathLocks) {}
    fn remove_later(&mut self, _: BuildDir) {}
    fn hook(&mut self) -> &mut Option<HookInstance> {
        &mut self.hook
    }
    fn subst_queries(&mut self) -> &mut QueryPool {
        &mut self.queries
    }
    fn builtin_subst(&mut self) -> &mut BuiltinSubstituter {
        &mut self.builtin
    }
}

/// A request as a test compares it (children and locks left out).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Asked {
    WaitFor(SubGoal),
    WakeUp,
    WaitForBuildSlot,
    WaitForAnyGoal,
    WaitForAWhile,
    StartChild {
        in_build_slot: bool,
        respect_timeouts: bool,
    },
    LockedOutputs(BTreeSet<StorePath>),
    UnlockedOutputs,
    Failed {
        kind: FailureKind,
        permanent: bool,
    },
    Done(ExitCode),
}

/// A temporary store, settings and fake services, and what the steps left behind.
pub(crate) struct Harness {
    pub tmp: tempfile::TempDir,
    pub store: Rc<FakeStore>,
    pub cfg: WorkerConfig,
    pub services: FakeServices,
    /// Children the goal asked the scheduler to adopt, in order.
    pub children: Vec<nixb_sandbox::Builder>,
    /// Failures recorded, in order.
    pub failures: Vec<Failure>,
}

impl Harness {
    pub fn new() -> Harness {
        let tmp = tempfile::tempdir().expect("temporary directory");
        let root = tmp.path();
        for d in ["store", "builds", "logs", "state"] {
            std::fs::create_dir_all(root.join(d)).expect("test directories");
        }
        let dir = StoreDir::new(root.join("store").to_str().expect("utf-8 tmp").to_string())
            .expect("store dir");
        let mut cfg = WorkerConfig::new(root.join("logs"));
        cfg.build_dir_root = root.join("builds");
        cfg.state_dir = root.join("state");
        cfg.homeless_shelter = root.join("homeless-shelter");
        cfg.log.compress = false;
        let store = Rc::new(FakeStore {
            dir: dir.clone(),
            valid: RefCell::default(),
            drvs: RefCell::default(),
            failed: RefCell::default(),
            registered: RefCell::default(),
            temp_roots: RefCell::default(),
        });
        let services = FakeServices {
            store: Rc::clone(&store),
            events: Vec::new(),
            nr_local_builds: 0,
            locked_by_me: BTreeSet::new(),
            kills: 0,
            temp_roots: Vec::new(),
            build_dirs: BuildDirs::new(&cfg.build_dir_root),
            hook: None,
            queries: QueryPool::default(),
            builtin: BuiltinSubstituter::new(&cfg, dir),
        };
        Harness {
            tmp,
            store,
            cfg,
            services,
            children: Vec::new(),
            failures: Vec::new(),
        }
    }

    /// A store path whose hash part is `c` repeated (`c` a Nix base-32 digit).
    pub fn path(&self, c: char, name: &str) -> StorePath {
        StorePath::from_base_name(&format!("{}-{name}", c.to_string().repeat(32)))
            .expect("test store path")
    }

    pub fn real(&self, p: &StorePath) -> PathBuf {
        self.store.store_dir().to_path(p)
    }

    /// Marks `p` valid with the NAR hash of what is on disk (nothing there: a made-up hash).
    pub fn make_valid(&self, p: &StorePath, references: &[StorePath]) {
        let real = self.real(p);
        let (nar_hash, nar_size) = nixb_store::nar::hash_path(&real, HashAlgo::Sha256)
            .unwrap_or_else(|_| (nixb_store::Hash::digest(HashAlgo::Sha256, b"absent"), 0));
        self.store.valid.borrow_mut().insert(
            p.clone(),
            PathInfo {
                nar_hash,
                nar_size,
                references: references.iter().cloned().collect(),
                deriver: None,
                ca: None,
            },
        );
    }

    /// Adds a derivation with one output `out` whose builder runs `script` in `sh`.
    pub fn add_drv(
        &self,
        drv_path: &StorePath,
        out: &StorePath,
        script: &str,
        input_drvs: &[(StorePath, &str)],
        input_srcs: &[StorePath],
    ) {
        let sd = self.store.store_dir();
        let drv = Derivation {
            outputs: BTreeMap::from([(
                "out".to_string(),
                DerivationOutput {
                    path: Some(out.clone()),
                    fixed: None,
                },
            )]),
            input_drvs: input_drvs
                .iter()
                .map(|(p, o)| (p.clone(), BTreeSet::from([o.to_string()])))
                .collect(),
            input_srcs: input_srcs.iter().cloned().collect(),
            platform: self.cfg.system.clone(),
            builder: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            env: BTreeMap::from([("out".to_string(), sd.print(out))]),
        };
        self.store.drvs.borrow_mut().insert(drv_path.clone(), drv);
    }

    /// Writes an executable shell script into the temporary directory.
    pub fn script(&self, name: &str, text: &str) -> PathBuf {
        let p = self.tmp.path().join(name);
        // Written here and copied into place by `cp`: a file this process had open for
        // writing may still be open in a child another test's thread has just forked
        // (until that child execs), and executing it then fails with ETXTBSY. The copy's
        // only writer is `cp`, which has exited by the time the script runs.
        let draft = self.tmp.path().join(format!("{name}.draft"));
        std::fs::write(&draft, format!("#!/bin/sh\n{text}")).expect("writing a script");
        std::fs::set_permissions(&draft, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let copied = std::process::Command::new("cp")
            .arg(&draft)
            .arg(&p)
            .status()
            .expect("running cp");
        assert!(copied.success(), "cp {} {}", draft.display(), p.display());
        p
    }

    /// Uses `script` as the build hook.
    pub fn use_hook(&mut self, script: &Path) {
        self.cfg.build_hook = Some(HookCommand {
            program: script.to_path_buf(),
            args: Vec::new(),
        });
    }

    /// Takes one step (`f` acts on the goal), with the failure counts of finished waitees.
    pub fn step_with(&mut self, counts: WaiteeCounts, f: impl FnOnce(&mut Step<'_>)) -> Vec<Asked> {
        let mut step = Step::new(
            GoalId(0),
            &*self.store,
            &self.cfg,
            &mut self.services,
            counts,
        );
        f(&mut step);
        let mut asked = Vec::new();
        for r in step.into_requests() {
            asked.push(match r {
                Request::WaitFor(s) => Asked::WaitFor(s),
                Request::WakeUp => Asked::WakeUp,
                Request::WaitForBuildSlot => Asked::WaitForBuildSlot,
                Request::WaitForAnyGoal => Asked::WaitForAnyGoal,
                Request::WaitForAWhile => Asked::WaitForAWhile,
                Request::StartChild {
                    builder,
                    in_build_slot,
                    respect_timeouts,
                    ..
                } => {
                    self.children.push(builder);
                    Asked::StartChild {
                        in_build_slot,
                        respect_timeouts,
                    }
                }
                Request::LockedOutputs(p) => Asked::LockedOutputs(p),
                Request::UnlockedOutputs => Asked::UnlockedOutputs,
                Request::Failed { failure, permanent } => {
                    let kind = failure.kind;
                    self.failures.push(failure);
                    Asked::Failed { kind, permanent }
                }
                Request::Done(code) => Asked::Done(code),
            });
        }
        asked
    }

    pub fn step(&mut self, f: impl FnOnce(&mut Step<'_>)) -> Vec<Asked> {
        self.step_with(WaiteeCounts::default(), f)
    }

    /// Waits for the last child the goal started.
    pub fn wait_child(&mut self) -> ChildStatus {
        let mut c = self.children.pop().expect("the goal started a child");
        c.wait()
            .map_err(|e| crate::services::ChildError::Other(e.to_string()))
    }

    /// The message of the last failure recorded.
    pub fn last_failure(&self) -> &str {
        self.failures.last().map_or("", |f| f.message.as_str())
    }
}

/// Waitee counts: `failed` in all, of which `no_substituters` and `incomplete_closure`.
pub(crate) fn counts(failed: u32, no_substituters: u32, incomplete_closure: u32) -> WaiteeCounts {
    WaiteeCounts {
        failed,
        no_substituters,
        incomplete_closure,
    }
}
