//! What every `nixb` command promises beyond its own job: `--help` text (snapshots),
//! `realise --json` events (snapshot), diagnostics of the library crates shown according to
//! `-v`/`-q`, `--option` refused where nothing reads it, and `nixb log` streaming.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Stdio;

use nixb_tests::{nixb_binary, run, run_str, TestStore};
use serde_json::json;

/// Every subcommand's `--help`, so that a change of wording or of a flag shows up in review.
#[test]
fn help_texts() {
    let help = |args: &[&str]| {
        let out = run(std::process::Command::new(nixb_binary()).args(args), None);
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    insta::assert_snapshot!("nixb", help(&["--help"]));
    for cmd in [
        "realise",
        "query",
        "log",
        "add",
        "derivation",
        "dump",
        "restore",
        "hash",
        "verify",
        "substitute",
        "copy",
        "serve",
        "build-remote",
        "gc",
        "daemon",
    ] {
        insta::assert_snapshot!(format!("nixb_{cmd}"), help(&[cmd, "--help"]));
    }
}

fn system() -> String {
    format!("{}-linux", std::env::consts::ARCH)
}

/// A derivation running `/bin/sh -c script`, with the given inputs, added with nixb.
fn add_drv(t: &TestStore, name: &str, script: &str, input_drvs: &[&str]) -> String {
    let inputs: serde_json::Map<_, _> = input_drvs
        .iter()
        .map(|d| ((*d).to_string(), json!(["out"])))
        .collect();
    let drv = json!({
        "outputs": { "out": { "path": "" } },
        "inputSrcs": [],
        "inputDrvs": inputs,
        "system": system(),
        "builder": "/bin/sh",
        "args": ["-c", script],
        "env": { "name": name, "builder": "/bin/sh", "system": system(), "out": "" },
    });
    run_str(
        t.nixb().args(["derivation", "add"]),
        Some(drv.to_string().as_bytes()),
    )
}

/// The JSON event stream of a build with a dependency and a failure under --keep-going:
/// its shape is an interface for tools, so it is pinned as a whole. Store hashes differ per
/// temp dir and are filtered out; event order is deterministic with --max-jobs 1.
#[test]
fn realise_json_events() {
    let t = TestStore::new();
    let dep = add_drv(&t, "dep", "echo building dep; echo dep > $out", &[]);
    let top = add_drv(
        &t,
        "top",
        &format!("echo top uses {dep}; echo top > $out"),
        &[&dep],
    );
    let bad = add_drv(&t, "bad", "echo about to fail >&2; exit 3", &[]);
    let out = run(
        t.nixb()
            .args(["realise", "--json", "--keep-going", "--max-jobs", "1"])
            .args([&top, &bad]),
        None,
    );
    assert_eq!(out.status.code(), Some(100), "{out:?}");
    let root = t.root.path().display().to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).replace(&root, "[ROOT]");
    insta::with_settings!({filters => vec![
        (r"/[0-9a-df-np-sv-z]{32}-", "/[HASH]-"),
        (r"drvs/[0-9a-df-np-sv-z]{2}/[0-9a-df-np-sv-z]{30}-", "drvs/[HASH]-"),
        // What a build used differs from run to run; the fields do not.
        (r#""(cpu-user-us|cpu-system-us|peak-memory-bytes|read-bytes|written-bytes)":\d+"#, r#""$1":[N]"#),
    ]}, {
        insta::assert_snapshot!(stderr);
    });
}

/// A `tracing` warning of a library crate (here the binary cache's retry) reaches stderr as
/// `warning: …` by default and disappears with `-q`; `download-attempts` from `--option`
/// sets how many tries are reported.
#[test]
fn library_warnings_follow_verbosity_and_options() {
    // A port nothing listens on: every connection is refused at once.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let t = TestStore::new();
    let query = |extra: &[&str]| {
        let out = run(
            t.nixb()
                .args(["substitute", "--cache", &url, "--query"])
                .args(extra),
            Some(b""),
        );
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let loud = query(&["--option", "download-attempts", "2"]);
    assert!(
        loud.contains(&format!(
            "warning: cache '{url}': fetching 'nix-cache-info' (attempt 2 of 2)"
        )),
        "{loud}"
    );
    assert!(!loud.contains("attempt 3"), "{loud}");
    let quiet = query(&["-q", "--option", "download-attempts", "1"]);
    assert!(!quiet.contains("attempt"), "{quiet}");
    let bad = run(
        t.nixb()
            .args(["substitute", "--cache", &url, "--query"])
            .args(["--option", "download-attempts", "0"]),
        Some(b""),
    );
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("setting 'download-attempts'"),
        "{bad:?}"
    );
}

/// Commands that read no setting refuse `--option` instead of ignoring it.
#[test]
fn option_is_refused_where_nothing_reads_it() {
    let t = TestStore::new();
    for args in [
        &["query", "--valid", "/nonexistent"][..],
        &["log", "/nonexistent"],
        &["verify"],
        &["hash", "file", "/dev/null"],
    ] {
        let out = run(
            t.nixb().args(args).args(["--option", "max-jobs", "4"]),
            None,
        );
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("'nixb {}' reads no settings", args[0]))
                && stderr.contains("--option max-jobs"),
            "{args:?}: {stderr}"
        );
    }
}

/// Peak resident memory of a running process, in KiB (`VmHWM`).
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// `nixb log` copies a log through a small buffer: with a 256 MiB log, the process has
/// handed out half of it while its peak memory stays far below the log's size (a reader
/// that loads the whole log first would be past 256 MiB before writing a byte).
#[test]
fn log_streams() {
    const SIZE: usize = 256 << 20;
    let t = TestStore::new();
    let drv = add_drv(&t, "loud", "true", &[]);
    let base = drv.rsplit('/').next().unwrap();
    let dir = t.log_dir().join("drvs").join(&base[..2]);
    std::fs::create_dir_all(&dir).unwrap();
    let file = std::fs::File::create(dir.join(format!("{}.bz2", &base[2..]))).unwrap();
    let mut enc = bzip2::write::BzEncoder::new(file, bzip2::Compression::fast());
    let block = vec![b'x'; 1 << 20];
    for _ in 0..SIZE >> 20 {
        enc.write_all(&block).unwrap();
    }
    enc.finish().unwrap();

    let mut child = t
        .nixb()
        .args(["log", &drv])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut buf = vec![0u8; 1 << 16];
    let mut seen = 0usize;
    while seen < SIZE / 2 {
        let n = stdout.read(&mut buf).unwrap();
        assert!(n > 0, "log ended after {seen} bytes");
        assert!(buf[..n].iter().all(|&b| b == b'x'));
        seen += n;
    }
    // The child is now blocked writing into the full pipe: still alive, peak measurable.
    let peak = peak_rss_kib(child.id());
    assert!(
        peak < 64 << 10,
        "nixb log peaked at {peak} KiB after copying {seen} bytes"
    );
    seen += std::io::copy(&mut stdout, &mut std::io::sink()).unwrap() as usize;
    assert!(child.wait().unwrap().success());
    assert_eq!(seen, SIZE);
}
