//! Output locks held by someone else: the worker polls (build-poll-interval) and, once it
//! gets the lock, uses what the other party built instead of building again.

mod common;

use std::collections::BTreeSet;

use common::*;
use nixb_goals::Event;
use nixb_store::locks::PathLocks;

#[test]
fn waits_for_a_foreign_lock_then_builds() {
    let t = TestStore::new();
    let drv = t.add_drv(spec("locked", "echo built > $out"));
    let out = t.real(&t.out(&drv));
    // Another holder of the output lock (a separate open file description, so it conflicts
    // with the worker's own attempt exactly as another process's would).
    let lock = PathLocks::lock(std::slice::from_ref(&out), false, None)
        .unwrap()
        .expect("lock is free");
    // Released only once the worker says it is waiting for it.
    let mut lock = Some(lock);
    let (outcome, events) = realise_drvs_acting(&t.store, &[&drv], &t.cfg, |e| {
        if matches!(e, Event::WaitingForLocks) {
            lock.take();
        }
    });
    assert_eq!(outcome.exit_status, 0, "{:?}", outcome.failures);
    assert!(lock.is_none(), "the worker never said it was waiting");
    let waited = events
        .iter()
        .position(|e| matches!(e, Event::WaitingForLocks))
        .unwrap();
    let built = events
        .iter()
        .position(|e| matches!(e, Event::BuildStarted { .. }))
        .expect("built once the lock was free");
    assert!(waited < built, "{events:?}");
    assert_eq!(started(&events), vec![drv.clone()]);
}

#[test]
fn someone_beat_us_to_it() {
    let t = TestStore::new();
    let drv = t.add_drv(spec("raced", "echo mine > $out"));
    let out_path = t.out(&drv);
    let out = t.real(&out_path);
    let lock = PathLocks::lock(std::slice::from_ref(&out), false, None)
        .unwrap()
        .expect("lock is free");
    // The other party builds and registers the output while holding the lock.
    std::fs::write(&out, "theirs\n").unwrap();
    let (hash, size) = nixb_store::nar::hash_path(&out, nixb_store::HashAlgo::Sha256).unwrap();
    // Once the worker waits for the lock, the other party registers and lets go.
    let mut lock = Some(lock);
    let (outcome, events) = realise_drvs_acting(&t.store, &[&drv], &t.cfg, |e| {
        if matches!(e, Event::WaitingForLocks) && lock.is_some() {
            BuildStore::register_outputs(
                &t.store,
                &[nixb_goals::NewOutput {
                    path: out_path.clone(),
                    nar_hash: hash.clone(),
                    nar_size: size,
                    references: BTreeSet::new(),
                    deriver: drv.clone(),
                    ca: None,
                }],
            )
            .unwrap();
            lock.take();
        }
    });
    assert_eq!(outcome.exit_status, 0, "{:?}", outcome.failures);
    assert!(lock.is_none(), "the worker never said it was waiting");
    assert!(
        started(&events).is_empty(),
        "built although the output became valid"
    );
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "theirs\n");
}

#[test]
fn existing_homeless_shelter_refuses_the_build() {
    let t = TestStore::new();
    let drv = t.add_drv(spec("pure", "echo > $out"));
    let mut cfg = t.cfg.clone();
    cfg.homeless_shelter = t.root().join("home");
    std::fs::create_dir(&cfg.homeless_shelter).unwrap();
    let (outcome, events) = t.realise_with(&[&drv], &cfg);
    assert_eq!(outcome.exit_status, 1);
    assert!(started(&events).is_empty());
    assert_eq!(
        outcome.failures[0].message,
        format!(
            "home directory '{}' exists; please remove it to assure purity of builds without sandboxing",
            cfg.homeless_shelter.display()
        )
    );
    assert_eq!(std::fs::read_dir(&cfg.build_dir_root).unwrap().count(), 0);
}

#[test]
fn max_jobs_bounds_concurrent_builders() {
    let t = TestStore::new();
    let (r, c) = (t.root().display().to_string(), "running");
    // Each builder counts itself in, records the peak, waits, counts itself out.
    let script = format!(
        "/usr/bin/flock {r}/lk /bin/sh -c 'n=$(/bin/cat {r}/{c} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {r}/{c}; \
         echo $n >> {r}/peaks'; /bin/sleep 0.3; \
         /usr/bin/flock {r}/lk /bin/sh -c 'n=$(/bin/cat {r}/{c}); echo $((n-1)) > {r}/{c}'; echo > $out"
    );
    let drvs: Vec<_> = (0..5)
        .map(|i| t.add_drv(spec(&format!("p{i}"), &script)))
        .collect();
    let mut cfg = t.cfg.clone();
    cfg.max_jobs = 2;
    let refs: Vec<_> = drvs.iter().collect();
    let (outcome, _) = t.realise_with(&refs, &cfg);
    assert_eq!(outcome.exit_status, 0, "{:?}", outcome.failures);
    let peaks: Vec<u32> = std::fs::read_to_string(t.root().join("peaks"))
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(peaks.len(), 5);
    assert_eq!(*peaks.iter().max().unwrap(), 2, "{peaks:?}");
}
