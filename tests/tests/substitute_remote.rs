//! Substitutes and remote builds through `nixb realise`, with real Nix 2.8 as the oracle:
//! external substituter programs tried in order, a binary cache written by real
//! `nix copy`, a dying HTTP cache with and without `--fallback`, and builds sent by the
//! build hook to a real `nix-store --serve` host and to a `nixb serve` host (each in a
//! private mount namespace behind a fake `ssh`).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nixb_tests::{nixb_binary, run, run_ok, run_str, TestStore};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn write_exe(path: &Path, body: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, body).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Removes a store directory real Nix made read-only.
fn remove_tree(p: &Path) {
    if p.exists() {
        let _ = Command::new("chmod").arg("-R").arg("u+w").arg(p).status();
        std::fs::remove_dir_all(p).unwrap();
    }
}

/// The trace lines (`@ ...`) of a run's stderr.
fn trace_lines(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .filter(|l| l.starts_with("@ "))
        .map(str::to_string)
        .collect()
}

/// Writes `expr` to `file` and instantiates it with real Nix: the derivation's path.
fn instantiate(t: &TestStore, file: &str, expr: &str) -> String {
    let expr = t.file(file, expr);
    run_str(t.nix("nix-instantiate").arg(&expr), None)
}

/// A derivation with one output, built by `/bin/sh -c script`, needing `features`.
fn one_drv(name: &str, script: &str, features: &[&str]) -> String {
    let required = match features {
        [] => String::new(),
        f => format!(
            " requiredSystemFeatures = [ {} ];",
            f.iter()
                .map(|x| format!("\"{x}\""))
                .collect::<Vec<_>>()
                .join(" ")
        ),
    };
    format!(
        r#"builtins.derivation {{ name = "{name}"; system = builtins.currentSystem; builder = "/bin/sh";{required} args = [ "-c" "{script}" ]; }}"#
    )
}

/// The NAR hash real Nix has for `p`, or `None` when it does not hold `p` as valid.
fn nix_hash(t: &TestStore, p: &str) -> Option<String> {
    let out = run(t.nix("nix-store").args(["-q", "--hash"]).arg(p), None);
    out.status
        .success()
        .then(|| text(&out.stdout).trim().to_string())
}

/// Leaves the store empty, as on a fresh machine with the same store directory.
fn empty_store(t: &TestStore) {
    remove_tree(&t.store_dir());
    remove_tree(&t.state_dir());
}

/// `nixb realise --print-build-trace` from the substituters `url`, with `options` (pairs
/// of `--option NAME VALUE`).
fn realise_from(t: &TestStore, url: &str, options: &[(&str, &str)]) -> Command {
    let mut c = t.nixb();
    c.args([
        "realise",
        "--print-build-trace",
        "--option",
        "substituters",
        url,
    ]);
    for (name, value) in options {
        c.args(["--option", name, value]);
    }
    c
}

/// A path real Nix added and then deleted, so that the only way back is a substituter.
struct Deleted {
    path: String,
    /// Its NAR, as `nix-store --dump` wrote it.
    nar: PathBuf,
    nar_bytes: Vec<u8>,
    /// Its NAR hash, as real Nix had it registered.
    hash: String,
}

/// Adds a file with `contents` with real Nix, dumps it to `payload.nar`, then deletes it.
fn added_then_deleted(t: &TestStore, contents: &str) -> Deleted {
    let src = t.file("payload.txt", contents);
    let path = run_str(t.nix("nix-store").arg("--add").arg(&src), None);
    let nar = t.root.path().join("payload.nar");
    let nar_bytes = run_ok(t.nix("nix-store").arg("--dump").arg(&path), None);
    std::fs::write(&nar, &nar_bytes).unwrap();
    let hash = nix_hash(t, &path).expect("valid after nix-store --add");
    run_ok(t.nix("nix-store").arg("--delete").arg(&path), None);
    assert!(!Path::new(&path).exists());
    Deleted {
        path,
        nar,
        nar_bytes,
        hash,
    }
}

// --- external substituter programs ------------------------------------------------------

#[test]
fn external_substituters_are_tried_in_order_and_checked() {
    nixb_testsupport::require!(Nix);
    let t = TestStore::new();
    let dir = t.root.path().to_path_buf();
    // Real Nix makes the path (and tells us its NAR and hash), then deletes it, so that the
    // only way back is through a substituter.
    let Deleted {
        path: p,
        nar,
        nar_bytes,
        hash,
    } = added_then_deleted(&t, "substituted contents\n");
    let other = t.file("other.txt", "not what was asked for\n");
    let other_hash = run_str(
        t.nix("nix")
            .args(["hash", "path", "--type", "sha256", "--base32"])
            .arg(&other),
        None,
    );

    let calls = dir.join("calls.log");
    // Each program answers --query with the same info and differs in --substitute.
    let query = format!(
        "if [ \"$1\" = --query ]; then\n  echo\n  while read cmd paths; do\n    case \"$cmd\" in\n      have) echo {p};;\n      info) printf '%s\\n\\n0\\n0\\n%s\\n' {p} {size};;\n    esac\n    echo\n  done\n  exit 0\nfi\n",
        size = nar_bytes.len()
    );
    let fail = dir.join("subs/fail");
    write_exe(
        &fail,
        &format!("#!/bin/sh\n{query}echo fail \"$2\" >> {calls}\necho\necho 'no luck today' >&2\nexit 1\n", calls = calls.display()),
    );
    let liar = dir.join("subs/liar");
    write_exe(
        &liar,
        &format!(
            "#!/bin/sh\n{query}echo liar \"$2\" >> {calls}\necho\nnix-store --restore \"$3\" < {nar}\necho sha256:{other}\n",
            calls = calls.display(),
            nar = nar.display(),
            other = other_hash
        ),
    );
    let good = dir.join("subs/good");
    write_exe(
        &good,
        &format!(
            "#!/bin/sh\n{query}echo good \"$2\" >> {calls}\necho\nnix-store --restore \"$3\" < {nar}\necho {hash}\n",
            calls = calls.display(),
            nar = nar.display()
        ),
    );
    let subs = format!("{} {} {}", fail.display(), liar.display(), good.display());
    let out = run(realise_from(&t, &subs, &[]).arg(&p), None);
    let err = text(&out.stderr);
    assert!(out.status.success(), "nixb realise failed: {err}");
    assert_eq!(text(&out.stdout).trim(), p);

    // In order: the failing one, the liar, the good one.
    let called = std::fs::read_to_string(&calls).unwrap();
    assert_eq!(called, format!("fail {p}\nliar {p}\ngood {p}\n"));
    // Each traced as started, then failed (256 is exit code 1 as a raw wait status, as the
    // original prints it) or succeeded.
    let steps = [
        (
            &fail,
            Some(format!("256 fetching path '{p}' failed with exit code 1")),
        ),
        (
            &liar,
            Some(format!("0 hash mismatch in downloaded path '{p}'")),
        ),
        (&good, None),
    ];
    let trace = trace_lines(&err);
    assert_eq!(trace.len(), 2 * steps.len(), "{err}");
    for (i, (program, failure)) in steps.iter().enumerate() {
        let (started, ended) = (&trace[2 * i], &trace[2 * i + 1]);
        assert_eq!(
            started,
            &format!("@ substituter-started {p} {}", program.display())
        );
        match failure {
            Some(f) => assert!(
                ended.starts_with(&format!("@ substituter-failed {p} {f}")),
                "{ended}"
            ),
            None => assert_eq!(ended, &format!("@ substituter-succeeded {p}")),
        }
    }

    // Real Nix agrees: valid, same hash, contents intact, and not "ultimate".
    assert_eq!(nix_hash(&t, &p), Some(hash));
    run_ok(t.nix("nix-store").args(["--verify-path"]).arg(&p), None);
    assert_eq!(
        std::fs::read_to_string(&p).unwrap(),
        "substituted contents\n"
    );
}

#[test]
fn only_lying_and_failing_substituters_leave_the_path_invalid() {
    nixb_testsupport::require!(Nix);
    let t = TestStore::new();
    let dir = t.root.path().to_path_buf();
    let Deleted { path: p, nar, .. } = added_then_deleted(&t, "x\n");
    let liar = dir.join("subs/liar");
    write_exe(
        &liar,
        &format!(
            "#!/bin/sh\nif [ \"$1\" = --query ]; then echo; while read c x; do [ $c = info ] && printf '%s\\n\\n0\\n0\\n0\\n' {p}; echo; done; exit 0; fi\necho\nnix-store --restore \"$3\" < {nar}\necho sha256:{zeros}\n",
            nar = nar.display(),
            zeros = "0".repeat(52)
        ),
    );
    let out = run(
        t.nixb()
            .args(["realise", "--option", "substituters"])
            .arg(&liar)
            .arg(&p),
        None,
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains(&format!("path '{p}' does not exist and cannot be created")));
    assert_eq!(
        nix_hash(&t, &p),
        None,
        "a path whose hash was a lie got registered"
    );
}

// --- a cache written by real Nix ------------------------------------------------------------

const GRAPH: &str = r#"
let
  mk = name: deps: builtins.derivation {
    inherit name deps; system = builtins.currentSystem; builder = "/bin/sh";
    args = [ "-c" "echo ${name} > $out; for d in $deps; do echo $d >> $out; while read -r l; do echo \"$l\" >> $out; done < $d; done" ];
  };
  a = mk "a" [];
  b = mk "b" [ a ];
  c = mk "c" [ a ];
in mk "top" [ b c ]
"#;

/// A store with no substituters in which real Nix has built [`GRAPH`]: the store, the
/// derivation and its output.
fn graph_built_by_nix() -> (TestStore, String, String) {
    let t = TestStore::with_conf("sandbox = false\nbuild-users-group =\nsubstituters =\n");
    let drv = instantiate(&t, "graph.nix", GRAPH);
    let out = run_str(t.nix("nix-store").arg("-r").arg(&drv), None);
    (t, drv, out)
}

fn nix_key(t: &TestStore) -> (PathBuf, String) {
    let sk = t.root.path().join("cache.sk");
    let secret = run_ok(
        t.nix("nix")
            .args(["key", "generate-secret", "--key-name", "test-cache-1"]),
        None,
    );
    std::fs::write(&sk, &secret).unwrap();
    let public = run_str(
        t.nix("nix").args(["key", "convert-secret-to-public"]),
        Some(&secret),
    );
    (sk, public)
}

#[test]
fn a_cache_made_by_real_nix_copy_is_substituted_whole_without_builds() {
    nixb_testsupport::require!(Nix);
    let (t, drv, out) = graph_built_by_nix();
    let closure: Vec<String> = run_str(t.nix("nix-store").args(["-qR"]).arg(&drv).arg(&out), None)
        .lines()
        .map(str::to_string)
        .collect();
    let hashes: BTreeMap<String, Option<String>> = closure
        .iter()
        .map(|p| (p.clone(), nix_hash(&t, p)))
        .collect();
    let (sk, pk) = nix_key(&t);
    let cache = t.root.path().join("cache");
    let to = format!("file://{}?secret-key={}", cache.display(), sk.display());
    run_ok(
        t.nix("nix")
            .args(["copy", "--to", &to, "--derivation"])
            .arg(&drv),
        None,
    );
    run_ok(t.nix("nix").args(["copy", "--to", &to]).arg(&out), None);

    // A fresh store with the same store directory.
    empty_store(&t);
    let url = format!("file://{}", cache.display());
    let res = run(
        realise_from(&t, &url, &[("trusted-public-keys", &pk)]).arg(&drv),
        None,
    );
    let err = text(&res.stderr);
    assert!(res.status.success(), "{err}");
    assert_eq!(text(&res.stdout).trim(), out);
    assert!(
        !err.contains("@ build-started"),
        "something was built: {err}"
    );
    for p in &closure {
        assert!(
            err.contains(&format!("@ substituter-succeeded {p}")),
            "{p} not substituted: {err}"
        );
        // Real Nix reads nixb's registration: same NAR hash, and the contents match it.
        assert!(hashes[p].is_some(), "{p}");
        assert_eq!(nix_hash(&t, p), hashes[p]);
    }
    run_ok(
        t.nix("nix-store").args(["--verify", "--check-contents"]),
        None,
    );
    // The built-in substituter (not a `nixb substitute` child, which registers no
    // signatures) kept each narinfo's signature, as real Nix does when it substitutes; real
    // Nix finds them valid for our key in nixb's registration.
    let info = run_str(
        t.nix("nix")
            .args(["path-info", "--json"])
            .args(closure.iter()),
        None,
    );
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    for entry in info.as_array().unwrap() {
        let sigs = entry["signatures"].as_array().cloned().unwrap_or_default();
        assert!(
            sigs.iter()
                .any(|s| s.as_str().unwrap_or("").starts_with("test-cache-1:")),
            "no signature registered: {entry}"
        );
    }
    run_ok(
        t.nix("nix")
            .args(["store", "verify", "--sigs-needed", "1"])
            .args(["--option", "trusted-public-keys", &pk])
            .args(closure.iter()),
        None,
    );

    // Unsigned (no trusted key): refused, nothing registered, the build is not tried
    // either since the derivation itself cannot be had.
    empty_store(&t);
    let res = run(
        t.nixb()
            .args(["realise", "--option", "substituters", &url])
            .arg(&out),
        None,
    );
    assert_eq!(res.status.code(), Some(1), "{}", text(&res.stderr));
    // Refused with a message naming the reason, before anything is downloaded.
    assert!(
        text(&res.stderr).contains("no valid signature by a trusted key (signed by: test-cache-1"),
        "{}",
        text(&res.stderr)
    );
    assert_eq!(nix_hash(&t, &out), None);
}

#[test]
fn a_tampered_nar_is_refused_by_the_builtin_substituter_and_nothing_registered() {
    nixb_testsupport::require!(Nix);
    let (t, _drv, out) = graph_built_by_nix();
    let closure: Vec<String> = run_str(t.nix("nix-store").args(["-qR"]).arg(&out), None)
        .lines()
        .map(str::to_string)
        .collect();
    // The leaf "a": its output holds the text "a\n".
    let a = closure.iter().find(|p| p.ends_with("-a")).unwrap().clone();
    let (sk, pk) = nix_key(&t);
    let cache = t.root.path().join("cache");
    // Uncompressed, so that one byte of the file's contents can be changed in place and
    // the archive stays well-formed: only its hash tells.
    let to = format!(
        "file://{}?secret-key={}&compression=none",
        cache.display(),
        sk.display()
    );
    run_ok(t.nix("nix").args(["copy", "--to", &to]).arg(&out), None);
    let hash_part = &Path::new(&a).file_name().unwrap().to_str().unwrap()[..32];
    let narinfo = std::fs::read_to_string(cache.join(format!("{hash_part}.narinfo"))).unwrap();
    let nar_url = narinfo
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .unwrap()
        .to_string();
    let nar_file = cache.join(&nar_url);
    let mut nar = std::fs::read(&nar_file).unwrap();
    // "contents", its 8-byte length, then the bytes of the file.
    let at = nar.windows(8).position(|w| w == b"contents").unwrap() + 16;
    assert_eq!(nar[at], b'a', "unexpected NAR layout");
    nar[at] = b'A';
    std::fs::write(&nar_file, &nar).unwrap();

    empty_store(&t);
    let url = format!("file://{}", cache.display());
    let res = run(
        realise_from(&t, &url, &[("trusted-public-keys", &pk)]).arg(&out),
        None,
    );
    let err = text(&res.stderr);
    assert_eq!(res.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("@ substituter-started {a} {url}")),
        "{err}"
    );
    let failed = trace_lines(&err)
        .into_iter()
        .find(|l| l.starts_with(&format!("@ substituter-failed {a} ")))
        .unwrap_or_else(|| panic!("no failure traced for {a}: {err}"));
    assert!(
        failed.contains("NarHash mismatch") && failed.contains(&a),
        "{failed}"
    );
    assert!(
        !err.contains(&format!("@ substituter-succeeded {a}")),
        "{err}"
    );
    // Nothing of it is left, neither in the database nor on disk, and nothing that
    // refers to it was registered (the closure invariant).
    assert!(
        std::fs::symlink_metadata(&a).is_err(),
        "the tampered contents were left at {a}"
    );
    for p in &closure {
        assert_eq!(nix_hash(&t, p), None, "{p} was registered");
    }
}

// --- a dying HTTP cache -----------------------------------------------------------------

/// Serves a cache that has `out` (by its narinfo) but dies in the middle of every NAR,
/// or with `stall`, stops sending in the middle of it and keeps the connection open.
fn dying_cache(store_dir: &str, out: &str, stall: bool) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let nar_requests = Arc::new(AtomicUsize::new(0));
    let counter = nar_requests.clone();
    let hash_part = Path::new(out).file_name().unwrap().to_str().unwrap()[..32].to_string();
    let narinfo = format!(
        "StorePath: {out}\nURL: nar/dying.nar\nCompression: none\nNarHash: sha256:{}\nNarSize: 4096\nReferences: \n",
        "0".repeat(52)
    );
    let info = format!("StoreDir: {store_dir}\nWantMassQuery: 1\nPriority: 40\n");
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { continue };
            let mut line = String::new();
            let mut r = BufReader::new(s.try_clone().unwrap());
            if r.read_line(&mut line).is_err() {
                continue;
            }
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                    break;
                }
            }
            let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
            let reply = |s: &mut std::net::TcpStream, body: &str| {
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            };
            if path == "/nix-cache-info" {
                reply(&mut s, &info);
            } else if path == format!("/{hash_part}.narinfo") {
                reply(&mut s, &narinfo);
            } else if path.starts_with("/nar/") {
                counter.fetch_add(1, Ordering::SeqCst);
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\nContent-Length: 4096\r\nConnection: close\r\n\r\n"
                );
                // A correct start of a NAR (the magic string, length-prefixed and padded)...
                let mut head = 13u64.to_le_bytes().to_vec();
                head.extend_from_slice(b"nix-archive-1\0\0\0");
                let _ = s.write_all(&head);
                if stall {
                    // ... and nothing more, on a connection left open.
                    std::thread::spawn(move || {
                        std::thread::sleep(Duration::from_secs(600));
                        drop(s);
                    });
                    continue;
                }
                // ... and the connection dies.
            } else {
                let _ = write!(
                    s,
                    "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
            }
        }
    });
    (format!("http://127.0.0.1:{port}"), nar_requests)
}

/// A store where real Nix instantiated a derivation `one` (never built), and a cache from
/// [`dying_cache`] for its output: (store, derivation, output, cache URL, NAR requests).
fn one_behind_a_dying_cache(stall: bool) -> (TestStore, String, String, String, Arc<AtomicUsize>) {
    let t = TestStore::new();
    let drv = instantiate(
        &t,
        "one.nix",
        &one_drv("one", "echo built here > $out", &[]),
    );
    let out = run_str(t.nix("nix-store").args(["-q", "--outputs"]).arg(&drv), None);
    let (url, nar_requests) = dying_cache(t.store_dir().to_str().unwrap(), &out, stall);
    (t, drv, out, url, nar_requests)
}

#[test]
fn a_dying_http_cache_is_retried_then_fallback_builds() {
    nixb_testsupport::require!(Nix);
    let (t, drv, out, url, nar_requests) = one_behind_a_dying_cache(false);
    let unsigned = [("require-sigs", "false")];
    let res = run(realise_from(&t, &url, &unsigned).arg(&drv), None);
    let err = text(&res.stderr);
    assert_eq!(res.status.code(), Some(1), "{err}");
    assert!(err.contains("try '--fallback'"), "{err}");
    assert!(
        err.contains(&format!("@ substituter-failed {out} 256")),
        "{err}"
    );
    assert!(!err.contains("@ build-started"), "{err}");
    // Retried: more than one attempt at the NAR.
    assert!(
        nar_requests.load(Ordering::SeqCst) > 1,
        "the NAR was not retried: {err}"
    );

    let res = run(
        realise_from(&t, &url, &unsigned)
            .arg("--fallback")
            .arg(&drv),
        None,
    );
    let err = text(&res.stderr);
    assert!(res.status.success(), "{err}");
    assert!(
        err.contains(&format!("@ substituter-failed {out}")),
        "{err}"
    );
    assert!(err.contains(&format!("@ build-started {drv}")), "{err}");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "built here\n");
}

#[test]
fn max_silent_time_gives_up_on_a_stalled_cache_then_fallback_builds() {
    nixb_testsupport::require!(Nix);
    let (t, drv, out, url, nar_requests) = one_behind_a_dying_cache(true);
    let start = Instant::now();
    let res = run(
        realise_from(&t, &url, &[("require-sigs", "false")])
            .args(["--fallback", "--max-silent-time", "1"])
            .arg(&drv),
        None,
    );
    let took = start.elapsed();
    let err = text(&res.stderr);
    assert!(res.status.success(), "{err}");
    // Each of the 5 attempts waits 1 s for a byte, plus 3.75 s of backoff; without the
    // bound, one attempt alone would wait the cache's 30 s read timeout.
    assert!(took < Duration::from_secs(29), "took {took:?}\n{err}");
    assert!(nar_requests.load(Ordering::SeqCst) >= 1, "{err}");
    assert!(
        err.contains(&format!("@ substituter-failed {out}")),
        "{err}"
    );
    assert!(err.contains(&format!("@ build-started {drv}")), "{err}");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "built here\n");
}

// --- remote builds ----------------------------------------------------------------------

/// Remote hosts behind a fake `ssh`: `nixhost` runs real `nix-store --serve --write`,
/// `nixbhost` runs `nixb serve --write`, each on its own physical store mounted over the
/// client's store directory in a private mount namespace; `deadhost` refuses connections.
struct Hosts {
    bin: PathBuf,
    log: PathBuf,
}

fn hosts(t: &TestStore) -> Hosts {
    let root = t.root.path().join("hosts");
    let store = t.store_dir();
    std::fs::create_dir_all(&store).unwrap();
    for h in ["nixhost", "nixbhost"] {
        std::fs::create_dir_all(root.join(h).join("phys")).unwrap();
        std::fs::create_dir_all(root.join(h).join("etc")).unwrap();
        std::fs::write(
            root.join(h).join("etc/nix.conf"),
            "sandbox = false\nbuild-users-group =\nsubstituters =\nsystem-features = onnix onnixb\n",
        )
        .unwrap();
    }
    let bin = root.join("bin");
    let log = root.join("ssh.log");
    write_exe(
        &bin.join("ssh"),
        &format!(
            r#"#!/bin/sh
host=
for a; do case "$a" in nixhost|nixbhost|deadhost) host=$a;; esac; done
echo "$host" >> {log}
case "$host" in
  deadhost) echo "ssh: connect to host deadhost port 22: Connection refused" >&2; exit 255;;
  nixhost) set -- nix-store --serve --write;;
  nixbhost) set -- {nixb} serve --write;;
  *) echo "fake ssh: unknown host" >&2; exit 255;;
esac
export NIX_STORE_DIR={store} NIX_STATE_DIR={root}/$host/state NIX_LOG_DIR={root}/$host/log NIX_CONF_DIR={root}/$host/etc
exec unshare --mount --propagation private sh -c 'mount --bind "$1" "$2" && shift 2 && exec "$@"' sh {root}/$host/phys {store} "$@"
"#,
            log = log.display(),
            nixb = nixb_binary().display(),
            store = store.display(),
            root = root.display()
        ),
    );
    Hosts { bin, log }
}

impl Hosts {
    fn nixb(&self, t: &TestStore, builders: &str) -> Command {
        let mut c = t.nixb();
        let path = format!(
            "{}:{}",
            self.bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        c.env("PATH", path).args([
            "realise",
            "--print-build-trace",
            "--option",
            "builders",
            builders,
        ]);
        c
    }

    fn contacted(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Realises `drv` with `builders` and `args`: the run and its stderr.
    fn realise(
        &self,
        t: &TestStore,
        builders: &str,
        args: &[&str],
        drv: &str,
    ) -> (std::process::Output, String) {
        let res = run(self.nixb(t, builders).args(args).arg(drv), None);
        let err = text(&res.stderr);
        (res, err)
    }
}

/// A store with the fake hosts, where real Nix instantiated [`one_drv`]`(name, script,
/// features)`: the store, the hosts and the derivation.
fn hosts_and_one(name: &str, script: &str, features: &[&str]) -> (TestStore, Hosts, String) {
    let t = TestStore::new();
    let h = hosts(&t);
    let drv = instantiate(&t, &format!("{name}.nix"), &one_drv(name, script, features));
    (t, h, drv)
}

const REMOTE_GRAPH: &str = r#"
let
  mk = name: feature: deps: builtins.derivation {
    inherit name deps; system = builtins.currentSystem; builder = "/bin/sh";
    requiredSystemFeatures = [ feature ];
    args = [ "-c" "echo ${name} > $out; for d in $deps; do echo $d >> $out; while read -r l; do echo \"$l\" >> $out; done < $d; done" ];
  };
  a = mk "a" "onnix" [];
  b = mk "b" "onnixb" [ a ];
in mk "top" "onnix" [ a b ]
"#;

const TWO_HOSTS: &str =
    "ssh://nixhost x86_64-linux - 1 1 onnix ; ssh://nixbhost x86_64-linux - 1 1 onnixb";

#[test]
fn builds_go_to_a_real_nix_host_and_a_nixb_host() {
    nixb_testsupport::require!(Nix);
    let t = TestStore::with_conf(
        "sandbox = false\nbuild-users-group =\nsubstituters =\nsystem-features = onnix onnixb\n",
    );
    let h = hosts(&t);
    let drv = instantiate(&t, "graph.nix", REMOTE_GRAPH);
    // No local builds at all: everything must go through the hook.
    let (res, err) = h.realise(&t, TWO_HOSTS, &["--max-jobs", "0"], &drv);
    assert!(res.status.success(), "{err}");
    let out = text(&res.stdout).trim().to_string();
    let contacted = h.contacted();
    assert!(
        contacted.contains("nixhost") && contacted.contains("nixbhost"),
        "{contacted}"
    );
    assert!(err.contains("on 'ssh://nixbhost'"), "{err}");
    // Real Nix rebuilds every output locally and finds them identical.
    let closure = run_str(t.nix("nix-store").args(["-qR"]).arg(&out), None);
    assert_eq!(closure.lines().count(), 3, "{closure}");
    run_ok(
        t.nix("nix-store")
            .args([
                "--realise",
                "--check",
                "--max-jobs",
                "1",
                "--option",
                "builders",
                "",
            ])
            .arg(&drv),
        None,
    );
    run_ok(
        t.nix("nix-store").args(["--verify", "--check-contents"]),
        None,
    );
}

#[test]
fn a_remote_build_failure_is_a_build_failure() {
    nixb_testsupport::require!(Nix);
    let (t, h, drv) = hosts_and_one("bad", "echo going down; exit 3", &["onnix"]);
    let (res, err) = h.realise(&t, TWO_HOSTS, &["--max-jobs", "0"], &drv);
    assert_eq!(res.status.code(), Some(100), "{err}");
    assert!(err.contains(&format!("@ build-failed {drv}")), "{err}");
    assert!(!err.contains("@ hook-failed"), "{err}");
    // The remote builder's output reached us.
    assert!(err.contains("going down"), "{err}");
}

#[test]
fn an_unreachable_host_is_named_and_the_build_done_locally() {
    nixb_testsupport::require!(Nix);
    let (t, h, drv) = hosts_and_one("one", "echo local > $out", &[]);
    let dead = "ssh://deadhost x86_64-linux - 1 1";
    let (res, err) = h.realise(&t, dead, &["--max-jobs", "1"], &drv);
    assert!(res.status.success(), "{err}");
    assert!(h.contacted().contains("deadhost"));
    assert!(err.contains("cannot build on 'ssh://deadhost'"), "{err}");
    assert!(err.contains("Connection refused"), "{err}");
    let out = text(&res.stdout).trim().to_string();
    assert_eq!(std::fs::read_to_string(out).unwrap(), "local\n");
}

#[test]
fn a_remote_timeout_is_honoured() {
    nixb_testsupport::require!(Nix);
    let (t, h, drv) = hosts_and_one("slow", "while true; do :; done", &["onnix"]);
    let start = Instant::now();
    let (res, err) = h.realise(&t, TWO_HOSTS, &["--max-jobs", "0", "--timeout", "2"], &drv);
    let took = start.elapsed();
    // The hook exits 101 and the run carries Nix's timeout bit, as a local timeout.
    assert_eq!(res.status.code(), Some(101), "{err}");
    assert!(
        err.contains(&format!("@ build-failed {drv} - timeout")),
        "{err}"
    );
    assert!(
        took < Duration::from_secs(40),
        "took {took:?}: the timeout was not passed on"
    );
    assert!(err.contains("timed out"), "{err}");
    assert!(h.contacted().contains("nixhost"));
}

// --- nixb as a cache producer -----------------------------------------------------------

#[test]
fn nixb_copy_writes_a_signed_cache_that_real_nix_substitutes_from() {
    nixb_testsupport::require!(Nix);
    let t = TestStore::with_conf("sandbox = false\nbuild-users-group =\nsubstituters =\n");
    let (sk, pk) = nix_key(&t);
    let dep = t.file("dep.txt", "a dependency\n");
    let dep_path = run_str(t.nixb().arg("add").arg(&dep), None);
    // An input-addressed output (built by nixb) referring to the source: real Nix only
    // trusts such a path with a good signature.
    let drv = instantiate(
        &t,
        "top.nix",
        &format!(
            r#"builtins.derivation {{ name = "top"; system = builtins.currentSystem; builder = "/bin/sh"; dep = {dep_path}; args = [ "-c" "echo $dep > $out" ]; }}"#
        ),
    );
    let top_path = run_str(t.nixb().arg("realise").arg(&drv), None);
    let cache = t.root.path().join("cache");
    let url = format!("file://{}", cache.display());
    let sk_s = sk.display().to_string();
    run_ok(
        t.nixb()
            .args(["copy", "--to", &url, "--option", "secret-key-files", &sk_s])
            .arg(&dep_path)
            .arg(&top_path),
        None,
    );
    let hashes: Vec<Option<String>> = [&dep_path, &top_path]
        .iter()
        .map(|p| nix_hash(&t, p))
        .collect();
    assert!(hashes.iter().all(Option::is_some), "{hashes:?}");
    empty_store(&t);
    // Real Nix, requiring signatures by our key, takes both paths from the cache.
    run_ok(
        t.nix("nix-store")
            .args(["-r", "--option", "substituters", &url])
            .args(["--option", "trusted-public-keys", &pk])
            .arg(&dep_path)
            .arg(&top_path),
        None,
    );
    for (p, h) in [&dep_path, &top_path].iter().zip(&hashes) {
        assert_eq!(&nix_hash(&t, p), h);
    }
    // The signatures themselves: real Nix checks them against our key, and finds none
    // from a key we do not hold. (The paths are content-addressed, which real Nix would
    // accept unsigned, so substitution alone proves nothing about them.)
    let verify = |key: &str| {
        run(
            t.nix("nix")
                .args(["store", "verify", "--store", &url, "--sigs-needed", "1"])
                .args(["--option", "trusted-public-keys", key])
                .arg(&dep_path)
                .arg(&top_path),
            None,
        )
    };
    let good = verify(&pk);
    assert!(good.status.success(), "{}", text(&good.stderr));
    let other = format!("other-key-1:{}", data_encoding_base64_of_zeros());
    let bad = verify(&other);
    assert!(
        !bad.status.success(),
        "real Nix accepted signatures of an untrusted key"
    );
}

/// A syntactically valid ed25519 public key nobody holds the secret of (32 zero bytes).
fn data_encoding_base64_of_zeros() -> String {
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".to_string()
}
