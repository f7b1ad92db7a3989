//! A connection's greeting and `SetOptions`, timed by the same client (nixb's `Client`)
//! against real `nix-daemon` 2.8 (socket mode, on a private store) and against a
//! `ServerConnection` with no engine behind it (one thread per connection, as a daemon
//! built on this crate would start). The second is the protocol's floor: what is left of
//! a daemon's per-connection budget after the protocol. Connections alternate between
//! the two so that drifting load hits both alike; prints the median, 10th and 90th
//! percentile of each and the ratio of the medians.
//!
//! Run by `cargo xtask bench protocol` (release build); `ROUNDS` (default 300) sets the
//! connections per side.

use std::collections::BTreeSet;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nixb_protocol::types::ClientSettings;
use nixb_protocol::{Client, ClientInfo, Response, ServerConnection, ServerInfo, Version};
use nixb_store::StoreDir;

fn one(sock: &Path, store: &StoreDir) -> Duration {
    let t = Instant::now();
    let s = UnixStream::connect(sock).expect("connecting");
    let info = ClientInfo {
        version: Version::MAX,
        features: BTreeSet::new(),
    };
    let mut c = Client::connect(s.try_clone().unwrap(), s, store.clone(), &info).expect("greeting");
    c.set_options(&ClientSettings::default())
        .expect("SetOptions");
    t.elapsed()
}

fn stats(mut v: Vec<Duration>) -> (f64, f64, f64) {
    v.sort();
    let at = |q: f64| v[((v.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e3;
    (at(0.5), at(0.1), at(0.9))
}

fn main() {
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    std::fs::create_dir_all(r.join("etc")).unwrap();
    std::fs::write(
        r.join("etc/nix.conf"),
        "build-users-group =\nsandbox = false\n",
    )
    .unwrap();
    let store = StoreDir::new(r.join("store").to_str().unwrap()).unwrap();

    // Real nix-daemon, listening on $NIX_STATE_DIR/daemon-socket/socket.
    let nix = |program: &str| {
        let mut c = Command::new(program);
        c.env("NIX_STORE_DIR", r.join("store"))
            .env("NIX_STATE_DIR", r.join("state"))
            .env("NIX_LOG_DIR", r.join("log"))
            .env("NIX_CONF_DIR", r.join("etc"))
            .env_remove("NIX_REMOTE")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c
    };
    // Without writable state yet, a connection's process of nix-daemon may take itself
    // for a client of the daemon and drop the connection.
    let init = nix("nix-store")
        .arg("--init")
        .status()
        .expect("nix-store --init");
    assert!(init.success(), "nix-store --init failed");
    let mut daemon = nix("nix-daemon").spawn().expect("starting nix-daemon");
    let nix_sock = r.join("state/daemon-socket/socket");
    let started = Instant::now();
    while UnixStream::connect(&nix_sock).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "nix-daemon did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    // The engine-less ServerConnection.
    let ours = r.join("nixb.socket");
    let listener = UnixListener::bind(&ours).unwrap();
    let sd = store.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let conn = conn.unwrap();
            let sd = sd.clone();
            std::thread::Builder::new()
                .stack_size(64 << 10)
                .spawn(move || {
                    let info = ServerInfo {
                        version: Version::MAX,
                        nix_version: "2.8.0".into(),
                        trusted: None,
                        features: BTreeSet::new(),
                    };
                    let mut c =
                        ServerConnection::accept(conn.try_clone().unwrap(), conn, sd, &info)
                            .unwrap();
                    while let Ok(Some(req)) = c.read_request() {
                        c.finish(&req, &Response::Nothing).unwrap();
                    }
                })
                .unwrap();
        }
    });

    // Warm up both, then alternate.
    for _ in 0..10 {
        one(&nix_sock, &store);
        one(&ours, &store);
    }
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        a.push(one(&ours, &store));
        b.push(one(&nix_sock, &store));
    }
    daemon.kill().ok();
    daemon.wait().ok();
    let (am, a10, a90) = stats(a);
    let (bm, b10, b90) = stats(b);
    println!("greeting + SetOptions, {rounds} connections each, ms (median [p10, p90]):");
    println!("  nixb-protocol ServerConnection (no engine): {am:.3} [{a10:.3}, {a90:.3}]");
    println!("  nix-daemon 2.8:                             {bm:.3} [{b10:.3}, {b90:.3}]");
    println!(
        "  ratio nix-daemon / ServerConnection (medians): {:.1}x",
        bm / am
    );
}
