//! Reading a binary cache: `file://DIR` or `http(s)://HOST/PREFIX`.
//!
//! ```text
//! <cache>/nix-cache-info            StoreDir must equal ours
//! <cache>/<hash part>.narinfo       metadata of one store path (see narinfo)
//! <cache>/<narinfo URL>             the NAR, compressed as the narinfo says
//! ```
//!
//! A NAR is never held whole in memory nor written to a temporary file: the response body
//! flows through the decompressor and a sha256 hasher straight into `nar::restore_path`,
//! and only when the stream has ended are `NarHash` and `NarSize` compared; a mismatch
//! deletes what was unpacked. `FileSize` is compared too (counting is free), `FileHash`
//! is not computed: it is outside the signed fingerprint, so it guards nothing that
//! `NarHash` does not, and a second sha256 pass over the compressed bytes cost as much
//! as the first (Nix 2.8 does not check it either). Transient failures (connection refused or reset, timeouts,
//! HTTP 5xx and 429, a body cut off mid-way) are retried with exponential backoff; a 404
//! is an answer ("not in this cache"), not a failure.

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nixb_store::hash::{Encoding, Hash, HashAlgo, Hasher};
use nixb_store::nar::{self, NarError};
use nixb_store::{StoreDir, StorePath};

use crate::narinfo::{CacheInfo, Compression, NarInfo, NarInfoError};
use crate::signing::TrustedKeys;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache '{cache}': {reason}")]
    Open { cache: String, reason: String },
    #[error("cache '{cache}' is for store '{theirs}', but this store is '{ours}'")]
    StoreDirMismatch {
        cache: String,
        theirs: String,
        ours: String,
    },
    #[error("cache '{cache}': fetching '{url}'{} failed after {attempts} attempt(s): {reason}", for_path.as_ref().map(|p| format!(" (nar of '{p}')")).unwrap_or_default())]
    Transfer {
        cache: String,
        url: String,
        /// The store path whose NAR this was, if any.
        for_path: Option<String>,
        attempts: u32,
        reason: String,
    },
    #[error("cache '{cache}': fetching '{url}': {reason}")]
    Http {
        cache: String,
        url: String,
        reason: String,
    },
    #[error(transparent)]
    NarInfo(#[from] NarInfoError),
    #[error("cache '{cache}': narinfo for '{asked}' describes '{got}'")]
    WrongPath {
        cache: String,
        asked: String,
        got: String,
    },
    #[error("cache '{cache}': nar of '{path}' ('{url}') is missing")]
    NarMissing {
        cache: String,
        path: String,
        url: String,
    },
    #[error("cache '{cache}': unpacking nar of '{path}': {source}")]
    Unpack {
        cache: String,
        path: String,
        #[source]
        source: NarError,
    },
    #[error("cache '{cache}': {what} mismatch for '{path}': narinfo says {expected}, got {got}")]
    Mismatch {
        cache: String,
        path: String,
        what: &'static str,
        expected: String,
        got: String,
    },
    #[error("cache '{cache}': refusing '{path}': {reason}")]
    Untrusted {
        cache: String,
        path: String,
        reason: String,
    },
    #[error("{step} '{path}': {source}")]
    Io {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// How to talk to a cache and what to trust from it.
#[derive(Clone, Debug)]
pub struct CacheOptions {
    /// `trusted-public-keys`.
    pub trusted_keys: TrustedKeys,
    /// `require-sigs`: refuse paths no trusted key has signed.
    pub require_sigs: bool,
    pub connect_timeout: Duration,
    /// Longest wait for any single read on the connection (a stalled server).
    pub read_timeout: Duration,
    /// Attempts per request, the first included (Nix's `download-attempts` is 5).
    pub attempts: u32,
    /// Wait before the second attempt; doubled for each further one.
    pub initial_backoff: Duration,
}

impl Default for CacheOptions {
    fn default() -> Self {
        CacheOptions {
            trusted_keys: TrustedKeys::new(),
            require_sigs: true,
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
            attempts: 5,
            initial_backoff: Duration::from_millis(250),
        }
    }
}

enum Transport {
    File(PathBuf),
    Http { base: String, agent: ureq::Agent },
}

/// What one attempt at a request came to.
enum Attempt<T> {
    Done(T),
    /// Worth retrying (network trouble, server trouble).
    Transient(String),
    Fatal(CacheError),
}

type Body = Box<dyn Read + Send>;

/// An open binary cache.
pub struct BinaryCache {
    url: String,
    transport: Transport,
    store_dir: StoreDir,
    info: CacheInfo,
    opts: CacheOptions,
}

impl std::fmt::Debug for BinaryCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BinaryCache({})", self.url)
    }
}

/// Remembers that the transport (not the data) failed while a body was being read, so
/// that the whole download is retried rather than reported as a corrupt NAR.
struct FlagOnError<R> {
    inner: R,
    failed: Arc<AtomicBool>,
    error: Arc<std::sync::Mutex<Option<String>>>,
}

impl<R: Read> Read for FlagOnError<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).inspect_err(|e| {
            if e.kind() != io::ErrorKind::Interrupted {
                self.failed.store(true, Ordering::SeqCst);
                if let Ok(mut g) = self.error.lock() {
                    *g = Some(e.to_string());
                }
            }
        })
    }
}

/// Counts the bytes of the compressed file (for `FileSize`) as they pass.
struct CountingReader<R> {
    inner: R,
    count: u64,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        Ok(n)
    }
}

/// Hashes the NAR (sha256, for `NarHash`) and counts it (for `NarSize`) as it passes.
struct HashingReader<R> {
    inner: R,
    hasher: Hasher,
    count: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// Read size for the compressed file and for the NAR coming out of the decompressor.
/// The NAR parser reads 8-byte tags; behind this buffer those cost a copy instead of a
/// decompressor call (and a hasher update) each, and the file is read in large chunks.
const STREAM_BUF: usize = 128 * 1024;

/// liblzma's `LZMA_IGNORE_CHECK` decoder flag (`lzma/container.h`, liblzma >= 5.1.4).
/// Spelled out because xz2 0.1's `IGNORE_CHECK` constant carries another flag's value.
const LZMA_IGNORE_CHECK: u32 = 0x10;

fn decompressor<'a>(c: Compression, r: impl Read + 'a) -> io::Result<Box<dyn Read + 'a>> {
    // Multi-stream decoders: parallel compressors write several concatenated streams.
    Ok(match c {
        Compression::None => Box::new(r),
        Compression::Xz => {
            // The stream's CRC64/SHA-256 check is skipped: every byte that comes out is
            // hashed for NarHash, which the narinfo's signature covers, so a corrupt
            // stream is refused anyway, and the check cost about as much as decoding.
            // Only the xz format is accepted, as Nix (lzma_stream_decoder) does.
            let stream = xz2::stream::Stream::new_stream_decoder(
                u64::MAX,
                xz2::stream::CONCATENATED | LZMA_IGNORE_CHECK,
            )
            .map_err(io::Error::other)?;
            Box::new(xz2::bufread::XzDecoder::new_stream(
                io::BufReader::with_capacity(STREAM_BUF, r),
                stream,
            ))
        }
        Compression::Bzip2 => Box::new(bzip2::read::MultiBzDecoder::new(
            io::BufReader::with_capacity(STREAM_BUF, r),
        )),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(
            io::BufReader::with_capacity(STREAM_BUF, r),
        )?),
    })
}

/// Removes `path` (file, symlink or tree; see [`nixb_store::delete::delete_path`]). A
/// missing path is fine.
pub fn delete_path(path: &Path) -> Result<(), CacheError> {
    nixb_store::delete::delete_path(path).map_err(|e| CacheError::Io {
        step: e.step,
        path: e.path,
        source: e.source,
    })
}

impl BinaryCache {
    /// Opens the cache at `url` (`file:///dir`, `http://host[:port]/prefix`, `https://...`)
    /// and reads its `nix-cache-info`, refusing a cache made for another store directory:
    /// its paths and references would mean nothing here.
    pub fn open(
        url: &str,
        store_dir: &StoreDir,
        opts: CacheOptions,
    ) -> Result<BinaryCache, CacheError> {
        let url = url.trim_end_matches('/').to_string();
        let transport = if let Some(dir) = url.strip_prefix("file://") {
            if !dir.starts_with('/') {
                return Err(CacheError::Open {
                    cache: url.clone(),
                    reason: "a file:// cache needs an absolute directory".into(),
                });
            }
            Transport::File(PathBuf::from(dir))
        } else if url.starts_with("http://") || url.starts_with("https://") {
            let agent = ureq::AgentBuilder::new()
                .timeout_connect(opts.connect_timeout)
                .timeout_read(opts.read_timeout)
                .user_agent(concat!("nixb/", env!("CARGO_PKG_VERSION")))
                .build();
            Transport::Http {
                base: url.clone(),
                agent,
            }
        } else {
            return Err(CacheError::Open {
                cache: url.clone(),
                reason: "unsupported cache URL (expected file://, http:// or https://)".into(),
            });
        };
        let mut cache = BinaryCache {
            url,
            transport,
            store_dir: store_dir.clone(),
            info: CacheInfo {
                store_dir: String::new(),
                want_mass_query: false,
                priority: None,
            },
            opts,
        };
        let whence = format!("{}/nix-cache-info", cache.url);
        let text = cache
            .get_text("nix-cache-info")?
            .ok_or_else(|| CacheError::Open {
                cache: cache.url.clone(),
                reason: "no nix-cache-info (is this a binary cache?)".into(),
            })?;
        let info = CacheInfo::parse(&text, &whence)?;
        if info.store_dir != store_dir.as_str() {
            return Err(CacheError::StoreDirMismatch {
                cache: cache.url.clone(),
                theirs: info.store_dir,
                ours: store_dir.as_str().to_string(),
            });
        }
        cache.info = info;
        Ok(cache)
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn info(&self) -> &CacheInfo {
        &self.info
    }

    pub fn options(&self) -> &CacheOptions {
        &self.opts
    }

    pub fn store_dir(&self) -> &StoreDir {
        &self.store_dir
    }

    /// Checks a relative URL from a narinfo: it must stay inside the cache.
    fn check_rel(&self, rel: &str) -> Result<(), CacheError> {
        let escapes = rel.starts_with('/')
            || rel.split('/').any(|c| c == ".." || c == ".")
            || rel.contains('\\');
        if escapes || rel.contains("://") || rel.contains('?') || rel.contains('#') {
            return Err(CacheError::Http {
                cache: self.url.clone(),
                url: rel.to_string(),
                reason: "URL leaves the cache (only plain relative URLs are followed)".into(),
            });
        }
        Ok(())
    }

    fn full_url(&self, rel: &str) -> String {
        format!("{}/{}", self.url, rel)
    }

    /// Runs `attempt` until it succeeds, fails for good, or the attempts run out, sleeping
    /// initial_backoff, 2x, 4x ... between tries.
    fn retrying<T>(
        &self,
        rel: &str,
        for_path: Option<&str>,
        mut attempt: impl FnMut() -> Attempt<T>,
    ) -> Result<T, CacheError> {
        let mut delay = self.opts.initial_backoff;
        let attempts = self.opts.attempts.max(1);
        let mut last = String::new();
        for n in 1..=attempts {
            match attempt() {
                Attempt::Done(v) => return Ok(v),
                Attempt::Fatal(e) => return Err(e),
                Attempt::Transient(why) => {
                    tracing::warn!(
                        "cache '{}': fetching '{}' (attempt {n} of {attempts}): {why}",
                        self.url,
                        rel
                    );
                    last = why;
                    if n < attempts {
                        std::thread::sleep(delay);
                        delay = delay.saturating_mul(2);
                    }
                }
            }
        }
        Err(CacheError::Transfer {
            cache: self.url.clone(),
            url: self.full_url(rel),
            for_path: for_path.map(String::from),
            attempts,
            reason: last,
        })
    }

    /// One request: the body, `None` when the cache does not have the file.
    fn request(&self, rel: &str) -> Attempt<Option<Body>> {
        match &self.transport {
            Transport::File(dir) => {
                let p = dir.join(rel);
                match std::fs::File::open(&p) {
                    Ok(f) => Attempt::Done(Some(Box::new(f))),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Attempt::Done(None),
                    Err(source) => Attempt::Fatal(CacheError::Io {
                        step: "opening",
                        path: p,
                        source,
                    }),
                }
            }
            Transport::Http { base, agent } => {
                let url = format!("{base}/{rel}");
                match agent.get(&url).call() {
                    Ok(resp) => Attempt::Done(Some(Box::new(resp.into_reader()))),
                    // Nix treats 403 like 404: S3 answers 403 for a missing key.
                    Err(ureq::Error::Status(404 | 403 | 410, _)) => Attempt::Done(None),
                    Err(ureq::Error::Status(code, resp))
                        if code >= 500 || code == 429 || code == 408 =>
                    {
                        Attempt::Transient(format!("HTTP {code} {}", resp.status_text()))
                    }
                    Err(ureq::Error::Status(code, resp)) => Attempt::Fatal(CacheError::Http {
                        cache: self.url.clone(),
                        url,
                        reason: format!("HTTP {code} {}", resp.status_text()),
                    }),
                    Err(ureq::Error::Transport(t)) => match t.kind() {
                        ureq::ErrorKind::InvalidUrl
                        | ureq::ErrorKind::UnknownScheme
                        | ureq::ErrorKind::InvalidProxyUrl => Attempt::Fatal(CacheError::Http {
                            cache: self.url.clone(),
                            url,
                            reason: t.to_string(),
                        }),
                        _ => Attempt::Transient(t.to_string()),
                    },
                }
            }
        }
    }

    /// A small text file (narinfo, nix-cache-info), read whole with retries.
    fn get_text(&self, rel: &str) -> Result<Option<String>, CacheError> {
        // Anything this large is not a narinfo; refuse rather than fill memory.
        const MAX: u64 = 16 << 20;
        self.retrying(rel, None, || match self.request(rel) {
            Attempt::Done(None) => Attempt::Done(None),
            Attempt::Done(Some(body)) => {
                // Room for a typical narinfo, so it takes one read rather than a probing
                // series of doubling reads starting at 32 bytes.
                let mut buf = Vec::with_capacity(8 * 1024);
                match body.take(MAX + 1).read_to_end(&mut buf) {
                    Ok(_) if buf.len() as u64 > MAX => Attempt::Fatal(CacheError::Http {
                        cache: self.url.clone(),
                        url: self.full_url(rel),
                        reason: format!("file larger than {MAX} bytes"),
                    }),
                    Ok(_) => match String::from_utf8(buf) {
                        Ok(s) => Attempt::Done(Some(s)),
                        Err(_) => Attempt::Fatal(CacheError::Http {
                            cache: self.url.clone(),
                            url: self.full_url(rel),
                            reason: "file is not UTF-8 text".into(),
                        }),
                    },
                    Err(e) if matches!(self.transport, Transport::Http { .. }) => {
                        Attempt::Transient(e.to_string())
                    }
                    Err(source) => Attempt::Fatal(CacheError::Io {
                        step: "reading",
                        path: PathBuf::from(self.full_url(rel)),
                        source,
                    }),
                }
            }
            Attempt::Transient(s) => Attempt::Transient(s),
            Attempt::Fatal(e) => Attempt::Fatal(e),
        })
    }

    /// The narinfo of `path`, or `None` when the cache does not have it.
    pub fn query_info(&self, path: &StorePath) -> Result<Option<NarInfo>, CacheError> {
        let rel = format!("{}.narinfo", path.hash_part());
        let Some(text) = self.get_text(&rel)? else {
            return Ok(None);
        };
        let info = NarInfo::parse(&text, &self.store_dir, &self.full_url(&rel))?;
        if &info.store_path != path {
            return Err(CacheError::WrongPath {
                cache: self.url.clone(),
                asked: self.store_dir.print(path),
                got: self.store_dir.print(&info.store_path),
            });
        }
        Ok(Some(info))
    }

    /// Refuses `info` unless a trusted key signed it (when `require_sigs`).
    pub fn check_signatures(&self, info: &NarInfo) -> Result<(), CacheError> {
        if !self.opts.require_sigs {
            return Ok(());
        }
        let refuse = |reason: String| CacheError::Untrusted {
            cache: self.url.clone(),
            path: self.store_dir.print(&info.store_path),
            reason,
        };
        if info.sigs.is_empty() {
            return Err(refuse(
                "it is not signed (set require-sigs = false to accept unsigned paths)".into(),
            ));
        }
        if self
            .opts
            .trusted_keys
            .count_valid(&info.fingerprint(&self.store_dir), &info.sigs)
            == 0
        {
            let names: Vec<&str> = info
                .sigs
                .iter()
                .map(|s| s.split(':').next().unwrap_or(""))
                .collect();
            return Err(refuse(format!(
                "no valid signature by a trusted key (signed by: {}; check trusted-public-keys)",
                names.join(", ")
            )));
        }
        Ok(())
    }

    /// Downloads, decompresses and unpacks the NAR of `info` into `dest` (which must not
    /// exist), returning its sha256 NAR hash and size after checking them against the
    /// narinfo. On any failure `dest` does not exist afterwards.
    pub fn fetch_into(&self, info: &NarInfo, dest: &Path) -> Result<(Hash, u64), CacheError> {
        self.check_rel(&info.url)?;
        let path_str = self.store_dir.print(&info.store_path);
        let mismatch = |what, expected: String, got: String| CacheError::Mismatch {
            cache: self.url.clone(),
            path: path_str.clone(),
            what,
            expected,
            got,
        };
        let outcome = self.retrying(&info.url, Some(&path_str), || {
            let body = match self.request(&info.url) {
                Attempt::Done(Some(b)) => b,
                Attempt::Done(None) => {
                    return Attempt::Fatal(CacheError::NarMissing {
                        cache: self.url.clone(),
                        path: path_str.clone(),
                        url: self.full_url(&info.url),
                    })
                }
                Attempt::Transient(s) => return Attempt::Transient(s),
                Attempt::Fatal(e) => return Attempt::Fatal(e),
            };
            let failed = Arc::new(AtomicBool::new(false));
            let error = Arc::new(std::sync::Mutex::new(None));
            let flagged = FlagOnError {
                inner: body,
                failed: failed.clone(),
                error: error.clone(),
            };
            let mut file = CountingReader {
                inner: flagged,
                count: 0,
            };
            let res = (|| {
                let decoder =
                    decompressor(info.compression, &mut file).map_err(|e| NarError::Read {
                        offset: 0,
                        source: e,
                    })?;
                // The hasher sits below the buffer, so it sees large chunks; restore_path
                // reads to the end of the stream, so every byte is hashed and counted.
                let mut nar = io::BufReader::with_capacity(
                    STREAM_BUF,
                    HashingReader {
                        inner: decoder,
                        hasher: Hasher::new(HashAlgo::Sha256),
                        count: 0,
                    },
                );
                nar::restore_path(&mut nar, dest)?;
                let nar = nar.into_inner();
                Ok::<_, NarError>((nar.hasher, nar.count))
            })();
            match res {
                Ok((h, n)) => {
                    // The decompressor may stop at the end of its stream; whatever follows
                    // in the file must still be counted for FileSize.
                    if let Err(e) = io::copy(&mut file, &mut io::sink()) {
                        let _ = delete_path(dest);
                        return if failed.load(Ordering::SeqCst) {
                            Attempt::Transient(e.to_string())
                        } else {
                            Attempt::Fatal(CacheError::Io {
                                step: "reading",
                                path: PathBuf::from(self.full_url(&info.url)),
                                source: e,
                            })
                        };
                    }
                    Attempt::Done((h.finish(), n, file.count))
                }
                // The connection broke mid-body: restore_path already removed what it
                // made, so the next attempt starts from nothing.
                Err(_) if failed.load(Ordering::SeqCst) => {
                    let why = error
                        .lock()
                        .ok()
                        .and_then(|g| g.clone())
                        .unwrap_or_default();
                    Attempt::Transient(format!("connection failed while downloading: {why}"))
                }
                Err(source) => Attempt::Fatal(CacheError::Unpack {
                    cache: self.url.clone(),
                    path: path_str.clone(),
                    source,
                }),
            }
        });
        let (nar_hash, nar_size, file_size) = outcome?;
        let check = || -> Result<(), CacheError> {
            if nar_size != info.nar_size {
                return Err(mismatch(
                    "NarSize",
                    info.nar_size.to_string(),
                    nar_size.to_string(),
                ));
            }
            if nar_hash != info.nar_hash {
                return Err(mismatch(
                    "NarHash",
                    info.nar_hash.to_typed(Encoding::Base32),
                    nar_hash.to_typed(Encoding::Base32),
                ));
            }
            if let Some(expected) = info.file_size {
                if expected != file_size {
                    return Err(mismatch(
                        "FileSize",
                        expected.to_string(),
                        file_size.to_string(),
                    ));
                }
            }
            Ok(())
        };
        if let Err(e) = check() {
            delete_path(dest)?;
            return Err(e);
        }
        Ok((info.nar_hash.clone(), nar_size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Incompressible bytes (xorshift), so that xz stores them in uncompressed LZMA2
    /// chunks: a byte changed there decodes without complaint to a different NAR.
    fn noise(n: usize) -> Vec<u8> {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// A file:// cache holding one path whose NAR is xz-compressed, unsigned; returns the
    /// cache, its root and the compressed NAR's file.
    fn one_path_cache(tmp: &Path) -> (BinaryCache, NarInfo, PathBuf) {
        let sd = StoreDir::new("/nix/store").unwrap();
        let src = tmp.join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("data"), noise(200_000)).unwrap();
        std::fs::write(src.join("name"), b"x\n").unwrap();
        let mut nar = Vec::new();
        nar::dump_path(&src, &mut nar).unwrap();
        // The expected hash comes from sha2 directly, not from the code under test.
        let nar_hash = {
            use sha2::Digest;
            let d = sha2::Sha256::digest(&nar);
            Hash::parse_typed(&format!("sha256:{}", data_encoding::HEXLOWER.encode(&d))).unwrap()
        };
        let mut enc = xz2::write::XzEncoder::new(Vec::new(), 6);
        enc.write_all(&nar).unwrap();
        let xz = enc.finish().unwrap();
        let root = tmp.join("cache");
        std::fs::create_dir_all(root.join("nar")).unwrap();
        std::fs::write(
            root.join("nix-cache-info"),
            "StoreDir: /nix/store\nWantMassQuery: 1\n",
        )
        .unwrap();
        let nar_file = root.join("nar/x.nar.xz");
        std::fs::write(&nar_file, &xz).unwrap();
        let text = format!(
            "StorePath: /nix/store/0123456789abcdfghijklmnpqrsvwxyz-x\nURL: nar/x.nar.xz\n\
             Compression: xz\nFileSize: {}\nNarHash: {}\nNarSize: {}\nReferences: \n",
            xz.len(),
            nar_hash.to_typed(Encoding::Base32),
            nar.len()
        );
        let info = NarInfo::parse(&text, &sd, "test").unwrap();
        let opts = CacheOptions {
            require_sigs: false,
            attempts: 1,
            ..CacheOptions::default()
        };
        let cache = BinaryCache::open(&format!("file://{}", root.display()), &sd, opts).unwrap();
        (cache, info, nar_file)
    }

    #[test]
    fn xz_nar_is_unpacked_and_verified() {
        let tmp = tempfile::tempdir().unwrap();
        let (cache, info, _) = one_path_cache(tmp.path());
        let dest = tmp.path().join("out");
        let (h, n) = cache.fetch_into(&info, &dest).unwrap();
        assert_eq!((h, n), (info.nar_hash.clone(), info.nar_size));
        assert_eq!(std::fs::read(dest.join("data")).unwrap(), noise(200_000));
        assert_eq!(std::fs::read(dest.join("name")).unwrap(), b"x\n");
    }

    /// The xz integrity check is skipped while decoding (see `decompressor`): a byte
    /// changed inside the compressed data must still be refused, by NarHash, with
    /// nothing left at the destination.
    #[test]
    fn corrupt_xz_data_is_refused_by_nar_hash() {
        let tmp = tempfile::tempdir().unwrap();
        let (cache, info, nar_file) = one_path_cache(tmp.path());
        let mut xz = std::fs::read(&nar_file).unwrap();
        let mid = xz.len() / 2;
        xz[mid] ^= 0x55;
        std::fs::write(&nar_file, &xz).unwrap();
        let dest = tmp.path().join("out");
        let err = cache.fetch_into(&info, &dest).unwrap_err();
        assert!(
            matches!(
                err,
                CacheError::Mismatch {
                    what: "NarHash",
                    ..
                }
            ),
            "{err}"
        );
        assert!(std::fs::symlink_metadata(&dest).is_err(), "dest removed");
    }

    /// A narinfo's FileSize that disagrees with the file is refused.
    #[test]
    fn wrong_file_size_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let (cache, mut info, _) = one_path_cache(tmp.path());
        info.file_size = info.file_size.map(|n| n + 1);
        let dest = tmp.path().join("out");
        let err = cache.fetch_into(&info, &dest).unwrap_err();
        assert!(
            matches!(
                err,
                CacheError::Mismatch {
                    what: "FileSize",
                    ..
                }
            ),
            "{err}"
        );
        assert!(std::fs::symlink_metadata(&dest).is_err(), "dest removed");
    }
}
