//! Content a client adds (`AddToStore` in both forms): it always comes over the
//! connection, never read from a path the client names. A NAR is spooled to an unlinked
//! file under the state directory while it is hashed, then added through the same checked
//! import every incoming NAR takes (`nixb_serve::import::add_nar_to_store`: path lock,
//! restore, hash and size check, registration).

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, Read, Seek, Write};

use nixb_protocol::ops::CaMethod;
use nixb_protocol::wire::WireReader;
use nixb_store::local_store::{LocalStore, ValidPathInfo};
use nixb_store::{Encoding, Hash, HashAlgo, Hasher, StorePath};

use crate::error::{DaemonError, Result};

/// Most bytes of a text added with `text:` (a `.drv`, `builtins.toFile`), held in memory.
pub const MAX_TEXT: u64 = 64 << 20;

fn spool_err(source: io::Error) -> DaemonError {
    DaemonError::Io {
        step: "spooling the client's data to",
        path: "a temporary file".into(),
        source,
    }
}

/// Copies `r` into `out`, hashing what passes with each hasher; returns the byte count.
fn copy_hashed(
    r: &mut impl Read,
    out: &mut impl Write,
    hashers: &mut [&mut Hasher],
) -> Result<u64> {
    let mut buf = vec![0u8; 64 << 10];
    let mut n = 0u64;
    loop {
        let k = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(DaemonError::Io {
                    step: "reading the client's data for",
                    path: "the store".into(),
                    source: e,
                })
            }
        };
        for h in hashers.iter_mut() {
            h.update(&buf[..k]);
        }
        out.write_all(&buf[..k]).map_err(spool_err)?;
        n += k as u64;
    }
    Ok(n)
}

fn spool_file(store: &LocalStore) -> Result<File> {
    tempfile::tempfile_in(&store.config().state_dir).map_err(spool_err)
}

/// Adds the dump of an `AddToStore` request (1.25+) as `method` says.
pub fn add_from_dump(
    store: &LocalStore,
    name: &str,
    method: CaMethod,
    references: &BTreeSet<StorePath>,
    dump: &mut impl Read,
) -> Result<ValidPathInfo> {
    match method {
        CaMethod::Text(algo) => {
            if algo != HashAlgo::Sha256 {
                return Err(DaemonError::Refused(format!(
                    "text content of '{name}' must be hashed with sha256, not {algo}"
                )));
            }
            let mut text = Vec::new();
            let n = dump
                .take(MAX_TEXT + 1)
                .read_to_end(&mut text)
                .map_err(spool_err)?;
            if n as u64 > MAX_TEXT {
                return Err(DaemonError::Refused(format!(
                    "text content of '{name}' is longer than the {MAX_TEXT} bytes allowed"
                )));
            }
            let p = store.add_text_to_store(name, &text, references)?;
            valid_info(store, &p)
        }
        CaMethod::Nar(algo) => {
            let mut nar = spool_file(store)?;
            let mut sha = Hasher::new(HashAlgo::Sha256);
            let mut ca = Hasher::new(algo);
            let size = copy_hashed(dump, &mut nar, &mut [&mut sha, &mut ca])?;
            add_spooled_nar(
                store,
                name,
                true,
                ca.finish(),
                references,
                nar,
                sha.finish(),
                size,
            )
        }
        CaMethod::Flat(algo) => {
            let mut contents = spool_file(store)?;
            let mut ca = Hasher::new(algo);
            copy_hashed(dump, &mut contents, &mut [&mut ca])?;
            contents.rewind().map_err(spool_err)?;
            add_flat_file(store, name, ca.finish(), references, contents)
        }
    }
}

/// Adds the plain NAR that follows an `AddToStore` request before 1.25.
pub fn add_from_old_nar<R: Read>(
    store: &LocalStore,
    name: &str,
    method: CaMethod,
    r: &mut WireReader<R>,
) -> Result<ValidPathInfo> {
    let mut spooled = spool_file(store)?;
    nixb_protocol::nar::copy_nar(r, &mut spooled)?;
    spooled.rewind().map_err(spool_err)?;
    match method {
        CaMethod::Flat(_) => {
            // The NAR wraps one regular file; its contents are what is hashed.
            let scratch = tempfile::tempdir_in(&store.config().state_dir).map_err(spool_err)?;
            let file = scratch.path().join("contents");
            nixb_store::nar::restore_path(&mut spooled, &file).map_err(|e| {
                DaemonError::Refused(format!("the data for '{name}' is not a valid nar: {e}"))
            })?;
            let mut f = File::open(&file).map_err(spool_err)?;
            add_from_dump(store, name, method, &BTreeSet::new(), &mut f)
        }
        _ => add_from_dump(store, name, method, &BTreeSet::new(), &mut spooled),
    }
}

fn add_flat_file(
    store: &LocalStore,
    name: &str,
    ca_hash: Hash,
    references: &BTreeSet<StorePath>,
    mut contents: File,
) -> Result<ValidPathInfo> {
    // The NAR of a single non-executable regular file.
    let scratch = tempfile::tempdir_in(&store.config().state_dir).map_err(spool_err)?;
    let file = scratch.path().join("contents");
    {
        let mut out = File::create(&file).map_err(spool_err)?;
        io::copy(&mut contents, &mut out).map_err(spool_err)?;
    }
    let mut nar = spool_file(store)?;
    let mut sha = Hasher::new(HashAlgo::Sha256);
    let mut size = 0u64;
    nixb_store::nar::dump_to_sink(&file, &mut |b| {
        sha.update(b);
        size += b.len() as u64;
        nar.write_all(b).map_err(nixb_store::nar::NarError::Sink)
    })
    .map_err(|e| DaemonError::Refused(format!("serialising '{name}': {e}")))?;
    add_spooled_nar(
        store,
        name,
        false,
        ca_hash,
        references,
        nar,
        sha.finish(),
        size,
    )
}

#[allow(clippy::too_many_arguments)]
fn add_spooled_nar(
    store: &LocalStore,
    name: &str,
    recursive: bool,
    ca_hash: Hash,
    references: &BTreeSet<StorePath>,
    mut nar: File,
    nar_hash: Hash,
    nar_size: u64,
) -> Result<ValidPathInfo> {
    let dir = store.store_dir();
    let path = if recursive && ca_hash.algo() == HashAlgo::Sha256 {
        dir.make_source_path(name, &ca_hash, references, false)
            .map_err(|e| DaemonError::Refused(e.to_string()))?
    } else if !references.is_empty() {
        return Err(DaemonError::Refused(format!(
            "'{name}': only text and recursive sha256 content may have references"
        )));
    } else {
        dir.make_fixed_output_path(recursive, &ca_hash, name)
            .map_err(|e| DaemonError::Refused(e.to_string()))?
    };
    let mut info = ValidPathInfo::new(path.clone(), nar_hash, nar_size);
    info.references = references.clone();
    info.ca = Some(format!(
        "fixed:{}{}",
        if recursive { "r:" } else { "" },
        ca_hash.to_typed(Encoding::Base32)
    ));
    nar.rewind().map_err(spool_err)?;
    nixb_serve::import::add_nar_to_store(store, &info, &mut nar)?;
    valid_info(store, &path)
}

fn valid_info(store: &LocalStore, p: &StorePath) -> Result<ValidPathInfo> {
    store.query_path_info(p)?.ok_or_else(|| {
        DaemonError::Refused(format!(
            "path '{}' is not valid after adding it",
            store.store_dir().print(p)
        ))
    })
}

/// Whether a path a client sends may be added without being trusted on its word, as Nix's
/// `LocalStore::addToStore` decides with signature checking on: `require-sigs` off, a
/// content address that yields the path itself, or a signature that one of
/// `trusted-public-keys` verifies.
pub(crate) fn has_valid_signature(
    store: &LocalStore,
    cache: &nixb_binarycache::CacheOptions,
    info: &ValidPathInfo,
) -> bool {
    if !cache.require_sigs || is_content_addressed(store, info) {
        return true;
    }
    let dir = store.store_dir();
    let fingerprint = nixb_binarycache::narinfo::fingerprint(
        dir,
        &info.path,
        &info.nar_hash,
        info.nar_size,
        &info.references,
    );
    cache.trusted_keys.count_valid(&fingerprint, &info.sigs) > 0
}

/// `ValidPathInfo::isContentAddressed`: the path is where its `ca` field puts it.
fn is_content_addressed(store: &LocalStore, info: &ValidPathInfo) -> bool {
    let Some(ca) = &info.ca else {
        return false;
    };
    let dir = store.store_dir();
    let name = info.path.name();
    let self_ref = info.references.contains(&info.path);
    let others: Vec<&StorePath> = info
        .references
        .iter()
        .filter(|r| **r != info.path)
        .collect();
    let computed = if let Some(h) = ca.strip_prefix("text:") {
        let Ok(hash) = Hash::parse_typed(h) else {
            return false;
        };
        let mut ty = String::from("text");
        let mut refs: Vec<String> = others.iter().map(|r| dir.print(r)).collect();
        refs.sort();
        for r in refs {
            ty.push(':');
            ty.push_str(&r);
        }
        if self_ref {
            return false;
        }
        dir.make_store_path(&ty, &hash, name)
    } else if let Some(h) = ca.strip_prefix("fixed:") {
        let (recursive, h) = match h.strip_prefix("r:") {
            Some(rest) => (true, rest),
            None => (false, h),
        };
        let Ok(hash) = Hash::parse_typed(h) else {
            return false;
        };
        if recursive && hash.algo() == HashAlgo::Sha256 {
            dir.make_source_path(name, &hash, others.iter().copied(), self_ref)
        } else if info.references.is_empty() {
            dir.make_fixed_output_path(recursive, &hash, name)
        } else {
            return false;
        }
    } else {
        return false;
    };
    computed.is_ok_and(|p| p == info.path)
}

/// `AddBuildLog`: stores a derivation's log where Nix keeps it
/// (`<log dir>/drvs/<2 chars>/<rest>.bz2`), bzip2-compressed through a temporary file
/// renamed into place. A log that is there already is kept, as Nix keeps it.
pub(crate) fn add_build_log(
    log_dir: &std::path::Path,
    drv: &StorePath,
    printed: &str,
    log: &mut impl Read,
) -> Result<()> {
    if !drv.is_derivation() {
        return Err(DaemonError::Refused(format!(
            "cannot add a build log for '{printed}': it is not a derivation"
        )));
    }
    let path = nixb_logs::log_path(log_dir, drv.base_name(), true);
    if path.exists() {
        return Ok(());
    }
    let io = |step: &'static str, p: &std::path::Path| {
        let path = p.display().to_string();
        move |source| DaemonError::Io { step, path, source }
    };
    let dir = path.parent().unwrap_or(log_dir);
    std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
    let tmp = tempfile::Builder::new()
        .prefix(".tmp-log-")
        .tempfile_in(dir)
        .map_err(io("creating a temporary file in", dir))?;
    // Readable by every user, as Nix writes logs (clients read them directly).
    use std::os::unix::fs::PermissionsExt;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o644))
        .map_err(io("setting permissions of", tmp.path()))?;
    let mut enc = bzip2::write::BzEncoder::new(tmp, bzip2::Compression::default());
    std::io::copy(log, &mut enc).map_err(io("writing", &path))?;
    let tmp = enc.finish().map_err(io("writing", &path))?;
    tmp.persist(&path)
        .map_err(|e| io("renaming into", &path)(e.error))?;
    Ok(())
}
