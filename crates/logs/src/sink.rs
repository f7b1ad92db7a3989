//! Writing one build's log: size accounting, plain or bzip2 output, and the
//! background compressor that keeps bzip2 off the caller's thread.
//!
//! # Why a thread, and where the bytes wait
//!
//! The caller is the worker's single-threaded poll loop, which reads the log
//! pipes of many builders. bzip2 at level 9 is far slower than a builder can
//! print (BENCHMARKS.md, "Log compression priority"), so compressing on the loop's thread
//! would stall every other build (and their timeouts). Each compressed sink
//! therefore owns a thread that runs the encoder; [`LogSink::write`] only
//! hands the chunk over. The thread and the encoder start with the first byte
//! of output: a builder that prints nothing gets the 14-byte empty stream,
//! written directly, and costs no thread and no 8 MB encoder.
//!
//! Dropping log data is wrong and blocking the loop is wrong, so when the
//! compressor falls behind the backlog has to live somewhere. It lives in
//! memory up to a cap ([`DEFAULT_MEMORY_CAP`], per sink); beyond the cap,
//! `write` appends the chunk to an unlinked *spill file* beside the log (a
//! plain, uncompressed append: as cheap as writing an uncompressed log, which
//! is what Nix does on the caller's thread anyway) and queues a note of where
//! it went. The compressor takes items in order, reading spilled ranges back
//! from the file, so the log's byte order is kept. Memory per sink is thus
//! bounded by the cap; disk use by the spill is bounded by the log's
//! uncompressed size (itself bounded by `max-build-log-size` when set) and is
//! released when the sink ends, since the file has no name.
//!
//! Plain logs are written on the caller's thread, unbuffered, like Nix does:
//! a page-cache write is cheap and it lets `nixb log` follow a running build.
//!
//! # Where the file is written
//!
//! Straight to its final name, truncating an older log, as Nix does; there is
//! no `.tmp` and rename. A reader may therefore see a log that is still being
//! written (for bzip2 an unfinished stream, which reads as an error until the
//! sink is finished), and a build interrupted by a crash leaves a truncated
//! log, again as with Nix.
//!
//! # The size limit
//!
//! Every chunk counts towards `max-build-log-size`, as in Nix's
//! `handleChildOutput`: when the total goes *over* the limit the chunk that
//! crossed it is not logged and [`LimitState::Exceeded`] is returned, and the
//! caller kills the build. Later chunks are counted and dropped too.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use crate::{check_name, log_path, LogConfig, LogError};

/// Backlog a compressed sink keeps in memory before spilling to disk.
pub const DEFAULT_MEMORY_CAP: u64 = 16 * 1024 * 1024;

/// How much the compressor reads back from the spill file at a time.
const SPILL_READ: usize = 1024 * 1024;

/// Whether the log is still within `max-build-log-size`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitState {
    Within,
    /// The build wrote more than `limit` bytes of log; kill it.
    Exceeded {
        limit: u64,
    },
}

/// Counters for a sink's backlog, for tests and diagnostics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Bytes handed to the compressor and held in memory right now.
    pub in_memory: u64,
    /// Highest value `in_memory` has had.
    pub peak_in_memory: u64,
    /// Bytes that went through the spill file so far.
    pub spilled: u64,
}

/// The log of one build. See the module documentation.
pub struct LogSink {
    /// `None` when `keep-build-log` is false.
    path: Option<PathBuf>,
    /// 0 = unlimited.
    limit: u64,
    /// Bytes offered by the builder, logged or not (Nix's `logSize`).
    offered: u64,
    /// Bytes accepted into the log.
    logged: u64,
    out: Output,
}

enum Output {
    None,
    Plain(File),
    Compressed(Compressor),
    /// A compressed log nothing was written to yet. The encoder (about 8 MB at level 9)
    /// and its thread start with the first byte, so a quiet builder costs neither.
    CompressedIdle {
        file: File,
        cap: u64,
    },
}

/// What a level-9 bzip2 encoder writes for empty input: the stream header `BZh9` and the
/// end-of-stream marker with a combined CRC of zero. Written directly for a log that
/// stayed empty.
const EMPTY_BZIP2: &[u8] = b"BZh9\x17\x72\x45\x38\x50\x90\x00\x00\x00\x00";

enum Item {
    Data(Vec<u8>),
    /// `len` bytes at `offset` in the (unlinked) spill file.
    Spilled {
        file: Arc<File>,
        path: PathBuf,
        offset: u64,
        len: u64,
    },
}

struct Spill {
    file: Arc<File>,
    /// The name it had before being unlinked, for error messages.
    path: PathBuf,
    len: u64,
}

struct Compressor {
    tx: Option<mpsc::Sender<Item>>,
    thread: Option<JoinHandle<Result<(), LogError>>>,
    in_memory: Arc<AtomicU64>,
    peak_in_memory: u64,
    cap: u64,
    /// Created on first need; its length is the total spilled so far.
    spill: Option<Spill>,
    /// The log file's path, for error messages.
    path: PathBuf,
}

impl LogSink {
    /// Creates (or truncates) the log file for the derivation with base name
    /// `drv_base_name` (e.g. `48b8s…-x.drv`), creating its directory. With
    /// `keep == false` no file is made, but bytes are still counted.
    pub fn create(cfg: &LogConfig, drv_base_name: &str) -> Result<LogSink, LogError> {
        Self::with_memory_cap(cfg, drv_base_name, DEFAULT_MEMORY_CAP)
    }

    /// As [`LogSink::create`], with the in-memory backlog of a compressed log
    /// capped at `cap` bytes instead of [`DEFAULT_MEMORY_CAP`].
    pub fn with_memory_cap(
        cfg: &LogConfig,
        drv_base_name: &str,
        cap: u64,
    ) -> Result<LogSink, LogError> {
        check_name(drv_base_name)?;
        let limit = cfg.max_size.unwrap_or(0);
        if !cfg.keep {
            return Ok(LogSink {
                path: None,
                limit,
                offered: 0,
                logged: 0,
                out: Output::None,
            });
        }
        let path = log_path(&cfg.log_dir, drv_base_name, cfg.compress);
        // The directory (one of 1,024 `drvs/xx`) exists for most logs: try the file first
        // and make the directory only when that fails, which saves a mkdir and a stat per
        // build.
        let file = match File::create(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if let Some(dir) = path.parent() {
                    fs::create_dir_all(dir).map_err(|source| LogError::Create {
                        path: dir.to_path_buf(),
                        source,
                    })?;
                }
                File::create(&path)
            }
            r => r,
        }
        .map_err(|source| LogError::Create {
            path: path.clone(),
            source,
        })?;
        let out = if cfg.compress {
            Output::CompressedIdle { file, cap }
        } else {
            Output::Plain(file)
        };
        Ok(LogSink {
            path: Some(path),
            limit,
            offered: 0,
            logged: 0,
            out,
        })
    }

    /// The log file, or `None` when logs are not kept.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Counts `chunk` and, while within the limit, logs it. Never waits for
    /// compression. An `Err` means the log cannot be written (it names the
    /// file); `Ok(Exceeded)` means the build must be killed.
    pub fn write(&mut self, chunk: &[u8]) -> Result<LimitState, LogError> {
        self.offered += chunk.len() as u64;
        if self.limit != 0 && self.offered > self.limit {
            return Ok(LimitState::Exceeded { limit: self.limit });
        }
        if chunk.is_empty() {
            return Ok(LimitState::Within);
        }
        if matches!(self.out, Output::CompressedIdle { .. }) {
            self.start_compressor()?;
        }
        match &mut self.out {
            Output::None | Output::CompressedIdle { .. } => {}
            Output::Plain(file) => {
                file.write_all(chunk).map_err(|source| LogError::Write {
                    path: self.path.clone().unwrap_or_default(),
                    source,
                })?;
            }
            Output::Compressed(c) => c.send(chunk)?,
        }
        self.logged += chunk.len() as u64;
        Ok(LimitState::Within)
    }

    /// The first byte arrived: start the encoder thread for an idle compressed log.
    fn start_compressor(&mut self) -> Result<(), LogError> {
        if let Output::CompressedIdle { file, cap } = std::mem::replace(&mut self.out, Output::None)
        {
            let path = self.path.clone().unwrap_or_default();
            self.out = Output::Compressed(Compressor::start(file, path, cap)?);
        }
        Ok(())
    }

    /// Bytes accepted into the log so far (not counting chunks refused for
    /// going over the limit).
    pub fn bytes_written(&self) -> u64 {
        self.logged
    }

    /// Bytes the builder has written so far, including refused ones; this is
    /// what is compared with the limit.
    pub fn bytes_offered(&self) -> u64 {
        self.offered
    }

    /// The compressor's backlog (all zero for plain or unkept logs).
    pub fn queue_stats(&self) -> QueueStats {
        match &self.out {
            Output::Compressed(c) => QueueStats {
                in_memory: c.in_memory.load(Ordering::Acquire),
                peak_in_memory: c.peak_in_memory,
                spilled: c.spill.as_ref().map_or(0, |s| s.len),
            },
            _ => QueueStats::default(),
        }
    }

    /// Ends the log: waits for the compressor to drain its backlog and write
    /// the bzip2 trailer, and reports any write error (e.g. a full disk,
    /// naming the file). Blocks for as long as compression takes; see
    /// [`LogSink::finish_in_background`] for a loop that must not block.
    pub fn finish(self) -> Result<(), LogError> {
        self.finish_in_background().wait()
    }

    /// Ends the log without waiting: the returned handle reports when the
    /// compressor is done.
    pub fn finish_in_background(mut self) -> FinishingLog {
        match std::mem::replace(&mut self.out, Output::None) {
            Output::None => FinishingLog {
                state: Finishing::Done(Ok(())),
            },
            Output::Plain(file) => {
                // Unbuffered writes: nothing to flush; close errors are not
                // reported by std, as with Nix's close().
                drop(file);
                FinishingLog {
                    state: Finishing::Done(Ok(())),
                }
            }
            Output::CompressedIdle { mut file, .. } => {
                let r = file
                    .write_all(EMPTY_BZIP2)
                    .map_err(|source| LogError::Write {
                        path: self.path.clone().unwrap_or_default(),
                        source,
                    });
                FinishingLog {
                    state: Finishing::Done(r),
                }
            }
            Output::Compressed(mut c) => {
                // Closing the channel tells the thread to finish the stream.
                c.tx = None;
                match c.thread.take() {
                    Some(thread) => FinishingLog {
                        state: Finishing::Running {
                            thread,
                            path: c.path.clone(),
                        },
                    },
                    // The thread already stopped on an error, reported by `write`.
                    None => FinishingLog {
                        state: Finishing::Done(Err(LogError::WriterStopped {
                            path: c.path.clone(),
                        })),
                    },
                }
            }
        }
    }
}

/// A compressed log whose writer thread is finishing.
pub struct FinishingLog {
    state: Finishing,
}

enum Finishing {
    Done(Result<(), LogError>),
    Running {
        thread: JoinHandle<Result<(), LogError>>,
        path: PathBuf,
    },
}

impl FinishingLog {
    /// True once [`FinishingLog::wait`] would not block.
    pub fn is_done(&self) -> bool {
        match &self.state {
            Finishing::Done(_) => true,
            Finishing::Running { thread, .. } => thread.is_finished(),
        }
    }

    /// Waits for the writer thread and returns its result.
    pub fn wait(self) -> Result<(), LogError> {
        match self.state {
            Finishing::Done(r) => r,
            Finishing::Running { thread, path } => join(thread, path),
        }
    }
}

fn join(thread: JoinHandle<Result<(), LogError>>, path: PathBuf) -> Result<(), LogError> {
    thread
        .join()
        .unwrap_or(Err(LogError::WriterPanicked { path }))
}

impl Compressor {
    fn start(file: File, path: PathBuf, cap: u64) -> Result<Compressor, LogError> {
        let (tx, rx) = mpsc::channel::<Item>();
        let in_memory = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&in_memory);
        let thread_path = path.clone();
        let thread = thread::Builder::new()
            .name("nixb-log-bzip2".into())
            .spawn(move || compress_loop(file, thread_path, rx, counter))
            .map_err(|source| LogError::Create {
                path: path.clone(),
                source,
            })?;
        Ok(Compressor {
            tx: Some(tx),
            thread: Some(thread),
            in_memory,
            peak_in_memory: 0,
            cap,
            spill: None,
            path,
        })
    }

    fn send(&mut self, chunk: &[u8]) -> Result<(), LogError> {
        let len = chunk.len() as u64;
        let queued = self.in_memory.load(Ordering::Acquire);
        let item = if queued + len <= self.cap {
            // Count before sending, so the thread's decrement cannot come first.
            let now = self.in_memory.fetch_add(len, Ordering::AcqRel) + len;
            self.peak_in_memory = self.peak_in_memory.max(now);
            Item::Data(chunk.to_vec())
        } else {
            let spill = self.spill_file()?;
            let offset = spill.len;
            spill
                .file
                .write_all_at(chunk, offset)
                .map_err(|source| LogError::Write {
                    path: spill.path.clone(),
                    source,
                })?;
            spill.len += len;
            Item::Spilled {
                file: Arc::clone(&spill.file),
                path: spill.path.clone(),
                offset,
                len,
            }
        };
        let sent = match &self.tx {
            Some(tx) => tx.send(item).is_ok(),
            None => false,
        };
        if sent {
            return Ok(());
        }
        // The thread hung up: it stopped on an error. Report that error.
        self.tx = None;
        let path = self.path.clone();
        match self.thread.take() {
            Some(thread) => match join(thread, path.clone()) {
                Err(e) => Err(e),
                Ok(()) => Err(LogError::WriterPanicked { path }),
            },
            None => Err(LogError::WriterStopped { path }),
        }
    }

    fn spill_file(&mut self) -> Result<&mut Spill, LogError> {
        if self.spill.is_none() {
            let mut name = self.path.clone().into_os_string();
            name.push(format!(".spill-{}", std::process::id()));
            let path = PathBuf::from(name);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .map_err(|source| LogError::Create {
                    path: path.clone(),
                    source,
                })?;
            // Unlink at once: the space is freed when both threads close it,
            // and a crash leaves nothing behind.
            fs::remove_file(&path).map_err(|source| LogError::Create {
                path: path.clone(),
                source,
            })?;
            self.spill = Some(Spill {
                file: Arc::new(file),
                path,
                len: 0,
            });
        }
        match &mut self.spill {
            Some(spill) => Ok(spill),
            None => Err(LogError::WriterPanicked {
                path: self.path.clone(),
            }),
        }
    }
}

impl Drop for Compressor {
    fn drop(&mut self) {
        // A sink dropped without finish: close the channel and let the thread
        // finish the file on its own rather than block the caller here.
        self.tx = None;
    }
}

/// The writer thread: compresses items in order until the channel closes,
/// then writes the bzip2 trailer. On the first error it returns, which drops
/// the receiver, so the caller's next send fails and it collects the error.
/// Nice value of the compressing threads. bzip2 keeps a CPU busy for as long as a chatty
/// builder writes, and at the default priority it competes with the builders themselves.
/// Compressing is background work: at the lowest priority it gets the CPU time builders
/// leave, and the log still ends up complete, only later (the engine does not wait for a
/// log to be finished before it goes on; the process waits for its logs before it exits).
/// The measurement behind this is in BENCHMARKS.md ("log compression priority").
const COMPRESSOR_NICE: i32 = 19;

/// Lowers the calling thread's priority to [`COMPRESSOR_NICE`]. On Linux the nice value
/// belongs to the thread, and `setpriority(PRIO_PROCESS, 0, ..)` sets the caller's. Best
/// effort: a thread left at the normal priority compresses the same bytes.
fn lower_priority() {
    let _ = rustix::process::setpriority_process(None, COMPRESSOR_NICE);
}

fn compress_loop(
    file: File,
    path: PathBuf,
    rx: mpsc::Receiver<Item>,
    in_memory: Arc<AtomicU64>,
) -> Result<(), LogError> {
    let write_err = |source: io::Error| LogError::Write {
        path: path.clone(),
        source,
    };
    lower_priority();
    // Level 9, as Nix opens its bzip2 log stream.
    let mut enc = bzip2::write::BzEncoder::new(file, bzip2::Compression::best());
    let mut buf = Vec::new();
    for item in rx {
        match item {
            Item::Data(data) => {
                let res = enc.write_all(&data);
                in_memory.fetch_sub(data.len() as u64, Ordering::AcqRel);
                res.map_err(write_err)?;
            }
            Item::Spilled {
                file: spill,
                path: spill_path,
                offset,
                len,
            } => {
                let mut done = 0u64;
                while done < len {
                    let n = (len - done).min(SPILL_READ as u64) as usize;
                    buf.resize(n, 0);
                    spill
                        .read_exact_at(&mut buf, offset + done)
                        .map_err(|source| LogError::Read {
                            path: spill_path.clone(),
                            source,
                        })?;
                    enc.write_all(&buf).map_err(write_err)?;
                    done += n as u64;
                }
            }
        }
    }
    // No fsync, as in Nix: a log is not worth a disk flush per build.
    enc.finish().map_err(write_err)?;
    Ok(())
}
