#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

pub mod sink;

pub use sink::{FinishingLog, LimitState, LogSink, QueueStats, DEFAULT_MEMORY_CAP};

/// Log settings, mapped by the caller from nix.conf.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogConfig {
    /// `$NIX_LOG_DIR`; logs go under its `drvs/` subdirectory.
    pub log_dir: PathBuf,
    /// `compress-build-log` (Nix's default: true).
    pub compress: bool,
    /// `keep-build-log` (Nix's default: true); false writes no file.
    pub keep: bool,
    /// `max-build-log-size` in bytes; `None` or `Some(0)` is unlimited, as 0
    /// is in nix.conf.
    pub max_size: Option<u64>,
}

/// Errors of this crate; each names the file or derivation at fault.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("invalid derivation base name '{name}' for a log: {reason}")]
    BadName { name: String, reason: &'static str },
    #[error("cannot create log file {path}: {source}", path = .path.display())]
    Create { path: PathBuf, source: io::Error },
    #[error("cannot write log file {path}: {source}", path = .path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot read log file {path}: {source}", path = .path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("no build log for {drv} (looked for {tried})", tried = display_paths(.tried))]
    NotFound { drv: String, tried: Vec<PathBuf> },
    #[error("log writer thread for {path} panicked", path = .path.display())]
    WriterPanicked { path: PathBuf },
    #[error("cannot write log file {path}: the writer stopped after an earlier error", path = .path.display())]
    WriterStopped { path: PathBuf },
    #[error("internal error: {0}")]
    Internal(String),
}

fn display_paths(paths: &[PathBuf]) -> String {
    let shown: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    shown.join(", ")
}

/// A derivation base name must be a single non-empty path component of at
/// least three bytes (two for the directory, at least one for the file).
pub(crate) fn check_name(name: &str) -> Result<(), LogError> {
    let bad = |reason| {
        Err(LogError::BadName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.len() < 3 {
        return bad("shorter than 3 bytes");
    }
    if name.contains('/') || name.contains('\0') {
        return bad("contains '/' or NUL");
    }
    if !name.is_char_boundary(2) {
        return bad("its first two bytes are not whole characters");
    }
    if name.starts_with('.') {
        return bad("starts with '.'");
    }
    Ok(())
}

/// Where the log of the derivation with base name `drv_base_name` is written:
/// `<log_dir>/drvs/<2 chars>/<rest>[.bz2]`. Names shorter than the split (not
/// valid derivation names) keep all their characters in the directory part.
pub fn log_path(log_dir: &Path, drv_base_name: &str, compressed: bool) -> PathBuf {
    let cut = drv_base_name
        .char_indices()
        .nth(2)
        .map_or(drv_base_name.len(), |(i, _)| i);
    let (dir, rest) = drv_base_name.split_at(cut);
    let mut file = rest.to_owned();
    if compressed {
        file.push_str(".bz2");
    }
    log_dir.join("drvs").join(dir).join(file)
}

/// The candidate files for a log, in the order `nix-store -l` tries them,
/// each with whether it is compressed.
fn candidates(log_dir: &Path, drv_base_name: &str) -> Vec<(PathBuf, bool)> {
    let flat = log_dir.join("drvs").join(drv_base_name);
    let mut flat_bz2 = flat.clone().into_os_string();
    flat_bz2.push(".bz2");
    vec![
        (log_path(log_dir, drv_base_name, false), false),
        (log_path(log_dir, drv_base_name, true), true),
        (flat, false),
        (PathBuf::from(flat_bz2), true),
    ]
}

/// Finds the log file of a derivation: `Some((path, compressed))`.
pub fn find_log(log_dir: &Path, drv_base_name: &str) -> Result<Option<(PathBuf, bool)>, LogError> {
    check_name(drv_base_name)?;
    for (path, compressed) in candidates(log_dir, drv_base_name) {
        match std::fs::symlink_metadata(&path) {
            Ok(_) => return Ok(Some((path, compressed))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => return Err(LogError::Read { path, source }),
        }
    }
    Ok(None)
}

/// Finds a derivation's log or says where it looked.
fn locate(log_dir: &Path, drv_base_name: &str) -> Result<(PathBuf, bool), LogError> {
    find_log(log_dir, drv_base_name)?.ok_or_else(|| LogError::NotFound {
        drv: drv_base_name.to_owned(),
        tried: candidates(log_dir, drv_base_name)
            .into_iter()
            .map(|(p, _)| p)
            .collect(),
    })
}

fn open_raw(path: &Path, compressed: bool) -> Result<Box<dyn Read + Send>, LogError> {
    let file = File::open(path).map_err(|source| LogError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(if compressed {
        Box::new(bzip2::bufread::MultiBzDecoder::new(BufReader::new(file)))
    } else {
        Box::new(file)
    })
}

/// Opens a derivation's log for streaming, decompressing a `.bz2` one
/// (single or multi-stream). Read errors from the returned reader name the
/// file.
pub fn open_log(log_dir: &Path, drv_base_name: &str) -> Result<Box<dyn Read + Send>, LogError> {
    let (path, compressed) = locate(log_dir, drv_base_name)?;
    let inner = open_raw(&path, compressed)?;
    Ok(Box::new(NamedReader { inner, path }))
}

/// Reads a derivation's whole log, decompressed.
pub fn read_log(log_dir: &Path, drv_base_name: &str) -> Result<Vec<u8>, LogError> {
    let (path, compressed) = locate(log_dir, drv_base_name)?;
    let mut out = Vec::new();
    open_raw(&path, compressed)?
        .read_to_end(&mut out)
        .map_err(|source| LogError::Read { path, source })?;
    Ok(out)
}

/// Adds the file name to read errors, which bzip2's decoder reports bare.
struct NamedReader {
    inner: Box<dyn Read + Send>,
    path: PathBuf,
}

impl Read for NamedReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner
            .read(buf)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", self.path.display())))
    }
}
