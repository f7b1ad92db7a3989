//! The client side of `nix-store --serve`: what a machine that hands a build to another
//! one does. It speaks to any peer that implements the protocol (real Nix's
//! `nix-store --serve --write`, or nixb's [`serve`](crate::server::serve)) over any pair
//! of byte streams; [`crate::transport`] provides them for SSH and local children.
//!
//! Copying is closure-preserving in both directions: paths go to the remote in
//! dependency order after asking which it already has, and paths coming back are added
//! locally only after everything they reference, each NAR checked against the hash and
//! size the remote announced.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};

use nixb_store::derivation::Derivation;
use nixb_store::local_store::{LocalStore, ValidPathInfo};
use nixb_store::{StoreDir, StorePath};

use crate::error::ServeError;
use crate::import::{add_nar_to_store, dump_nar, export_paths, import_paths, topo_sort};
use crate::proto::{
    nar_hash_base16, protocol_major, protocol_minor, read_path_info, read_paths,
    write_basic_derivation, write_paths, BuildOptions, BuildResult, BuildStatus, Command,
    MIN_PROTOCOL_VERSION, SERVE_MAGIC_1, SERVE_MAGIC_2, SERVE_PROTOCOL_VERSION,
};
use crate::wire::{WireError, WireReader, WireWriter};

pub struct ServeClient<R: Read, W: Write> {
    r: WireReader<R>,
    w: WireWriter<W>,
    /// The version both sides use: the lower of ours and the remote's.
    version: u64,
    remote_version: u64,
    store_dir: StoreDir,
    peer: String,
}

impl<R: Read, W: Write> ServeClient<R, W> {
    /// Opens a session over `reader` (the remote's standard output) and `writer` (its
    /// standard input): exchanges the greeting and checks the remote speaks 2.x, at
    /// least 2.4. `peer` names the remote in every error; `store_dir` is the store
    /// directory both sides share (paths are the same string on both).
    pub fn new(
        reader: R,
        writer: W,
        store_dir: StoreDir,
        peer: &str,
    ) -> Result<ServeClient<R, W>, ServeError> {
        let mut c = ServeClient {
            r: WireReader::new(reader),
            w: WireWriter::new(writer),
            version: SERVE_PROTOCOL_VERSION,
            remote_version: 0,
            store_dir,
            peer: peer.to_string(),
        };
        c.handshake().map_err(|e| ServeError::peer(peer, e))?;
        Ok(c)
    }

    fn handshake(&mut self) -> Result<(), ServeError> {
        self.w.write_u64(SERVE_MAGIC_1, "magic")?;
        self.w
            .write_u64(SERVE_PROTOCOL_VERSION, "protocol version")?;
        self.w.flush()?;
        let magic = match self.r.read_u64("magic") {
            Ok(m) => m,
            Err(WireError::Eof { .. }) => {
                return Err(ServeError::HandshakeEof {
                    stderr: String::new(),
                })
            }
            Err(e) => return Err(e.into()),
        };
        if magic != SERVE_MAGIC_2 {
            return Err(ServeError::BadMagic {
                expected: SERVE_MAGIC_2,
                got: magic,
                stderr: String::new(),
            });
        }
        let v = self.r.read_u64("protocol version")?;
        if protocol_major(v) != 0x200 || v < MIN_PROTOCOL_VERSION {
            return Err(ServeError::Version(v));
        }
        self.remote_version = v;
        self.version = v.min(SERVE_PROTOCOL_VERSION);
        Ok(())
    }

    /// The version the remote announced.
    pub fn remote_version(&self) -> u64 {
        self.remote_version
    }

    pub fn peer(&self) -> &str {
        &self.peer
    }

    pub fn store_dir(&self) -> &StoreDir {
        &self.store_dir
    }

    fn ctx<T>(&self, res: Result<T, ServeError>) -> Result<T, ServeError> {
        res.map_err(|e| ServeError::peer(&self.peer, e))
    }

    /// Which of `paths` are valid on the remote. With `substitute`, the remote first
    /// tries to fetch missing ones from its own substituters (`builders-use-substitutes`).
    pub fn query_valid_paths(
        &mut self,
        paths: &BTreeSet<StorePath>,
        lock: bool,
        substitute: bool,
    ) -> Result<BTreeSet<StorePath>, ServeError> {
        let res = (|| {
            self.w
                .write_u64(Command::QueryValidPaths as u64, "command")?;
            self.w.write_bool(lock, "lock flag")?;
            self.w.write_bool(substitute, "substitute flag")?;
            write_paths(&mut self.w, &self.store_dir, paths, "paths")?;
            self.w.flush()?;
            read_paths(&mut self.r, &self.store_dir, "valid paths")
        })();
        self.ctx(res)
    }

    /// What the remote knows about those of `paths` that are valid there.
    pub fn query_path_infos(
        &mut self,
        paths: &BTreeSet<StorePath>,
    ) -> Result<BTreeMap<StorePath, ValidPathInfo>, ServeError> {
        let res = (|| {
            self.w
                .write_u64(Command::QueryPathInfos as u64, "command")?;
            write_paths(&mut self.w, &self.store_dir, paths, "paths")?;
            self.w.flush()?;
            let mut out = BTreeMap::new();
            while let Some(info) = read_path_info(&mut self.r, &self.store_dir, self.version)? {
                out.insert(info.path.clone(), info);
            }
            Ok(out)
        })();
        self.ctx(res)
    }

    /// The closure of `paths` on the remote (with the outputs of derivations among them
    /// when `include_outputs`).
    pub fn query_closure(
        &mut self,
        paths: &BTreeSet<StorePath>,
        include_outputs: bool,
    ) -> Result<BTreeSet<StorePath>, ServeError> {
        let res = (|| {
            self.w.write_u64(Command::QueryClosure as u64, "command")?;
            self.w.write_bool(include_outputs, "include outputs flag")?;
            write_paths(&mut self.w, &self.store_dir, paths, "paths")?;
            self.w.flush()?;
            read_paths(&mut self.r, &self.store_dir, "closure")
        })();
        self.ctx(res)
    }

    /// Sends one valid local path with `AddToStoreNar`; its references must already be
    /// valid on the remote.
    pub fn add_to_store_nar(
        &mut self,
        store: &LocalStore,
        info: &ValidPathInfo,
    ) -> Result<(), ServeError> {
        let dir = store.store_dir().clone();
        let res = (|| {
            let w = &mut self.w;
            w.write_u64(Command::AddToStoreNar as u64, "command")?;
            w.write_str(&dir.print(&info.path), "path")?;
            w.write_str(
                &info
                    .deriver
                    .as_ref()
                    .map(|d| dir.print(d))
                    .unwrap_or_default(),
                "deriver",
            )?;
            w.write_str(&nar_hash_base16(&info.nar_hash), "nar hash")?;
            write_paths(w, &dir, &info.references, "references")?;
            w.write_u64(info.registration_time.max(0) as u64, "registration time")?;
            w.write_u64(info.nar_size, "nar size")?;
            w.write_bool(info.ultimate, "ultimate flag")?;
            w.write_strings(info.sigs.iter().map(|s| s.as_str()), "signatures")?;
            w.write_str(info.ca.as_deref().unwrap_or(""), "content address")?;
            dump_nar(store, &info.path, w)?;
            w.flush()?;
            let code = self.r.read_u64("add result")?;
            if code != 1 {
                return Err(ServeError::Refused {
                    step: format!("adding '{}'", dir.print(&info.path)),
                    code,
                });
            }
            Ok(())
        })();
        self.ctx(res)
    }

    /// Sends valid local paths as one `ImportPaths` export stream (the pre-2.5 way of
    /// copying, kept for old peers); references must be valid on the remote or among
    /// `paths`.
    pub fn import_paths(
        &mut self,
        store: &LocalStore,
        paths: &BTreeSet<StorePath>,
    ) -> Result<(), ServeError> {
        let res = (|| {
            self.w.write_u64(Command::ImportPaths as u64, "command")?;
            export_paths(store, paths, &mut self.w)?;
            self.w.flush()?;
            let code = self.r.read_u64("import result")?;
            if code != 1 {
                return Err(ServeError::Refused {
                    step: format!("importing {} paths", paths.len()),
                    code,
                });
            }
            Ok(())
        })();
        self.ctx(res)
    }

    /// Copies the closure of `paths` from `store` to the remote, sending only what the
    /// remote lacks (after letting it substitute, with `substitute`), references first.
    /// Returns the paths sent.
    pub fn copy_closure_to(
        &mut self,
        store: &LocalStore,
        paths: &BTreeSet<StorePath>,
        substitute: bool,
    ) -> Result<Vec<StorePath>, ServeError> {
        let closure = store.compute_closure(paths)?;
        let present = self.query_valid_paths(&closure, false, substitute)?;
        let missing: BTreeSet<StorePath> = closure.difference(&present).cloned().collect();
        let mut infos = BTreeMap::new();
        for p in &missing {
            let info = store
                .query_path_info(p)?
                .ok_or_else(|| ServeError::NotValid(store.store_dir().print(p)))?;
            infos.insert(p.clone(), info);
        }
        let order = topo_sort(store.store_dir(), &missing, |p| {
            Ok(infos[p].references.clone())
        })?;
        if protocol_minor(self.version) >= 5 {
            for p in &order {
                self.add_to_store_nar(store, &infos[p])?;
            }
        } else if !missing.is_empty() {
            self.import_paths(store, &missing)?;
        }
        Ok(order)
    }

    /// Streams the NAR of a remote path into `sink`, as it arrives.
    pub fn dump_store_path(
        &mut self,
        path: &StorePath,
        sink: &mut impl Write,
    ) -> Result<(), ServeError> {
        let dir = self.store_dir.clone();
        let res = (|| {
            self.w.write_u64(Command::DumpStorePath as u64, "command")?;
            self.w.write_str(&dir.print(path), "path")?;
            self.w.flush()?;
            // The NAR is not length-prefixed: only parsing it tells where it ends, so it
            // is unpacked into a scratch directory while being passed on.
            let scratch = scratch_dir()?;
            let mut tee = TeeReader {
                inner: &mut self.r,
                sink,
            };
            let res = nixb_store::nar::restore_path_prefix(&mut tee, &scratch.join("nar"))
                .map_err(ServeError::nar(dir.print(path)));
            let _ = crate::import::remove_tree(&scratch);
            res
        })();
        self.ctx(res)
    }

    /// Copies `paths` and whatever they reference from the remote into `store`: infos
    /// first (so the closure is known and each NAR can be verified), then one
    /// `DumpStorePath` per missing path, in dependency order. Returns the paths added.
    pub fn copy_paths_from(
        &mut self,
        store: &LocalStore,
        paths: &BTreeSet<StorePath>,
    ) -> Result<Vec<StorePath>, ServeError> {
        let mut infos: BTreeMap<StorePath, ValidPathInfo> = BTreeMap::new();
        let mut todo: BTreeSet<StorePath> = BTreeSet::new();
        for p in paths {
            if !store.is_valid_path(p)? {
                todo.insert(p.clone());
            }
        }
        while !todo.is_empty() {
            let got = self.query_path_infos(&todo)?;
            for p in &todo {
                if !got.contains_key(p) {
                    return Err(ServeError::peer(
                        &self.peer,
                        ServeError::NotValid(self.store_dir.print(p)),
                    ));
                }
            }
            let mut next = BTreeSet::new();
            for (p, info) in got {
                for r in &info.references {
                    if *r != p && !infos.contains_key(r) && !store.is_valid_path(r)? {
                        next.insert(r.clone());
                    }
                }
                infos.insert(p, info);
            }
            next.retain(|r| !infos.contains_key(r));
            todo = next;
        }
        let wanted: BTreeSet<StorePath> = infos.keys().cloned().collect();
        let order = topo_sort(&self.store_dir, &wanted, |p| {
            Ok(infos[p].references.clone())
        })?;
        let mut added = Vec::new();
        for p in order {
            let dir = self.store_dir.clone();
            let res = (|| {
                self.w.write_u64(Command::DumpStorePath as u64, "command")?;
                self.w.write_str(&dir.print(&p), "path")?;
                self.w.flush()?;
                add_nar_to_store(store, &infos[&p], &mut self.r)
            })();
            if self.ctx(res)? {
                added.push(p);
            }
        }
        Ok(added)
    }

    /// Fetches `paths` (with everything they reference that `store` lacks) with one
    /// `ExportPaths` request, adding them as they arrive.
    pub fn export_paths_into(
        &mut self,
        store: &LocalStore,
        paths: &BTreeSet<StorePath>,
    ) -> Result<Vec<StorePath>, ServeError> {
        let res = (|| {
            self.w.write_u64(Command::ExportPaths as u64, "command")?;
            self.w.write_u64(0, "obsolete flag")?;
            write_paths(&mut self.w, &self.store_dir, paths, "paths")?;
            self.w.flush()?;
            import_paths(store, &mut self.r)
        })();
        self.ctx(res)
    }

    /// Builds `drv` (a `BasicDerivation`: input derivations already resolved to their
    /// outputs in `input_srcs`, see [`crate::proto::basic_derivation`]) on the remote.
    /// The inputs' closure must be there already ([`copy_closure_to`](Self::copy_closure_to)).
    /// The build log arrives on the remote's standard error, not here.
    pub fn build_derivation(
        &mut self,
        drv_path: &StorePath,
        drv: &Derivation,
        options: &BuildOptions,
    ) -> Result<BuildResult, ServeError> {
        let dir = self.store_dir.clone();
        let version = self.version;
        let res = (|| {
            self.w
                .write_u64(Command::BuildDerivation as u64, "command")?;
            self.w.write_str(&dir.print(drv_path), "derivation path")?;
            write_basic_derivation(&mut self.w, &dir, drv)?;
            options.write(&mut self.w, version)?;
            self.w.flush()?;
            // Nix 2.8 always sends the built outputs; older servers only from 2.6 on.
            BuildResult::read(&mut self.r, version.max(0x206))
        })();
        self.ctx(res)
    }

    /// Builds `paths` (`<drv>!<out>,...` or plain store paths) with the remote's own
    /// derivations; `Ok` with the failure status and message when the build failed.
    pub fn build_paths(
        &mut self,
        paths: &[String],
        options: &BuildOptions,
    ) -> Result<Result<(), (BuildStatus, String)>, ServeError> {
        let version = self.version;
        let res = (|| {
            self.w.write_u64(Command::BuildPaths as u64, "command")?;
            self.w
                .write_strings(paths.iter().map(|s| s.as_str()), "paths")?;
            options.write(&mut self.w, version)?;
            self.w.flush()?;
            let status = self.r.read_u64("build status")?;
            if status == 0 {
                return Ok(Ok(()));
            }
            let msg = self.r.read_string("build error message")?;
            Ok(Err((BuildStatus::from_u64(status), msg)))
        })();
        self.ctx(res)
    }

    /// Ends the session: closes our side so the remote sees end of input and exits.
    pub fn close(self) -> Result<(R, W), ServeError> {
        let ServeClient { r, w, peer, .. } = self;
        let w = w
            .into_inner()
            .map_err(|e| ServeError::peer(&peer, e.into()))?;
        Ok((r.into_inner(), w))
    }
}

/// Passes everything read through to a sink.
struct TeeReader<'a, R: Read, W: Write> {
    inner: &'a mut R,
    sink: &'a mut W,
}

impl<R: Read, W: Write> Read for TeeReader<'_, R, W> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sink.write_all(&buf[..n])?;
        Ok(n)
    }
}

fn scratch_dir() -> Result<std::path::PathBuf, ServeError> {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let p = std::env::temp_dir().join(format!("nixb-serve-dump-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&p).map_err(|source| ServeError::Io {
        step: "creating directory",
        path: p.display().to_string(),
        source,
    })?;
    Ok(p)
}
