//! `nixb add PATH...`: as `nix-store --add`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use nixb_protocol::ops::AddToStoreOldRequest;
use nixb_protocol::{Request, Response};
use nixb_store::StorePath;

use crate::remote::{op_error, Remote, StoreUri};

#[derive(Args)]
pub struct AddArgs {
    /// Files or directories to add (by their NAR serialisation, as `nix-store --add`)
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
}

pub fn run(args: AddArgs, store: &StoreUri) -> Result<u8> {
    if let StoreUri::Daemon { socket, origin } = store {
        let mut remote = Remote::connect_plain(socket, origin)?;
        for p in &args.paths {
            let added = add_remote(&mut remote, p)?;
            println!("{}", remote.dir.print(&added));
        }
        return Ok(0);
    }
    let store = super::open_store()?;
    for p in &args.paths {
        let added = store
            .add_to_store(p, None)
            .with_context(|| format!("adding {} to the store", p.display()))?;
        println!("{}", store.store_dir().print(&added));
    }
    Ok(0)
}

/// Adds `src` through the daemon by its NAR, streamed from a second thread:
/// `AddToStore` with `fixed:r:sha256` from 1.25, the old `AddToStore` before.
fn add_remote(remote: &mut Remote, src: &Path) -> Result<StorePath> {
    let name = src
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| {
            format!(
                "{} has no utf-8 file name to name its store path",
                src.display()
            )
        })?
        .to_string();
    std::fs::symlink_metadata(src).with_context(|| format!("reading {}", src.display()))?;
    let (mut reader, mut writer) =
        std::io::pipe().context("making a pipe for the NAR to send to the daemon")?;
    let path = src.to_path_buf();
    let dumper = std::thread::spawn(move || nixb_store::nar::dump_path(&path, &mut writer));
    let answer = if remote.client.ctx().version.at_least(25) {
        remote
            .client
            .add_to_store(&name, "fixed:r:sha256", &BTreeSet::new(), &mut reader)
            .map(|v| v.path)
    } else {
        // Nix's own client of that time: "fixed" 0 for a recursive SHA-256 addition.
        let req = Request::AddToStoreOld(AddToStoreOldRequest {
            base_name: name.clone(),
            fixed: false,
            recursive: true,
            hash_algo: "sha256".into(),
        });
        remote
            .client
            .request(&req, Some(&mut reader), &mut |_| {})
            .and_then(|r| match r {
                Response::Path(p) => Ok(p),
                r => Err(nixb_protocol::ProtocolError::Field {
                    what: "AddToStore answer",
                    value: format!("{r:?}"),
                    reason: "not a store path".into(),
                }),
            })
    };
    // Unblocks a dumper still writing when the exchange failed early.
    drop(reader);
    let dumped = dumper
        .join()
        .map_err(|_| anyhow::anyhow!("the thread serialising {} panicked", src.display()))?;
    dumped.with_context(|| format!("serialising {} to add it to the store", src.display()))?;
    answer.map_err(|e| op_error(remote, &format!("add {}", src.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nixb_protocol::handshake::ServerInfo;
    use nixb_protocol::{ServerConnection, Version};
    use std::os::unix::net::UnixListener;

    /// Below 1.25 a path is added with the old `AddToStore`: "fixed" 0, recursive, sha256,
    /// and the NAR itself after the request (what Nix 2.3's client sends).
    #[test]
    fn daemons_before_1_25_get_the_old_add_to_store() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("added");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("f"), "contents\n").unwrap();
        let socket = tmp.path().join("s");
        let listener = UnixListener::bind(&socket).unwrap();
        let dir = crate::remote::store_dir().unwrap();
        let answer = dir
            .parse(&format!(
                "{}/0c7n2dq0zp8f7j3y4dn9wz5d2w8w6gqz-added",
                dir.as_str()
            ))
            .unwrap();
        let reply = answer.clone();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let info = ServerInfo {
                version: Version::new(1, 24),
                nix_version: "old".into(),
                trusted: None,
                features: Default::default(),
            };
            let dir = crate::remote::store_dir().unwrap();
            let mut conn =
                ServerConnection::accept(stream.try_clone().unwrap(), stream, dir, &info).unwrap();
            let mut seen = Vec::new();
            while let Some(req) = conn.read_request().unwrap() {
                match &req {
                    Request::SetOptions(_) => conn.finish(&req, &Response::Nothing).unwrap(),
                    Request::AddToStoreOld(_) => {
                        let mut nar = Vec::new();
                        nixb_protocol::nar::copy_nar(conn.reader(), &mut nar).unwrap();
                        conn.finish(&req, &Response::Path(reply.clone())).unwrap();
                        seen.push((req.clone(), nar));
                    }
                    other => panic!("unexpected request {other:?}"),
                }
            }
            seen
        });
        let mut remote = Remote::connect_plain(&socket, "test").unwrap();
        assert_eq!(add_remote(&mut remote, &src).unwrap(), answer);
        drop(remote);
        let seen = server.join().unwrap();
        let mut expected_nar = Vec::new();
        nixb_store::nar::dump_path(&src, &mut expected_nar).unwrap();
        assert_eq!(
            seen,
            vec![(
                Request::AddToStoreOld(AddToStoreOldRequest {
                    base_name: "added".into(),
                    fixed: false,
                    recursive: true,
                    hash_algo: "sha256".into(),
                }),
                expected_nar
            )]
        );
    }
}
