//! Property tests: the rewriter against an independent, deliberately naive
//! reference, and streaming at many chunkings against the one-shot result.

use std::io::Write;

use nixb_hashrewrite::{RewriteWriter, Rewriter};
use proptest::prelude::*;

/// The specification, written as directly as possible: walk the input; at
/// each position try every pattern, take the longest that matches, emit its
/// replacement and jump past it; otherwise copy one byte.
fn reference(pairs: &[(Vec<u8>, Vec<u8>)], data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < data.len() {
        let best = pairs
            .iter()
            .filter(|(p, _)| data[i..].starts_with(p))
            .max_by_key(|(p, _)| p.len());
        match best {
            Some((p, r)) => {
                out.extend_from_slice(r);
                i += p.len();
            }
            None => {
                out.push(data[i]);
                i += 1;
            }
        }
    }
    out
}

fn stream_chunks(rw: &Rewriter, data: &[u8], cuts: &[usize]) -> Vec<u8> {
    let mut s = rw.stream();
    let mut out = Vec::new();
    let mut start = 0;
    for &c in cuts {
        let c = c.clamp(start, data.len());
        s.feed(&data[start..c], &mut out);
        assert!(out.len() <= c, "emitted more than was fed");
        start = c;
    }
    s.feed(&data[start..], &mut out);
    s.finish(&mut out);
    out
}

fn stream_fixed(rw: &Rewriter, data: &[u8], size: usize) -> Vec<u8> {
    let cuts: Vec<usize> = (1..)
        .map(|k| k * size)
        .take_while(|&c| c < data.len())
        .collect();
    stream_chunks(rw, data, &cuts)
}

/// Pairs over a tiny alphabet so that matches, overlaps and shared prefixes
/// are frequent. Patterns are deduplicated; lengths vary (1..=6) unless
/// `same_len`.
fn pairs_strategy(same_len: bool) -> impl Strategy<Value = Vec<(Vec<u8>, Vec<u8>)>> {
    let len = if same_len { 3..=3usize } else { 1..=6usize };
    prop::collection::vec(
        len.prop_flat_map(|n| {
            (
                prop::collection::vec(prop::sample::select(b"abc".to_vec()), n),
                prop::collection::vec(prop::sample::select(b"abcXYZ".to_vec()), n),
            )
        }),
        0..6,
    )
    .prop_map(|mut v| {
        let mut seen = std::collections::HashSet::new();
        v.retain(|(p, _)| seen.insert(p.clone()));
        v
    })
}

fn data_strategy() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(prop::sample::select(b"abcd".to_vec()), 0..300)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn one_shot_equals_reference(pairs in pairs_strategy(false), data in data_strategy()) {
        let rw = Rewriter::new(pairs.clone()).unwrap();
        let got = rw.rewrite_all(&data);
        prop_assert_eq!(got.len(), data.len());
        prop_assert_eq!(got, reference(&pairs, &data));
    }

    #[test]
    fn same_length_patterns_equal_reference(pairs in pairs_strategy(true), data in data_strategy()) {
        let rw = Rewriter::new(pairs.clone()).unwrap();
        prop_assert_eq!(rw.rewrite_all(&data), reference(&pairs, &data));
    }

    #[test]
    fn streaming_fixed_sizes_equal_one_shot(pairs in pairs_strategy(false), data in data_strategy()) {
        let rw = Rewriter::new(pairs).unwrap();
        let whole = rw.rewrite_all(&data);
        for size in [1, 2, 3, 5, 7, 4096] {
            prop_assert_eq!(&stream_fixed(&rw, &data, size), &whole, "chunk size {}", size);
        }
    }

    #[test]
    fn streaming_random_splits_equal_one_shot(
        pairs in pairs_strategy(false),
        data in data_strategy(),
        mut cuts in prop::collection::vec(0usize..300, 0..40),
    ) {
        cuts.sort_unstable();
        let rw = Rewriter::new(pairs).unwrap();
        prop_assert_eq!(stream_chunks(&rw, &data, &cuts), rw.rewrite_all(&data));
    }

    #[test]
    fn order_of_pairs_does_not_matter(pairs in pairs_strategy(false), data in data_strategy()) {
        let mut rev = pairs.clone();
        rev.reverse();
        let a = Rewriter::new(pairs).unwrap();
        let b = Rewriter::new(rev).unwrap();
        prop_assert_eq!(a.rewrite_all(&data), b.rewrite_all(&data));
    }

    #[test]
    fn writer_equals_one_shot(
        pairs in pairs_strategy(false),
        data in data_strategy(),
        size in 1usize..50,
    ) {
        let rw = Rewriter::new(pairs).unwrap();
        let mut w = RewriteWriter::new(&rw, Vec::new());
        for c in data.chunks(size) {
            w.write_all(c).unwrap();
        }
        prop_assert_eq!(w.finish().unwrap(), rw.rewrite_all(&data));
    }

    /// The real use: 32-byte base-32 hashes in binary noise, streamed at the
    /// sizes named in the style guide, including through the fast path that
    /// hands a large chunk to the searcher without copying.
    #[test]
    fn store_hashes_in_noise(
        noise in prop::collection::vec(any::<u8>(), 0..9000),
        positions in prop::collection::vec((0usize..9000, 0usize..2), 0..8),
    ) {
        let h = |c: u8| vec![c; 32];
        let pairs = vec![(h(b'a'), h(b'z')), (b"0123456789abcdfghijklmnpqrsvwxyz".to_vec(), h(b'9'))];
        let mut data = noise;
        for (pos, which) in positions {
            let p = &pairs[which].0;
            if pos + p.len() <= data.len() {
                data[pos..pos + p.len()].copy_from_slice(p);
            }
        }
        let rw = Rewriter::new(pairs.clone()).unwrap();
        let whole = rw.rewrite_all(&data);
        prop_assert_eq!(&whole, &reference(&pairs, &data));
        for size in [1, 7, 31, 32, 33, 4096] {
            prop_assert_eq!(&stream_fixed(&rw, &data, size), &whole, "chunk size {}", size);
        }
    }
}
