//! Malformed derivations: every error names the file and the byte offset (or JSON field)
//! at fault, and no input makes the parser panic.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use nixb_store::derivation::{
    compute_output_paths, hash_derivation_modulo, Derivation, DrvError, DrvHashCache,
};
use nixb_store::{StoreDir, StorePath};
use proptest::prelude::*;
use serde_json::json;

const ORIGIN: &str = "/nix/store/00000000000000000000000000000000-bad.drv";
const OUT: &str = "/nix/store/7pqa5g9qdbh2fyl0ld2bhjxmbqp9v1ga-x";

fn parse(text: &[u8]) -> Result<Derivation, DrvError> {
    Derivation::parse(&StoreDir::default(), text, ORIGIN)
}

/// The offset of a parse error, checking the message names the origin and the offset.
fn offset_of(r: Result<Derivation, DrvError>) -> (usize, String) {
    match r {
        Err(e @ DrvError::Parse { offset, .. }) => {
            let msg = e.to_string();
            assert!(msg.starts_with(&format!("derivation {ORIGIN}: ")), "{msg}");
            assert!(msg.ends_with(&format!(" at byte {offset}")), "{msg}");
            (offset, msg)
        }
        other => panic!("expected a parse error, got {other:?}"),
    }
}

fn minimal(env: &str) -> String {
    format!(r#"Derive([("out","{OUT}","","")],[],[],"x86_64-linux","/bin/sh",[],[{env}])"#)
}

#[test]
fn minimal_is_accepted() {
    let d = parse(
        minimal(r#"("name","x"),("out","/nix/store/7pqa5g9qdbh2fyl0ld2bhjxmbqp9v1ga-x")"#)
            .as_bytes(),
    )
    .unwrap();
    assert_eq!(d.name().unwrap(), "x");
}

#[test]
fn errors_point_at_the_byte() {
    // `Derive([(` is 9 bytes and `"out"` 5 more: the space sits at byte 14.
    let (off, msg) = offset_of(parse(br#"Derive([("out" "/nix/store/x","","")],"#));
    assert_eq!(off, 14);
    assert!(msg.contains("expected ','"), "{msg}");

    let (off, msg) = offset_of(parse(b"Derive(["));
    assert_eq!(off, 8);
    assert!(msg.contains("end of file"), "{msg}");

    // "Derive" and "Deriva" part at byte 5.
    let (off, _) = offset_of(parse(b"Derivation(["));
    assert_eq!(off, 5);

    let (off, msg) = offset_of(parse(
        br#"DrvWithVersion("xp-dyn-drv",[],[],[],"","",[],[])"#,
    ));
    assert_eq!(off, 0);
    assert!(msg.contains("DrvWithVersion"), "{msg}");

    // An output path outside the store: the error points at the string's opening quote.
    let text = r#"Derive([("out","/usr/bin/x","","")],[],[],"s","b",[],[])"#;
    let (off, msg) = offset_of(parse(text.as_bytes()));
    assert_eq!(off, text.find("\"/usr").unwrap());
    assert!(msg.contains("/usr/bin/x"), "{msg}");

    // Trailing bytes after the closing parenthesis.
    let text = minimal("") + "\n";
    assert_eq!(offset_of(parse(text.as_bytes())).0, text.len() - 1);

    // Unterminated string: points at where it starts.
    let text = minimal(r#"("name","x)])"#);
    let text = &text[..text.len() - 3];
    assert_eq!(
        offset_of(parse(text.as_bytes())).0,
        text.rfind('"').unwrap()
    );

    // Not UTF-8.
    let mut bytes = minimal(r#"("name","x")"#).into_bytes();
    let at = bytes.len() - 5; // the x in ("name","x")])
    bytes[at] = 0xff;
    assert_eq!(offset_of(parse(&bytes)).0, at - 1);
}

#[test]
fn semantic_errors_point_at_the_field() {
    for (env_or_output, needle) in [
        (
            minimal(r#"("a","1"),("a","2")"#),
            "duplicate environment variable 'a'",
        ),
        (
            minimal("").replace(r#""","")"#, r#""whirlpool","00")"#),
            "whirlpool",
        ),
        (
            minimal("").replace(r#""","")"#, r#""sha256","")"#),
            "ca-derivations",
        ),
        (
            minimal("").replace(r#""","")"#, r#""","00")"#),
            "hash but no hash algorithm",
        ),
        (
            minimal("").replace(r#""","")"#, r#""r:sha256","abc")"#),
            "abc",
        ),
        (
            minimal("").replace("(\"out\"", "(\"o u t\""),
            "invalid output name",
        ),
        (
            minimal("").replace("[],[],\"x86", "[(\"/nix/store/x.drv\",[\"out\"])],[],\"x86"),
            "input derivation",
        ),
        (
            minimal("").replace("[],\"x86", "[\"relative\"],\"x86"),
            "input source",
        ),
    ] {
        let (_, msg) = offset_of(parse(env_or_output.as_bytes()));
        assert!(msg.contains(needle), "{needle:?} not in {msg}");
    }
}

#[test]
fn lenient_nix_forms_we_reject_stay_errors() {
    // Nix's reader skips missing commas between list elements; a damaged file should not pass here.
    let text = minimal(r#"("a","1")("b","2")"#);
    assert!(offset_of(parse(text.as_bytes()))
        .1
        .contains("expected ',' or ']'"));
    let text = minimal(r#",("a","1")"#);
    offset_of(parse(text.as_bytes()));
}

#[test]
fn json_errors_name_the_field() {
    let sd = StoreDir::default();
    let good = json!({
        "outputs": {"out": {"path": OUT}},
        "inputSrcs": [], "inputDrvs": {}, "system": "x86_64-linux", "builder": "/bin/sh",
        "args": [], "env": {"name": "x"}
    });
    assert!(Derivation::from_json(&sd, &good, "in.json").is_ok());
    type Mutation = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(Mutation, &str)> = vec![
        (
            Box::new(|v| {
                v.as_object_mut().unwrap().remove("outputs");
            }),
            "json outputs: missing",
        ),
        (
            Box::new(|v| v["system"] = json!(3)),
            "json system: expected a string, found a number",
        ),
        (
            Box::new(|v| v["args"] = json!(["a", null])),
            "json args[1]: expected a string, found null",
        ),
        (
            Box::new(|v| v["env"]["k"] = json!([])),
            "json env.k: expected a string",
        ),
        (
            Box::new(|v| v["extra"] = json!(1)),
            "json extra: unknown key",
        ),
        (
            Box::new(|v| v["outputs"]["out"]["path"] = json!("/elsewhere/x")),
            "json outputs.out.path: path '/elsewhere/x' is not in",
        ),
        (
            Box::new(|v| v["outputs"]["out"]["hashAlgo"] = json!("sha256")),
            "ca-derivations",
        ),
        (
            Box::new(|v| v["outputs"]["out"]["hash"] = json!("00")),
            "'hash' without 'hashAlgo'",
        ),
        (
            Box::new(|v| v["inputDrvs"] = json!({"/nix/store/x.drv": ["out"]})),
            "json inputDrvs./nix/store/x.drv",
        ),
        (
            Box::new(|v| v["inputDrvs"] = json!({OUT: ["out", "out"]})),
            "duplicate output 'out'",
        ),
        (
            Box::new(|v| v["inputSrcs"] = json!([OUT, OUT])),
            "json inputSrcs[1]: duplicate",
        ),
        (
            Box::new(|v| v["name"] = json!("y")),
            "json name: 'y' differs from env.name",
        ),
        (
            Box::new(|v| *v = json!([])),
            "expected an object, found an array",
        ),
    ];
    for (mutate, needle) in cases {
        let mut v = good.clone();
        mutate(&mut v);
        let e = Derivation::from_json(&sd, &v, "in.json").unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("derivation in.json: json "), "{msg}");
        assert!(msg.contains(needle), "{needle:?} not in {msg}");
    }
    // Later Nix's shapes are accepted.
    let mut newer = good.clone();
    newer["name"] = json!("x");
    newer["inputDrvs"] = json!({"/nix/store/7pqa5g9qdbh2fyl0ld2bhjxmbqp9v1ga-y.drv": {"outputs": ["out"], "dynamicOutputs": {}}});
    newer["outputs"] =
        json!({"out": {"method": "nar", "hashAlgo": "sha256", "hash": "00".repeat(32)}});
    let d = Derivation::from_json(&sd, &newer, "in.json").unwrap();
    assert!(d.is_fixed_output());
    assert!(d.outputs["out"].fixed.as_ref().unwrap().recursive);
}

fn fixture_texts() -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/drv/nix-store");
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "drv"))
        .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()))
        .collect();
    v.sort();
    assert!(v.len() >= 20);
    v
}

/// Every proper prefix of a real .drv is an error pointing inside the prefix.
#[test]
fn every_truncation_is_an_error() {
    for (name, text) in fixture_texts() {
        assert!(parse(&text).is_ok(), "{name}");
        for cut in 0..text.len() {
            let (off, msg) = offset_of(parse(&text[..cut]));
            assert!(off <= cut, "{name} cut at {cut}: {msg}");
        }
    }
}

fn check_no_panic(text: &[u8]) -> Result<(), TestCaseError> {
    match parse(text) {
        Ok(d) => {
            // Whatever parses must print and parse back to itself.
            let again = parse(d.to_aterm(&StoreDir::default()).as_bytes());
            if !d.platform.contains(['"', '\\']) {
                prop_assert_eq!(again.ok(), Some(d));
            }
        }
        Err(e @ DrvError::Parse { offset, .. }) => {
            prop_assert!(offset <= text.len());
            let msg = e.to_string();
            prop_assert!(
                msg.contains(ORIGIN) && msg.ends_with(&format!("at byte {offset}")),
                "{}",
                msg
            );
        }
        Err(e) => prop_assert!(false, "unexpected error kind {e:?}"),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn random_bytes_never_panic(text in prop::collection::vec(any::<u8>(), 0..300)) {
        check_no_panic(&text)?;
        let mut prefixed = b"Derive([".to_vec();
        prefixed.extend_from_slice(&text);
        check_no_panic(&prefixed)?;
    }

    #[test]
    fn mutated_fixtures_never_panic(which in 0usize..20, edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4)) {
        let fixtures = fixture_texts();
        let mut text = fixtures[which % fixtures.len()].1.clone();
        for (at, b) in edits {
            let i = at.index(text.len());
            text[i] = b;
        }
        check_no_panic(&text)?;
    }

    #[test]
    fn random_json_never_panics(s in "[\\[\\]{}\",:a-z0-9/ ]{0,80}") {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&s) {
            let _ = Derivation::from_json(&StoreDir::default(), &v, "fuzz.json");
        }
    }
}

fn sp(s: &str) -> StorePath {
    StoreDir::default().parse(s).unwrap()
}

fn drv_with_inputs(name: &str, inputs: &[(&str, &str)]) -> Derivation {
    Derivation {
        outputs: BTreeMap::from([("out".to_string(), Default::default())]),
        input_drvs: inputs
            .iter()
            .map(|(p, o)| (sp(p), BTreeSet::from([o.to_string()])))
            .collect(),
        input_srcs: BTreeSet::new(),
        platform: "x86_64-linux".into(),
        builder: "/bin/sh".into(),
        args: vec![],
        env: BTreeMap::from([("name".to_string(), name.to_string())]),
    }
}

const A: &str = "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-a.drv";
const B: &str = "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-b.drv";

#[test]
fn input_cycles_are_errors_not_hangs() {
    let root = drv_with_inputs("root", &[(A, "out")]);
    let mut resolve = |p: &StorePath| -> Result<Derivation, DrvError> {
        Ok(if p.name() == "a.drv" {
            drv_with_inputs("a", &[(B, "out")])
        } else {
            drv_with_inputs("b", &[(A, "out")])
        })
    };
    let e = hash_derivation_modulo(
        &StoreDir::default(),
        &root,
        true,
        &mut resolve,
        &mut DrvHashCache::new(),
    )
    .unwrap_err();
    assert!(matches!(e, DrvError::Cycle(_)), "{e}");
    assert!(e.to_string().contains("cycle"));
}

#[test]
fn missing_input_output_and_resolve_errors_surface() {
    let root = drv_with_inputs("root", &[(A, "dev")]);
    let mut resolve =
        |_: &StorePath| -> Result<Derivation, DrvError> { Ok(drv_with_inputs("a", &[])) };
    let e = hash_derivation_modulo(
        &StoreDir::default(),
        &root,
        true,
        &mut resolve,
        &mut DrvHashCache::new(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("wants output 'dev'"), "{e}");

    let mut failing = |p: &StorePath| -> Result<Derivation, DrvError> {
        Derivation::read(
            &StoreDir::default(),
            Path::new(&format!("/nonexistent/{}", p.base_name())),
        )
    };
    let e = hash_derivation_modulo(
        &StoreDir::default(),
        &root,
        true,
        &mut failing,
        &mut DrvHashCache::new(),
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("/nonexistent/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-a.drv"),
        "{e}"
    );
}

/// A long chain of inputs is walked without recursion (a recursive walk would overflow
/// the 2 MiB test thread stack long before 100 000 levels).
#[test]
fn deep_chains_do_not_overflow() {
    let n = 100_000usize;
    let path_of = |i: usize| sp(&format!("/nix/store/{}-d{i}.drv", nix_base32_like(i)));
    let root = Derivation {
        input_drvs: BTreeMap::from([(path_of(0), BTreeSet::from(["out".to_string()]))]),
        ..drv_with_inputs("root", &[])
    };
    let mut loads = 0;
    let mut resolve = |p: &StorePath| -> Result<Derivation, DrvError> {
        loads += 1;
        let i: usize = p
            .name()
            .trim_start_matches('d')
            .trim_end_matches(".drv")
            .parse()
            .unwrap();
        let mut d = drv_with_inputs(&format!("d{i}"), &[]);
        if i + 1 < n {
            d.input_drvs
                .insert(path_of(i + 1), BTreeSet::from(["out".to_string()]));
        }
        Ok(d)
    };
    let mut cache = DrvHashCache::new();
    hash_derivation_modulo(&StoreDir::default(), &root, true, &mut resolve, &mut cache).unwrap();
    assert_eq!(loads, n);
    assert_eq!(cache.len(), n);
}

fn nix_base32_like(i: usize) -> String {
    let alphabet = b"0123456789abcdfghijklmnpqrsvwxyz";
    (0..32)
        .map(|k| alphabet[(i >> (5 * (k % 6))) & 31] as char)
        .collect()
}

#[test]
fn compute_output_paths_rejects_wrong_or_invalid() {
    let sd = StoreDir::default();
    let mut none = |_: &StorePath| -> Result<Derivation, DrvError> { unreachable!("no inputs") };

    // A wrong given output path.
    let mut d = drv_with_inputs("x", &[]);
    d.outputs.get_mut("out").unwrap().path = Some(sp(OUT));
    let e = compute_output_paths(&sd, &mut d, &mut none, &mut DrvHashCache::new()).unwrap_err();
    assert!(
        e.to_string()
            .contains(&format!("output 'out' is {OUT}, but should be")),
        "{e}"
    );

    // A wrong env var.
    let mut d = drv_with_inputs("x", &[]);
    d.env.insert("out".into(), "/tmp/elsewhere".into());
    let e = compute_output_paths(&sd, &mut d, &mut none, &mut DrvHashCache::new()).unwrap_err();
    assert!(e.to_string().contains("environment variable 'out'"), "{e}");

    // Mixing a fixed output with another.
    let mut d: Derivation = Derivation::from_json(
        &sd,
        &json!({
            "outputs": {"out": {"hashAlgo": "sha256", "hash": "00".repeat(32)}, "dev": {}},
            "system": "x", "builder": "/bin/sh", "env": {"name": "x"}
        }),
        "mixed",
    )
    .unwrap();
    let e = compute_output_paths(&sd, &mut d, &mut none, &mut DrvHashCache::new()).unwrap_err();
    assert!(e.to_string().contains("exactly one output"), "{e}");

    // A platform Nix would write unreadably.
    let mut d = drv_with_inputs("x", &[]);
    d.platform = "a\"b".into();
    assert!(compute_output_paths(&sd, &mut d, &mut none, &mut DrvHashCache::new()).is_err());

    // No name, no outputs.
    let mut d = drv_with_inputs("x", &[]);
    d.env.clear();
    assert!(matches!(
        compute_output_paths(&sd, &mut d, &mut none, &mut DrvHashCache::new()),
        Err(DrvError::NoName)
    ));
    let mut d = drv_with_inputs("x", &[]);
    d.outputs.clear();
    assert!(
        compute_output_paths(&sd, &mut d, &mut none, &mut DrvHashCache::new())
            .unwrap_err()
            .to_string()
            .contains("no outputs")
    );
}
