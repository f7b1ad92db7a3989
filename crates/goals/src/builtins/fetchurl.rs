//! `builtin:fetchurl`: the downloader of `<nix/fetchurl.nix>`, a fixed-output derivation
//! whose hash the worker checks once the builder is done.
//!
//! The environment gives `out`, `url`, and optionally `unpack = "1"` (the download is a NAR,
//! xz-compressed when the URL ends in `.xz`, restored at `out`) and `executable = "1"` (the
//! file is made executable). Nix 2.x first tries its `hashed-mirrors`, empty by default;
//! nixb goes to the URL straight away.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

/// The builder: downloads `url` to `out`.
pub fn run(env: &BTreeMap<String, String>) -> Result<(), String> {
    let get = |name: &str| super::attr(env, name);
    let out = PathBuf::from(get("out")?);
    let url = get("url")?;
    let flag = |name: &str| env.get(name).is_some_and(|v| v == "1");
    let unpack = flag("unpack");
    let mut input = nixb_binarycache::fetch::open_url(url, unpack && url.ends_with(".xz"))?;
    if unpack {
        nixb_store::nar::restore_path(&mut input, &out)
            .map_err(|e| format!("unpacking the NAR from '{url}': {e}"))?;
    } else {
        let mut file = std::fs::File::create(&out)
            .map_err(|e| format!("creating '{}': {e}", out.display()))?;
        std::io::copy(&mut input, &mut file)
            .map_err(|e| format!("downloading '{url}' to '{}': {e}", out.display()))?;
    }
    if flag("executable") {
        std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| format!("making '{}' executable: {e}", out.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, String)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    #[test]
    fn downloads_a_file_and_makes_it_executable() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("tool.sh");
        std::fs::write(&src, "#!/bin/sh\n").unwrap();
        let out = dir.path().join("out");
        run(&env(&[
            ("out", out.display().to_string()),
            ("url", format!("file://{}", src.display())),
            ("executable", "1".into()),
        ]))
        .unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"#!/bin/sh\n");
        let mode = std::fs::metadata(&out).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
    }

    #[test]
    fn unpacks_a_nar() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir(&tree).unwrap();
        std::fs::write(tree.join("f"), "x\n").unwrap();
        let mut nar = Vec::new();
        nixb_store::nar::dump_path(&tree, &mut nar).unwrap();
        let nar_file = dir.path().join("t.nar");
        std::fs::write(&nar_file, &nar).unwrap();
        let out = dir.path().join("out");
        run(&env(&[
            ("out", out.display().to_string()),
            ("url", format!("file://{}", nar_file.display())),
            ("unpack", "1".into()),
        ]))
        .unwrap();
        assert_eq!(std::fs::read_to_string(out.join("f")).unwrap(), "x\n");
        let missing = run(&env(&[("out", out.display().to_string())])).unwrap_err();
        assert_eq!(missing, "attribute 'url' missing");
    }
}
