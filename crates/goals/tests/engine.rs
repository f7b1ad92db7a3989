//! The shared engine: requests from several threads join one scheduler thread, in a real
//! store with `/bin/sh` builders.

mod common;

use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use nixb_goals::{BuildStore, Engine, Event, EventSink, RequestOptions};
use nixb_store::local_store::LocalStore;
use nixb_store::{DerivedPath, StorePath};

/// A sink handing each event to the test thread, which blocks on it instead of sleeping.
struct Forward(mpsc::Sender<Event>);

impl EventSink for Forward {
    fn event(&mut self, e: Event) {
        let _ = self.0.send(e);
    }
}

fn sink() -> (Box<dyn EventSink + Send>, mpsc::Receiver<Event>) {
    let (tx, rx) = mpsc::channel();
    (Box::new(Forward(tx)), rx)
}

fn built(drv: &StorePath) -> DerivedPath {
    DerivedPath::Built {
        drv: drv.clone(),
        outputs: vec![],
    }
}

struct Setup {
    tmp: tempfile::TempDir,
    store: Arc<LocalStore>,
    engine: Engine,
    system: String,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(local_store(tmp.path()));
    let mut cfg = worker_config(tmp.path());
    cfg.max_jobs = 4;
    let system = cfg.system.clone();
    let shared: Arc<dyn BuildStore + Send + Sync> = store.clone();
    let engine = Engine::start(shared, cfg).unwrap();
    Setup {
        tmp,
        store,
        engine,
        system,
    }
}

fn out_of(s: &Setup, drv: &StorePath) -> StorePath {
    s.store.read_derivation(drv).unwrap().output_paths()["out"].clone()
}

/// Two requests from two threads need one derivation: it is built once, and both get
/// its result and the events of its build.
#[test]
fn two_requests_share_one_build() {
    let s = setup();
    let count = s.tmp.path().join("count");
    let c = count.display();
    let sleep = ["/bin/sleep", "/usr/bin/sleep"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap();
    // Says it waits until the test releases it, so that the second request comes while
    // it builds.
    let release = s.tmp.path().join("release");
    let r = release.display();
    let script = format!(
        "echo shared >> {c}; while [ ! -e {r} ]; do echo waiting; {sleep} 0.05; done; echo s > $out"
    );
    let shared = add_local_drv(&s.store, spec("shared", &script), &s.system);
    let (sa, ea) = sink();
    let (sb, eb) = sink();
    let a = s
        .engine
        .submit(vec![built(&shared)], RequestOptions::default(), sa);
    let started = |e: &Event| matches!(e, Event::BuildStarted { drv, .. } if *drv == shared);
    assert!(ea.iter().any(|e| started(&e)), "the build started");
    let b = s
        .engine
        .submit(vec![built(&shared)], RequestOptions::default(), sb);
    // The second request has joined once it is shown the running build's log.
    let is_log = |e: &Event| matches!(e, Event::BuildLog { drv, .. } if *drv == shared);
    assert!(eb.iter().any(|e| is_log(&e)), "b sees the build's log");
    std::fs::write(&release, "").unwrap();
    let (ra, rb) = (a.wait().unwrap(), b.wait().unwrap());
    assert_eq!((ra.exit_status, rb.exit_status), (0, 0));
    let out = out_of(&s, &shared);
    assert_eq!(ra.outputs[0].1["out"], out);
    assert_eq!(rb.outputs[0].1["out"], out);
    assert_eq!(std::fs::read_to_string(&count).unwrap(), "shared\n");
    // The second request joined the running build: it sees it succeed.
    let b_events: Vec<Event> = eb.try_iter().collect();
    assert!(
        b_events.contains(&Event::BuildSucceeded {
            drv: shared.clone()
        }),
        "{b_events:?}"
    );
}

/// A request for nothing is answered at once, with nothing.
#[test]
fn an_empty_request_is_done_at_once() {
    let s = setup();
    let (sk, _) = sink();
    let r = s
        .engine
        .submit(Vec::new(), RequestOptions::default(), sk)
        .wait()
        .unwrap();
    assert_eq!(r.exit_status, 0);
    assert!(r.outputs.is_empty() && r.failures.is_empty());
}

fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !matches!(
            stat.rsplit_once(") ").and_then(|(_, r)| r.chars().next()),
            Some('Z') | Some('X')
        ),
        Err(_) => false,
    }
}

/// Dropping a job stops the build only it wanted; the engine goes on serving.
#[test]
fn dropping_a_job_kills_its_builder_and_registers_nothing() {
    let s = setup();
    let sleep = ["/bin/sleep", "/usr/bin/sleep"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap();
    let slow = add_local_drv(
        &s.store,
        spec("slow", &format!("echo $$; {sleep} 60; echo > $out")),
        &s.system,
    );
    let (sk, events) = sink();
    let job = s
        .engine
        .submit(vec![built(&slow)], RequestOptions::default(), sk);
    // The builder's first words are its pid.
    let pid: i32 = loop {
        match events.recv().unwrap() {
            Event::BuildLog { chunk, .. } => {
                break String::from_utf8(chunk).unwrap().trim().parse().unwrap()
            }
            _ => continue,
        }
    };
    assert!(alive(pid));
    drop(job);
    let deadline = Instant::now() + Duration::from_secs(60);
    while alive(pid) {
        assert!(Instant::now() < deadline, "the builder still runs");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The engine still serves: a quick build goes through, and the slow output is
    // neither valid nor on disk.
    let quick = add_local_drv(&s.store, spec("quick", "echo q > $out"), &s.system);
    let (sq, _) = sink();
    let r = s
        .engine
        .submit(vec![built(&quick)], RequestOptions::default(), sq)
        .wait()
        .unwrap();
    assert_eq!(r.exit_status, 0);
    let slow_out = out_of(&s, &slow);
    assert!(!s.store.is_valid_path(&slow_out).unwrap());
    assert!(!s.store.store_dir().to_path(&slow_out).exists());
}
