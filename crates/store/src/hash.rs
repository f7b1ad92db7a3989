//! Content hashes as Nix writes them.
//!
//! A [`Hash`](struct@Hash) is an algorithm plus its digest bytes. Nix prints digests in four
//! encodings and accepts them all back:
//!
//! ```text
//! base16   sha256:0a1b...            (2 hex digits a byte)
//! base32   sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s
//!                                    (Nix's own base-32: alphabet without e o u t,
//!                                     bytes taken from the end; the `nix-base32` crate)
//! base64   sha256:n4bQgYhMfWWaL+qgxVrQFaO/TxsrC4Is0V1sFbDwCgg=
//! SRI      sha256-n4bQgYhMfWWaL+qgxVrQFaO/TxsrC4Is0V1sFbDwCgg=
//! ```
//!
//! The encoding of an untyped digest string is recognised by its length, as
//! Nix does: each algorithm has one length per encoding and they never collide.

use std::fmt;
use std::str::FromStr;

use digest::Digest;

/// A hash algorithm Nix supports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HashAlgo {
    Md5,
    Sha1,
    Sha256,
    Sha512,
}

/// How to print a digest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Base16,
    Base32,
    Base64,
    Sri,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HashError {
    #[error("unknown hash algorithm '{0}' (expected md5, sha1, sha256 or sha512)")]
    UnknownAlgo(String),
    #[error("hash '{0}' does not say its algorithm (expected e.g. 'sha256:...' or 'sha256-...')")]
    MissingAlgo(String),
    #[error("hash '{hash}' has length {len}, which is no valid {algo} digest in base16, base32 or base64")]
    BadLength {
        hash: String,
        algo: HashAlgo,
        len: usize,
    },
    #[error("hash '{hash}' is not valid {encoding}")]
    BadDigits {
        hash: String,
        encoding: &'static str,
    },
    #[error("hash '{hash}' says {found} but {expected} was expected")]
    AlgoMismatch {
        hash: String,
        found: HashAlgo,
        expected: HashAlgo,
    },
}

impl HashAlgo {
    pub const ALL: [HashAlgo; 4] = [
        HashAlgo::Md5,
        HashAlgo::Sha1,
        HashAlgo::Sha256,
        HashAlgo::Sha512,
    ];

    /// Digest size in bytes.
    pub const fn size(self) -> usize {
        match self {
            HashAlgo::Md5 => 16,
            HashAlgo::Sha1 => 20,
            HashAlgo::Sha256 => 32,
            HashAlgo::Sha512 => 64,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            HashAlgo::Md5 => "md5",
            HashAlgo::Sha1 => "sha1",
            HashAlgo::Sha256 => "sha256",
            HashAlgo::Sha512 => "sha512",
        }
    }

    /// Length of a digest of this algorithm printed in `enc` (without the prefix).
    pub const fn encoded_len(self, enc: Encoding) -> usize {
        let n = self.size();
        match enc {
            Encoding::Base16 => n * 2,
            Encoding::Base32 => (n * 8 - 1) / 5 + 1,
            Encoding::Base64 | Encoding::Sri => n.div_ceil(3) * 4,
        }
    }
}

impl fmt::Display for HashAlgo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for HashAlgo {
    type Err = HashError;
    fn from_str(s: &str) -> Result<Self, HashError> {
        match s {
            "md5" => Ok(HashAlgo::Md5),
            "sha1" => Ok(HashAlgo::Sha1),
            "sha256" => Ok(HashAlgo::Sha256),
            "sha512" => Ok(HashAlgo::Sha512),
            _ => Err(HashError::UnknownAlgo(s.to_string())),
        }
    }
}

/// A digest together with its algorithm.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hash {
    algo: HashAlgo,
    bytes: Vec<u8>,
}

impl Hash {
    /// Wraps digest bytes; `None` when their length does not fit `algo`.
    pub fn from_bytes(algo: HashAlgo, bytes: &[u8]) -> Option<Hash> {
        (bytes.len() == algo.size()).then(|| Hash {
            algo,
            bytes: bytes.to_vec(),
        })
    }

    /// Hashes a byte string in memory.
    pub fn digest(algo: HashAlgo, data: impl AsRef<[u8]>) -> Hash {
        let mut h = Hasher::new(algo);
        h.update(data.as_ref());
        h.finish()
    }

    pub fn algo(&self) -> HashAlgo {
        self.algo
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Digest printed in `enc`, without any algorithm prefix (but SRI has its own).
    pub fn encode(&self, enc: Encoding) -> String {
        match enc {
            Encoding::Base16 => data_encoding::HEXLOWER.encode(&self.bytes),
            Encoding::Base32 => nix_base32::to_nix_base32(&self.bytes),
            Encoding::Base64 => data_encoding::BASE64.encode(&self.bytes),
            Encoding::Sri => format!(
                "{}-{}",
                self.algo,
                data_encoding::BASE64.encode(&self.bytes)
            ),
        }
    }

    /// `algo:digest` in `enc` (SRI is printed as `algo-base64`).
    pub fn to_typed(&self, enc: Encoding) -> String {
        match enc {
            Encoding::Sri => self.encode(enc),
            _ => format!("{}:{}", self.algo, self.encode(enc)),
        }
    }

    /// base16 digest, the form `.drv` files and the database's `hash` column use.
    pub fn to_hex(&self) -> String {
        self.encode(Encoding::Base16)
    }

    /// `sha256:<base32>`, the form `nix-store -q --hash` prints (the database itself stores
    /// `sha256:<base16>`).
    pub fn to_base32_typed(&self) -> String {
        self.to_typed(Encoding::Base32)
    }

    /// Parses `algo:digest`, `algo-base64` (SRI) in any encoding.
    pub fn parse_typed(s: &str) -> Result<Hash, HashError> {
        Self::parse_inner(s, None)
    }

    /// Parses a digest that may omit its algorithm; when it names one it must be `algo`.
    pub fn parse_with_algo(s: &str, algo: HashAlgo) -> Result<Hash, HashError> {
        Self::parse_inner(s, Some(algo))
    }

    fn parse_inner(s: &str, want: Option<HashAlgo>) -> Result<Hash, HashError> {
        let (algo, digits, sri) = if let Some((a, rest)) = s.split_once(':') {
            (a.parse::<HashAlgo>()?, rest, false)
        } else if let Some((a, rest)) = s
            .split_once('-')
            .filter(|(a, _)| a.parse::<HashAlgo>().is_ok())
        {
            (a.parse::<HashAlgo>()?, rest, true)
        } else {
            match want {
                Some(a) => (a, s, false),
                None => return Err(HashError::MissingAlgo(s.to_string())),
            }
        };
        if let Some(w) = want {
            if w != algo {
                return Err(HashError::AlgoMismatch {
                    hash: s.to_string(),
                    found: algo,
                    expected: w,
                });
            }
        }
        let bad = |encoding| HashError::BadDigits {
            hash: s.to_string(),
            encoding,
        };
        let len = digits.len();
        let bytes = if sri {
            let b = data_encoding::BASE64
                .decode(digits.as_bytes())
                .map_err(|_| bad("base64"))?;
            if b.len() != algo.size() {
                return Err(HashError::BadLength {
                    hash: s.to_string(),
                    algo,
                    len,
                });
            }
            b
        } else if len == algo.encoded_len(Encoding::Base16) {
            data_encoding::HEXLOWER_PERMISSIVE
                .decode(digits.as_bytes())
                .map_err(|_| bad("base16"))?
        } else if len == algo.encoded_len(Encoding::Base32) {
            let b = nix_base32::from_nix_base32(digits).ok_or_else(|| bad("nix base32"))?;
            // The crate accepts stray high bits in the first digit; Nix does not.
            if b.len() != algo.size() || nix_base32::to_nix_base32(&b) != digits {
                return Err(bad("nix base32"));
            }
            b
        } else if len == algo.encoded_len(Encoding::Base64) {
            data_encoding::BASE64
                .decode(digits.as_bytes())
                .map_err(|_| bad("base64"))?
        } else {
            return Err(HashError::BadLength {
                hash: s.to_string(),
                algo,
                len,
            });
        };
        Ok(Hash { algo, bytes })
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_typed(Encoding::Base16))
    }
}

impl fmt::Display for Hash {
    /// `algo:base32`, Nix's default way of printing a hash.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_typed(Encoding::Base32))
    }
}

/// An incremental hasher over any supported algorithm.
#[derive(Clone)]
pub enum Hasher {
    Md5(md5::Md5),
    Sha1(sha1::Sha1),
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Hasher {
    pub fn new(algo: HashAlgo) -> Hasher {
        match algo {
            HashAlgo::Md5 => Hasher::Md5(md5::Md5::new()),
            HashAlgo::Sha1 => Hasher::Sha1(sha1::Sha1::new()),
            HashAlgo::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            HashAlgo::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }

    pub fn algo(&self) -> HashAlgo {
        match self {
            Hasher::Md5(_) => HashAlgo::Md5,
            Hasher::Sha1(_) => HashAlgo::Sha1,
            Hasher::Sha256(_) => HashAlgo::Sha256,
            Hasher::Sha512(_) => HashAlgo::Sha512,
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Md5(h) => h.update(data),
            Hasher::Sha1(h) => h.update(data),
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    pub fn finish(self) -> Hash {
        let algo = self.algo();
        let bytes = match self {
            Hasher::Md5(h) => h.finalize().to_vec(),
            Hasher::Sha1(h) => h.finalize().to_vec(),
            Hasher::Sha256(h) => h.finalize().to_vec(),
            Hasher::Sha512(h) => h.finalize().to_vec(),
        };
        Hash { algo, bytes }
    }
}

impl std::io::Write for Hasher {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Folds a digest into `size` bytes by XOR, as Nix does to shorten a sha256 to
/// the 160 bits of a store path hash.
pub fn compress_hash(bytes: &[u8], size: usize) -> Vec<u8> {
    let mut out = vec![0u8; size];
    for (i, b) in bytes.iter().enumerate() {
        out[i % size] ^= b;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    // Digests of "abc" from FIPS 180 / RFC 1321, independent of this code.
    const ABC_SHA256: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
    const ABC_MD5: &str = "900150983cd24fb0d6963f7d28e17f72";

    #[test]
    fn digests_match_published_vectors() {
        assert_eq!(Hash::digest(HashAlgo::Sha256, "abc").to_hex(), ABC_SHA256);
        assert_eq!(Hash::digest(HashAlgo::Md5, "abc").to_hex(), ABC_MD5);
        assert_eq!(
            Hash::digest(HashAlgo::Sha1, "abc").to_hex(),
            "a9993e364706816aba3e25717850c26c9cd0d89d"
        );
    }

    #[test]
    fn every_encoding_parses_back() {
        for algo in HashAlgo::ALL {
            let h = Hash::digest(algo, "hello");
            for enc in [
                Encoding::Base16,
                Encoding::Base32,
                Encoding::Base64,
                Encoding::Sri,
            ] {
                let s = h.to_typed(enc);
                assert_eq!(Hash::parse_typed(&s).unwrap(), h, "{s}");
                assert_eq!(
                    h.encode(enc).len(),
                    if enc == Encoding::Sri {
                        algo.name().len() + 1 + algo.encoded_len(enc)
                    } else {
                        algo.encoded_len(enc)
                    }
                );
            }
        }
    }

    #[test]
    fn errors_name_the_problem() {
        assert!(matches!(
            Hash::parse_typed("sha256:abc"),
            Err(HashError::BadLength { .. })
        ));
        assert!(matches!(
            Hash::parse_typed("whirlpool:abc"),
            Err(HashError::UnknownAlgo(_))
        ));
        assert!(matches!(
            Hash::parse_typed(ABC_SHA256),
            Err(HashError::MissingAlgo(_))
        ));
        assert!(matches!(
            Hash::parse_with_algo(&format!("md5:{ABC_MD5}"), HashAlgo::Sha256),
            Err(HashError::AlgoMismatch { .. })
        ));
        let bad32 = format!("sha256:{}", "e".repeat(52));
        assert!(matches!(
            Hash::parse_typed(&bad32),
            Err(HashError::BadDigits { .. })
        ));
    }
}
