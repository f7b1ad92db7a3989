//! The server side against real Nix 2.8 clients: a tiny daemon made of
//! `ServerConnection` (no store behind it, canned answers) on a unix socket, and
//! `nix-store` / `nix` pointed at it with `NIX_REMOTE=unix://…`. What the clients print
//! must be what the canned answers say, worked out by hand.

use std::collections::BTreeSet;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Output};

use nixb_protocol::stderr::{ActivityType, Field, Verbosity};
use nixb_protocol::types::PathInfo;
use nixb_protocol::{
    RemoteError, Request, Response, ServerConnection, ServerInfo, StderrFrame, Version,
};
use nixb_store::{Hash, HashAlgo, StoreDir};

/// Serves every connection on `listener` with canned answers.
fn serve(listener: UnixListener, store_dir: StoreDir, nar_hash: Hash) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { return };
        let info = ServerInfo {
            version: Version::MAX,
            nix_version: "2.99.0-nixb-test".into(),
            trusted: None,
            features: BTreeSet::new(),
        };
        let Ok(mut c) =
            ServerConnection::accept(conn.try_clone().unwrap(), conn, store_dir.clone(), &info)
        else {
            continue;
        };
        while let Ok(Some(req)) = c.read_request() {
            let resp = match &req {
                Request::SetOptions(_) => Response::Nothing,
                Request::IsValidPath(_) => Response::Bool(true),
                Request::QueryPathInfo(_) => {
                    // A log line and an activity on the way, as a daemon would send.
                    c.frame(&StderrFrame::Next(b"hello from nixb\n".to_vec()))
                        .unwrap();
                    c.frame(&StderrFrame::StartActivity {
                        id: 7,
                        level: Verbosity::Error,
                        kind: ActivityType::Unknown,
                        text: "an activity of nixb".into(),
                        fields: vec![Field::Int(1)],
                        parent: 0,
                    })
                    .unwrap();
                    c.frame(&StderrFrame::StopActivity { id: 7 }).unwrap();
                    Response::PathInfo(Some(PathInfo {
                        deriver: None,
                        nar_hash: nar_hash.clone(),
                        references: BTreeSet::new(),
                        registration_time: 1,
                        nar_size: 4242,
                        ultimate: false,
                        sigs: BTreeSet::new(),
                        ca: None,
                    }))
                }
                other => {
                    c.fail(&RemoteError::new(format!(
                        "{} is not served by this test",
                        other.op().name()
                    )))
                    .unwrap();
                    continue;
                }
            };
            c.finish(&req, &resp).unwrap();
        }
    }
}

fn nix(root: &Path, prog: &str, args: &[&str]) -> Output {
    Command::new(prog)
        .args(args)
        .env("NIX_STORE_DIR", root.join("store"))
        .env("NIX_STATE_DIR", root.join("state"))
        .env("NIX_LOG_DIR", root.join("log"))
        .env("NIX_CONF_DIR", root.join("etc"))
        .env("HOME", root)
        .env(
            "NIX_REMOTE",
            format!("unix://{}", root.join("socket").display()),
        )
        .output()
        .unwrap()
}

#[test]
fn nix_2_8_clients_talk_to_a_server_connection() {
    nixb_testsupport::require!(Nix);
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    std::fs::create_dir_all(r.join("etc")).unwrap();
    std::fs::create_dir_all(r.join("store")).unwrap();
    std::fs::write(
        r.join("etc/nix.conf"),
        "experimental-features = nix-command\n",
    )
    .unwrap();
    let store_dir = StoreDir::new(r.join("store").to_str().unwrap()).unwrap();
    let listener = UnixListener::bind(r.join("socket")).unwrap();
    let nar_hash = Hash::digest(HashAlgo::Sha256, b"some nar");
    let h = nar_hash.clone();
    let sd = store_dir.clone();
    std::thread::spawn(move || serve(listener, sd, h));

    let p = format!("{}/{}-canned", store_dir.as_str(), "1".repeat(32));
    let out = nix(r, "nix-store", &["-q", "--hash", &p]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        nar_hash.to_base32_typed()
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("hello from nixb"), "{stderr}");

    let out = nix(r, "nix-store", &["-q", "--size", &p]);
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), "4242");

    // An operation the canned daemon refuses: the client prints the error, exits 1.
    let out = nix(r, "nix-store", &["--optimise"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("OptimiseStore is not served by this test"),
        "{stderr}"
    );
}
