//! Idle connections against an in-process daemon on a unix socket: with 100 of them
//! the process stays under 64 MiB resident, and with 1,000 open at once (half of them
//! never greeted, half greeted and then silent) a new client is still served real
//! operations. One test in its own binary, so that the process's resident memory is
//! the daemon's (and the clients' sockets, which live in the kernel).

use std::collections::BTreeSet;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use nixb_protocol::types::ClientSettings;
use nixb_protocol::{Client, Request, Response};
use nixb_store::StoreDir;

mod common;

use common::{connect_to, TestDaemon};

const RSS_BOUND: u64 = 64 << 20;

fn status(field: &str) -> u64 {
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

fn greet(sock: &Path, store_dir: &StoreDir) -> Client<UnixStream, UnixStream> {
    let mut c = connect_to(sock, store_dir);
    c.set_options(&ClientSettings::default()).unwrap();
    c
}

/// The daemon's connection threads (named so by the daemon) now running.
fn connection_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter(|t| {
            let comm = t.as_ref().unwrap().path().join("comm");
            std::fs::read_to_string(comm).is_ok_and(|c| c.trim() == "connection")
        })
        .count()
}

/// Waits until exactly `n` connections are being served: the bare connections show no
/// other sign of having been accepted, and those of clients that have gone must have
/// ended.
fn wait_for_connections(n: usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while connection_threads() != n {
        assert!(
            Instant::now() < deadline,
            "{} connections served, expected {n}",
            connection_threads()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Opens `n` idle connections, every other one greeted.
fn open_idle(
    n: usize,
    sock: &Path,
    store_dir: &StoreDir,
    bare: &mut Vec<UnixStream>,
    greeted: &mut Vec<Client<UnixStream, UnixStream>>,
) {
    for i in 0..n {
        if i % 2 == 0 {
            bare.push(UnixStream::connect(sock).unwrap());
        } else {
            greeted.push(greet(sock, store_dir));
        }
    }
}

#[test]
fn idle_connections_cost_little_and_do_not_stop_the_daemon() {
    // Two descriptors per connection in this process (ours and the daemon's).
    let (_, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    let want = 4096.max(hard);
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, want, want)
        .expect("raising RLIMIT_NOFILE to 4096 (needs root when the hard limit is lower)");

    let t = TestDaemon::new();
    let store_dir = t.store_dir.clone();
    let listening = t.listen();
    let sock = listening.sock.clone();

    // One client through real operations first, so that what every later client
    // shares (the database connection, the allocator's arenas) is in place.
    let mut n = 0;
    let serve_one = |n: &mut u32| {
        *n += 1;
        let mut c = greet(&sock, &store_dir);
        let name = format!("served-{n}");
        let r = c
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
        assert!(c.is_valid_path(&p).unwrap());
        let info = c
            .query_path_info(&p)
            .unwrap()
            .expect("the added path's info");
        assert_eq!(info.nar_size, 112 + (name.len() as u64).div_ceil(8) * 8);
    };
    serve_one(&mut n);

    let mut bare = Vec::new();
    let mut greeted = Vec::new();
    open_idle(100, &sock, &store_dir, &mut bare, &mut greeted);
    wait_for_connections(100);
    let rss = status("VmRSS:") << 10;
    eprintln!("resident with 100 idle connections: {rss} bytes");
    assert!(
        rss < RSS_BOUND,
        "{rss} bytes resident with 100 idle connections (bound {RSS_BOUND})"
    );
    serve_one(&mut n);

    open_idle(900, &sock, &store_dir, &mut bare, &mut greeted);
    wait_for_connections(1000);
    serve_one(&mut n);
    // Greeted clients that idled meanwhile are served too.
    for c in greeted.iter_mut().step_by(100) {
        c.set_options(&ClientSettings::default()).unwrap();
    }
    let rss = status("VmRSS:") << 10;
    eprintln!("resident with 1,000 idle connections: {rss} bytes");
    assert!(
        rss < 2 * RSS_BOUND,
        "{rss} bytes resident with 1,000 idle connections"
    );

    drop(bare);
    drop(greeted);
    listening.stop();
}
