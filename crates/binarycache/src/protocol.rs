//! The substituter side of the original engine's external-program protocol (Nix 1.x), so
//! that `nixb substitute` can be listed in `substituters` and run by a SubstitutionGoal.
//!
//! ```text
//! startup        the program writes one empty line to stdout before anything else
//!                (the engine reads it to know the program is alive)
//!
//! --query        commands on stdin, one a line, answers on stdout:
//!   have P...    the subset of the paths P it can substitute, one a line, then ""
//!   info P...    for each path it can substitute:
//!                  <path> \n <deriver or ""> \n <n refs> \n <ref>\n x n \n
//!                  <download size> \n <nar size> \n
//!                then ""
//!
//! --substitute P DEST
//!                unpack P at DEST (not registering it; the engine does), then write the
//!                expected NAR hash `sha256:<base32>` (or "" for none) as one line; the
//!                engine hashes DEST and compares. Progress goes to stderr (the build log).
//!                Failure: a non-zero exit, with the reason on stderr.
//! ```
//!
//! Paths are absolute store paths. A path is offered only when a cache has it with a
//! signature we accept, since offering what `--substitute` would then refuse only makes
//! the engine fail later.

use std::io::{self, BufRead, Write};
use std::path::Path;

use nixb_store::StorePath;

use crate::cache::BinaryCache;
use crate::substitute::{find_info, SubstituteError};

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("substituter protocol: {step}: {source}")]
    Io {
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("substituter protocol: unknown command '{0}' (expected 'have' or 'info')")]
    UnknownCommand(String),
    #[error("substituter protocol: '{path}' is not a store path: {reason}")]
    BadPath { path: String, reason: String },
    #[error("substituter protocol: no caches configured")]
    NoCaches,
    #[error(transparent)]
    Substitute(#[from] SubstituteError),
}

fn w(step: &'static str) -> impl FnOnce(io::Error) -> ProtocolError {
    move |source| ProtocolError::Io { step, source }
}

fn parse_path(caches: &[BinaryCache], s: &str) -> Result<StorePath, ProtocolError> {
    let sd = caches.first().ok_or(ProtocolError::NoCaches)?.store_dir();
    sd.parse(s).map_err(|e| ProtocolError::BadPath {
        path: s.to_string(),
        reason: e.to_string(),
    })
}

/// `--query`: answers `have` and `info` commands from `input` until it ends.
pub fn run_query(
    caches: &[BinaryCache],
    input: &mut dyn BufRead,
    out: &mut dyn Write,
) -> Result<(), ProtocolError> {
    out.write_all(b"\n")
        .and_then(|()| out.flush())
        .map_err(w("writing the startup line"))?;
    let mut line = String::new();
    loop {
        line.clear();
        if input.read_line(&mut line).map_err(w("reading a command"))? == 0 {
            return Ok(());
        }
        let mut words = line.split_whitespace();
        let Some(cmd) = words.next() else { continue };
        let paths: Vec<StorePath> = words
            .map(|p| parse_path(caches, p))
            .collect::<Result<_, _>>()?;
        let mut reply = String::new();
        match cmd {
            "have" => {
                for p in &paths {
                    if find_info(caches, p).is_ok() {
                        reply.push_str(&caches[0].store_dir().print(p));
                        reply.push('\n');
                    }
                }
            }
            "info" => {
                for p in &paths {
                    let Ok((cache, info)) = find_info(caches, p) else {
                        continue;
                    };
                    let sd = cache.store_dir();
                    reply.push_str(&format!("{}\n", sd.print(p)));
                    reply.push_str(&format!(
                        "{}\n",
                        info.deriver
                            .as_ref()
                            .map(|d| sd.print(d))
                            .unwrap_or_default()
                    ));
                    reply.push_str(&format!("{}\n", info.references.len()));
                    for r in &info.references {
                        reply.push_str(&format!("{}\n", sd.print(r)));
                    }
                    reply.push_str(&format!(
                        "{}\n{}\n",
                        info.file_size.unwrap_or(0),
                        info.nar_size
                    ));
                }
            }
            other => return Err(ProtocolError::UnknownCommand(other.to_string())),
        }
        reply.push('\n');
        out.write_all(reply.as_bytes())
            .and_then(|()| out.flush())
            .map_err(w("writing a reply"))?;
    }
}

/// `--substitute PATH DEST`: unpacks and verifies `path` at `dest`, then prints its hash.
pub fn run_substitute(
    caches: &[BinaryCache],
    path: &str,
    dest: &Path,
    out: &mut dyn Write,
    log: &mut dyn Write,
) -> Result<(), ProtocolError> {
    out.write_all(b"\n")
        .and_then(|()| out.flush())
        .map_err(w("writing the startup line"))?;
    let sp = parse_path(caches, path)?;
    let (cache, info) = find_info(caches, &sp)?;
    // The log is the engine's build log; failing to write it is no reason to fail.
    let _ = writeln!(log, "fetching path '{path}' from '{}'...", cache.url());
    let (hash, _) = cache
        .fetch_into(&info, dest)
        .map_err(SubstituteError::from)?;
    out.write_all(format!("{}\n", hash.to_base32_typed()).as_bytes())
        .and_then(|()| out.flush())
        .map_err(w("writing the expected hash"))
}
