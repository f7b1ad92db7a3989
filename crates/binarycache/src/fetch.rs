//! One file by URL (`file://` or `http(s)://`), for builders that download, such as
//! `builtin:fetchurl`. The result's hash is checked by whoever asked (a fixed-output
//! derivation's hash), so TLS certificates are not what makes it trustworthy; they are
//! still checked, as the same client does for caches.

use std::io::Read;
use std::time::Duration;

/// Opens `url` for reading; with `xz`, what comes is decompressed on the way.
pub fn open_url(url: &str, xz: bool) -> Result<Box<dyn Read + Send>, String> {
    let raw: Box<dyn Read + Send> = if let Some(path) = url.strip_prefix("file://") {
        Box::new(std::fs::File::open(path).map_err(|e| format!("opening '{path}': {e}"))?)
    } else if url.starts_with("http://") || url.starts_with("https://") {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(30))
            .timeout_read(Duration::from_secs(300))
            .user_agent(concat!("nixb/", env!("CARGO_PKG_VERSION")))
            .build();
        let resp = agent.get(url).call().map_err(|e| match e {
            ureq::Error::Status(code, _) => {
                format!("unable to download '{url}': HTTP error {code}")
            }
            ureq::Error::Transport(t) => format!("unable to download '{url}': {t}"),
        })?;
        Box::new(resp.into_reader())
    } else {
        return Err(format!(
            "unsupported URL '{url}' (expected file://, http:// or https://)"
        ));
    };
    Ok(if xz {
        Box::new(xz2::read::XzDecoder::new(raw))
    } else {
        raw
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_urls_are_read_and_xz_is_undone() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("a.txt");
        std::fs::write(&plain, "hello\n").unwrap();
        let mut s = String::new();
        open_url(&format!("file://{}", plain.display()), false)
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "hello\n");

        let packed = dir.path().join("a.txt.xz");
        let mut enc = xz2::write::XzEncoder::new(Vec::new(), 6);
        std::io::Write::write_all(&mut enc, b"packed\n").unwrap();
        std::fs::write(&packed, enc.finish().unwrap()).unwrap();
        let mut s = String::new();
        open_url(&format!("file://{}", packed.display()), true)
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "packed\n");

        let e = open_url("gopher://x/y", false).err().unwrap();
        assert!(e.contains("unsupported URL 'gopher://x/y'"), "{e}");
        let e = open_url("file:///nonexistent/x", false).err().unwrap();
        assert!(e.contains("opening '/nonexistent/x'"), "{e}");
    }
}
