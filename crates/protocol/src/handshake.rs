//! The greeting that opens every connection, both sides (Nix 2.8 `processConnection` and
//! `RemoteStore::initConnection`; the feature exchange of 1.38 from Nix 2.24):
//!
//! ```text
//! client -> u64(WORKER_MAGIC_1) u64(client version)
//! daemon -> u64(WORKER_MAGIC_2) u64(daemon version)
//!           both now use v = min(client version, daemon version)
//! v >= 1.38: client -> strs(client features); daemon -> strs(daemon features)
//! v >= 1.14: client -> u64(0)            obsolete cpu affinity (u64(1) u64(cpu) accepted)
//! v >= 1.11: client -> u64(0)            obsolete reserveSpace
//! v >= 1.33: daemon -> str(daemon's Nix version)
//! v >= 1.35: daemon -> u64(0 unknown | 1 trusted | 2 not trusted)
//! ```
//!
//! The daemon writes its last two fields (and closes the start-up channel) without
//! waiting for the client's obsolete ones, which it reads afterwards.
//!
//! After this the daemon opens a stderr channel for start-up messages and closes it with
//! `STDERR_LAST` (see [`crate::server`] and [`crate::client`]).

use std::collections::BTreeSet;
use std::io::{Read, Write};

use crate::error::{ProtocolError, Result};
use crate::version::Version;
use crate::wire::{WireError, WireReader, WireWriter};

pub const WORKER_MAGIC_1: u64 = 0x6e697863;
pub const WORKER_MAGIC_2: u64 = 0x6478696f;

/// Most features one side may announce, and the longest feature name.
pub const MAX_FEATURES: u64 = 256;
pub const MAX_FEATURE_LEN: u64 = 256;

/// Whether the daemon trusts the client (sent from 1.35 on; `None` is "unknown").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrustedFlag {
    Trusted,
    NotTrusted,
}

impl TrustedFlag {
    fn write<W: Write>(flag: Option<TrustedFlag>, w: &mut WireWriter<W>) -> Result<()> {
        let n = match flag {
            None => 0,
            Some(TrustedFlag::Trusted) => 1,
            Some(TrustedFlag::NotTrusted) => 2,
        };
        w.write_u64(n, "trusted flag")?;
        Ok(())
    }

    fn read<R: Read>(r: &mut WireReader<R>) -> Result<Option<TrustedFlag>> {
        let offset = r.offset();
        match r.read_u64("trusted flag")? {
            0 => Ok(None),
            1 => Ok(Some(TrustedFlag::Trusted)),
            2 => Ok(Some(TrustedFlag::NotTrusted)),
            value => Err(ProtocolError::UnknownValue {
                what: "trusted flag",
                value,
                offset,
            }),
        }
    }
}

/// What a daemon says about itself in the greeting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerInfo {
    /// The highest version this daemon speaks (normally [`Version::MAX`]).
    pub version: Version,
    /// Sent to clients of 1.33 and later (`nix store ping` prints it).
    pub nix_version: String,
    /// Sent to clients of 1.35 and later.
    pub trusted: Option<TrustedFlag>,
    /// Sent to clients of 1.38 and later.
    pub features: BTreeSet<String>,
}

/// What a client says about itself in the greeting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientInfo {
    /// The highest version this client speaks (normally [`Version::MAX`]).
    pub version: Version,
    pub features: BTreeSet<String>,
}

/// The outcome, as either side sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Handshake {
    /// The version both sides use: the smaller of the two offered.
    pub version: Version,
    /// What the other side offered.
    pub peer_version: Version,
    /// Features both sides announced (empty before 1.38).
    pub features: BTreeSet<String>,
    /// The daemon's Nix version (known to the client from 1.33 on).
    pub daemon_nix_version: Option<String>,
    /// Whether the daemon trusts the client (known to the client from 1.35 on).
    pub trusted: Option<TrustedFlag>,
    /// The obsolete CPU affinity a client sent, if it sent one (the server ignores it).
    pub cpu_affinity: Option<u64>,
}

fn check_peer(peer: &'static str, v: Version) -> Result<()> {
    if v.major != 1 {
        return Err(ProtocolError::Major { peer, version: v });
    }
    if v < Version::MIN {
        return Err(ProtocolError::TooOld {
            peer,
            version: v,
            min: Version::MIN,
        });
    }
    Ok(())
}

fn read_features<R: Read>(r: &mut WireReader<R>) -> Result<BTreeSet<String>> {
    let start = r.offset();
    let n = r.read_count("features", 8)?;
    if n > MAX_FEATURES {
        return Err(WireError::TooMany {
            what: "features",
            offset: start,
            count: n,
            max: MAX_FEATURES,
        }
        .into());
    }
    let mut set = BTreeSet::new();
    for _ in 0..n {
        set.insert(r.read_string_max("feature", MAX_FEATURE_LEN)?);
    }
    Ok(set)
}

fn write_features<W: Write>(w: &mut WireWriter<W>, f: &BTreeSet<String>) -> Result<()> {
    w.write_strings(f.iter().map(|s| s.as_str()), "features")?;
    Ok(())
}

/// The daemon's side, up to (not including) the start-up stderr channel.
pub fn server_handshake<R: Read, W: Write>(
    r: &mut WireReader<R>,
    w: &mut WireWriter<W>,
    info: &ServerInfo,
) -> Result<Handshake> {
    server_side(r, w, info, false)
}

/// The daemon's side with the start-up stderr channel opened and closed at once
/// (`STDERR_LAST`), as [`crate::ServerConnection::accept`] wants it.
pub(crate) fn server_greeting<R: Read, W: Write>(
    r: &mut WireReader<R>,
    w: &mut WireWriter<W>,
    info: &ServerInfo,
) -> Result<Handshake> {
    server_side(r, w, info, true)
}

/// What the daemon says never depends on the client's obsolete fields (cpu affinity,
/// reserveSpace), so it says all of it, start-up channel included when `close_startup`,
/// before reading them: the client, which sends them before it reads anything, then
/// finds its answer waiting. At 1.38 that saves the greeting a round trip (the feature
/// exchange comes between the versions and those fields).
fn server_side<R: Read, W: Write>(
    r: &mut WireReader<R>,
    w: &mut WireWriter<W>,
    info: &ServerInfo,
    close_startup: bool,
) -> Result<Handshake> {
    let magic = r.read_u64("client magic")?;
    if magic != WORKER_MAGIC_1 {
        return Err(ProtocolError::BadMagic {
            expected: WORKER_MAGIC_1,
            got: magic,
        });
    }
    w.write_u64(WORKER_MAGIC_2, "daemon magic")?;
    w.write_u64(info.version.to_wire(), "daemon version")?;
    w.flush()?;
    let peer_version = Version::from_wire(r.read_u64("client version")?);
    check_peer("client", peer_version)?;
    let version = peer_version.min(info.version);

    let mut features = BTreeSet::new();
    if version.at_least(38) {
        let theirs = read_features(r)?;
        write_features(w, &info.features)?;
        features = theirs.intersection(&info.features).cloned().collect();
    }
    if version.at_least(33) {
        w.write_str(&info.nix_version, "daemon nix version")?;
    }
    if version.at_least(35) {
        TrustedFlag::write(info.trusted, w)?;
    }
    if close_startup {
        crate::StderrFrame::Last.write(w, version)?;
    }
    w.flush()?;
    let mut cpu_affinity = None;
    if version.at_least(14) && r.read_bool("cpu affinity flag")? {
        cpu_affinity = Some(r.read_u64("cpu affinity")?);
    }
    if version.at_least(11) {
        r.read_u64("reserve space")?;
    }
    Ok(Handshake {
        version,
        peer_version,
        features,
        daemon_nix_version: version.at_least(33).then(|| info.nix_version.clone()),
        trusted: if version.at_least(35) {
            info.trusted
        } else {
            None
        },
        cpu_affinity,
    })
}

/// The client's side, up to (not including) the start-up stderr channel.
pub fn client_handshake<R: Read, W: Write>(
    r: &mut WireReader<R>,
    w: &mut WireWriter<W>,
    info: &ClientInfo,
) -> Result<Handshake> {
    w.write_u64(WORKER_MAGIC_1, "client magic")?;
    w.write_u64(info.version.to_wire(), "client version")?;
    w.flush()?;
    let magic = r.read_u64("daemon magic")?;
    if magic != WORKER_MAGIC_2 {
        return Err(ProtocolError::BadMagic {
            expected: WORKER_MAGIC_2,
            got: magic,
        });
    }
    let peer_version = Version::from_wire(r.read_u64("daemon version")?);
    check_peer("daemon", peer_version)?;
    let version = peer_version.min(info.version);

    let mut features = BTreeSet::new();
    if version.at_least(38) {
        write_features(w, &info.features)?;
        w.flush()?;
        let theirs = read_features(r)?;
        features = theirs.intersection(&info.features).cloned().collect();
    }
    if version.at_least(14) {
        w.write_u64(0, "cpu affinity flag")?;
    }
    if version.at_least(11) {
        w.write_u64(0, "reserve space")?;
    }
    w.flush()?;
    let daemon_nix_version = if version.at_least(33) {
        Some(r.read_string_max("daemon nix version", 1024)?)
    } else {
        None
    };
    let trusted = if version.at_least(35) {
        TrustedFlag::read(r)?
    } else {
        None
    };
    Ok(Handshake {
        version,
        peer_version,
        features,
        daemon_nix_version,
        trusted,
        cpu_affinity: None,
    })
}
