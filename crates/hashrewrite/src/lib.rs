#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

use std::fmt;
use std::io::{self, Write};

use aho_corasick::{AhoCorasick, MatchKind};

mod tree;

pub use tree::rewrite_tree;

/// Why a set of rewrite pairs was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RewriteError {
    #[error("rewrite pair {index}: pattern is empty")]
    EmptyPattern { index: usize },
    #[error(
        "rewrite pair {index}: replacement has length {replacement_len} but pattern {pattern} has length {pattern_len}"
    )]
    LengthMismatch {
        index: usize,
        pattern: Printable,
        pattern_len: usize,
        replacement_len: usize,
    },
    #[error("rewrite pairs {first} and {second}: same pattern {pattern} given twice")]
    DuplicatePattern {
        first: usize,
        second: usize,
        pattern: Printable,
    },
    #[error("cannot build the pattern automaton: {0}")]
    Automaton(String),
}

/// A byte string shown in error messages: printable ASCII as is, anything
/// else escaped, and cut after 64 bytes so a huge pattern cannot flood a log.
#[derive(Clone, PartialEq, Eq)]
pub struct Printable(pub Vec<u8>);

impl fmt::Display for Printable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 64;
        f.write_str("'")?;
        for &b in self.0.iter().take(SHOWN) {
            for c in std::ascii::escape_default(b) {
                write!(f, "{}", c as char)?;
            }
        }
        if self.0.len() > SHOWN {
            write!(f, "...")?;
        }
        f.write_str("'")
    }
}

impl fmt::Debug for Printable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A compiled set of equal-length rewrite pairs. Cheap to share: streams
/// borrow it, so one `Rewriter` can serve many outputs at once.
#[derive(Clone)]
pub struct Rewriter {
    /// `None` when there are no pairs: everything passes through unchanged.
    automaton: Option<AhoCorasick>,
    /// `replacements[i]` replaces the pattern with id `i` in `automaton`.
    replacements: Vec<Vec<u8>>,
    /// Length of the longest pattern. A match can only be confirmed once this
    /// many bytes from its start are visible, so a stream holds back at most
    /// `max_len - 1` bytes between chunks.
    max_len: usize,
}

impl fmt::Debug for Rewriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rewriter")
            .field("pairs", &self.replacements.len())
            .field("max_len", &self.max_len)
            .finish()
    }
}

impl Rewriter {
    /// Compiles the pairs. Rejects an empty pattern, a replacement whose
    /// length differs from its pattern's, and a pattern given twice (even
    /// with the same replacement: it is almost certainly a caller bug).
    /// No pairs at all is allowed and gives the identity rewriter.
    pub fn new(
        pairs: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>,
    ) -> Result<Rewriter, RewriteError> {
        let mut patterns: Vec<Vec<u8>> = Vec::new();
        let mut replacements = Vec::new();
        let mut seen = std::collections::HashMap::new();
        for (index, (pattern, replacement)) in pairs.into_iter().enumerate() {
            if pattern.is_empty() {
                return Err(RewriteError::EmptyPattern { index });
            }
            if pattern.len() != replacement.len() {
                return Err(RewriteError::LengthMismatch {
                    index,
                    pattern_len: pattern.len(),
                    replacement_len: replacement.len(),
                    pattern: Printable(pattern),
                });
            }
            if let Some(&first) = seen.get(&pattern) {
                return Err(RewriteError::DuplicatePattern {
                    first,
                    second: index,
                    pattern: Printable(pattern),
                });
            }
            seen.insert(pattern.clone(), index);
            patterns.push(pattern);
            replacements.push(replacement);
        }
        let max_len = patterns.iter().map(Vec::len).max().unwrap_or(0);
        let automaton = if patterns.is_empty() {
            None
        } else {
            let ac = AhoCorasick::builder()
                .match_kind(MatchKind::LeftmostLongest)
                .build(&patterns)
                .map_err(|e| RewriteError::Automaton(e.to_string()))?;
            Some(ac)
        };
        Ok(Rewriter {
            automaton,
            replacements,
            max_len,
        })
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.replacements.len()
    }

    /// True for the identity rewriter (no pairs).
    pub fn is_empty(&self) -> bool {
        self.replacements.is_empty()
    }

    /// Length of the longest pattern (0 without pairs).
    pub fn max_pattern_len(&self) -> usize {
        self.max_len
    }

    /// Starts rewriting a new stream.
    pub fn stream(&self) -> RewriteStream<'_> {
        RewriteStream {
            rewriter: self,
            pending: Vec::new(),
            replaced: 0,
        }
    }

    /// Rewrites a whole buffer at once.
    pub fn rewrite_all(&self, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(data.len());
        self.scan(data, &mut out, true);
        out
    }

    /// Like [`Rewriter::rewrite_all`], also returning how many matches
    /// were replaced.
    pub fn rewrite_all_counted(&self, data: &[u8]) -> (Vec<u8>, u64) {
        let mut out = Vec::with_capacity(data.len());
        let n = self.scan(data, &mut out, true).1;
        (out, n)
    }

    /// Rewrites a prefix of `buf` into `out` and returns how many bytes of
    /// `buf` it consumed, plus the number of matches replaced.
    ///
    /// With `last` the whole buffer is the rest of the stream and everything
    /// is consumed. Otherwise more input may follow `buf`, and the scan stops
    /// before any position where a match might still begin that is not yet
    /// fully visible: a match starting at `s` is only committed when
    /// `s + max_len <= buf.len()`, because only then is every pattern that
    /// could start at `s` (or earlier) decided. Everything before
    /// `buf.len() - (max_len - 1)` is then known to need no further change.
    fn scan(&self, buf: &[u8], out: &mut Vec<u8>, last: bool) -> (usize, u64) {
        let Some(ac) = &self.automaton else {
            out.extend_from_slice(buf);
            return (buf.len(), 0);
        };
        let mut pos = 0;
        let mut replaced = 0;
        for m in ac.find_iter(buf) {
            if !last && m.start() + self.max_len > buf.len() {
                break;
            }
            out.extend_from_slice(&buf[pos..m.start()]);
            out.extend_from_slice(&self.replacements[m.pattern().as_usize()]);
            pos = m.end();
            replaced += 1;
        }
        let safe = if last {
            buf.len()
        } else {
            buf.len().saturating_sub(self.max_len - 1)
        };
        if safe > pos {
            out.extend_from_slice(&buf[pos..safe]);
            pos = safe;
        }
        (pos, replaced)
    }
}

/// One stream being rewritten. Feed it chunks of any size; the output lags
/// the input by less than the longest pattern's length, and [`finish`]
/// emits the held-back tail. The total output is byte-for-byte what
/// [`Rewriter::rewrite_all`] gives for the concatenated input.
///
/// [`finish`]: RewriteStream::finish
pub struct RewriteStream<'r> {
    rewriter: &'r Rewriter,
    /// Input not yet decided: fewer than `max_len` bytes between calls.
    pending: Vec<u8>,
    replaced: u64,
}

impl RewriteStream<'_> {
    /// Rewrites as much of `input` as can be decided, appending it to `out`.
    /// Never appends more bytes in total than have been fed.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let rw = self.rewriter;
        if self.pending.is_empty() {
            let (used, n) = rw.scan(input, out, false);
            self.replaced += n;
            self.pending.extend_from_slice(&input[used..]);
            return;
        }
        // Join the held-back tail with just enough of the new chunk to decide
        // every match that starts in the tail, so a large chunk is not copied.
        let held = self.pending.len();
        let head = input.len().min(rw.max_len.saturating_sub(1));
        self.pending.extend_from_slice(&input[..head]);
        let (used, n) = rw.scan(&self.pending, out, false);
        self.replaced += n;
        if head == input.len() || used < held {
            // Either the chunk is all in the buffer already, or (not expected,
            // since the head makes every tail position decidable) the scan
            // stopped inside the tail: fall back to buffering the rest.
            self.pending.drain(..used);
            if head < input.len() {
                self.pending.extend_from_slice(&input[head..]);
                let (used, n) = rw.scan(&self.pending, out, false);
                self.replaced += n;
                self.pending.drain(..used);
            }
            return;
        }
        // The scan got past the tail, into `input` at offset `used - held`.
        self.pending.clear();
        let rest = &input[used - held..];
        let (used, n) = rw.scan(rest, out, false);
        self.replaced += n;
        self.pending.extend_from_slice(&rest[used..]);
    }

    /// Ends the stream: rewrites and appends the held-back tail.
    pub fn finish(mut self, out: &mut Vec<u8>) {
        self.finish_in_place(out);
    }

    fn finish_in_place(&mut self, out: &mut Vec<u8>) {
        let (_, n) = self.rewriter.scan(&self.pending, out, true);
        self.replaced += n;
        self.pending.clear();
    }

    /// Matches replaced so far (those in the held-back tail not yet counted).
    pub fn replaced(&self) -> u64 {
        self.replaced
    }

    /// Bytes fed but not yet emitted (always below the longest pattern's length).
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }
}

/// An [`io::Write`] adapter: bytes written to it are rewritten and passed on
/// to the inner writer. Call [`RewriteWriter::finish`] at the end to emit the
/// held-back tail and get the inner writer back with errors reported; if the
/// adapter is dropped instead, it emits the tail on a best-effort basis
/// (ignoring errors), as `BufWriter` does.
///
/// [`Write::flush`] passes on everything decided so far and flushes the
/// inner writer, but cannot emit the last `max_pattern_len() - 1` bytes,
/// which might be the start of a match.
pub struct RewriteWriter<'r, W: Write> {
    stream: RewriteStream<'r>,
    inner: Option<W>,
    buf: Vec<u8>,
}

impl<'r, W: Write> RewriteWriter<'r, W> {
    pub fn new(rewriter: &'r Rewriter, inner: W) -> Self {
        RewriteWriter {
            stream: rewriter.stream(),
            inner: Some(inner),
            buf: Vec::new(),
        }
    }

    /// Matches replaced so far.
    pub fn replaced(&self) -> u64 {
        self.stream.replaced()
    }

    /// Emits the held-back tail, flushes, and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.buf.clear();
        self.stream.finish_in_place(&mut self.buf);
        let mut inner = self
            .inner
            .take()
            .ok_or_else(|| io::Error::other("rewrite writer already finished"))?;
        inner.write_all(&self.buf)?;
        inner.flush()?;
        Ok(inner)
    }

    fn inner(&mut self) -> io::Result<&mut W> {
        self.inner
            .as_mut()
            .ok_or_else(|| io::Error::other("rewrite writer already finished"))
    }
}

impl<W: Write> Write for RewriteWriter<'_, W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        self.stream.feed(data, &mut buf);
        let res = self.inner().and_then(|w| w.write_all(&buf));
        self.buf = buf;
        // The data is consumed by the stream either way; an error from the
        // inner writer loses it, as with any failed write_all.
        res.map(|()| data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner()?.flush()
    }
}

impl<W: Write> Drop for RewriteWriter<'_, W> {
    fn drop(&mut self) {
        if let Some(mut inner) = self.inner.take() {
            let mut tail = Vec::new();
            self.stream.finish_in_place(&mut tail);
            let _ = inner.write_all(&tail);
            let _ = inner.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rw(pairs: &[(&str, &str)]) -> Rewriter {
        Rewriter::new(
            pairs
                .iter()
                .map(|(a, b)| (a.as_bytes().to_vec(), b.as_bytes().to_vec())),
        )
        .unwrap()
    }

    fn streamed(r: &Rewriter, data: &[u8], chunk: usize) -> Vec<u8> {
        let mut s = r.stream();
        let mut out = Vec::new();
        for c in data.chunks(chunk) {
            s.feed(c, &mut out);
        }
        s.finish(&mut out);
        out
    }

    #[test]
    fn replaces_every_occurrence() {
        let r = rw(&[("abc", "XYZ")]);
        assert_eq!(r.rewrite_all(b"abcabc-abc"), b"XYZXYZ-XYZ");
    }

    #[test]
    fn no_pairs_is_identity() {
        let r = Rewriter::new(Vec::new()).unwrap();
        assert!(r.is_empty());
        assert_eq!(r.rewrite_all(b"hello"), b"hello");
        assert_eq!(streamed(&r, b"hello", 2), b"hello");
    }

    #[test]
    fn leftmost_wins_over_overlapping_later_match() {
        // "abcd" at 0 and "cdef" at 2 overlap: the leftmost is taken, and the
        // later one is not matched inside what was already consumed.
        let r = rw(&[("cdef", "3333"), ("abcd", "1111")]);
        assert_eq!(r.rewrite_all(b"abcdef"), b"1111ef");
    }

    #[test]
    fn longest_wins_at_same_start() {
        let r = rw(&[("ab", "xx"), ("abcd", "yyyy")]);
        assert_eq!(r.rewrite_all(b"abcd ab"), b"yyyy xx");
        let r = rw(&[("abcd", "yyyy"), ("ab", "xx")]);
        assert_eq!(r.rewrite_all(b"abcd ab"), b"yyyy xx");
    }

    #[test]
    fn self_overlapping_pattern_is_non_overlapping() {
        let r = rw(&[("aa", "bb")]);
        assert_eq!(r.rewrite_all(b"aaaaa"), b"bbbba");
    }

    #[test]
    fn replacement_is_not_rescanned() {
        let r = rw(&[("ab", "ba")]);
        // "aab": match at 1 -> "aba"; the new "ab" at 0..2 is not a match,
        // because scanning had already passed position 0.
        assert_eq!(r.rewrite_all(b"aab"), b"aba");
        let r = rw(&[("a", "b"), ("b", "c")]);
        assert_eq!(r.rewrite_all(b"ab"), b"bc");
    }

    #[test]
    fn match_straddling_chunks() {
        let r = rw(&[("0123456789", "abcdefghij")]);
        let data = b"xx0123456789yy0123456789";
        for chunk in 1..=data.len() {
            assert_eq!(
                streamed(&r, data, chunk),
                b"xxabcdefghijyyabcdefghij",
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn stream_holds_back_less_than_max_len() {
        let r = rw(&[("abcd", "wxyz")]);
        let mut s = r.stream();
        let mut out = Vec::new();
        s.feed(b"123456abc", &mut out);
        assert_eq!(out, b"123456");
        assert_eq!(s.pending_len(), 3);
        s.feed(b"d", &mut out);
        assert_eq!(out, b"123456wxyz");
        assert_eq!(s.replaced(), 1);
        s.finish(&mut out);
        assert_eq!(out, b"123456wxyz");
    }

    #[test]
    fn rejects_bad_pairs() {
        let e = Rewriter::new(vec![(b"ab".to_vec(), b"abc".to_vec())]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "rewrite pair 0: replacement has length 3 but pattern 'ab' has length 2"
        );
        let e = Rewriter::new(vec![(b"".to_vec(), b"".to_vec())]).unwrap_err();
        assert_eq!(e, RewriteError::EmptyPattern { index: 0 });
        let e = Rewriter::new(vec![
            (b"ab".to_vec(), b"cd".to_vec()),
            (b"ab".to_vec(), b"cd".to_vec()),
        ])
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "rewrite pairs 0 and 1: same pattern 'ab' given twice"
        );
        let e = Rewriter::new(vec![(b"\x00\xff".to_vec(), b"x".to_vec())]).unwrap_err();
        assert!(e.to_string().contains(r"'\x00\xff'"), "{e}");
    }

    #[test]
    fn writer_passes_through_rewritten() {
        let r = rw(&[("needle", "NEEDLE")]);
        let mut w = RewriteWriter::new(&r, Vec::new());
        for piece in [&b"hay nee"[..], b"dle hay ne", b"edl", b"e"] {
            w.write_all(piece).unwrap();
        }
        assert_eq!(w.replaced(), 2);
        let out = w.finish().unwrap();
        assert_eq!(out, b"hay NEEDLE hay NEEDLE");
    }

    #[test]
    fn writer_drop_emits_tail() {
        let r = rw(&[("needle", "NEEDLE")]);
        let mut out = Vec::new();
        {
            let mut w = RewriteWriter::new(&r, &mut out);
            w.write_all(b"a needle").unwrap();
        }
        assert_eq!(out, b"a NEEDLE");
    }

    #[test]
    fn counted() {
        let r = rw(&[("ab", "cd")]);
        assert_eq!(
            r.rewrite_all_counted(b"ab ab a b"),
            (b"cd cd a b".to_vec(), 2)
        );
    }
}
