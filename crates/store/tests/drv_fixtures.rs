//! Golden tests against derivations written by real Nix 2.8 (see fixtures/drv/generate.sh).
//!
//! Every fixture is a `.drv` exactly as `nix-instantiate` wrote it, named by the store path
//! Nix gave it, beside the JSON `nix show-derivation` printed for it. Everything compared
//! here (bytes, JSON, the file's name, the output paths inside it) comes from Nix, not from
//! the code under test.

use std::cell::Cell;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use nixb_store::derivation::{
    compute_output_paths, hash_derivation_modulo, Derivation, DrvError, DrvHashCache,
};
use nixb_store::{StoreDir, StorePath};

fn fixture_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/drv")
}

struct Fixture {
    dir: PathBuf,
    store: StoreDir,
    path: StorePath,
    bytes: Vec<u8>,
    /// The whole object `nix show-derivation` printed: { "<drv path>": { ... } }.
    json_text: String,
}

fn load(rel: &str) -> Fixture {
    let file = fixture_root().join(rel);
    let dir = file.parent().unwrap().to_path_buf();
    let store_dir = std::fs::read_to_string(dir.join("STORE_DIR")).unwrap();
    let store = StoreDir::new(store_dir.trim()).unwrap();
    let base = file.file_name().unwrap().to_str().unwrap();
    Fixture {
        path: StorePath::from_base_name(base).unwrap(),
        bytes: std::fs::read(&file).unwrap(),
        json_text: std::fs::read_to_string(format!("{}.json", file.display())).unwrap(),
        store,
        dir,
    }
}

/// Loads input derivations from the fixture directory, counting the loads.
fn resolver<'a>(
    fx: &'a Fixture,
    loads: &'a Cell<usize>,
) -> impl FnMut(&StorePath) -> Result<Derivation, DrvError> + 'a {
    move |p: &StorePath| {
        loads.set(loads.get() + 1);
        Derivation::read(&fx.store, &fx.dir.join(p.base_name()))
    }
}

fn check_fixture(rel: &str) {
    let fx = load(rel);
    let origin = fx.store.print(&fx.path);
    let drv = Derivation::parse(&fx.store, &fx.bytes, &origin).unwrap();

    // 1. printing gives back Nix's bytes.
    let printed = drv.to_aterm(&fx.store);
    assert_eq!(printed.as_bytes(), &fx.bytes[..], "aterm of {rel}");

    // 2. the .drv's own path (its file name, chosen by Nix) is recomputed.
    assert_eq!(
        drv.drv_path(&fx.store).unwrap(),
        fx.path,
        "drv path of {rel}"
    );
    assert_eq!(
        drv.references(),
        drv.input_srcs
            .iter()
            .chain(drv.input_drvs.keys())
            .cloned()
            .collect::<BTreeSet<_>>()
    );

    // 3. JSON equals Nix's, as a value and as text (key order, escapes, unicode).
    let nix_json: serde_json::Value = serde_json::from_str(&fx.json_text).unwrap();
    let nix_obj = nix_json.as_object().unwrap();
    assert_eq!(nix_obj.len(), 1);
    let (key, nix_drv_json) = nix_obj.iter().next().unwrap();
    assert_eq!(key, &origin, "show-derivation key of {rel}");
    let ours = drv.to_json(&fx.store);
    assert_eq!(&ours, nix_drv_json, "json of {rel}");
    let wrapped = serde_json::json!({ origin.clone(): ours });
    assert_eq!(
        serde_json::to_string_pretty(&wrapped).unwrap(),
        fx.json_text.trim_end(),
        "json text of {rel}"
    );

    // 4. Nix's JSON read back prints Nix's .drv bytes.
    let from_json = Derivation::from_json(&fx.store, nix_drv_json, rel).unwrap();
    assert_eq!(from_json, drv);
    assert_eq!(
        from_json.to_aterm(&fx.store).as_bytes(),
        &fx.bytes[..],
        "aterm from json of {rel}"
    );

    // 5. hashDerivationModulo reproduces the output paths Nix wrote.
    let loads = Cell::new(0);
    let mut resolve = resolver(&fx, &loads);
    let mut cache = DrvHashCache::new();
    let name = &*drv.name().unwrap();
    let h = hash_derivation_modulo(&fx.store, &drv, true, &mut resolve, &mut cache).unwrap();
    match drv.fixed_output().unwrap() {
        Some(f) => {
            assert!(drv.is_fixed_output());
            let p = fx
                .store
                .make_fixed_output_path(f.recursive, &f.hash, name)
                .unwrap();
            assert_eq!(drv.output_paths()["out"], p, "fixed output path of {rel}");
        }
        None => {
            assert!(!drv.is_fixed_output());
            for (o, p) in drv.output_paths() {
                assert_eq!(
                    fx.store.make_output_path(&o, &h, name).unwrap(),
                    p,
                    "output {o} of {rel}"
                );
            }
        }
    }
    assert_eq!(drv.output_paths().len(), drv.outputs.len());

    // 6. blanking the outputs (as the derivation builtin starts) and computing them again
    //    gives Nix's derivation back, with each input resolved once thanks to the cache.
    for remove_env in [false, true] {
        let mut blank = drv.clone();
        for (o, out) in blank.outputs.iter_mut() {
            out.path = None;
            if remove_env {
                blank.env.remove(o);
            } else {
                blank.env.insert(o.clone(), String::new());
            }
        }
        let before = loads.get();
        compute_output_paths(&fx.store, &mut blank, &mut resolve, &mut cache).unwrap();
        assert_eq!(
            blank, drv,
            "computed outputs of {rel} (env removed: {remove_env})"
        );
        assert_eq!(
            loads.get(),
            before,
            "the cache should have made loading again unnecessary"
        );
    }
    let distinct: BTreeSet<_> = closure_of(&fx, &drv);
    if drv.fixed_output().unwrap().is_none() {
        assert_eq!(
            loads.get(),
            distinct.len(),
            "each input derivation of {rel} loaded exactly once"
        );
    }

    // 7. and computing over Nix's derivation as it is accepts it unchanged.
    let mut same = drv.clone();
    compute_output_paths(&fx.store, &mut same, &mut resolve, &mut DrvHashCache::new()).unwrap();
    assert_eq!(same, drv);
}

/// Every derivation reachable through input derivations (not through fixed-output ones,
/// whose inputs hashing does not visit).
fn closure_of(fx: &Fixture, drv: &Derivation) -> BTreeSet<StorePath> {
    let mut seen = BTreeSet::new();
    let mut todo: Vec<StorePath> = drv.input_drvs.keys().cloned().collect();
    while let Some(p) = todo.pop() {
        if seen.insert(p.clone()) {
            let d = Derivation::read(&fx.store, &fx.dir.join(p.base_name())).unwrap();
            if !d.is_fixed_output() {
                todo.extend(d.input_drvs.keys().cloned());
            }
        }
    }
    seen
}

macro_rules! fixtures {
    ($($name:ident => $file:literal,)*) => {
        $( #[test] fn $name() { check_fixture($file); } )*
        const ALL: &[&str] = &[$($file),*];
    };
}

fixtures! {
    nix_store_srcs_1wvc => "nix-store/1wvc4a5b941z1vkc34pa5s0ahdh98g05-srcs.drv",
    nix_store_uses_fixed_21yg => "nix-store/21yg87pbdcszangmddsr9m89ws2mz0j2-uses-fixed.drv",
    nix_store_chain_1_22q5 => "nix-store/22q53bqwkdwlx8w0cr0am2a2g1z0v4kh-chain-1.drv",
    nix_store_flat_sha1_8bpy => "nix-store/8bpyh8n9m3rgdhknbsdb448y5w4drxsg-flat-sha1.drv",
    nix_store_rec_sha1_9kz5 => "nix-store/9kz52z5zwc9yykb2p9z0pr45j1mhnnci-rec-sha1.drv",
    nix_store_flat_sha512_bzql => "nix-store/bzqld4v711748lj10bmab6zgn79cm3va-flat-sha512.drv",
    nix_store_uses_fixed_c4i6 => "nix-store/c4i6nmjmyzp189bpj33j3q562llmdb0k-uses-fixed.drv",
    nix_store_flat_sha256_c5mv => "nix-store/c5mv0aq768fz1vh6cn85vxl2pnmabpy5-flat-sha256.drv",
    nix_store_weird_platform_cy4s => "nix-store/cy4sg76jij3g9nmb6a8f6bhx87ad5kgv-weird-platform.drv",
    nix_store_chain_3_fck9 => "nix-store/fck9pqhpqk71lcpa3rm3b4p59vcv8745-chain-3.drv",
    nix_store_rec_md5_fx47 => "nix-store/fx47qmxaxz9din0knlplif4qcr5r9689-rec-md5.drv",
    nix_store_flat_md5_gj7b => "nix-store/gj7bgmzgjvy5bxv6770qik9c3vg4nk54-flat-md5.drv",
    nix_store_rec_sha256_hz2b => "nix-store/hz2b9f4kn10scsbfj6j5c9jbwnmmilf6-rec-sha256.drv",
    nix_store_flat_sha256_jd85 => "nix-store/jd8562wllllb4qal9wzly196psrwx2bz-flat-sha256.drv",
    nix_store_multi_l2lv => "nix-store/l2lvzkn8yvvp5v9fxd8nyiry96yprrsh-multi.drv",
    nix_store_a_b_c_d_e_f_1_0_l9pw => "nix-store/l9pw2f6f9ag8gh0814qck58hx2g2grsv-a+b=c?d_e.f-1.0.drv",
    nix_store_rec_sha512_n3ma => "nix-store/n3ma4h877sb64nip7cdw0im4hvw36b3w-rec-sha512.drv",
    nix_store_structured_w07x => "nix-store/w07x7x7gkcm1y108p4is13zcdrf278fa-structured.drv",
    nix_store_chain_2_wz86 => "nix-store/wz86q65b0lakyafzxh6a7zwkjq6yd59l-chain-2.drv",
    nix_store_nasty_zlih => "nix-store/zlihl019sl2qgs5ksanqq9rjcj7x874j-nasty.drv",
    custom_store_flat_md5_4435 => "custom-store/44352sdixs7a3lx55mzns0pv2jkfasim-flat-md5.drv",
    custom_store_uses_fixed_5fyg => "custom-store/5fygid8p4sp788hvgcgdjdhkjw1wrs1c-uses-fixed.drv",
    custom_store_chain_3_6vxk => "custom-store/6vxka6swzpyr6imv0iv0q7vpqxbj1hw2-chain-3.drv",
    custom_store_nasty_80jw => "custom-store/80jwangnr9s4kns7cqm0rhx89z2sxmx1-nasty.drv",
    custom_store_flat_sha256_89d8 => "custom-store/89d8nwq733i4rdgrpriypmmshz7jszf0-flat-sha256.drv",
    custom_store_flat_sha256_9gwr => "custom-store/9gwrcbd83lslwd9rfqzgrjr3yz4m192j-flat-sha256.drv",
    custom_store_weird_platform_adwf => "custom-store/adwf3id2nynby512zgda2rm87hp8ynpz-weird-platform.drv",
    custom_store_flat_sha1_axb2 => "custom-store/axb2g11h3i2r3fbcjdkix1wcvf9c5b5g-flat-sha1.drv",
    custom_store_rec_sha256_b2kz => "custom-store/b2kzbsxvmyrw0plz26ql6xxdcwbwylba-rec-sha256.drv",
    custom_store_chain_1_b34b => "custom-store/b34b5klkhffnkg1h4ajx7fw1060w6k1p-chain-1.drv",
    custom_store_multi_caf4 => "custom-store/caf4h636my7qibcn4vyklpjf0143ay9v-multi.drv",
    custom_store_rec_md5_fd4w => "custom-store/fd4wa04znby2f233kyqsh09cypqach7b-rec-md5.drv",
    custom_store_a_b_c_d_e_f_1_0_hiwr => "custom-store/hiwrdgxpnw75ks2vymskcmgl32m2phfa-a+b=c?d_e.f-1.0.drv",
    custom_store_srcs_rir7 => "custom-store/rir7blqw211rl303131fqncwrhcfjnag-srcs.drv",
    custom_store_uses_fixed_rkhv => "custom-store/rkhv5jlynrwy1hvf95b9hrw53nd2n0xl-uses-fixed.drv",
    custom_store_chain_2_skgf => "custom-store/skgfvlqjzmq982j5w0yfxyi0dd9bb8jl-chain-2.drv",
    custom_store_structured_wkfc => "custom-store/wkfc9b9vh16pfkaq1sirv89ycxrzc87m-structured.drv",
    custom_store_rec_sha1_wvdw => "custom-store/wvdwlf56ipvfaj6nwh99jzckch6xshab-rec-sha1.drv",
    custom_store_flat_sha512_y5p7 => "custom-store/y5p75chm8xkyz2h90k9bzzk9l77mnf46-flat-sha512.drv",
    custom_store_rec_sha512_y7fi => "custom-store/y7fil0vca9xx7jm9jq6svsk4dz0pfrnk-rec-sha512.drv",
}

#[test]
fn every_fixture_file_has_a_test() {
    let mut on_disk = BTreeSet::new();
    for sub in ["nix-store", "custom-store"] {
        for e in std::fs::read_dir(fixture_root().join(sub)).unwrap() {
            let name = e.unwrap().file_name().into_string().unwrap();
            if name.ends_with(".drv") {
                on_disk.insert(format!("{sub}/{name}"));
            }
        }
    }
    let listed: BTreeSet<String> = ALL.iter().map(|s| s.to_string()).collect();
    assert_eq!(
        on_disk, listed,
        "regenerated fixtures? update the list in drv_fixtures.rs"
    );
}

fn find(sub: &str, name: &str) -> Vec<(StorePath, Derivation)> {
    ALL.iter()
        .filter(|f| f.starts_with(sub) && f.ends_with(&format!("-{name}.drv")))
        .map(|f| {
            let fx = load(f);
            let d = Derivation::parse(&fx.store, &fx.bytes, f).unwrap();
            (fx.path, d)
        })
        .collect()
}

/// Two fixed-output derivations with the same hash and name but different builders have
/// different .drv paths, yet what depends on them gets the same output paths: the reason
/// hashDerivationModulo exists. Nix's fixtures show it; we must agree.
#[test]
fn fixed_output_inputs_do_not_change_dependants_outputs() {
    for sub in ["nix-store", "custom-store"] {
        let fixed = find(sub, "flat-sha256");
        assert_eq!(fixed.len(), 2);
        assert_ne!(fixed[0].0, fixed[1].0);
        assert_ne!(fixed[0].1.builder, fixed[1].1.builder);
        assert_eq!(fixed[0].1.output_paths(), fixed[1].1.output_paths());
        let users = find(sub, "uses-fixed");
        assert_eq!(users.len(), 2);
        assert_ne!(users[0].0, users[1].0);
        assert_eq!(users[0].1.output_paths(), users[1].1.output_paths());
    }
}

#[test]
fn chain_inputs_and_sources_are_read() {
    let chain2 = &find("nix-store", "chain-2")[0].1;
    let outs: Vec<Vec<&str>> = chain2
        .input_drvs
        .values()
        .map(|s| s.iter().map(String::as_str).collect())
        .collect();
    assert!(outs.contains(&vec!["dev", "out"]), "{outs:?}");
    assert_eq!(chain2.input_drvs.len(), 2);
    let srcs = &find("nix-store", "srcs")[0].1;
    let names: Vec<&str> = srcs.input_srcs.iter().map(|p| p.name()).collect();
    assert_eq!(names.len(), 3);
    for n in ["text-one", "text-two", "src-file.txt"] {
        assert!(names.contains(&n), "{names:?}");
    }
}
