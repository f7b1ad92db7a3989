//! Writing a `file://` binary cache, in the layout `nix copy --to file://DIR` produces:
//!
//! ```text
//! DIR/nix-cache-info                      StoreDir: <store dir>
//! DIR/<hash part>.narinfo                 one per path
//! DIR/nar/<file hash base32>.nar[.xz|.bz2|.zst]
//! DIR/log/  DIR/realisations/             created empty, as Nix does
//! ```
//!
//! Each NAR is streamed from the store through the compressor into a temporary file in
//! `DIR/nar`, hashing both sides on the way, and renamed to its content-addressed name; the
//! narinfo is written (also via rename) only after its NAR, and references before the paths
//! that refer to them, so a reader never sees a narinfo whose NAR or references are missing.
//! A path whose narinfo exists already is skipped, as Nix does.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use nixb_store::hash::{Encoding, HashAlgo, Hasher};
use nixb_store::local_store::LocalStore;
use nixb_store::nar::{self, NarError};
use nixb_store::StorePath;

use crate::cache::CacheError;
use crate::narinfo::{CacheInfo, Compression, NarInfo};
use crate::signing::SecretKey;

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("cache '{dir}': {step} '{}': {source}", path.display())]
    Io {
        dir: String,
        step: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cache '{dir}': archiving '{path}': {source}")]
    Nar {
        dir: String,
        path: String,
        #[source]
        source: NarError,
    },
    #[error("cache '{dir}': store: {reason}")]
    Store { dir: String, reason: String },
    #[error("cache '{dir}': '{path}' is corrupt in the store: its NAR hash is {got}, the database says {expected}")]
    Corrupt {
        dir: String,
        path: String,
        expected: String,
        got: String,
    },
    #[error(transparent)]
    Cache(#[from] CacheError),
}

/// Hashes and counts what goes through to the file.
struct HashingWriter<W> {
    inner: W,
    hasher: Hasher,
    count: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

enum Encoder<W: Write> {
    None(W),
    Xz(xz2::write::XzEncoder<W>),
    Bzip2(bzip2::write::BzEncoder<W>),
    Zstd(zstd::stream::write::Encoder<'static, W>),
}

impl<W: Write> Encoder<W> {
    fn new(c: Compression, w: W) -> io::Result<Encoder<W>> {
        // Levels are those Nix uses by default (liblzma preset 6, bzip2 9, zstd 3).
        Ok(match c {
            Compression::None => Encoder::None(w),
            Compression::Xz => Encoder::Xz(xz2::write::XzEncoder::new(w, 6)),
            Compression::Bzip2 => {
                Encoder::Bzip2(bzip2::write::BzEncoder::new(w, bzip2::Compression::best()))
            }
            Compression::Zstd => Encoder::Zstd(zstd::stream::write::Encoder::new(w, 3)?),
        })
    }

    fn writer(&mut self) -> &mut dyn Write {
        match self {
            Encoder::None(w) => w,
            Encoder::Xz(w) => w,
            Encoder::Bzip2(w) => w,
            Encoder::Zstd(w) => w,
        }
    }

    fn finish(self) -> io::Result<W> {
        match self {
            Encoder::None(w) => Ok(w),
            Encoder::Xz(w) => w.finish(),
            Encoder::Bzip2(w) => w.finish(),
            Encoder::Zstd(w) => w.finish(),
        }
    }
}

fn tmp_name(dir: &Path) -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    dir.join(format!(
        ".nixb-tmp-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ))
}

/// The error for a failed I/O `step` on `path` while writing the cache `dir`.
fn io_error(
    dir: &str,
    step: &'static str,
    path: &Path,
) -> impl FnOnce(std::io::Error) -> WriteError {
    let (dir, path) = (dir.to_string(), path.to_path_buf());
    move |source| WriteError::Io {
        dir,
        step,
        path,
        source,
    }
}

/// Writes `text` to `dest` atomically (temporary file, then rename).
fn write_atomic(dir_name: &str, dest: &Path, text: &[u8]) -> Result<(), WriteError> {
    let parent = dest.parent().unwrap_or(Path::new("."));
    let tmp = tmp_name(parent);
    let io_err = |step, p: &Path| io_error(dir_name, step, p);
    std::fs::write(&tmp, text).map_err(io_err("writing", &tmp))?;
    std::fs::rename(&tmp, dest).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io_err("renaming into place", dest)(e)
    })
}

/// Options for [`copy_to_file_cache`].
#[derive(Clone, Debug)]
pub struct WriteOptions {
    pub compression: Compression,
    /// `secret-key-files`: each signs every narinfo written.
    pub secret_keys: Vec<SecretKey>,
    /// Paths compressed at the same time.
    pub jobs: usize,
}

/// Copies the closure of `paths` from `store` into the cache directory `dir` (created
/// if needed). Returns the paths written (those already in the cache are skipped).
pub fn copy_to_file_cache(
    store: &LocalStore,
    dir: &Path,
    paths: &BTreeSet<StorePath>,
    opts: &WriteOptions,
) -> Result<Vec<StorePath>, WriteError> {
    let dname = format!("file://{}", dir.display());
    let sd = store.store_dir();
    let io_err = |step, p: &Path| io_error(&dname, step, p);
    let store_err = |e: nixb_store::local_store::StoreError| WriteError::Store {
        dir: dname.clone(),
        reason: e.to_string(),
    };

    for sub in ["nar", "log", "realisations"] {
        let d = dir.join(sub);
        std::fs::create_dir_all(&d).map_err(io_err("creating directory", &d))?;
    }
    let info_file = dir.join("nix-cache-info");
    match std::fs::read_to_string(&info_file) {
        Ok(text) => {
            let ci = CacheInfo::parse(&text, &format!("{dname}/nix-cache-info"))
                .map_err(CacheError::from)?;
            if ci.store_dir != sd.as_str() {
                return Err(CacheError::StoreDirMismatch {
                    cache: dname,
                    theirs: ci.store_dir,
                    ours: sd.as_str().to_string(),
                }
                .into());
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let ci = CacheInfo {
                store_dir: sd.as_str().to_string(),
                want_mass_query: false,
                priority: None,
            };
            write_atomic(&dname, &info_file, ci.to_text().as_bytes())?;
        }
        Err(e) => return Err(io_err("reading", &info_file)(e)),
    }

    // Depth of each path in the reference graph, so that a whole level can be compressed
    // in parallel while references are still written before their referrers.
    let closure = store.compute_closure(paths).map_err(store_err)?;
    let mut infos = BTreeMap::new();
    for p in &closure {
        let info = store
            .query_path_info(p)
            .map_err(store_err)?
            .ok_or_else(|| WriteError::Store {
                dir: dname.clone(),
                reason: format!("path '{}' is not valid", sd.print(p)),
            })?;
        infos.insert(p.clone(), info);
    }
    let mut level: BTreeMap<StorePath, usize> = BTreeMap::new();
    fn depth(
        p: &StorePath,
        infos: &BTreeMap<StorePath, nixb_store::local_store::ValidPathInfo>,
        level: &mut BTreeMap<StorePath, usize>,
        guard: usize,
    ) -> usize {
        if let Some(l) = level.get(p) {
            return *l;
        }
        // The store refuses reference cycles, so the guard only stops a corrupt database.
        if guard > infos.len() {
            return 0;
        }
        let refs: Vec<StorePath> = infos
            .get(p)
            .map(|i| i.references.iter().filter(|r| *r != p).cloned().collect())
            .unwrap_or_default();
        let l = refs
            .iter()
            .map(|r| depth(r, infos, level, guard + 1) + 1)
            .max()
            .unwrap_or(0);
        level.insert(p.clone(), l);
        l
    }
    for p in &closure {
        depth(p, &infos, &mut level, 0);
    }
    let max_level = level.values().copied().max().unwrap_or(0);

    let mut written = Vec::new();
    for l in 0..=max_level {
        let todo: Vec<&StorePath> = closure
            .iter()
            .filter(|p| {
                level.get(*p) == Some(&l)
                    && !dir.join(format!("{}.narinfo", p.hash_part())).exists()
            })
            .collect();
        let results = par_map(&todo, opts.jobs, |p| {
            write_one(store, dir, &dname, &infos[*p], opts)
        });
        for (p, r) in todo.iter().zip(results) {
            r?;
            written.push((*p).clone());
        }
    }
    Ok(written)
}

fn write_one(
    store: &LocalStore,
    dir: &Path,
    dname: &str,
    info: &nixb_store::local_store::ValidPathInfo,
    opts: &WriteOptions,
) -> Result<(), WriteError> {
    let sd = store.store_dir();
    let printed = sd.print(&info.path);
    let nar_dir = dir.join("nar");
    let tmp = tmp_name(&nar_dir);
    let io_err = |step, p: &Path| io_error(dname, step, p);
    let result = (|| {
        let file = std::fs::File::create(&tmp).map_err(io_err("creating", &tmp))?;
        let file = HashingWriter {
            inner: io::BufWriter::with_capacity(256 * 1024, file),
            hasher: Hasher::new(HashAlgo::Sha256),
            count: 0,
        };
        let mut enc = Encoder::new(opts.compression, file)
            .map_err(io_err("starting compression into", &tmp))?;
        let mut nar_hasher = Hasher::new(HashAlgo::Sha256);
        let mut nar_size = 0u64;
        nar::dump_to_sink(&sd.to_path(&info.path), &mut |chunk| {
            nar_hasher.update(chunk);
            nar_size += chunk.len() as u64;
            enc.writer().write_all(chunk).map_err(NarError::Sink)
        })
        .map_err(|source| WriteError::Nar {
            dir: dname.to_string(),
            path: printed.clone(),
            source,
        })?;
        let mut file = enc.finish().map_err(io_err("compressing into", &tmp))?;
        file.flush().map_err(io_err("writing", &tmp))?;
        file.inner
            .get_ref()
            .sync_all()
            .map_err(io_err("syncing", &tmp))?;
        let nar_hash = nar_hasher.finish();
        // Publishing a NAR that does not match the database would poison every client.
        if nar_hash != info.nar_hash || nar_size != info.nar_size {
            return Err(WriteError::Corrupt {
                dir: dname.to_string(),
                path: printed.clone(),
                expected: format!(
                    "{} ({} bytes)",
                    info.nar_hash.to_base32_typed(),
                    info.nar_size
                ),
                got: format!("{} ({} bytes)", nar_hash.to_base32_typed(), nar_size),
            });
        }
        let file_hash = file.hasher.finish();
        let file_size = file.count;
        let rel = format!(
            "nar/{}.nar{}",
            file_hash.encode(Encoding::Base32),
            opts.compression.extension()
        );
        let dest = dir.join(&rel);
        std::fs::rename(&tmp, &dest).map_err(io_err("renaming into place", &dest))?;

        let mut ni = NarInfo {
            store_path: info.path.clone(),
            url: rel,
            compression: opts.compression,
            file_hash: Some(file_hash),
            file_size: Some(file_size),
            nar_hash,
            nar_size,
            references: info.references.clone(),
            deriver: info.deriver.clone(),
            sigs: info.sigs.clone(),
            ca: info.ca.clone(),
            system: None,
        };
        let fp = ni.fingerprint(sd);
        for k in &opts.secret_keys {
            let sig = k.sign(&fp);
            if !ni.sigs.contains(&sig) {
                ni.sigs.push(sig);
            }
        }
        let narinfo = dir.join(format!("{}.narinfo", info.path.hash_part()));
        write_atomic(dname, &narinfo, ni.to_text(sd).as_bytes())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn par_map<T: Sync, R: Send>(items: &[T], jobs: usize, f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    crate::substitute::par_map(items, jobs, f)
}
