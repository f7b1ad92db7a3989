//! Remote builds over real SSH: the test makes a network namespace joined to the host by
//! a veth pair, starts Debian's `sshd` in it on the namespace's address (generated host
//! key, an authorized test key, a forced command that runs real Nix 2.8
//! `nix-store --serve --write` against a private store), and has the build hook pick
//! that machine from a machines line with its key and base64 host key, copy the inputs,
//! build, and bring the output back. Needs root, `ip` and `sshd`.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use nixb_serve::hook::{
    format_path_list, Hook, HookOutcome, HookRequest, HookSettings, SshConnector,
};
use nixb_serve::machines::parse_machines;

fn can_run() -> bool {
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let tools = ["ip", "/usr/sbin/sshd", "ssh-keygen"].iter().all(|t| {
        Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    });
    if root && tools && have_nix() {
        return true;
    }
    let why = format!("needs root ({root}), ip/sshd/ssh-keygen ({tools}) and nix");
    if std::env::var("CI").map(|v| v == "true").unwrap_or(false) {
        panic!("netns ssh test {why}");
    }
    eprintln!("skipping: {why}");
    false
}

fn run(cmd: &mut Command) {
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The namespace, its veth pair and sshd; all torn down on drop.
struct TestHost {
    ns: String,
    sshd: Option<Child>,
}

impl Drop for TestHost {
    fn drop(&mut self) {
        if let Some(mut c) = self.sshd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Deleting the namespace also deletes the veth end inside it, and so its peer.
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

#[test]
fn hook_builds_on_real_nix_over_real_ssh_in_a_network_namespace() {
    if !can_run() {
        return;
    }
    let w = World::new();
    let pid = std::process::id();
    let ns = format!("nixb-serve-{pid}");
    let (veth_host, veth_ns) = (
        format!("nxs{}h", pid % 100000),
        format!("nxs{}n", pid % 100000),
    );
    let net = format!("10.231.{}", pid % 250);
    let (host_ip, ns_ip) = (format!("{net}.1"), format!("{net}.2"));
    let mut host = TestHost {
        ns: ns.clone(),
        sshd: None,
    };
    run(Command::new("ip").args(["netns", "add", &ns]));
    run(Command::new("ip").args([
        "link", "add", &veth_host, "type", "veth", "peer", "name", &veth_ns,
    ]));
    run(Command::new("ip").args(["link", "set", &veth_ns, "netns", &ns]));
    run(Command::new("ip").args(["addr", "add", &format!("{host_ip}/30"), "dev", &veth_host]));
    run(Command::new("ip").args(["link", "set", &veth_host, "up"]));
    run(Command::new("ip").args([
        "-n",
        &ns,
        "addr",
        "add",
        &format!("{ns_ip}/30"),
        "dev",
        &veth_ns,
    ]));
    run(Command::new("ip").args(["-n", &ns, "link", "set", &veth_ns, "up"]));
    run(Command::new("ip").args(["-n", &ns, "link", "set", "lo", "up"]));

    // Keys: the host's, and the client's authorized one.
    let keys = w.path("keys");
    std::fs::create_dir_all(&keys).unwrap();
    for k in ["host", "client"] {
        run(Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", k, "-f"])
            .arg(keys.join(k)));
    }
    std::fs::copy(keys.join("client.pub"), keys.join("authorized_keys")).unwrap();
    let host_pub = std::fs::read_to_string(keys.join("host.pub")).unwrap();

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
    let config = w.path("sshd_config");
    std::fs::write(
        &config,
        format!(
            "ListenAddress {ns_ip}:2222\nHostKey {keys}/host\nAuthorizedKeysFile {keys}/authorized_keys\nPidFile none\nStrictModes no\nUsePAM no\nPermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nForceCommand {forced}\n",
            keys = keys.display(),
            forced = forced.display(),
        ),
    )
    .unwrap();
    // sshd wants /run/sshd; give it a private /run instead of touching the host's.
    let sshd_log = std::fs::File::create(w.path("sshd.log")).unwrap();
    host.sshd = Some(
        Command::new("ip")
            .args(["netns", "exec", &ns, "unshare", "--mount", "--propagation", "private", "sh", "-c"])
            .arg(r#"mount -t tmpfs tmpfs /run && mkdir -m 755 /run/sshd && exec /usr/sbin/sshd -D -e -f "$1""#)
            .arg("sh")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(sshd_log)
            .spawn()
            .unwrap(),
    );
    let addr: SocketAddr = format!("{ns_ip}:2222").parse().unwrap();
    let t0 = Instant::now();
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "sshd did not come up: {}",
            std::fs::read_to_string(w.path("sshd.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

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

    let b64 = data_encoding_b64(host_pub.trim().as_bytes());
    let line = format!(
        "ssh://root@{ns_ip}:2222 x86_64-linux {} 1 1 - - {b64}",
        keys.join("client").display()
    );
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
        connector: &mut conn,
        log: &mut mk_log,
    }
    .run(&mut input.as_bytes(), &mut replies);
    let replies = String::from_utf8(replies).unwrap();
    let outcome = outcome.unwrap_or_else(|e| {
        panic!(
            "{e}\nreplies: {replies}\nlog: {}\nsshd: {}",
            log.text(),
            std::fs::read_to_string(w.path("sshd.log")).unwrap_or_default()
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

fn data_encoding_b64(b: &[u8]) -> String {
    // Plain base64 (RFC 4648, padded), as Nix's machines file expects; written out here
    // so the test checks the parser against an independent encoder.
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in b.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                s.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}
