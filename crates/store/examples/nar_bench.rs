//! Worker for `cargo xtask bench store`: runs one NAR / reference-scanning job of nixb's
//! own code in its own process, so the bench can time it and read its peak RSS.
//!
//! ```text
//! nar_bench hash-path PATH          print the sha256 NAR hash and size
//! nar_bench dump PATH               NAR on stdout
//! nar_bench restore DEST            NAR from stdin into DEST
//! nar_bench scan-mem MIB TOTAL_MIB KIND   RefScanner over a MIB-sized buffer fed until
//!                                   TOTAL_MIB were scanned, 1,000 candidates;
//!                                   KIND = binary | base32text
//! nar_bench scan-path PATH          scan_path (dump + sha256 + scan) with 1,000 candidates
//! ```
//!
//! Each prints `elapsed_s=<seconds>` on stderr (work only, no process start-up).

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use nixb_store::nar::{dump_path, hash_path, restore_path};
use nixb_store::refscan::{scan_path, RefScanner};
use nixb_store::{HashAlgo, StorePath};

const ALPHABET: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Seeded, so a failing case reproduces.
struct Rng(fastrand::Rng);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0.u64(..)
    }
}

fn candidates(n: usize) -> Vec<String> {
    let mut rng = Rng(fastrand::Rng::with_seed(7));
    (0..n)
        .map(|_| {
            (0..32)
                .map(|_| ALPHABET[(rng.next() % 32) as usize] as char)
                .collect()
        })
        .collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| -> Result<&str, Box<dyn std::error::Error>> {
        args.get(i)
            .map(|s| s.as_str())
            .ok_or_else(|| "missing argument (see the module doc)".into())
    };
    let start = Instant::now();
    match arg(0)? {
        "hash-path" => {
            let (h, size) = hash_path(Path::new(arg(1)?), HashAlgo::Sha256)?;
            println!("{h} {size}");
        }
        "dump" => {
            let mut out = std::io::BufWriter::with_capacity(256 * 1024, std::io::stdout().lock());
            dump_path(Path::new(arg(1)?), &mut out)?;
            out.flush()?;
        }
        "restore" => {
            let mut input = std::io::BufReader::with_capacity(256 * 1024, std::io::stdin().lock());
            restore_path(&mut input, Path::new(arg(1)?))?;
        }
        "scan-mem" => {
            let mib: usize = arg(1)?.parse()?;
            let total: usize = arg(2)?.parse()?;
            let mut rng = Rng(fastrand::Rng::with_seed(99));
            let mut buf = vec![0u8; mib << 20];
            match arg(3)? {
                "binary" => buf.iter_mut().for_each(|b| *b = rng.next() as u8),
                // Worst realistic case: long runs of alphabet characters (think base32
                // hashes and lower-case identifiers), broken by a space now and then.
                "base32text" => buf.iter_mut().enumerate().for_each(|(i, b)| {
                    *b = if i % 41 == 40 {
                        b' '
                    } else {
                        ALPHABET[(rng.next() % 32) as usize]
                    }
                }),
                k => return Err(format!("unknown kind {k}").into()),
            }
            let cands = candidates(1000);
            // Plant one candidate so the scan has something to find.
            buf[1000..1032].copy_from_slice(cands[500].as_bytes());
            let start = Instant::now();
            let mut s = RefScanner::new(cands.iter().map(|c| c.as_str()));
            let mut done = 0;
            while done < total << 20 {
                for chunk in buf.chunks(256 * 1024) {
                    s.feed(chunk);
                }
                done += buf.len();
            }
            let found = s.found();
            eprintln!("scanned_bytes={done} found={}", found.len());
            eprintln!("elapsed_s={}", start.elapsed().as_secs_f64());
            return Ok(());
        }
        "scan-path" => {
            let cands: BTreeSet<StorePath> = candidates(1000)
                .into_iter()
                .map(|h| StorePath::from_base_name(&format!("{h}-x")))
                .collect::<Result<_, _>>()?;
            let r = scan_path(Path::new(arg(1)?), &cands)?;
            println!("{} {} refs={}", r.nar_hash, r.nar_size, r.references.len());
        }
        other => return Err(format!("unknown command {other}").into()),
    }
    eprintln!("elapsed_s={}", start.elapsed().as_secs_f64());
    Ok(())
}
