//! A second process for the VM tests (`tests/vm_userpool.rs`), built only with the `vm`
//! feature: `vm_helper hold GROUP STATE_DIR` acquires a build user, prints
//! `uid=<uid> name=<name>`, `none`, or `error: <message>` on one line, and holds the user
//! until its stdin is closed.

use std::io::{Read, Write};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 || args[1] != "hold" {
        eprintln!("usage: vm_helper hold GROUP STATE_DIR");
        std::process::exit(2);
    }
    let cfg = nixb_userpool::UserPoolConfig {
        group: args[2].clone(),
        state_dir: args[3].clone().into(),
    };
    let (line, user, code) = match nixb_userpool::acquire(&cfg) {
        Ok(Some(u)) => (format!("uid={} name={}", u.uid, u.name), Some(u), 0),
        Ok(None) => ("none".to_string(), None, 0),
        Err(e) => (format!("error: {e}"), None, 1),
    };
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    drop(user);
    std::process::exit(code);
}
