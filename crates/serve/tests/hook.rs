//! The build hook end to end: requests on a pipe as the engine writes them, an
//! unreachable machine (real `ssh` to a closed port) passed over and named, the build
//! done by real Nix 2.8 `nix-store --serve` and its outputs imported and verified;
//! decline, postpone, and a remote failure reported as exit code 100.

mod common;

use std::collections::BTreeSet;
use std::io::Write;

use common::*;
use nixb_serve::hook::{
    format_path_list, Connector, Hook, HookOutcome, HookRequest, HookSettings, SshConnector,
};
use nixb_serve::machines::{choose_machine, parse_machines, Choice, Machine};
use nixb_serve::transport::{spawn_serving, ChildClient, ServeChild};
use nixb_serve::ServeError;

/// `ssh://nix-remote` is real Nix in a private namespace; anything else goes to real ssh.
struct TestConnector<'a> {
    world: &'a World,
    ssh: SshConnector,
    connects: Vec<String>,
}

impl Connector for TestConnector<'_> {
    fn connect(
        &mut self,
        m: &Machine,
        log: Box<dyn Write + Send>,
    ) -> Result<(ChildClient, ServeChild), ServeError> {
        self.connects.push(m.store_uri.clone());
        if m.store_uri == "ssh://nix-remote" {
            spawn_serving(
                self.world.nix_serve_command("remote"),
                &m.store_uri,
                self.world.store_dir.clone(),
                log,
            )
        } else {
            self.ssh.connect(m, log)
        }
    }
}

fn settings() -> HookSettings {
    HookSettings {
        this_system: "x86_64-linux".into(),
        max_silent_time: 0,
        print_build_trace: false,
        build_timeout: 0,
    }
}

struct Run {
    outcome: Result<HookOutcome, ServeError>,
    replies: String,
    log: String,
    connects: Vec<String>,
}

fn run_hook(w: &World, machines: Vec<Machine>, input: String) -> Run {
    let store = w.local("local");
    let log = Log::default();
    let log2 = log.clone();
    let mut mk_log = move || -> Box<dyn Write + Send> { Box::new(log2.clone()) };
    let mut conn = TestConnector {
        world: w,
        ssh: SshConnector::new(w.store_dir.clone(), vec!["-oConnectTimeout=5".into()]),
        connects: Vec::new(),
    };
    let mut replies = Vec::new();
    let outcome = Hook {
        settings: settings(),
        machines,
        state_dir: w.path("local/state"),
        store: &store,
        use_substitutes: false,
        local_features: Default::default(),
        connector: &mut conn,
        log: &mut mk_log,
    }
    .run(&mut input.as_bytes(), &mut replies);
    Run {
        outcome,
        replies: String::from_utf8(replies).unwrap(),
        log: log.text(),
        connects: conn.connects,
    }
}

fn request(w: &World, drv_path: &nixb_store::StorePath, willing: bool, system: &str) -> String {
    HookRequest {
        am_willing: willing,
        platform: system.into(),
        drv_path: w.store_dir.print(drv_path),
        required_features: BTreeSet::new(),
    }
    .to_line()
}

#[test]
fn unreachable_machine_is_skipped_and_the_build_runs_on_real_nix() {
    nixb_testsupport::require!(Nix);
    let w = World::new();
    let store = w.local("local");
    let (a, b) = add_sources(&w, &store, "hook");
    let dep = make_drv(&w, "dep", "echo dep-output > $out", &[&a], &["out"]);
    let dep_path = store.add_derivation(&dep).unwrap();
    // The dependency's output is already realised locally, as the engine guarantees
    // before it asks the hook: build it through a first hook session.
    let machines = parse_machines(
        "ssh://127.0.0.1:1 x86_64-linux - 4 10; ssh://nix-remote x86_64-linux",
        "x86_64-linux",
    )
    .unwrap();
    let dep_out = dep.output_paths()["out"].clone();
    let input = format!(
        "{}\n{}\n{}\n",
        request(&w, &dep_path, true, "x86_64-linux"),
        format_path_list([w.store_dir.print(&a).as_str()]),
        format_path_list([w.store_dir.print(&dep_out).as_str()]),
    );
    drop(store);
    let run = run_hook(&w, machines.clone(), input);
    assert_eq!(
        run.outcome.as_ref().unwrap().exit_code(),
        0,
        "{:?} {} {}",
        run.outcome,
        run.replies,
        run.log
    );
    // The fast but unreachable machine was tried first and named, with ssh's words.
    assert_eq!(run.connects, ["ssh://127.0.0.1:1", "ssh://nix-remote"]);
    assert!(
        run.replies
            .contains("cannot build on 'ssh://127.0.0.1:1': ssh://127.0.0.1:1: "),
        "{}",
        run.replies
    );
    assert!(
        run.replies.contains("Connection refused"),
        "{}",
        run.replies
    );
    assert!(run.replies.contains("# accept\n"), "{}", run.replies);

    // Now a derivation with an input derivation: the remote gets a BasicDerivation
    // whose inputs are the dependency's output.
    let store = w.local("local");
    assert!(store.is_valid_path(&dep_out).unwrap());
    let mut top = make_drv(
        &w,
        "top",
        r#"read -r x < $in0; echo "$x and $in1" > $out"#,
        &[&dep_out, &b],
        &["out"],
    );
    top.input_srcs.remove(&dep_out);
    top.input_drvs
        .insert(dep_path.clone(), BTreeSet::from(["out".to_string()]));
    for o in top.outputs.values_mut() {
        o.path = None;
    }
    top.env.remove("out");
    nixb_store::derivation::compute_output_paths(
        &w.store_dir,
        &mut top,
        &mut |p| {
            store
                .read_derivation(p)
                .map_err(|e| nixb_store::derivation::DrvError::Invalid {
                    drv: p.to_string(),
                    msg: e.to_string(),
                })
        },
        &mut nixb_store::derivation::DrvHashCache::new(),
    )
    .unwrap();
    let top_path = store.add_derivation(&top).unwrap();
    let top_out = top.output_paths()["out"].clone();
    drop(store);
    let input = format!(
        "{}\n{}\n{}\n",
        request(&w, &top_path, false, "x86_64-linux"),
        format_path_list([w.store_dir.print(&dep_out).as_str()]),
        format_path_list([w.store_dir.print(&top_out).as_str()]),
    );
    let run = run_hook(&w, machines, input);
    assert_eq!(
        run.outcome.as_ref().unwrap().exit_code(),
        0,
        "{:?} {} {}",
        run.outcome,
        run.replies,
        run.log
    );
    let store = w.local("local");
    assert_eq!(
        std::fs::read_to_string(w.store_dir.to_path(&top_out)).unwrap(),
        format!("dep-output and {}\n", w.store_dir.print(&b))
    );
    // Real Nix registered it remotely with the hash we verified on import.
    let remote_hash = w.nix_store("remote", &["-q", "--hash", &w.store_dir.print(&top_out)]);
    assert_eq!(
        remote_hash.trim(),
        store
            .query_path_info(&top_out)
            .unwrap()
            .unwrap()
            .nar_hash
            .to_base32_typed()
    );
    // It names b but only holds the contents of dep's output, not its path.
    assert_eq!(
        store.query_references(&top_out).unwrap(),
        BTreeSet::from([b.clone()])
    );
}

#[test]
fn decline_postpone_and_the_request_loop() {
    let w = World::new();
    let store = w.local("local");
    let drv = make_drv(&w, "x", "echo > $out", &[], &["out"]);
    let drv_path = store.add_derivation(&drv).unwrap();
    drop(store);
    let machines = parse_machines("ssh://nix-remote x86_64-linux - 1", "x86_64-linux").unwrap();
    // Hold the machine's only slot, as another hook process building there would.
    let held = match choose_machine(
        &machines,
        "x86_64-linux",
        &BTreeSet::new(),
        &w.path("local/state"),
        &BTreeSet::new(),
    )
    .unwrap()
    {
        Choice::Machine(0, s) => s,
        c => panic!("{c:?}"),
    };
    let input = format!(
        "{}\n{}\n{}\n",
        request(&w, &drv_path, false, "aarch64-linux"), // nobody builds that: decline
        request(&w, &drv_path, false, "x86_64-linux"), // busy, and we cannot build locally: postpone
        request(&w, &drv_path, true, "x86_64-linux"),  // busy, but a local slot is free: decline
    );
    let run = run_hook(&w, machines, input);
    assert_eq!(run.outcome.unwrap(), HookOutcome::NoneAccepted);
    // The first is declined with Nix's report, since no machine and not this one (another
    // system) can build it.
    let base = drv_path.base_name();
    assert_eq!(
        run.replies,
        format!(
            "Failed to find a machine for remote build!\nderivation: {base}\n\
             required (system, features): (aarch64-linux, )\n1 available machines:\n\
             (systems, maxjobs, supportedFeatures, mandatoryFeatures)\n\
             (x86_64-linux, 1, , )\n# decline\n# postpone\n# decline\n"
        )
    );
    assert!(run.connects.is_empty());
    drop(held);
}

#[test]
fn a_remote_build_failure_exits_100_with_the_log() {
    nixb_testsupport::require!(Nix);
    let w = World::new();
    let store = w.local("local");
    let drv = make_drv(
        &w,
        "fails",
        "echo remote-failure-detail >&2; exit 1",
        &[],
        &["out"],
    );
    let drv_path = store.add_derivation(&drv).unwrap();
    let out = drv.output_paths()["out"].clone();
    drop(store);
    let machines = parse_machines("ssh://nix-remote x86_64-linux", "x86_64-linux").unwrap();
    let input = format!(
        "{}\n\n{}\n",
        request(&w, &drv_path, false, "x86_64-linux"),
        format_path_list([w.store_dir.print(&out).as_str()])
    );
    let run = run_hook(&w, machines, input);
    let outcome = run.outcome.unwrap();
    assert_eq!(outcome.exit_code(), 100, "{outcome:?}");
    match outcome {
        HookOutcome::BuildFailed {
            machine, message, ..
        } => {
            assert_eq!(machine, "ssh://nix-remote");
            assert!(message.contains("failed with exit code 1"), "{message}");
            assert!(!message.contains('\u{1b}'), "{message:?}");
        }
        o => panic!("{o:?}"),
    }
    assert!(run.log.contains("remote-failure-detail"), "{}", run.log);
    assert!(!w.local("local").is_valid_path(&out).unwrap());
}
