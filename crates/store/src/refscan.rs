//! Reference scanning: which of a set of candidate store paths a build output mentions.
//!
//! Nix decides that an output references a store path when the 32-character nix-base32
//! hash part of that path (`<hash>` in `<store dir>/<hash>-<name>`) occurs anywhere in the
//! output's NAR serialisation: in file contents, symlink targets or file names. Nothing
//! else counts; the name and store directory are ignored.
//!
//! The scanner is a streaming search over chunks of any size. A hash part consists only
//! of the 32 characters of the nix-base32 alphabet, so the search looks at the *last*
//! byte of each 32-byte window first: when that byte is outside the alphabet no window
//! containing it can match, and the search jumps 32 bytes ahead. Windows made entirely of
//! alphabet bytes go through a 64-Kibit filter on their first 8 bytes and only then into
//! the hash set. Up to 31 bytes are carried over between chunks so that a hash split
//! across a chunk boundary is still found.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::Path;

use crate::hash::{Hash, HashAlgo, Hasher};
use crate::nar::{dump_to_sink, NarError};
use crate::path::{StorePath, HASH_CHARS};

const W: usize = HASH_CHARS;
const FILTER_BITS: u32 = 16;

/// `true` for the bytes of Nix's base-32 alphabet (digits and lower-case letters except
/// e, o, u and t).
static IS_BASE32: [bool; 256] = {
    let mut t = [false; 256];
    let alphabet = b"0123456789abcdfghijklmnpqrsvwxyz";
    let mut i = 0;
    while i < alphabet.len() {
        t[alphabet[i] as usize] = true;
        i += 1;
    }
    t
};

/// Streaming search for candidate hash parts.
pub struct RefScanner {
    /// Candidates not seen yet; found ones move to `found` so they cost nothing later.
    pending: HashSet<[u8; W]>,
    found: BTreeSet<String>,
    /// One bit per hash of a window's first 8 bytes; a clear bit means "no candidate".
    filter: Box<[u64]>,
    /// The last up-to-31 bytes fed, the start of any window straddling the next chunk.
    tail: Vec<u8>,
}

#[inline]
fn filter_index(window: &[u8]) -> usize {
    let mut k = [0u8; 8];
    k.copy_from_slice(&window[..8]);
    (u64::from_le_bytes(k).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - FILTER_BITS)) as usize
}

impl RefScanner {
    /// A scanner for these hash parts. Strings that are not 32 characters of nix-base32
    /// can never occur as a hash part and are ignored.
    pub fn new<'a>(hash_parts: impl IntoIterator<Item = &'a str>) -> RefScanner {
        let mut filter = vec![0u64; 1 << (FILTER_BITS - 6)].into_boxed_slice();
        let mut pending = HashSet::new();
        for h in hash_parts {
            let b = h.as_bytes();
            if b.len() != W || !b.iter().all(|&c| IS_BASE32[c as usize]) {
                continue;
            }
            let mut k = [0u8; W];
            k.copy_from_slice(b);
            let i = filter_index(&k);
            filter[i / 64] |= 1 << (i % 64);
            pending.insert(k);
        }
        RefScanner {
            pending,
            found: BTreeSet::new(),
            filter,
            tail: Vec::with_capacity(2 * W),
        }
    }

    /// Scans the next piece of the stream.
    pub fn feed(&mut self, chunk: &[u8]) {
        if self.pending.is_empty() || chunk.is_empty() {
            return;
        }
        if !self.tail.is_empty() {
            // Windows that start in the carried-over tail and end in this chunk.
            let from_tail = self.tail.len();
            let take = chunk.len().min(W - 1);
            let mut joined = std::mem::take(&mut self.tail);
            joined.extend_from_slice(&chunk[..take]);
            let limit = joined.len();
            // Only windows starting inside the old tail; later ones lie within `chunk`.
            self.scan(&joined[..limit.min(from_tail + W - 1)]);
            // Keep the last W-1 bytes of tail+chunk for the next call.
            if chunk.len() >= W - 1 {
                joined.clear();
            } else {
                let keep = joined.len().min(W - 1);
                joined.drain(..joined.len() - keep);
            }
            self.tail = joined;
        }
        self.scan(chunk);
        if chunk.len() >= W - 1 {
            self.tail.clear();
            self.tail.extend_from_slice(&chunk[chunk.len() - (W - 1)..]);
        } else if self.tail.is_empty() {
            self.tail.extend_from_slice(chunk);
        }
    }

    /// Looks at every 32-byte window wholly inside `s`.
    fn scan(&mut self, s: &[u8]) {
        let n = s.len();
        let mut i = 0;
        'outer: while i + W <= n {
            // Check the window back to front: a byte outside the alphabet at offset j rules
            // out every window starting at or before i + j.
            if let Some(j) = s[i..i + W].iter().rposition(|&b| !IS_BASE32[b as usize]) {
                i += j + 1;
                continue;
            }
            // s[i..i+W] is all alphabet; slide one byte at a time while the next byte is.
            self.check(&s[i..i + W]);
            for (k, &b) in s[i + W..].iter().enumerate() {
                if !IS_BASE32[b as usize] {
                    i += W + k + 1;
                    continue 'outer;
                }
                let start = i + k + 1;
                self.check(&s[start..start + W]);
            }
            break;
        }
    }

    #[inline]
    fn check(&mut self, window: &[u8]) {
        let f = filter_index(window);
        if self.filter[f / 64] & (1 << (f % 64)) == 0 {
            return;
        }
        self.check_set(window);
    }

    // Kept out of line: the filter rejects almost every window, so the hot loop stays small.
    #[inline(never)]
    fn check_set(&mut self, window: &[u8]) {
        let mut k = [0u8; W];
        k.copy_from_slice(window);
        if self.pending.remove(&k) {
            // Candidates are all-ASCII by construction.
            self.found.insert(String::from_utf8_lossy(&k).into_owned());
        }
    }

    /// The hash parts seen so far.
    pub fn found(&self) -> BTreeSet<String> {
        self.found.clone()
    }
}

/// What one pass over an output yields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScanResult {
    /// sha256 of the NAR serialisation.
    pub nar_hash: Hash,
    pub nar_size: u64,
    /// The candidates whose hash part occurs in the NAR.
    pub references: BTreeSet<StorePath>,
}

/// One pass over the NAR serialisation of `path`: its sha256 NAR hash, NAR size, and which
/// of `candidates` it references.
pub fn scan_path(path: &Path, candidates: &BTreeSet<StorePath>) -> Result<ScanResult, NarError> {
    let mut by_hash: BTreeMap<&str, Vec<&StorePath>> = BTreeMap::new();
    for c in candidates {
        by_hash.entry(c.hash_part()).or_default().push(c);
    }
    let mut scanner = RefScanner::new(by_hash.keys().copied());
    let mut hasher = Hasher::new(HashAlgo::Sha256);
    let mut nar_size = 0u64;
    dump_to_sink(path, &mut |b| {
        hasher.update(b);
        scanner.feed(b);
        nar_size += b.len() as u64;
        Ok(())
    })?;
    let mut references = BTreeSet::new();
    for h in &scanner.found {
        if let Some(ps) = by_hash.get(h.as_str()) {
            references.extend(ps.iter().map(|p| (*p).clone()));
        }
    }
    Ok(ScanResult {
        nar_hash: hasher.finish(),
        nar_size,
        references,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "00bgd045z0d4icpbc2yyz4gx48ak44la";
    const B: &str = "7nbc3kljm0zx2pq3cvysnp7svjw6l8nq";

    #[test]
    fn finds_hash_split_at_every_offset() {
        let mut text = b"xx/nix/store/".to_vec();
        text.extend_from_slice(A.as_bytes());
        text.extend_from_slice(b"-foo\0");
        for cut in 0..=text.len() {
            let mut s = RefScanner::new([A, B]);
            s.feed(&text[..cut]);
            s.feed(&text[cut..]);
            assert_eq!(s.found(), BTreeSet::from([A.to_string()]), "cut at {cut}");
        }
    }

    #[test]
    fn long_alphabet_runs_and_near_misses() {
        // A inside a run of alphabet characters, and B with its last character changed.
        let mut text = "a".repeat(100);
        text.push_str(A);
        text.push_str(&"z".repeat(50));
        text.push_str(&B[..31]);
        text.push('0');
        let mut s = RefScanner::new([A, B]);
        s.feed(text.as_bytes());
        assert_eq!(s.found(), BTreeSet::from([A.to_string()]));
    }

    #[test]
    fn ignores_impossible_candidates() {
        let mut s = RefScanner::new(["short", "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee"]);
        s.feed("eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee short".as_bytes());
        assert!(s.found().is_empty());
    }
}
