//! An HTTP binary cache served by a tiny server on 127.0.0.1 inside the test: the same
//! cache real Nix wrote, a server that stalls, and one that dies mid-body.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Oracle;
use nixb_binarycache::{substitute_closure, CacheOptions};

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Good,
    /// NAR requests get no answer at all.
    Stall,
    /// NAR requests get headers and half the body, then the connection closes.
    Die,
    /// The first two NAR requests fail with 503, later ones succeed.
    Flaky,
}

struct Server {
    port: u16,
    nar_requests: Arc<AtomicUsize>,
}

fn serve(root: PathBuf, mode: Mode) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let nar_requests = Arc::new(AtomicUsize::new(0));
    let count = nar_requests.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let (root, count) = (root.clone(), count.clone());
            std::thread::spawn(move || handle(conn, &root, mode, &count));
        }
    });
    Server { port, nar_requests }
}

fn handle(mut conn: TcpStream, root: &std::path::Path, mode: Mode, count: &AtomicUsize) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut request = String::new();
    if reader.read_line(&mut request).is_err() {
        return;
    }
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
    }
    let path = request
        .split(' ')
        .nth(1)
        .unwrap_or("/")
        .trim_start_matches('/')
        .to_string();
    let is_nar = path.starts_with("nar/");
    let n = if is_nar {
        count.fetch_add(1, Ordering::SeqCst) + 1
    } else {
        0
    };
    if is_nar && mode == Mode::Stall {
        std::thread::sleep(Duration::from_secs(5));
        return;
    }
    if is_nar && mode == Mode::Flaky && n <= 2 {
        let _ = conn.write_all(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
        return;
    }
    match std::fs::read(root.join(&path)) {
        Ok(body) => {
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            if is_nar && mode == Mode::Die {
                let _ = conn.write_all(&body[..body.len() / 2]);
                let _ = conn.flush();
                return; // dropping the stream closes it mid-body
            }
            let _ = conn.write_all(&body);
        }
        Err(_) => {
            let _ = conn.write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
        }
    }
}

fn fast_retry(o: &Oracle) -> CacheOptions {
    CacheOptions {
        read_timeout: Duration::from_millis(400),
        connect_timeout: Duration::from_secs(2),
        attempts: 3,
        initial_backoff: Duration::from_millis(20),
        ..o.options()
    }
}

#[test]
fn http_cache_good_flaky_stalled_and_dying() {
    nixb_testsupport::require!(Nix);
    let o = Oracle::build();
    let dir = o.root.join("cache");
    o.copy_to(&dir, "xz");

    // A working server: the whole closure, checked by real Nix.
    for mode in [Mode::Good, Mode::Flaky] {
        o.wipe_store();
        let srv = serve(dir.clone(), mode);
        let store = o.open_store();
        let cache = o.open_cache(&format!("http://127.0.0.1:{}", srv.port), fast_retry(&o));
        let report =
            substitute_closure(&store, std::slice::from_ref(&cache), &o.top_set(), 3).unwrap();
        assert_eq!(report.substituted.len(), 6);
        drop(store);
        o.assert_closure_matches();
        if mode == Mode::Flaky {
            // Two 503s were retried: six NARs took eight requests.
            assert_eq!(srv.nar_requests.load(Ordering::SeqCst), 8);
        }
    }

    for (mode, expect) in [
        (Mode::Stall, "timed out"),
        (Mode::Die, "connection failed while downloading"),
    ] {
        o.wipe_store();
        let srv = serve(dir.clone(), mode);
        let store = o.open_store();
        let url = format!("http://127.0.0.1:{}", srv.port);
        let cache = o.open_cache(&url, fast_retry(&o));
        let started = Instant::now();
        let err = substitute_closure(&store, std::slice::from_ref(&cache), &o.top_set(), 1)
            .unwrap_err()
            .to_string();
        // One path was tried three times, then the closure gave up.
        assert_eq!(srv.nar_requests.load(Ordering::SeqCst), 3, "{err}");
        assert!(
            err.contains(&format!("cache '{url}'")) && err.contains("failed after 3 attempt(s)"),
            "{err}"
        );
        assert!(
            err.to_lowercase().contains(expect),
            "expected '{expect}' in: {err}"
        );
        assert!(
            o.closure
                .iter()
                .any(|p| err.contains(&format!("nar of '{p}'"))),
            "names the path: {err}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "gave up in time"
        );
        assert!(
            o.store_entries().is_empty(),
            "nothing left: {:?}",
            o.store_entries()
        );
        for p in &o.closure {
            let sp = nixb_store::StoreDir::new(o.store_dir())
                .unwrap()
                .parse(p)
                .unwrap();
            assert!(!store.is_valid_path(&sp).unwrap());
        }
    }
}
