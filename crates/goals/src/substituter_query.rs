//! The `--query` side of external substituter programs: one process per substituter for
//! the whole run, asked `info PATH` synchronously (their answers come from local metadata
//! and are quick), and what a substituter says about a path it can provide.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use nixb_binarycache::NarInfo;
use nixb_store::{StoreDir, StorePath};

use crate::config::SubstituterCommand;

/// What a substituter says about a path it can provide (`info`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SubstitutableInfo {
    pub deriver: Option<StorePath>,
    pub references: BTreeSet<StorePath>,
    pub download_size: u64,
    pub nar_size: u64,
    /// The whole narinfo, when a binary cache offered the path.
    pub narinfo: Option<Box<NarInfo>>,
}

impl SubstitutableInfo {
    pub fn from_narinfo(info: Box<NarInfo>) -> SubstitutableInfo {
        SubstitutableInfo {
            deriver: info.deriver.clone(),
            references: info.references.clone(),
            download_size: info.file_size.unwrap_or(0),
            nar_size: info.nar_size,
            narinfo: Some(info),
        }
    }
}

/// A substituter running in `--query` mode.
struct QueryProcess {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Drop for QueryProcess {
    fn drop(&mut self) {
        // Closing stdin ends a well-behaved program; one that hangs is killed.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `--query` processes of all substituters, started on first use. A substituter whose
/// query process failed is not asked again during this run.
#[derive(Default)]
pub(crate) struct QueryPool {
    procs: Vec<Option<QueryProcess>>,
    broken: BTreeSet<usize>,
}

impl QueryPool {
    /// Asks substituter `idx` about `path`: `Ok(None)` when it cannot provide it.
    pub fn query_info(
        &mut self,
        idx: usize,
        sub: &SubstituterCommand,
        dir: &StoreDir,
        path: &StorePath,
    ) -> Result<Option<SubstitutableInfo>, String> {
        if self.broken.contains(&idx) {
            return Ok(None);
        }
        if self.procs.len() <= idx {
            self.procs.resize_with(idx + 1, || None);
        }
        if self.procs[idx].is_none() {
            match start_query(sub) {
                Ok(p) => self.procs[idx] = Some(p),
                Err(e) => {
                    self.broken.insert(idx);
                    return Err(format!("substituter '{}': {e}", sub.name));
                }
            }
        }
        let Some(p) = self.procs[idx].as_mut() else {
            return Ok(None);
        };
        match ask_info(p, dir, path) {
            Ok(info) => Ok(info),
            Err(e) => {
                self.procs[idx] = None;
                self.broken.insert(idx);
                Err(format!(
                    "substituter '{}' (--query) about '{}': {e}",
                    sub.name,
                    dir.print(path)
                ))
            }
        }
    }
}

fn start_query(sub: &SubstituterCommand) -> Result<QueryProcess, String> {
    let mut child = Command::new(&sub.program)
        .args(&sub.args)
        .arg("--query")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("starting '{}': {e}", sub.program.display()))?;
    let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        let _ = child.kill();
        let _ = child.wait();
        return Err("no pipes to the query process".into());
    };
    let mut p = QueryProcess {
        child,
        stdin,
        stdout: BufReader::new(stdout),
    };
    // The program announces that it is alive with one empty line.
    let line = read_line(&mut p.stdout)?;
    if !line.is_empty() {
        return Err(format!("expected an empty startup line, got '{line}'"));
    }
    Ok(p)
}

fn read_line(r: &mut impl BufRead) -> Result<String, String> {
    let mut s = String::new();
    match r.read_line(&mut s) {
        Ok(0) => Err("unexpected end of output".into()),
        Ok(_) => Ok(s.trim_end_matches('\n').to_string()),
        Err(e) => Err(format!("reading its output: {e}")),
    }
}

fn ask_info(
    p: &mut QueryProcess,
    dir: &StoreDir,
    path: &StorePath,
) -> Result<Option<SubstitutableInfo>, String> {
    writeln!(p.stdin, "info {}", dir.print(path))
        .and_then(|()| p.stdin.flush())
        .map_err(|e| format!("writing the request: {e}"))?;
    let parse = |s: &str, what: &str| {
        dir.parse(s)
            .map_err(|e| format!("bad {what} '{s}' in the reply: {e}"))
    };
    let num = |s: &str, what: &str| {
        s.parse::<u64>()
            .map_err(|_| format!("bad {what} '{s}' in the reply"))
    };
    let mut found = None;
    loop {
        let first = read_line(&mut p.stdout)?;
        if first.is_empty() {
            return Ok(found);
        }
        let p_path = parse(&first, "path")?;
        let deriver = read_line(&mut p.stdout)?;
        let deriver = if deriver.is_empty() {
            None
        } else {
            Some(parse(&deriver, "deriver")?)
        };
        let n = num(&read_line(&mut p.stdout)?, "reference count")?;
        let mut references = BTreeSet::new();
        for _ in 0..n {
            references.insert(parse(&read_line(&mut p.stdout)?, "reference")?);
        }
        let download_size = num(&read_line(&mut p.stdout)?, "download size")?;
        let nar_size = num(&read_line(&mut p.stdout)?, "nar size")?;
        if &p_path == path {
            found = Some(SubstitutableInfo {
                deriver,
                references,
                download_size,
                nar_size,
                narinfo: None,
            });
        }
    }
}
