//! `nixb gc`: garbage collection as `nix-store --gc` and `nix-store --delete` do it, on
//! the same store and under the same lock as real Nix (see the `nixb-gc` crate).

use std::collections::BTreeSet;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{ArgGroup, Args, Subcommand};
use nixb_gc::{collect_garbage, GcAction, GcEvent, GcOptions, GcResults, RootDirs};
use nixb_store::local_store::LocalStore;

use crate::render;

#[derive(Args)]
#[command(
    args_conflicts_with_subcommands = true,
    group(ArgGroup::new("what").multiple(false)),
    after_help = "\
Examples:
  nixb gc                          delete every path no root keeps alive
  nixb gc --print-dead             list them, delete nothing (also --dry-run)
  nixb gc --print-roots            'link -> path' for every root
  nixb gc --max-freed 1000000000   stop after freeing 1 GB
  nixb gc delete /nix/store/…-hello-2.12

keep-outputs and keep-derivations (nix.conf or --option) widen what a root keeps."
)]
pub struct GcArgs {
    #[command(subcommand)]
    pub command: Option<GcCommand>,
    /// Print the paths that would be deleted, and delete nothing
    #[arg(long, group = "what")]
    pub dry_run: bool,
    /// Print the dead paths, one a line, and delete nothing
    #[arg(long, group = "what")]
    pub print_dead: bool,
    /// Print the live paths, one a line, and delete nothing
    #[arg(long, group = "what")]
    pub print_live: bool,
    /// Print every root as 'link -> path', as nix-store --gc --print-roots
    #[arg(long, group = "what")]
    pub print_roots: bool,
    /// Stop deleting once more than BYTES have been freed
    #[arg(long, value_name = "BYTES")]
    pub max_freed: Option<u64>,
    /// Paths whose database rows go in one transaction (for tests and benchmarks)
    #[arg(long, hide = true, global = true)]
    pub batch_size: Option<usize>,
}

#[derive(Subcommand)]
pub enum GcCommand {
    /// Delete the given paths; refused for a path that is alive or still referred to
    #[command(after_help = "Example:\n  nixb gc delete /nix/store/…-hello-2.12")]
    Delete(DeleteArgs),
}

#[derive(Args)]
pub struct DeleteArgs {
    /// Delete even paths that roots keep alive (never ones other paths refer to)
    #[arg(long)]
    pub ignore_liveness: bool,
    #[arg(required = true)]
    pub paths: Vec<String>,
}

pub fn run(args: GcArgs, options: &[String]) -> Result<u8> {
    let settings = super::settings(options)?;
    let store = super::open_store()?;
    if args.print_roots {
        for line in print_roots(&store)? {
            println!("{line}");
        }
        return Ok(0);
    }
    let action = match &args.command {
        Some(GcCommand::Delete(d)) => {
            let mut paths = BTreeSet::new();
            for p in &d.paths {
                paths.insert(super::parse_store_path(&store, p)?);
            }
            GcAction::DeleteSpecific(paths)
        }
        None if args.print_dead || args.dry_run => GcAction::ReturnDead,
        None if args.print_live => GcAction::ReturnLive,
        None => GcAction::DeleteDead,
    };
    let deleting = matches!(action, GcAction::DeleteDead | GcAction::DeleteSpecific(_));
    let mut opts = GcOptions::new(action);
    opts.keep_outputs = settings.keep_outputs;
    opts.keep_derivations = settings.keep_derivations;
    if let Some(GcCommand::Delete(d)) = &args.command {
        opts.ignore_liveness = d.ignore_liveness;
    }
    if let Some(b) = args.batch_size {
        opts.batch_size = b;
    }
    if let Some(m) = args.max_freed {
        opts.max_freed = m;
    }
    // Listed paths are printed as they come (sorted), not kept.
    opts.keep_paths = false;
    let started = Instant::now();
    let results = collect(&store, &opts)?;
    if !deleting {
        if args.dry_run && render::verbosity() >= 1 {
            eprintln!("{} store paths would be deleted", results.count);
        }
        return Ok(0);
    }
    if render::verbosity() >= 1 {
        eprintln!("{}", summary(&results, started.elapsed()));
    }
    Ok(0)
}

/// Runs a collection with a progress line on a terminal (plain lines with `-v`).
pub fn collect(store: &LocalStore, opts: &GcOptions) -> Result<GcResults> {
    let tty = std::io::stderr().is_terminal() && render::verbosity() >= 1;
    let mut last = Instant::now();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut write_error = None;
    let mut on_event = |e: GcEvent<'_>| match e {
        GcEvent::Listed { path } => {
            if write_error.is_none() {
                write_error = writeln!(out, "{path}").err();
            }
        }
        GcEvent::WaitingForLock => render::warn("waiting for the big garbage collector lock..."),
        GcEvent::FindingRoots => render::info("finding garbage collector roots..."),
        GcEvent::Determined { valid, dead } => {
            render::info(&format!("{dead} of {valid} valid paths are dead"))
        }
        GcEvent::Deleted {
            path,
            done,
            total,
            bytes_freed,
        } => {
            if render::verbosity() >= 2 {
                eprintln!("deleting '{path}'");
            } else if tty && (last.elapsed() >= Duration::from_millis(100) || done == total) {
                last = Instant::now();
                eprint!(
                    "\r\x1b[Kdeleting garbage: {done}/{total} paths, {} freed",
                    human_bytes(bytes_freed)
                );
            }
        }
        GcEvent::LimitReached { max_freed } => {
            render::info(&format!("deleted more than {max_freed} bytes; stopping"))
        }
        GcEvent::PruningLinks => {
            if tty && render::verbosity() < 2 {
                eprint!("\r\x1b[K");
            }
            render::info("deleting unused links...")
        }
        GcEvent::KeptInUse { path } => render::warn(&format!(
            "keeping '{path}': a path registered meanwhile refers to it"
        )),
    };
    let r = collect_garbage(store, opts, &mut on_event);
    if tty {
        eprint!("\r\x1b[K");
    }
    if let Some(e) = write_error {
        return Err(e).context("writing to stdout");
    }
    out.flush().context("writing to stdout")?;
    Ok(r?)
}

/// `N store paths deleted, X MiB freed in T s`.
pub fn summary(r: &GcResults, took: Duration) -> String {
    format!(
        "{} store paths deleted, {} freed in {:.2} s",
        r.count,
        human_bytes(r.bytes_freed),
        took.as_secs_f64()
    )
}

fn human_bytes(b: u64) -> String {
    format!("{:.2} MiB", b as f64 / (1024.0 * 1024.0))
}

/// Every root as `link -> path`, sorted, as `nix-store --gc --print-roots` prints them.
pub fn print_roots(store: &LocalStore) -> Result<Vec<String>> {
    let roots = find_all_roots(store)?;
    Ok(nixb_gc::print_roots(store.store_dir(), &roots))
}

/// Every root, uncensored.
pub fn find_all_roots(store: &LocalStore) -> Result<nixb_gc::Roots> {
    let config = store.config();
    let dirs = RootDirs::new(config.store_dir.clone(), config.state_dir.clone());
    let mut is_valid = |p: &nixb_store::StorePath| Ok(store.is_valid_path(p)?);
    nixb_gc::find_roots(&dirs, false, &mut is_valid).context("finding garbage collector roots")
}

/// Nix's auto-GC (`min-free`/`max-free`), once before a build: when the store's file
/// system has less than `min-free` bytes available, collect garbage until `max-free` would
/// be available. The targets become temporary roots first, so they survive it. As in Nix,
/// `_NIX_TEST_FREE_SPACE_FILE` names a file holding the free space to assume (for tests).
pub fn auto_gc(
    store: &LocalStore,
    settings: &crate::settings::Settings,
    targets: &[nixb_store::DerivedPath],
) -> Result<()> {
    if settings.min_free == 0 {
        return Ok(());
    }
    let avail = match std::env::var_os("_NIX_TEST_FREE_SPACE_FILE") {
        Some(f) => std::fs::read_to_string(&f)
            .with_context(|| format!("reading {}", std::path::Path::new(&f).display()))?
            .trim()
            .parse::<u64>()
            .context("_NIX_TEST_FREE_SPACE_FILE: expected a number of bytes")?,
        None => {
            let dir = store.store_dir().as_path();
            let st = nix::sys::statvfs::statvfs(dir)
                .with_context(|| format!("getting file system info about '{}'", dir.display()))?;
            st.blocks_available() as u64 * st.fragment_size() as u64
        }
    };
    if avail >= settings.min_free || avail >= settings.max_free {
        return Ok(());
    }
    for t in targets {
        let p = match t {
            nixb_store::DerivedPath::Opaque(p) => p,
            nixb_store::DerivedPath::Built { drv, .. } => drv,
        };
        store.add_temp_root(p)?;
    }
    let mut opts = GcOptions::new(GcAction::DeleteDead);
    opts.keep_outputs = settings.keep_outputs;
    opts.keep_derivations = settings.keep_derivations;
    opts.max_freed = settings.max_free - avail;
    if render::verbosity() >= 1 {
        eprintln!("running auto-GC to free {} bytes", opts.max_freed);
    }
    let started = Instant::now();
    let r = collect(store, &opts)?;
    if render::verbosity() >= 1 {
        eprintln!("{}", summary(&r, started.elapsed()));
    }
    Ok(())
}
