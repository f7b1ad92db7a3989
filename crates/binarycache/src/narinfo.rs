//! `.narinfo` and `nix-cache-info` files, as Nix 2.x binary caches hold them.
//!
//! Both are lines of `Key: value`, each ended by `\n`:
//!
//! ```text
//! narinfo     = line*                  (any order; unknown keys are ignored, as Nix does)
//! StorePath:   <store dir>/<hash>-<name>           required
//! URL:         nar/<filehash>.nar[.xz|.bz2|.zst]   required, relative to the cache root
//! Compression: none | xz | bzip2 | zstd            default bzip2 (what Nix assumes when absent)
//! FileHash:    sha256:<base32>                     of the compressed file, optional
//! FileSize:    <decimal>                           optional
//! NarHash:     sha256:<base32|base16|base64>       required
//! NarSize:     <decimal, > 0>                      required
//! References:  <base name> (' ' <base name>)*      may be empty ("References: ")
//! Deriver:     <base name> | unknown-deriver       optional
//! Sig:         <key name>:<base64 signature>       repeatable
//! CA:          <content address>                   optional
//! System:      <platform>                          optional (written by Hydra)
//!
//! nix-cache-info = StoreDir: <dir> | WantMassQuery: 0|1 | Priority: <decimal>
//! ```
//!
//! The parser is strict where Nix would silently mis-read: a line without `: `, a missing
//! final newline, a value that does not parse, or a single-valued key given twice is an
//! error naming the file and the line. The printer writes the fields in the order
//! `nix copy` does, so a narinfo that nixb writes is byte-identical to Nix's for the same path.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use nixb_store::hash::{Encoding, Hash, HashAlgo};
use nixb_store::{StoreDir, StorePath};

/// What went wrong in a narinfo or nix-cache-info file. `whence` names the file (its URL
/// or path) so that a user can go and look.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NarInfoError {
    #[error("{whence}, line {line}: {reason}")]
    Line {
        whence: String,
        line: usize,
        reason: String,
    },
    #[error("{whence}: {reason}")]
    File { whence: String, reason: String },
}

/// How the NAR file in the cache is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Compression {
    None,
    Xz,
    Bzip2,
    Zstd,
}

impl Compression {
    /// The name used in the `Compression:` field and in `?compression=` URLs.
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Xz => "xz",
            Compression::Bzip2 => "bzip2",
            Compression::Zstd => "zstd",
        }
    }

    /// The suffix Nix appends to `.nar` for this compression.
    pub fn extension(self) -> &'static str {
        match self {
            Compression::None => "",
            Compression::Xz => ".xz",
            Compression::Bzip2 => ".bz2",
            Compression::Zstd => ".zst",
        }
    }

    pub fn parse(s: &str) -> Option<Compression> {
        match s {
            "none" => Some(Compression::None),
            "xz" => Some(Compression::Xz),
            "bzip2" => Some(Compression::Bzip2),
            "zstd" => Some(Compression::Zstd),
            _ => None,
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One `.narinfo`: where a store path's NAR is in the cache, and the path's metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NarInfo {
    pub store_path: StorePath,
    /// Relative to the cache root (`nar/...`), or an absolute URL.
    pub url: String,
    pub compression: Compression,
    pub file_hash: Option<Hash>,
    pub file_size: Option<u64>,
    pub nar_hash: Hash,
    pub nar_size: u64,
    pub references: BTreeSet<StorePath>,
    pub deriver: Option<StorePath>,
    /// `keyname:base64`, as written; checked by [`crate::signing`].
    pub sigs: Vec<String>,
    pub ca: Option<String>,
    pub system: Option<String>,
}

/// Splits `text` into `(line number, key, value)`, refusing malformed lines.
fn fields<'a>(
    text: &'a str,
    whence: &'a str,
) -> impl Iterator<Item = Result<(usize, &'a str, &'a str), NarInfoError>> + 'a {
    let ends_in_newline = text.is_empty() || text.ends_with('\n');
    let nlines = text.split_terminator('\n').count();
    text.split_terminator('\n')
        .enumerate()
        .map(move |(i, line)| {
            let n = i + 1;
            let bad = |reason: String| NarInfoError::Line {
                whence: whence.to_string(),
                line: n,
                reason,
            };
            if n == nlines && !ends_in_newline {
                return Err(bad(
                    "last line is not terminated by a newline (truncated file?)".into(),
                ));
            }
            match line.split_once(':') {
                Some((key, rest))
                    if !key.is_empty() && (rest.is_empty() || rest.starts_with(' ')) =>
                {
                    // "References: " with nothing after the space is how Nix writes no references.
                    Ok((n, key, rest.strip_prefix(' ').unwrap_or(rest)))
                }
                _ => Err(bad(format!(
                    "expected 'Key: value', got '{}'",
                    truncate(line)
                ))),
            }
        })
}

fn truncate(s: &str) -> String {
    if s.chars().count() > 80 {
        format!("{}...", s.chars().take(80).collect::<String>())
    } else {
        s.to_string()
    }
}

impl NarInfo {
    /// Parses a `.narinfo`. `whence` (the file's URL) is only used in error messages.
    /// `StorePath` must lie in `store_dir`: a cache for another store directory is useless.
    pub fn parse(text: &str, store_dir: &StoreDir, whence: &str) -> Result<NarInfo, NarInfoError> {
        let mut store_path = None;
        let mut url = None;
        let mut compression = None;
        let mut file_hash = None;
        let mut file_size = None;
        let mut nar_hash = None;
        let mut nar_size = None;
        let mut references = None;
        let mut deriver = None;
        let mut sigs = Vec::new();
        let mut ca = None;
        let mut system = None;

        for field in fields(text, whence) {
            let (line, key, value) = field?;
            let bad = |reason: String| NarInfoError::Line {
                whence: whence.to_string(),
                line,
                reason,
            };
            // Each single-valued key may appear once: a second one would let a cache show
            // one value to a signature check and another to the fetcher.
            fn once<T>(
                slot: &mut Option<T>,
                v: T,
                key: &str,
                bad: &dyn Fn(String) -> NarInfoError,
            ) -> Result<(), NarInfoError> {
                if slot.is_some() {
                    return Err(bad(format!("'{key}' given twice")));
                }
                *slot = Some(v);
                Ok(())
            }
            let base_name =
                |s: &str| StorePath::from_base_name(s).map_err(|e| bad(format!("{key}: {e}")));
            let decimal = |s: &str| {
                if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad(format!("{key}: '{s}' is not a decimal number")));
                }
                s.parse::<u64>()
                    .map_err(|e| bad(format!("{key}: '{s}': {e}")))
            };
            let hash = |s: &str| Hash::parse_typed(s).map_err(|e| bad(format!("{key}: {e}")));
            match key {
                "StorePath" => {
                    let p = store_dir
                        .parse(value)
                        .map_err(|e| bad(format!("StorePath: {e}")))?;
                    once(&mut store_path, p, key, &bad)?
                }
                "URL" => {
                    if value.is_empty() {
                        return Err(bad("URL is empty".into()));
                    }
                    once(&mut url, value.to_string(), key, &bad)?
                }
                "Compression" => {
                    let c = Compression::parse(value).ok_or_else(|| {
                        bad(format!(
                            "unknown compression '{value}' (expected none, xz, bzip2 or zstd)"
                        ))
                    })?;
                    once(&mut compression, c, key, &bad)?
                }
                "FileHash" => once(&mut file_hash, hash(value)?, key, &bad)?,
                "FileSize" => once(&mut file_size, decimal(value)?, key, &bad)?,
                "NarHash" => {
                    let h = hash(value)?;
                    if h.algo() != HashAlgo::Sha256 {
                        return Err(bad(format!("NarHash must be sha256, got {}", h.algo())));
                    }
                    once(&mut nar_hash, h, key, &bad)?
                }
                "NarSize" => {
                    let n = decimal(value)?;
                    if n == 0 {
                        return Err(bad("NarSize is 0 (no NAR is empty)".into()));
                    }
                    once(&mut nar_size, n, key, &bad)?
                }
                "References" => {
                    let mut refs = BTreeSet::new();
                    for r in value.split(' ').filter(|r| !r.is_empty()) {
                        refs.insert(base_name(r)?);
                    }
                    once(&mut references, refs, key, &bad)?
                }
                "Deriver" => {
                    let d = if value == "unknown-deriver" {
                        None
                    } else {
                        Some(base_name(value)?)
                    };
                    once(&mut deriver, d, key, &bad)?
                }
                "Sig" => {
                    match value.split_once(':') {
                        Some((name, sig)) if !name.is_empty() && !sig.is_empty() => {}
                        _ => {
                            return Err(bad(format!("Sig '{value}' is not '<key name>:<base64>'")))
                        }
                    }
                    sigs.push(value.to_string());
                }
                "CA" => once(&mut ca, value.to_string(), key, &bad)?,
                "System" => once(&mut system, value.to_string(), key, &bad)?,
                // Nix ignores keys it does not know, so caches may carry extra ones.
                _ => {}
            }
        }

        let missing = |what: &str| NarInfoError::File {
            whence: whence.to_string(),
            reason: format!("required field '{what}' is missing"),
        };
        Ok(NarInfo {
            store_path: store_path.ok_or_else(|| missing("StorePath"))?,
            url: url.ok_or_else(|| missing("URL"))?,
            compression: compression.unwrap_or(Compression::Bzip2),
            file_hash,
            file_size,
            nar_hash: nar_hash.ok_or_else(|| missing("NarHash"))?,
            nar_size: nar_size.ok_or_else(|| missing("NarSize"))?,
            references: references.unwrap_or_default(),
            deriver: deriver.flatten(),
            sigs,
            ca,
            system,
        })
    }

    /// The file as `nix copy --to file://` writes it.
    pub fn to_text(&self, store_dir: &StoreDir) -> String {
        let mut s = String::new();
        // Writing to a String cannot fail.
        let _ = writeln!(s, "StorePath: {}", store_dir.print(&self.store_path));
        let _ = writeln!(s, "URL: {}", self.url);
        let _ = writeln!(s, "Compression: {}", self.compression);
        if let Some(h) = &self.file_hash {
            let _ = writeln!(s, "FileHash: {}", h.to_typed(Encoding::Base32));
        }
        if let Some(n) = self.file_size {
            let _ = writeln!(s, "FileSize: {n}");
        }
        let _ = writeln!(s, "NarHash: {}", self.nar_hash.to_typed(Encoding::Base32));
        let _ = writeln!(s, "NarSize: {}", self.nar_size);
        let refs: Vec<&str> = self.references.iter().map(|r| r.base_name()).collect();
        let _ = writeln!(s, "References: {}", refs.join(" "));
        if let Some(d) = &self.deriver {
            let _ = writeln!(s, "Deriver: {d}");
        }
        if let Some(sys) = &self.system {
            let _ = writeln!(s, "System: {sys}");
        }
        for sig in &self.sigs {
            let _ = writeln!(s, "Sig: {sig}");
        }
        if let Some(ca) = &self.ca {
            let _ = writeln!(s, "CA: {ca}");
        }
        s
    }

    /// What signatures sign: `1;<store path>;<narHash>;<narSize>;<refs>`, the NAR hash as
    /// `sha256:<base32>` and the references as full paths joined by commas.
    pub fn fingerprint(&self, store_dir: &StoreDir) -> String {
        fingerprint(
            store_dir,
            &self.store_path,
            &self.nar_hash,
            self.nar_size,
            &self.references,
        )
    }
}

/// The signed fingerprint of a path's metadata (see [`NarInfo::fingerprint`]).
pub fn fingerprint(
    store_dir: &StoreDir,
    path: &StorePath,
    nar_hash: &Hash,
    nar_size: u64,
    references: &BTreeSet<StorePath>,
) -> String {
    let refs: Vec<String> = references.iter().map(|r| store_dir.print(r)).collect();
    format!(
        "1;{};{};{};{}",
        store_dir.print(path),
        nar_hash.to_typed(Encoding::Base32),
        nar_size,
        refs.join(",")
    )
}

/// `nix-cache-info`: which store the cache is for, and how to rank it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheInfo {
    pub store_dir: String,
    pub want_mass_query: bool,
    pub priority: Option<u64>,
}

impl CacheInfo {
    pub fn parse(text: &str, whence: &str) -> Result<CacheInfo, NarInfoError> {
        let mut store_dir = None;
        let mut want_mass_query = false;
        let mut priority = None;
        for field in fields(text, whence) {
            let (line, key, value) = field?;
            let bad = |reason: String| NarInfoError::Line {
                whence: whence.to_string(),
                line,
                reason,
            };
            match key {
                "StoreDir" => {
                    if store_dir.is_some() {
                        return Err(bad("'StoreDir' given twice".into()));
                    }
                    store_dir = Some(value.to_string());
                }
                "WantMassQuery" => {
                    want_mass_query = match value {
                        "1" => true,
                        "0" => false,
                        _ => {
                            return Err(bad(format!(
                                "WantMassQuery: expected 0 or 1, got '{value}'"
                            )))
                        }
                    }
                }
                "Priority" => {
                    priority =
                        Some(value.parse::<u64>().map_err(|_| {
                            bad(format!("Priority: '{value}' is not a decimal number"))
                        })?)
                }
                _ => {}
            }
        }
        Ok(CacheInfo {
            store_dir: store_dir.ok_or_else(|| NarInfoError::File {
                whence: whence.to_string(),
                reason: "required field 'StoreDir' is missing".into(),
            })?,
            want_mass_query,
            priority,
        })
    }

    /// Only `StoreDir` is written for a default cache, as `nix copy --to file://` does.
    pub fn to_text(&self) -> String {
        let mut s = format!("StoreDir: {}\n", self.store_dir);
        if self.want_mass_query {
            s.push_str("WantMassQuery: 1\n");
        }
        if let Some(p) = self.priority {
            let _ = writeln!(s, "Priority: {p}");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Written by real `nix copy --to file://` (Nix 2.8) for a store at /tmp/h/t/store.
    const REAL: &str = "StorePath: /tmp/h/t/store/3ayawmkpnnmm8bhfng889z21ilxrsnlv-b
URL: nar/0v6zs586djgnim04iv15ysiqfb02rg4w5qg7if3jhb191b8czbdl.nar.xz
Compression: xz
FileHash: sha256:0v6zs586djgnim04iv15ysiqfb02rg4w5qg7if3jhb191b8czbdl
FileSize: 280
NarHash: sha256:0ndnnv6sp5g4fik6qfgdhm7525r6764kbi484nivd414nb3viphj
NarSize: 952
References: kd8pimc8vzy71bhwbibavli70zi4hzzf-a
Deriver: hg55j8sa04rmzlwzf3f0686hcbq6dwgc-b.drv
Sig: test-1:nW0XvVdrcGl872MT0glBgsLlXBoblxOi3Fg0syPx44ZCNoB8JsuRj0tnqNDJHdz6tR5KJSHGpJxb8Y2dB7I6CA==
";
    const REAL_NO_REFS: &str = "StorePath: /tmp/h/t/store/kd8pimc8vzy71bhwbibavli70zi4hzzf-a
URL: nar/0xcvjq9ss2b17bd7mvn3xf2c4zgb0fvr9g7b7jwb7c2mici8kjn4.nar.xz
Compression: xz
FileHash: sha256:0xcvjq9ss2b17bd7mvn3xf2c4zgb0fvr9g7b7jwb7c2mici8kjn4
FileSize: 220
NarHash: sha256:000bhbaxwzp8qwkjvlmm6q7pay97anwp3sfrgmca6rkg2fyvwxgv
NarSize: 712
References: 
Deriver: 3bsprfljn64fjgimfiz7i6zw0pf7nca6-a.drv
Sig: test-1:9J3r9mUzNtS437NF+i8hAJGm8OGq+IPVx9b3KAEj41/dTLF08nc0bgNiqWb4vNOIVNKdCJCQp1gH9poQtT2ABA==
";

    fn sd() -> StoreDir {
        StoreDir::new("/tmp/h/t/store").unwrap()
    }

    #[test]
    fn real_narinfo_round_trips_byte_for_byte() {
        for text in [REAL, REAL_NO_REFS] {
            let ni = NarInfo::parse(text, &sd(), "x.narinfo").unwrap();
            assert_eq!(ni.to_text(&sd()), text);
        }
        let ni = NarInfo::parse(REAL, &sd(), "x.narinfo").unwrap();
        assert_eq!(ni.nar_size, 952);
        assert_eq!(ni.compression, Compression::Xz);
        assert_eq!(ni.references.len(), 1);
        assert_eq!(
            ni.deriver.unwrap().base_name(),
            "hg55j8sa04rmzlwzf3f0686hcbq6dwgc-b.drv"
        );
        assert!(NarInfo::parse(REAL_NO_REFS, &sd(), "x")
            .unwrap()
            .references
            .is_empty());
    }

    #[test]
    fn fingerprint_has_full_reference_paths() {
        let ni = NarInfo::parse(REAL, &sd(), "x").unwrap();
        assert_eq!(
            ni.fingerprint(&sd()),
            "1;/tmp/h/t/store/3ayawmkpnnmm8bhfng889z21ilxrsnlv-b;sha256:0ndnnv6sp5g4fik6qfgdhm7525r6764kbi484nivd414nb3viphj;952;/tmp/h/t/store/kd8pimc8vzy71bhwbibavli70zi4hzzf-a"
        );
    }

    #[test]
    fn missing_compression_means_bzip2_and_unknown_keys_are_ignored() {
        let text = REAL
            .replace("Compression: xz\n", "")
            .replace("FileSize: 280\n", "FileSize: 280\nFoo: bar\n");
        let ni = NarInfo::parse(&text, &sd(), "x").unwrap();
        assert_eq!(ni.compression, Compression::Bzip2);
    }

    fn err(text: &str) -> String {
        NarInfo::parse(text, &sd(), "file:///c/abc.narinfo")
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn malformed_files_name_the_file_and_line() {
        assert_eq!(
            err(&REAL.replace("NarSize: 952", "NarSize: 9x2")),
            "file:///c/abc.narinfo, line 7: NarSize: '9x2' is not a decimal number"
        );
        assert_eq!(
            err(&REAL.replace("Compression: xz", "Compression: gzip")),
            "file:///c/abc.narinfo, line 3: unknown compression 'gzip' (expected none, xz, bzip2 or zstd)"
        );
        assert_eq!(err(&REAL.replace("URL: nar", "URLnar")), "file:///c/abc.narinfo, line 2: expected 'Key: value', got 'URLnar/0v6zs586djgnim04iv15ysiqfb02rg4w5qg7if3jhb191b8czbdl.nar.xz'");
        assert!(err(&format!("{REAL}NarSize: 1\n")).contains("line 11: 'NarSize' given twice"));
        assert!(err(REAL.trim_end()).contains("line 10: last line is not terminated"));
        assert!(err(&REAL.replace("NarSize: 952\n", ""))
            .ends_with("required field 'NarSize' is missing"));
        assert!(
            err(&REAL.replace("NarHash: sha256:", "NarHash: md5:")).contains("line 6: NarHash:")
        );
        assert!(err(&REAL.replace("/tmp/h/t/store/3ay", "/nix/store/3ay"))
            .contains("line 1: StorePath:"));
        assert!(err(&REAL.replace("References: kd8p", "References: kd8p/"))
            .contains("line 8: References:"));
        assert!(err(&REAL.replace("Sig: test-1:", "Sig: test-1")).contains("line 10: Sig"));
    }

    #[test]
    fn cache_info() {
        let ci = CacheInfo::parse(
            "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n",
            "nix-cache-info",
        )
        .unwrap();
        assert_eq!(ci.store_dir, "/nix/store");
        assert!(ci.want_mass_query);
        assert_eq!(ci.priority, Some(40));
        assert_eq!(
            ci.to_text(),
            "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n"
        );
        // Byte-identical to what `nix copy --to file://` wrote.
        let plain = CacheInfo::parse("StoreDir: /tmp/h/t/store\n", "n").unwrap();
        assert_eq!(plain.to_text(), "StoreDir: /tmp/h/t/store\n");
        assert!(CacheInfo::parse("WantMassQuery: 1\n", "c/nix-cache-info")
            .unwrap_err()
            .to_string()
            .contains("c/nix-cache-info: required field 'StoreDir'"));
        assert!(CacheInfo::parse("StoreDir: /a\nPriority: x\n", "c")
            .unwrap_err()
            .to_string()
            .contains("line 2"));
    }
}
