//! `nixb query`: one question about each path, answered from the validity database.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{bail, Context, Result};
use clap::{ArgGroup, Args};
use nixb_protocol::types::PathInfo;
use nixb_protocol::{Request, Response};
use nixb_store::StorePath;

use crate::remote::{op_error, Remote, StoreUri};

#[derive(Args)]
#[command(group(ArgGroup::new("what").required(true).multiple(false)))]
pub struct QueryArgs {
    /// Output paths of a derivation (a non-derivation path stands for itself)
    #[arg(long, group = "what")]
    pub outputs: bool,
    /// Paths each path refers to directly
    #[arg(long, group = "what")]
    pub references: bool,
    /// Valid paths that refer to each path
    #[arg(long, group = "what")]
    pub referrers: bool,
    /// The closure: each path and everything it refers to, transitively
    #[arg(long, group = "what")]
    pub requisites: bool,
    /// The NAR hash, as `sha256:<base32>`
    #[arg(long, group = "what")]
    pub hash: bool,
    /// The NAR size in bytes
    #[arg(long, group = "what")]
    pub size: bool,
    /// The derivation that produced each path (`unknown-deriver` if none is recorded)
    #[arg(long, group = "what")]
    pub deriver: bool,
    /// Print the paths that are valid; fail naming those that are not
    #[arg(long, group = "what")]
    pub valid: bool,
    /// The garbage collector roots that keep each path alive, as 'link -> root'
    #[arg(long, group = "what")]
    pub roots: bool,
    /// Store paths (or symlinks into the store, such as ./result)
    #[arg(required = true)]
    pub paths: Vec<String>,
}

pub fn run(args: QueryArgs, options: &[String], store: &StoreUri) -> Result<u8> {
    if let StoreUri::Daemon { socket, origin } = store {
        // --roots reads keep-outputs and keep-derivations, as locally.
        let keep = if args.roots {
            let s = super::settings(options)?;
            (s.keep_outputs, s.keep_derivations)
        } else {
            (false, true)
        };
        return run_remote(&args, &mut Remote::connect_plain(socket, origin)?, keep);
    }
    let store = super::open_store()?;
    let dir = store.store_dir().clone();
    let paths: Vec<StorePath> = args
        .paths
        .iter()
        .map(|p| super::parse_store_path(&store, p))
        .collect::<Result<_>>()?;
    let print_set = |set: BTreeSet<StorePath>| {
        for p in set {
            println!("{}", dir.print(&p));
        }
    };

    if args.valid {
        let mut invalid = Vec::new();
        for p in &paths {
            if store.is_valid_path(p)? {
                println!("{}", dir.print(p));
            } else {
                invalid.push(dir.print(p));
            }
        }
        if !invalid.is_empty() {
            bail!("not valid: {}", invalid.join(", "));
        }
        return Ok(0);
    }
    if args.outputs {
        for p in &paths {
            if p.is_derivation() {
                let drv = store
                    .read_derivation(p)
                    .with_context(|| format!("reading derivation {}", dir.print(p)))?;
                for out in drv.outputs.values() {
                    match &out.path {
                        Some(o) => println!("{}", dir.print(o)),
                        None => bail!("derivation {} has an output without a path", dir.print(p)),
                    }
                }
            } else {
                println!("{}", dir.print(p));
            }
        }
        return Ok(0);
    }
    if args.roots {
        let settings = super::settings(options)?;
        let set: BTreeSet<StorePath> = paths.iter().cloned().collect();
        let keepers = referrer_closure(
            &store,
            &set,
            settings.keep_outputs,
            settings.keep_derivations,
        )?;
        let roots = super::gc::find_all_roots(&store)?;
        for (target, links) in &roots {
            if keepers.contains(target) {
                for link in links {
                    println!("{link} -> {}", dir.print(target));
                }
            }
        }
        return Ok(0);
    }
    if args.requisites {
        let set: BTreeSet<StorePath> = paths.iter().cloned().collect();
        for p in &set {
            ensure_valid(&store, p)?;
        }
        print_set(store.compute_closure(&set)?);
        return Ok(0);
    }
    for p in &paths {
        if args.referrers {
            print_set(store.query_referrers(p)?);
            continue;
        }
        let info = store
            .query_path_info(p)?
            .with_context(|| format!("path '{}' is not valid", dir.print(p)))?;
        if args.references {
            print_set(info.references);
        } else if args.hash {
            println!("{}", info.nar_hash.to_base32_typed());
        } else if args.size {
            println!("{}", info.nar_size);
        } else if args.deriver {
            match &info.deriver {
                Some(d) => println!("{}", dir.print(d)),
                None => println!("unknown-deriver"),
            }
        }
    }
    Ok(0)
}

/// Everything that keeps `paths` alive, `paths` included: the closure under referrers,
/// plus with `keep_outputs` the derivations that have a path as output, plus with
/// `keep_derivations` the outputs of a derivation (Nix's reverse `computeFSClosure`).
fn referrer_closure(
    store: &nixb_store::local_store::LocalStore,
    paths: &BTreeSet<StorePath>,
    keep_outputs: bool,
    keep_derivations: bool,
) -> Result<BTreeSet<StorePath>> {
    let mut seen = BTreeSet::new();
    let mut todo: Vec<StorePath> = paths.iter().cloned().collect();
    while let Some(p) = todo.pop() {
        if !seen.insert(p.clone()) {
            continue;
        }
        let mut next: Vec<StorePath> = store.query_referrers(&p)?.into_iter().collect();
        if keep_outputs {
            next.extend(store.query_valid_derivers(&p)?);
        }
        if keep_derivations && p.is_derivation() && store.is_valid_path(&p)? {
            for o in store.query_derivation_outputs(&p)?.into_values() {
                if store.is_valid_path(&o)? {
                    next.push(o);
                }
            }
        }
        todo.extend(next.into_iter().filter(|n| !seen.contains(n)));
    }
    Ok(seen)
}

fn ensure_valid(store: &nixb_store::local_store::LocalStore, p: &StorePath) -> Result<()> {
    if !store.is_valid_path(p)? {
        bail!("path '{}' is not valid", store.store_dir().print(p));
    }
    Ok(())
}

/// The same questions asked of a daemon: `QueryValidPaths`, `QueryDerivationOutputMap`,
/// `QueryReferrers` and `QueryPathInfo` (the closure walked here, as Nix's client does);
/// for `--roots`, `FindRoots` and the referrer closure walked here with
/// `(keep-outputs, keep-derivations)` as `keep` says.
fn run_remote(args: &QueryArgs, remote: &mut Remote, keep: (bool, bool)) -> Result<u8> {
    let dir = remote.dir.clone();
    let mut conn = RemoteQueries {
        remote,
        dir: dir.clone(),
    };
    let paths: Vec<StorePath> = args
        .paths
        .iter()
        .map(|p| super::parse_store_path_in(&dir, p))
        .collect::<Result<_>>()?;
    let print_set = |set: BTreeSet<StorePath>| {
        for p in set {
            println!("{}", dir.print(&p));
        }
    };
    if args.valid {
        let valid = conn.valid_paths(&paths.iter().cloned().collect())?;
        let mut invalid = Vec::new();
        for p in &paths {
            if valid.contains(p) {
                println!("{}", dir.print(p));
            } else {
                invalid.push(dir.print(p));
            }
        }
        if !invalid.is_empty() {
            bail!("not valid: {}", invalid.join(", "));
        }
        return Ok(0);
    }
    if args.outputs {
        for p in &paths {
            if p.is_derivation() {
                for (name, out) in conn.output_map(p)? {
                    match out {
                        Some(o) => println!("{}", dir.print(&o)),
                        None => bail!(
                            "derivation {} has no path for its output '{name}'",
                            dir.print(p)
                        ),
                    }
                }
            } else {
                println!("{}", dir.print(p));
            }
        }
        return Ok(0);
    }
    if args.roots {
        let roots = conn.roots()?;
        let keepers = conn.referrer_closure(&paths, keep.0, keep.1)?;
        for (target, links) in &roots {
            if keepers.contains(target) {
                for link in links {
                    println!("{link} -> {}", dir.print(target));
                }
            }
        }
        return Ok(0);
    }
    if args.requisites {
        let mut seen = BTreeSet::new();
        let mut todo: Vec<StorePath> = paths.clone();
        while let Some(p) = todo.pop() {
            if seen.contains(&p) {
                continue;
            }
            let info = conn.info(&p)?;
            todo.extend(info.references.into_iter().filter(|r| !seen.contains(r)));
            seen.insert(p);
        }
        print_set(seen);
        return Ok(0);
    }
    for p in &paths {
        if args.referrers {
            print_set(conn.referrers(p)?);
            continue;
        }
        let info = conn.info(p)?;
        if args.references {
            print_set(info.references);
        } else if args.hash {
            println!("{}", info.nar_hash.to_base32_typed());
        } else if args.size {
            println!("{}", info.nar_size);
        } else if args.deriver {
            match &info.deriver {
                Some(d) => println!("{}", dir.print(d)),
                None => println!("unknown-deriver"),
            }
        }
    }
    Ok(0)
}

/// The queries `run_remote` asks, each with its error worded as Nix's client words it.
struct RemoteQueries<'a> {
    remote: &'a mut Remote,
    dir: nixb_store::StoreDir,
}

impl RemoteQueries<'_> {
    fn ask(&mut self, req: Request, what: &str) -> Result<Response> {
        let answer = self.remote.client.request(&req, None, &mut |_| {});
        answer.map_err(|e| op_error(self.remote, what, e))
    }

    fn info(&mut self, p: &StorePath) -> Result<PathInfo> {
        let printed = self.dir.print(p);
        match self.ask(
            Request::QueryPathInfo(p.clone()),
            &format!("describe {printed}"),
        )? {
            Response::PathInfo(Some(i)) => Ok(i),
            Response::PathInfo(None) => bail!("path '{printed}' is not valid"),
            r => bail!("the daemon answered {r:?} when asked to describe {printed}"),
        }
    }

    fn valid_paths(&mut self, paths: &BTreeSet<StorePath>) -> Result<BTreeSet<StorePath>> {
        let req = Request::QueryValidPaths {
            paths: paths.clone(),
            substitute: false,
        };
        match self.ask(req, "check which paths are valid")? {
            Response::Paths(p) => Ok(p),
            r => bail!("the daemon answered {r:?} when asked which paths are valid"),
        }
    }

    fn referrers(&mut self, p: &StorePath) -> Result<BTreeSet<StorePath>> {
        let printed = self.dir.print(p);
        match self.ask(
            Request::QueryReferrers(p.clone()),
            &format!("list the referrers of {printed}"),
        )? {
            Response::Paths(p) => Ok(p),
            r => bail!("the daemon answered {r:?} when asked for the referrers of {printed}"),
        }
    }

    /// `FindRoots`: each root's target with the links that lead to it.
    fn roots(&mut self) -> Result<BTreeMap<StorePath, BTreeSet<String>>> {
        match self.ask(Request::FindRoots, "find the garbage collector roots")? {
            Response::Roots(v) => {
                let mut roots: BTreeMap<StorePath, BTreeSet<String>> = BTreeMap::new();
                for (link, target) in v {
                    roots.entry(target).or_default().insert(link);
                }
                Ok(roots)
            }
            r => bail!("the daemon answered {r:?} when asked for the roots"),
        }
    }

    /// What keeps `paths` alive, as the local `referrer_closure` computes it, asked of
    /// the daemon.
    fn referrer_closure(
        &mut self,
        paths: &[StorePath],
        keep_outputs: bool,
        keep_derivations: bool,
    ) -> Result<BTreeSet<StorePath>> {
        let mut seen = BTreeSet::new();
        let mut todo: Vec<StorePath> = paths.to_vec();
        while let Some(p) = todo.pop() {
            if !seen.insert(p.clone()) {
                continue;
            }
            let mut next: Vec<StorePath> = self.referrers(&p)?.into_iter().collect();
            if keep_outputs {
                let printed = self.dir.print(&p);
                match self.ask(
                    Request::QueryValidDerivers(p.clone()),
                    &format!("list the derivers of {printed}"),
                )? {
                    Response::Paths(d) => next.extend(d),
                    r => {
                        bail!("the daemon answered {r:?} when asked for the derivers of {printed}")
                    }
                }
            }
            let valid = |q: &mut Self, x: &StorePath| -> Result<bool> {
                Ok(q.valid_paths(&BTreeSet::from([x.clone()]))?.contains(x))
            };
            if keep_derivations && p.is_derivation() && valid(self, &p)? {
                for o in self.output_map(&p)?.into_values().flatten() {
                    if valid(self, &o)? {
                        next.push(o);
                    }
                }
            }
            todo.extend(next.into_iter().filter(|n| !seen.contains(n)));
        }
        Ok(seen)
    }

    fn output_map(&mut self, p: &StorePath) -> Result<BTreeMap<String, Option<StorePath>>> {
        let printed = self.dir.print(p);
        match self
            .ask(
                Request::QueryDerivationOutputMap(p.clone()),
                &format!("list the outputs of {printed}"),
            )
            .with_context(|| format!("reading derivation {printed}"))?
        {
            Response::OutputMap(m) => Ok(m),
            r => bail!("the daemon answered {r:?} when asked for the outputs of {printed}"),
        }
    }
}
