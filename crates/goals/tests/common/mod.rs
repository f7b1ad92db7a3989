//! A private store in a temp dir, derivations written with the store crate's own
//! derivation code, and a shortcut to realise them.
//!
//! The validity database here is [`MemStore`], an in-memory [`BuildStore`]: the engine only
//! talks to the store through that trait, and keeping the double tiny makes what the engine
//! does (and registers) easy to inspect.

#![allow(dead_code)]

pub mod oracle;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

pub use nixb_goals::BuildStore;
use nixb_goals::{
    realise, Event, NewOutput, PathInfo, RealiseOutcome, StoreFault, VecSink, WorkerConfig,
};
use nixb_store::derivation::{
    compute_output_paths, Derivation, DerivationOutput, DrvHashCache, FixedOutputHash,
};
use nixb_store::local_store::{LocalStore, StoreConfig};
use nixb_store::{DerivedPath, HashAlgo, StoreDir, StorePath};

/// Valid paths and failed paths in memory; files in a real store directory.
pub struct MemStore {
    dir: StoreDir,
    valid: Mutex<BTreeMap<StorePath, PathInfo>>,
    failed: Mutex<BTreeSet<StorePath>>,
    /// How often each derivation was read through `read_derivation`.
    drv_reads: Mutex<BTreeMap<StorePath, usize>>,
}

fn fault(e: impl std::fmt::Display) -> StoreFault {
    StoreFault(e.to_string())
}

impl MemStore {
    pub fn open(dir: StoreDir) -> MemStore {
        std::fs::create_dir_all(dir.as_path()).unwrap();
        MemStore {
            dir,
            valid: Mutex::new(BTreeMap::new()),
            failed: Mutex::new(BTreeSet::new()),
            drv_reads: Mutex::new(BTreeMap::new()),
        }
    }

    /// The `read_derivation` calls per derivation since the last call of this.
    pub fn take_drv_reads(&self) -> BTreeMap<StorePath, usize> {
        std::mem::take(&mut *self.drv_reads.lock().unwrap())
    }

    /// The content address registered for `p`.
    pub fn ca(&self, p: &StorePath) -> Option<String> {
        self.valid.lock().unwrap().get(p).and_then(|i| i.ca.clone())
    }

    pub fn add_text_to_store(
        &self,
        name: &str,
        contents: &[u8],
        refs: &BTreeSet<StorePath>,
    ) -> Result<StorePath, StoreFault> {
        let p = self
            .dir
            .make_text_path(name, contents, refs)
            .map_err(fault)?;
        let real = self.dir.to_path(&p);
        if !real.exists() {
            std::fs::write(&real, contents).map_err(fault)?;
        }
        let (nar_hash, nar_size) =
            nixb_store::nar::hash_path(&real, HashAlgo::Sha256).map_err(fault)?;
        let info = PathInfo {
            nar_hash,
            nar_size,
            references: refs.clone(),
            deriver: None,
            // As Nix records a text path (builtins.toFile, a .drv).
            ca: Some(format!(
                "text:{}",
                nixb_store::Hash::digest(HashAlgo::Sha256, contents)
            )),
        };
        self.valid.lock().unwrap().insert(p.clone(), info);
        Ok(p)
    }

    /// Adds the file or directory `src` as `nix-store --add` does (a source path).
    pub fn add_source(&self, name: &str, src: &Path) -> Result<StorePath, StoreFault> {
        let (nar_hash, nar_size) =
            nixb_store::nar::hash_path(src, HashAlgo::Sha256).map_err(fault)?;
        let p = self
            .dir
            .make_source_path(name, &nar_hash, [], false)
            .map_err(fault)?;
        let real = self.dir.to_path(&p);
        if !real.exists() {
            let status = std::process::Command::new("cp")
                .arg("-a")
                .arg(src)
                .arg(&real)
                .status()
                .map_err(fault)?;
            if !status.success() {
                return Err(fault(format!("cp -a {} failed", src.display())));
            }
        }
        let info = PathInfo {
            ca: Some(format!("fixed:r:{nar_hash}")),
            nar_hash,
            nar_size,
            references: BTreeSet::new(),
            deriver: None,
        };
        self.valid.lock().unwrap().insert(p.clone(), info);
        Ok(p)
    }

    pub fn add_derivation(&self, drv: &Derivation) -> Result<StorePath, StoreFault> {
        let name = format!("{}.drv", drv.name().map_err(fault)?);
        self.add_text_to_store(&name, drv.to_aterm(&self.dir).as_bytes(), &drv.references())
    }
}

impl BuildStore for MemStore {
    fn store_dir(&self) -> &StoreDir {
        &self.dir
    }
    fn is_valid_path(&self, p: &StorePath) -> Result<bool, StoreFault> {
        Ok(self.valid.lock().unwrap().contains_key(p))
    }
    fn query_path_info(&self, p: &StorePath) -> Result<Option<PathInfo>, StoreFault> {
        Ok(self.valid.lock().unwrap().get(p).cloned())
    }
    fn query_references(&self, p: &StorePath) -> Result<BTreeSet<StorePath>, StoreFault> {
        Ok(self
            .valid
            .lock()
            .unwrap()
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
        *self
            .drv_reads
            .lock()
            .unwrap()
            .entry(drv.clone())
            .or_default() += 1;
        Derivation::read(&self.dir, &self.dir.to_path(drv)).map_err(fault)
    }
    fn register_outputs(&self, outputs: &[NewOutput]) -> Result<(), StoreFault> {
        let mut v = self.valid.lock().unwrap();
        for o in outputs {
            let info = PathInfo {
                nar_hash: o.nar_hash.clone(),
                nar_size: o.nar_size,
                references: o.references.clone(),
                deriver: Some(o.deriver.clone()),
                ca: o.ca.clone(),
            };
            v.insert(o.path.clone(), info);
        }
        Ok(())
    }
    fn has_path_failed(&self, p: &StorePath) -> Result<bool, StoreFault> {
        Ok(self.failed.lock().unwrap().contains(p))
    }
    fn register_failed_path(&self, p: &StorePath) -> Result<(), StoreFault> {
        self.failed.lock().unwrap().insert(p.clone());
        Ok(())
    }
    fn add_temp_root(&self, _p: &StorePath) -> Result<(), StoreFault> {
        Ok(())
    }
}

pub struct TestStore {
    pub tmp: tempfile::TempDir,
    pub store: MemStore,
    pub cfg: WorkerConfig,
}

/// A derivation under construction.
pub struct DrvSpec {
    pub name: String,
    pub script: String,
    pub outputs: Vec<String>,
    pub input_drvs: Vec<(StorePath, Vec<String>)>,
    pub input_srcs: Vec<StorePath>,
    pub env: Vec<(String, String)>,
    pub fixed: Option<FixedOutputHash>,
    pub builder: String,
}

pub fn spec(name: &str, script: &str) -> DrvSpec {
    DrvSpec {
        name: name.into(),
        script: script.into(),
        outputs: vec!["out".into()],
        input_drvs: vec![],
        input_srcs: vec![],
        env: vec![],
        fixed: None,
        builder: "/bin/sh".into(),
    }
}

impl DrvSpec {
    pub fn input(mut self, drv: &StorePath, outs: &[&str]) -> Self {
        self.input_drvs
            .push((drv.clone(), outs.iter().map(|s| s.to_string()).collect()));
        self
    }
    pub fn src(mut self, p: &StorePath) -> Self {
        self.input_srcs.push(p.clone());
        self
    }
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }
    pub fn outputs(mut self, outs: &[&str]) -> Self {
        self.outputs = outs.iter().map(|s| s.to_string()).collect();
        self
    }
    pub fn builder(mut self, program: &str) -> Self {
        self.builder = program.into();
        self
    }
    pub fn fixed(mut self, recursive: bool, hash: nixb_store::Hash) -> Self {
        self.fixed = Some(FixedOutputHash { recursive, hash });
        self
    }

    /// The derivation for `system`, its output paths computed; `store` gives the input
    /// derivations.
    pub fn derivation(self, store: &dyn BuildStore, system: &str) -> Derivation {
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        env.insert("name".into(), self.name.clone());
        env.insert("builder".into(), self.builder.clone());
        env.insert("system".into(), system.to_string());
        for (k, v) in self.env {
            env.insert(k, v);
        }
        let mut outputs = BTreeMap::new();
        for o in &self.outputs {
            env.insert(o.clone(), String::new());
            outputs.insert(
                o.clone(),
                DerivationOutput {
                    path: None,
                    fixed: self.fixed.clone(),
                },
            );
        }
        let mut drv = Derivation {
            outputs,
            input_drvs: self
                .input_drvs
                .into_iter()
                .map(|(p, o)| (p, o.into_iter().collect::<BTreeSet<_>>()))
                .collect(),
            input_srcs: self.input_srcs.into_iter().collect(),
            platform: system.to_string(),
            builder: self.builder,
            args: vec!["-c".into(), self.script],
            env,
        };
        compute_output_paths(
            store.store_dir(),
            &mut drv,
            &mut |p| {
                store
                    .read_derivation(p)
                    .map_err(|e| nixb_store::derivation::DrvError::Invalid {
                        drv: p.to_string(),
                        msg: e.to_string(),
                    })
            },
            &mut DrvHashCache::new(),
        )
        .expect("compute output paths");
        drv
    }
}

/// The real SQLite store under `root` (`store`, `state`, `log`).
pub fn local_store(root: &Path) -> LocalStore {
    LocalStore::open(StoreConfig {
        store_dir: StoreDir::new(root.join("store").to_str().unwrap()).unwrap(),
        state_dir: root.join("state"),
        log_dir: root.join("log"),
    })
    .unwrap()
}

/// Writes the derivation into the real store `store` and returns its path.
pub fn add_local_drv(store: &LocalStore, s: DrvSpec, system: &str) -> StorePath {
    store.add_derivation(&s.derivation(store, system)).unwrap()
}

/// The worker's settings for tests under `root`: logs in `log`, build directories in
/// `build`, no impure environment, a quick poll for locks held elsewhere.
pub fn worker_config(root: &Path) -> WorkerConfig {
    let mut cfg = WorkerConfig::new(root.join("log"));
    cfg.build_dir_root = root.join("build");
    std::fs::create_dir_all(&cfg.build_dir_root).unwrap();
    cfg.impure_env = BTreeMap::new();
    cfg.build_poll_interval = Duration::from_millis(100);
    cfg
}

/// Realises every output of each of `drvs` in `store`, with the events reported.
pub fn realise_drvs(
    store: &dyn BuildStore,
    drvs: &[&StorePath],
    cfg: &WorkerConfig,
) -> (RealiseOutcome, Vec<Event>) {
    let targets: Vec<DerivedPath> = drvs
        .iter()
        .map(|d| DerivedPath::Built {
            drv: (*d).clone(),
            outputs: vec![],
        })
        .collect();
    let mut sink = VecSink::default();
    let outcome = realise(store, &targets, cfg, &mut sink).expect("realise");
    (outcome, sink.0)
}

/// Realises every output of each of `drvs`, calling `on_event` with each event as the
/// worker reports it (so a test can act at a precise point of the run instead of after a
/// fixed delay), and returns the outcome and all events.
pub fn realise_drvs_acting(
    store: &dyn BuildStore,
    drvs: &[&StorePath],
    cfg: &WorkerConfig,
    on_event: impl FnMut(&Event),
) -> (RealiseOutcome, Vec<Event>) {
    struct Acting<F> {
        events: Vec<Event>,
        on_event: F,
    }
    impl<F: FnMut(&Event)> nixb_goals::EventSink for Acting<F> {
        fn event(&mut self, e: Event) {
            (self.on_event)(&e);
            self.events.push(e);
        }
    }
    let targets: Vec<DerivedPath> = drvs
        .iter()
        .map(|d| DerivedPath::Built {
            drv: (*d).clone(),
            outputs: vec![],
        })
        .collect();
    let mut sink = Acting {
        events: Vec::new(),
        on_event,
    };
    let outcome = realise(store, &targets, cfg, &mut sink).expect("realise");
    (outcome, sink.events)
}

/// Makes everything under `dir` writable (store paths are read-only) and removes it.
pub fn remove_tree(dir: &Path) {
    if !dir.exists() {
        return;
    }
    let ok = std::process::Command::new("chmod")
        .args(["-R", "u+w"])
        .arg(dir)
        .status()
        .unwrap()
        .success();
    assert!(ok, "chmod -R u+w {}", dir.display());
    std::fs::remove_dir_all(dir).unwrap();
}

impl TestStore {
    pub fn new() -> TestStore {
        Self::at(tempfile::tempdir().expect("temp dir"))
    }

    /// A store under `tmp` (which may already hold one, e.g. made by another process).
    pub fn at(tmp: tempfile::TempDir) -> TestStore {
        let root = tmp.path();
        let store_dir = StoreDir::new(root.join("store").to_str().unwrap()).unwrap();
        let store = MemStore::open(store_dir);
        let cfg = worker_config(root);
        TestStore { tmp, store, cfg }
    }

    pub fn dir(&self) -> &StoreDir {
        self.store.store_dir()
    }

    pub fn root(&self) -> &Path {
        self.tmp.path()
    }

    /// The absolute file name of a store path.
    pub fn real(&self, p: &StorePath) -> PathBuf {
        self.dir().to_path(p)
    }

    pub fn print(&self, p: &StorePath) -> String {
        self.dir().print(p)
    }

    /// Writes the derivation into the store and returns its path.
    pub fn add_drv(&self, s: DrvSpec) -> StorePath {
        let drv = s.derivation(&self.store, &self.cfg.system);
        self.store.add_derivation(&drv).expect("add derivation")
    }

    pub fn add_text(&self, name: &str, text: &str) -> StorePath {
        self.store
            .add_text_to_store(name, text.as_bytes(), &BTreeSet::new())
            .expect("add text")
    }

    pub fn outputs(&self, drv: &StorePath) -> BTreeMap<String, StorePath> {
        self.store.read_derivation(drv).unwrap().output_paths()
    }

    pub fn out(&self, drv: &StorePath) -> StorePath {
        self.outputs(drv)["out"].clone()
    }

    pub fn realise(&self, drvs: &[&StorePath]) -> (RealiseOutcome, Vec<Event>) {
        self.realise_with(drvs, &self.cfg)
    }

    pub fn realise_with(
        &self,
        drvs: &[&StorePath],
        cfg: &WorkerConfig,
    ) -> (RealiseOutcome, Vec<Event>) {
        realise_drvs(&self.store, drvs, cfg)
    }
}

/// All log bytes reported for `drv`, as text.
pub fn log_of(events: &[Event], drv: &StorePath) -> String {
    let mut s = Vec::new();
    for e in events {
        if let Event::BuildLog { drv: d, chunk } = e {
            if d == drv {
                s.extend_from_slice(chunk);
            }
        }
    }
    String::from_utf8_lossy(&s).into_owned()
}

pub fn started(events: &[Event]) -> Vec<StorePath> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::BuildStarted { drv, .. } => Some(drv.clone()),
            _ => None,
        })
        .collect()
}
