//! Validity as it is now: a path that real Nix 2.8 registers through its own access to
//! the store while nixb's daemon serves a connection is valid, with the references Nix
//! recorded and the hash Nix computed, at that connection's next request. No answer is
//! kept from an earlier request (the connection asked, and was told "not valid", before).

use std::collections::BTreeSet;
use std::process::Stdio;

mod common;

use common::{connect_to, TestDaemon};

#[test]
fn a_path_real_nix_registers_meanwhile_is_seen_at_the_next_request() {
    nixb_testsupport::require!(Nix);
    let t = TestDaemon::new();
    let listening = t.listen();
    let mut c = connect_to(&listening.sock, &t.store_dir);

    let path = |name: &str, ch: char| {
        t.store_dir
            .parse(&format!(
                "{}/{}-{name}",
                t.store_dir.as_str(),
                ch.to_string().repeat(32)
            ))
            .unwrap()
    };
    let dep = path("dep", 'a');
    let top = path("top", 'b');
    std::fs::write(t.store_dir.to_path(&dep), "the dependency\n").unwrap();
    std::fs::write(
        t.store_dir.to_path(&top),
        format!("refers to {}\n", t.store_dir.print(&dep)),
    )
    .unwrap();
    assert_eq!(c.query_path_info(&top).unwrap(), None);
    assert!(!c.is_valid_path(&dep).unwrap());

    // Nix's --register-validity input: path, deriver (none), reference count, references.
    let input = format!(
        "{dep}\n\n0\n{top}\n\n1\n{dep}\n",
        dep = t.store_dir.print(&dep),
        top = t.store_dir.print(&top)
    );
    nixb_testsupport::store::run_ok(
        t.store
            .nix("nix-store")
            .arg("--register-validity")
            .stdin(Stdio::piped()),
        Some(input.as_bytes()),
    );
    let nix_hash = nixb_testsupport::store::run_str(
        t.store
            .nix("nix-store")
            .args(["-q", "--hash"])
            .arg(t.store_dir.to_path(&top)),
        None,
    );

    let info = c
        .query_path_info(&top)
        .unwrap()
        .expect("the path Nix registered is valid");
    assert_eq!(info.references, BTreeSet::from([dep.clone()]));
    assert_eq!(info.nar_hash.to_base32_typed(), nix_hash);
    assert!(c.is_valid_path(&dep).unwrap());
    drop(c);
    listening.stop();
}
