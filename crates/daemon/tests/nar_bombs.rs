//! NAR bombs through every operation that takes a NAR (`AddToStoreNar`, `AddToStore`,
//! `AddMultipleToStore`): a NAR that produces far more than its declared `narSize`, a
//! file entry claiming 2^60 bytes, directories nested past the restore's limit. Each
//! must end in an error naming what is wrong, with the daemon's peak memory well below
//! the size of the bomb, and nothing left behind: no path on disk, no database row, no
//! temporary file under the state directory. The connection stays in step (its data is
//! framed) and another client is served throughout.
//!
//! One test in its own binary, so that the process's peak RSS (`VmHWM`, reset through
//! `/proc/self/clear_refs`) is the daemon's alone.

use std::collections::BTreeSet;
use std::io::Read;
use std::os::unix::net::UnixStream;

use nixb_protocol::types::{PathInfo, ValidPathInfo};
use nixb_protocol::wire::WireWriter;
use nixb_protocol::{Client, Request, Response};
use nixb_store::{Hash, HashAlgo, StorePath};

mod common;

use common::{connect_to, listing, TestDaemon};

/// What each bomb streams: well above the memory bound below, so a daemon that held a
/// bomb in memory would break the bound.
const BOMB: u64 = 48 << 20;
/// How far the process's peak RSS may rise over the whole run. The rise includes this
/// test's own work beside the daemon's (the bystander's adds, the directory listings and
/// database reads after every bomb): 18-21 MiB in a usual run, now and then about 5 MiB
/// more. A daemon that held one bomb in memory would add at least `BOMB` to that.
const MEMORY_BOUND: u64 = 32 << 20;
const _: () = assert!(MEMORY_BOUND < BOMB);

/// A NAR string: length, bytes, zero padding to 8.
fn nar_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s);
    out.resize(out.len() + (8 - s.len() % 8) % 8, 0);
}

fn nar_strs(out: &mut Vec<u8>, ss: &[&str]) {
    for s in ss {
        nar_str(out, s.as_bytes());
    }
}

/// A stream made lazily: `prefix`, then `zeros` zero bytes, then `suffix`; never more
/// than a chunk of it in memory.
struct Bomb {
    prefix: Vec<u8>,
    zeros: u64,
    suffix: Vec<u8>,
    at: u64,
}

impl Bomb {
    fn new(prefix: Vec<u8>, zeros: u64, suffix: Vec<u8>) -> Bomb {
        Bomb {
            prefix,
            zeros,
            suffix,
            at: 0,
        }
    }

    /// A regular file whose header claims `claimed` bytes of contents, followed by
    /// `sent` zero bytes and, when the claim is kept, the end of the archive.
    fn file(claimed: u64, sent: u64) -> Bomb {
        let mut prefix = Vec::new();
        nar_strs(
            &mut prefix,
            &["nix-archive-1", "(", "type", "regular", "contents"],
        );
        prefix.extend_from_slice(&claimed.to_le_bytes());
        let mut suffix = Vec::new();
        if claimed == sent {
            suffix.resize((8 - sent % 8) as usize % 8, 0);
            nar_strs(&mut suffix, &[")"]);
        }
        Bomb::new(prefix, sent, suffix)
    }

    fn len(&self) -> u64 {
        self.prefix.len() as u64 + self.zeros + self.suffix.len() as u64
    }
}

impl Read for Bomb {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let p = self.prefix.len() as u64;
        let n = if self.at < p {
            let from = &self.prefix[self.at as usize..];
            let n = from.len().min(buf.len());
            buf[..n].copy_from_slice(&from[..n]);
            n
        } else if self.at < p + self.zeros {
            let n = (p + self.zeros - self.at).min(buf.len() as u64) as usize;
            buf[..n].fill(0);
            n
        } else {
            let from = &self.suffix[(self.at - p - self.zeros) as usize..];
            let n = from.len().min(buf.len());
            buf[..n].copy_from_slice(&from[..n]);
            n
        };
        self.at += n as u64;
        Ok(n)
    }
}

/// Directories nested `depth` deep, a complete archive.
fn deep_nar(depth: usize) -> Vec<u8> {
    let mut nar = Vec::new();
    nar_strs(&mut nar, &["nix-archive-1", "(", "type", "directory"]);
    for _ in 0..depth {
        nar_strs(
            &mut nar,
            &["entry", "(", "name", "d", "node", "(", "type", "directory"],
        );
    }
    for _ in 0..depth {
        nar_strs(&mut nar, &[")", ")"]);
    }
    nar_strs(&mut nar, &[")"]);
    nar
}

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"));
    line[field.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap()
}

fn info_for(path: &StorePath, nar_size: u64) -> ValidPathInfo {
    ValidPathInfo {
        path: path.clone(),
        info: PathInfo {
            deriver: None,
            nar_hash: Hash::digest(HashAlgo::Sha256, b"not the hash of anything sent"),
            references: BTreeSet::new(),
            registration_time: 0,
            nar_size,
            ultimate: false,
            sigs: BTreeSet::new(),
            ca: None,
        },
    }
}

/// `AddMultipleToStore`'s payload for one path: the count, the info, then `nar`.
fn multiple(c: &Client<UnixStream, UnixStream>, info: &ValidPathInfo, nar: impl Read) -> impl Read {
    let mut head = Vec::new();
    {
        let mut w = WireWriter::new(&mut head);
        nixb_protocol::ops::write_multiple_header(&mut w, 1).unwrap();
        nixb_protocol::ops::write_multiple_item(&mut w, c.ctx(), info).unwrap();
        w.flush().unwrap();
    }
    std::io::Cursor::new(head).chain(nar)
}

#[test]
fn nar_bombs_end_in_an_error_with_bounded_memory_and_nothing_left() {
    let t = TestDaemon::new();
    let store_dir = t.store_dir.clone();
    let state = t.state_dir();
    let listening = t.listen();
    let sock = listening.sock.clone();

    // The bystander: connected first, served after every bomb. Its first add also makes
    // the files every add leaves for good (temporary roots, the database's journal).
    let mut good = connect_to(&sock, &store_dir);
    let mut bystander_adds = 0;
    let mut bystander = |good: &mut Client<UnixStream, UnixStream>| {
        bystander_adds += 1;
        let name = format!("bystander-{bystander_adds}");
        let r = good
            .request(
                &Request::AddTextToStore {
                    name: name.clone(),
                    text: name.clone().into_bytes(),
                    references: BTreeSet::new(),
                },
                None,
                &mut |_| {},
            )
            .unwrap();
        let Response::Path(p) = r else {
            panic!("{r:?}")
        };
        assert!(good.is_valid_path(&p).unwrap());
        assert_eq!(
            std::fs::read(store_dir.to_path(&p)).unwrap(),
            name.as_bytes()
        );
        p
    };
    let mut expected_paths = BTreeSet::from([bystander(&mut good)]);

    let target = |n: &str| {
        store_dir
            .parse(&format!("{}/{}-{n}", store_dir.as_str(), "b".repeat(32)))
            .unwrap()
    };
    let state_before = listing(&state);

    // Peak RSS from here on.
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let rss_start = status_kib("VmHWM:") << 10;

    let mut attacker = connect_to(&sock, &store_dir);
    let mut check = |what: &str,
                     err: nixb_protocol::ProtocolError,
                     expect: &str,
                     attacker: &mut Client<UnixStream, UnixStream>,
                     good: &mut Client<UnixStream, UnixStream>| {
        let err = err.to_string();
        assert!(err.contains(expect), "{what}: {err}");
        // The same connection is still in step, and the bystander is served.
        let bomb_path = target(what);
        assert!(!attacker.is_valid_path(&bomb_path).unwrap(), "{what}");
        expected_paths.insert(bystander(good));
        // Nothing on disk but what was added for good, nothing in the database.
        let on_disk: BTreeSet<String> = std::fs::read_dir(store_dir.as_str())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| !n.ends_with(".lock"))
            .collect();
        let expected: BTreeSet<String> = expected_paths
            .iter()
            .map(|p| p.base_name().to_string())
            .collect();
        assert_eq!(on_disk, expected, "{what}: store directory");
        assert_eq!(
            t.daemon.store().query_all_valid_paths().unwrap(),
            expected_paths,
            "{what}: database"
        );
        // The attacker's connection may have rooted the bomb's path before refusing it:
        // in a temporary roots file of its own, which goes with the connection.
        let connections_roots = format!("temproots/{}-", std::process::id());
        let state_after: Vec<_> = listing(&state)
            .into_iter()
            .filter(|p| {
                state_before.contains(p) || !p.to_str().unwrap().starts_with(&connections_roots)
            })
            .collect();
        assert_eq!(state_after, state_before, "{what}: state directory");
    };

    // AddToStoreNar, a NAR far larger than the narSize it declares.
    let p = target("outgrows-its-size");
    let err = attacker
        .add_to_store_nar(
            &info_for(&p, 4096),
            &mut Bomb::file(BOMB, BOMB),
            false,
            true,
        )
        .unwrap_err();
    check(
        "outgrows-its-size",
        err,
        "grows past the 4096 bytes allowed",
        &mut attacker,
        &mut good,
    );

    // AddToStoreNar, a file entry claiming 2^60 bytes (and a narSize to match) of which
    // BOMB arrive before the data ends.
    let p = target("huge-file");
    let err = attacker
        .add_to_store_nar(
            &info_for(&p, (1 << 60) + 200),
            &mut Bomb::file(1 << 60, BOMB),
            false,
            true,
        )
        .unwrap_err();
    check("huge-file", err, "huge-file", &mut attacker, &mut good);

    // AddToStoreNar, directories nested past the restore's limit.
    let p = target("deep");
    let nar = deep_nar(nixb_store::nar::MAX_DEPTH + 10);
    let err = attacker
        .add_to_store_nar(&info_for(&p, nar.len() as u64), &mut &nar[..], false, true)
        .unwrap_err();
    check("deep", err, "nested more than", &mut attacker, &mut good);

    // AddToStore (a NAR to be hashed for its content address), the 2^60-byte file.
    let err = attacker
        .add_to_store(
            "ca-huge-file",
            "fixed:r:sha256",
            &BTreeSet::new(),
            &mut Bomb::file(1 << 60, BOMB),
        )
        .unwrap_err();
    check(
        "ca-huge-file",
        err,
        "ca-huge-file",
        &mut attacker,
        &mut good,
    );

    // AddToStore, the deep archive.
    let err = attacker
        .add_to_store("ca-deep", "fixed:r:sha256", &BTreeSet::new(), &mut &nar[..])
        .unwrap_err();
    check("ca-deep", err, "nested more than", &mut attacker, &mut good);

    // AddMultipleToStore, a NAR far larger than its narSize.
    let p = target("multiple-outgrows");
    let info = info_for(&p, 4096);
    let bomb = Bomb::file(BOMB, BOMB);
    assert!(bomb.len() > BOMB);
    let mut payload = multiple(&attacker, &info, bomb);
    let err = attacker
        .request(
            &Request::AddMultipleToStore {
                repair: false,
                dont_check_sigs: true,
            },
            Some(&mut payload),
            &mut |_| {},
        )
        .unwrap_err();
    check(
        "multiple-outgrows",
        err,
        "multiple-outgrows",
        &mut attacker,
        &mut good,
    );

    // AddMultipleToStore, the deep archive.
    let p = target("multiple-deep");
    let info = info_for(&p, nar.len() as u64);
    let mut payload = multiple(&attacker, &info, &nar[..]);
    let err = attacker
        .request(
            &Request::AddMultipleToStore {
                repair: false,
                dont_check_sigs: true,
            },
            Some(&mut payload),
            &mut |_| {},
        )
        .unwrap_err();
    check(
        "multiple-deep",
        err,
        "nested more than",
        &mut attacker,
        &mut good,
    );

    let rss_peak = status_kib("VmHWM:") << 10;
    assert!(
        rss_peak.saturating_sub(rss_start) < MEMORY_BOUND,
        "peak RSS rose by {} bytes under bombs of {BOMB} bytes each",
        rss_peak - rss_start
    );

    drop(attacker);
    drop(good);
    listening.stop();
}
