//! The resource report of `nixb realise`: one builder that touches ~200 MiB and writes 50 MB,
//! shown the same in `--json` events, `--print-build-trace` lines and the closing summary of
//! `-v`, each within 10% of what the builder did. Unsandboxed (no root needed).

use nixb_tests::{run, run_str, TestStore};
use serde_json::json;

const MIB: u64 = 1024 * 1024;

/// A python3 builder: 200 MiB touched (one bytes object), 50 MB of it written to `$out`.
/// `salt` makes each derivation a new one.
fn hungry(t: &TestStore, salt: &str) -> String {
    let script = format!(
        "import os\n# {salt}\nb = b'x' * (200 * 1024 * 1024)\n\
         open(os.environ['out'], 'wb').write(memoryview(b)[:50_000_000])\n"
    );
    let system = format!("{}-linux", std::env::consts::ARCH);
    let drv = json!({
        "outputs": { "out": { "path": "" } },
        "inputSrcs": [], "inputDrvs": {}, "system": system,
        "builder": "/usr/bin/python3", "args": ["-c", script],
        "env": { "name": "hungry", "builder": "/usr/bin/python3", "system": system, "out": "" },
    });
    run_str(
        t.nixb().args(["derivation", "add"]),
        Some(drv.to_string().as_bytes()),
    )
}

fn within(got: u64, want: u64) -> bool {
    got >= want * 9 / 10 && got <= want * 11 / 10
}

#[test]
fn json_trace_and_verbose_summary_report_memory_and_bytes_written() {
    let t = TestStore::new();

    let drv = hungry(&t, "json");
    let out = run(t.nixb().args(["realise", "--json", &drv]), None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let ev: serde_json::Value = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "build-resources")
        .unwrap_or_else(|| panic!("no build-resources event: {stderr}"));
    assert_eq!(ev["drv"], drv.as_str());
    let peak = ev["peak-memory-bytes"].as_u64().unwrap();
    let written = ev["written-bytes"].as_u64().unwrap();
    assert!(within(peak, 200 * MIB), "peak {peak}");
    assert!(within(written, 50_000_000), "written {written}");
    assert!(ev["cpu-user-us"].as_u64().unwrap() + ev["cpu-system-us"].as_u64().unwrap() > 0);

    let drv = hungry(&t, "trace");
    let out = run(
        t.nixb().args(["realise", "--print-build-trace", &drv]),
        None,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("@ build-resources "))
        .unwrap_or_else(|| panic!("{stderr}"));
    // @ build-resources DRV USER_US SYSTEM_US PEAK READ WRITTEN, before build-succeeded.
    let w: Vec<&str> = line.split(' ').collect();
    assert_eq!((w.len(), w[2]), (8, drv.as_str()), "{line}");
    let num = |i: usize| w[i].parse::<u64>().unwrap();
    assert!(
        within(num(5), 200 * MIB) && within(num(7), 50_000_000),
        "{line}"
    );
    assert!(stderr.find("@ build-resources").unwrap() < stderr.find("@ build-succeeded").unwrap());

    let drv = hungry(&t, "verbose");
    let out = run(t.nixb().args(["realise", "-v", &drv]), None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let summary = stderr
        .lines()
        .find(|l| l.starts_with(&format!("resources of '{drv}': cpu ")))
        .unwrap_or_else(|| panic!("{stderr}"));
    // "... peak memory 207.9 MiB, read 0 B, written 47.7 MiB"
    let mib_after = |key: &str| -> f64 {
        let rest = summary.split(key).nth(1).unwrap();
        let n = rest.split(' ').next().unwrap();
        assert!(rest[n.len()..].starts_with(" MiB"), "{summary}");
        n.parse().unwrap()
    };
    let (peak, written) = (mib_after("peak memory "), mib_after("written "));
    assert!((180.0..=220.0).contains(&peak), "{summary}");
    assert!((42.9..=52.5).contains(&written), "{summary}");
}
