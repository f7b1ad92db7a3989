//! Remote builds over real SSH: the test makes a network namespace joined to the host by
//! a veth pair, starts Debian's `sshd` in it on the namespace's address (generated host
//! key, an authorized test key, a forced command that runs real Nix 2.8
//! `nix-store --serve --write` against a private store), and has the build hook pick
//! that machine from a machines line with its key and base64 host key, copy the inputs,
//! build, and bring the output back. Needs root, `ip` and `sshd` (the namespace and sshd
//! are `common::netns`, shared with the engine-level tests in tests/tests/remote_netns.rs).

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;

use common::netns::{self, SshHost};
use common::*;
use nixb_serve::hook::{
    format_path_list, Hook, HookOutcome, HookRequest, HookSettings, SshConnector,
};
use nixb_serve::machines::parse_machines;

#[test]
fn hook_builds_on_real_nix_over_real_ssh_in_a_network_namespace() {
    nixb_testsupport::require!(Nix);
    if !netns::can_run() {
        return;
    }
    let w = World::new();
    // The forced command: real nix-store on the remote's private store, recording
    // what the client asked to run.
    let phys = w.remote_phys("remote");
    std::fs::create_dir_all(&phys).unwrap();
    let etc = w.path("remote/etc");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(
        etc.join("nix.conf"),
        "sandbox = false\nbuild-users-group =\nsubstituters =\n",
    )
    .unwrap();
    let forced = w.path("remote-nix-store");
    std::fs::write(
        &forced,
        format!(
            "#!/bin/sh\necho \"$SSH_ORIGINAL_COMMAND\" >> {cmdlog}\nexport NIX_STORE_DIR={store} NIX_STATE_DIR={root}/remote/state NIX_LOG_DIR={root}/remote/log NIX_CONF_DIR={root}/remote/etc\nexec unshare --mount --propagation private sh -c 'mount --bind \"$1\" \"$2\" && exec nix-store --serve --write' sh {phys} {store}\n",
            cmdlog = w.path("commands.log").display(),
            store = w.store_dir.as_str(),
            root = w.root.path().display(),
            phys = phys.display(),
        ),
    )
    .unwrap();
    std::fs::set_permissions(&forced, std::fs::Permissions::from_mode(0o755)).unwrap();
    let host = SshHost::start(&w.path("host"), &forced);

    // A build for the hook, its input in the local store.
    let store = w.local("local");
    let (a, _b) = add_sources(&w, &store, "ssh");
    let drv = make_drv(
        &w,
        "over-ssh",
        r#"echo over-ssh-log >&2; read -r x < $in0/data; echo "$x via ssh" > $out"#,
        &[&a],
        &["out"],
    );
    let drv_path = store.add_derivation(&drv).unwrap();
    let out = drv.output_paths()["out"].clone();

    let line = host.machines_line("x86_64-linux", 1, 1, "-");
    let machines = parse_machines(&line, "x86_64-linux").unwrap();
    let log = Log::default();
    let log2 = log.clone();
    let mut mk_log = move || -> Box<dyn Write + Send> { Box::new(log2.clone()) };
    // -F /dev/null: nothing from the user's ssh configuration; the host key is pinned
    // by the machines line alone.
    let mut conn = SshConnector::new(w.store_dir.clone(), vec!["-F".into(), "/dev/null".into()]);
    let request = HookRequest {
        am_willing: false,
        platform: "x86_64-linux".into(),
        drv_path: w.store_dir.print(&drv_path),
        required_features: BTreeSet::new(),
    };
    let input = format!(
        "{}\n{}\n{}\n",
        request.to_line(),
        format_path_list([w.store_dir.print(&a).as_str()]),
        format_path_list([w.store_dir.print(&out).as_str()])
    );
    let mut replies = Vec::new();
    let outcome = Hook {
        settings: HookSettings {
            this_system: "x86_64-linux".into(),
            max_silent_time: 0,
            print_build_trace: false,
            build_timeout: 0,
        },
        machines,
        state_dir: w.path("local/state"),
        store: &store,
        use_substitutes: false,
        local_features: Default::default(),
        connector: &mut conn,
        log: &mut mk_log,
    }
    .run(&mut input.as_bytes(), &mut replies);
    let replies = String::from_utf8(replies).unwrap();
    let outcome = outcome.unwrap_or_else(|e| {
        panic!(
            "{e}\nreplies: {replies}\nlog: {}\nsshd: {}",
            log.text(),
            host.sshd_log()
        )
    });
    assert!(
        matches!(outcome, HookOutcome::Built { .. }),
        "{outcome:?} {replies} {}",
        log.text()
    );
    assert!(replies.starts_with("# accept\n"), "{replies}");
    assert!(log.text().contains("over-ssh-log"), "{}", log.text());
    assert_eq!(
        std::fs::read_to_string(w.store_dir.to_path(&out)).unwrap(),
        "payload ssh via ssh\n"
    );
    let commands = std::fs::read_to_string(w.path("commands.log")).unwrap();
    assert_eq!(commands.trim(), "nix-store --serve --write");
    let remote_hash = w.nix_store("remote", &["-q", "--hash", &w.store_dir.print(&out)]);
    assert_eq!(
        remote_hash.trim(),
        store
            .query_path_info(&out)
            .unwrap()
            .unwrap()
            .nar_hash
            .to_base32_typed()
    );
    drop(host);
}
