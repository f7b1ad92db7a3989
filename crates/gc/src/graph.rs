//! The whole validity database as an in-memory graph, read in three statements (one per
//! table) instead of a query per path.
//!
//! Nodes are the rows of `ValidPaths`, numbered `0..n` in the order SQLite returns them;
//! a node's name is its base name `<hash>-<name>`, kept in one string arena. Edges are
//! kept forward only, in compressed rows (`start[i]..start[i+1]` index into one array):
//!
//! ```text
//! refs      referrer -> reference           (Refs, self references dropped)
//! outputs   derivation -> output            (DerivationOutputs; only valid outputs)
//! deriver   path -> its deriver             (ValidPaths.deriver; only when valid)
//! ```
//!
//! Liveness follows *liveness edges*: references always, `outputs` with `keep-outputs`,
//! `deriver` with `keep-derivations`, which is exactly the closure Nix computes for a
//! root (`computeFSClosure` with `includeOutputs`/`includeDerivers`).

use nixb_store::local_store::LocalStore;
use nixb_store::path::HASH_CHARS;

use crate::GcError;

/// A node number.
pub type Node = u32;
const NONE: Node = Node::MAX;

/// Row id to node. Nodes are numbered in id order, so the ids are the sorted `db_id`; ids
/// of a store are mostly dense (autoincrement, with gaps where paths were deleted), so a
/// table indexed by `id - first` costs 4 bytes a slot, a quarter of a hash map's entry, and
/// one load a look-up. Where the gaps make the table more than four times as long as the
/// store, a binary search over `db_id` needs nothing more.
enum IdIndex {
    Dense { first: i64, table: Vec<Node> },
    Sorted,
}

impl IdIndex {
    fn new(db_id: &[i64]) -> IdIndex {
        let (Some(&first), Some(&last)) = (db_id.first(), db_id.last()) else {
            return IdIndex::Sorted;
        };
        let span = u64::try_from(last - first)
            .unwrap_or(u64::MAX)
            .saturating_add(1);
        if span > 4 * db_id.len() as u64 + 1024 {
            return IdIndex::Sorted;
        }
        let mut table = vec![NONE; span as usize];
        for (node, id) in db_id.iter().enumerate() {
            table[(id - first) as usize] = node as Node;
        }
        IdIndex::Dense { first, table }
    }

    fn get(&self, db_id: &[i64], id: i64) -> Option<Node> {
        match self {
            IdIndex::Dense { first, table } => {
                let slot = usize::try_from(id.checked_sub(*first)?).ok()?;
                table.get(slot).copied().filter(|n| *n != NONE)
            }
            IdIndex::Sorted => db_id.binary_search(&id).ok().map(|n| n as Node),
        }
    }
}

/// Which optional edges to load.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EdgeKinds {
    pub outputs: bool,
    pub derivers: bool,
}

/// The reference graph of a store.
#[derive(Debug, Default)]
pub struct Graph {
    names: String,
    name_end: Vec<u32>,
    db_id: Vec<i64>,
    ref_start: Vec<u32>,
    refs: Vec<Node>,
    out_start: Vec<u32>,
    outs: Vec<Node>,
    deriver: Vec<Node>,
    /// Nodes sorted by hash part, for lookups by path.
    by_hash: Vec<Node>,
    /// The first 8 bytes of each of their hash parts, as a big-endian number: a binary
    /// search over this array stays within a few cache lines, where one over `by_hash`
    /// reads a name from a random place of `names` at every step.
    hash_keys: Vec<u64>,
}

/// The sort key of a hash part (its first 8 characters, in the same order).
fn hash_key(hash: &[u8]) -> u64 {
    let mut k = [0u8; 8];
    k.copy_from_slice(&hash[..8]);
    u64::from_be_bytes(k)
}

impl Graph {
    /// Reads `ValidPaths`, `Refs` and (as `kinds` asks) `DerivationOutputs` and the
    /// derivers.
    pub fn load(store: &LocalStore, kinds: EdgeKinds) -> Result<Graph, GcError> {
        let prefix = format!("{}/", store.store_dir().as_str());
        // One snapshot for all tables: builds may register paths meanwhile.
        store.with_db(|db| {
            db.read_snapshot("reading the reference graph", |db| {
                let mut g = Graph::default();
                let mut bad: Option<String> = None;
                let mut unsorted = false;
                db.scan_valid_paths(|id, path, _| {
                    let Some(base) = path.strip_prefix(&prefix).filter(|b| b.len() > HASH_CHARS)
                    else {
                        bad.get_or_insert_with(|| path.to_string());
                        return;
                    };
                    unsorted |= g.db_id.last().is_some_and(|last| *last >= id);
                    g.names.push_str(base);
                    g.name_end.push(g.names.len() as u32);
                    g.db_id.push(id);
                })?;
                if let Some(path) = bad {
                    return Err(GcError::Corrupt {
                        what: format!("valid path '{path}' is not in the store {prefix}"),
                    });
                }
                if g.names.len() >= u32::MAX as usize || g.db_id.len() >= NONE as usize {
                    return Err(GcError::Corrupt {
                        what: "too many valid paths for one collection".into(),
                    });
                }
                if unsorted {
                    return Err(GcError::Corrupt {
                        what: "valid paths did not come ordered by id".into(),
                    });
                }
                let n = g.db_id.len();
                g.index_by_hash();
                let ids = IdIndex::new(&g.db_id);

                // Refs come ordered by referrer id, and nodes are numbered in id order, so
                // the rows are built as they stream in (no list of pairs at twice the size).
                let mut missing = None;
                let mut unordered = false;
                g.ref_start.reserve(n + 1);
                g.ref_start.push(0);
                let (db_id, ref_start, refs) = (&g.db_id, &mut g.ref_start, &mut g.refs);
                db.scan_references(|from, to| {
                    if from == to {
                        return;
                    }
                    let (Some(f), Some(t)) = (ids.get(db_id, from), ids.get(db_id, to)) else {
                        missing = Some((from, to));
                        return;
                    };
                    if (f as usize) + 1 < ref_start.len() {
                        unordered = true;
                        return;
                    }
                    while ref_start.len() <= f as usize {
                        ref_start.push(refs.len() as u32);
                    }
                    refs.push(t);
                })?;
                if let Some((from, to)) = missing {
                    return Err(GcError::Corrupt {
                        what: format!("reference {from} -> {to} names a row that does not exist"),
                    });
                }
                if unordered || g.refs.len() >= u32::MAX as usize {
                    return Err(GcError::Corrupt {
                        what: "references did not come ordered by referrer".into(),
                    });
                }
                while g.ref_start.len() <= n {
                    g.ref_start.push(g.refs.len() as u32);
                }
                g.refs.shrink_to_fit();

                if kinds.outputs {
                    let mut pairs = Vec::new();
                    db.scan_derivation_outputs(|drv, path| {
                        if let (Some(d), Some(o)) = (
                            ids.get(&g.db_id, drv),
                            path.strip_prefix(&prefix).and_then(|b| g.lookup(b)),
                        ) {
                            pairs.push((d, o));
                        }
                    })?;
                    (g.out_start, g.outs) = compress(n, pairs);
                }
                if kinds.derivers {
                    // A second pass over the same snapshot, now that names can be looked up:
                    // holding every deriver's name until then would cost more memory than
                    // the graph itself on a large store.
                    let mut deriver = vec![NONE; n];
                    let mut node = 0usize;
                    db.scan_valid_paths(|_, _, d| {
                        if let Some(dn) = d
                            .and_then(|d| d.strip_prefix(&prefix))
                            .and_then(|d| g.lookup(d))
                        {
                            if let Some(slot) = deriver.get_mut(node) {
                                *slot = dn;
                            }
                        }
                        node += 1;
                    })?;
                    g.deriver = deriver;
                }
                Ok(g)
            })
        })
    }

    /// Sorts the nodes by hash part into `by_hash` and `hash_keys`.
    fn index_by_hash(&mut self) {
        let n = self.db_id.len();
        let hash = |i: Node| self.hash_part(i).as_bytes();
        let mut keyed: Vec<(u64, Node)> = (0..n as Node).map(|i| (hash_key(hash(i)), i)).collect();
        keyed.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| hash(a.1).cmp(hash(b.1))));
        self.hash_keys = keyed.iter().map(|k| k.0).collect();
        self.by_hash = keyed.into_iter().map(|k| k.1).collect();
    }

    pub fn len(&self) -> usize {
        self.db_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.db_id.is_empty()
    }

    /// `<hash>-<name>` of `n`.
    pub fn name(&self, n: Node) -> &str {
        let i = n as usize;
        let s = if i == 0 {
            0
        } else {
            self.name_end[i - 1] as usize
        };
        &self.names[s..self.name_end[i] as usize]
    }

    pub fn hash_part(&self, n: Node) -> &str {
        &self.name(n)[..HASH_CHARS]
    }

    pub fn db_id(&self, n: Node) -> i64 {
        self.db_id[n as usize]
    }

    /// The highest row id read (0 for an empty store): a row above it was registered
    /// after the graph was read.
    pub fn max_db_id(&self) -> i64 {
        self.db_id.iter().copied().max().unwrap_or(0)
    }

    /// The node whose hash part is `hash` (32 characters).
    pub fn lookup_hash(&self, hash: &str) -> Option<Node> {
        if hash.len() != HASH_CHARS {
            return None;
        }
        let key = hash_key(hash.as_bytes());
        let first = self.hash_keys.partition_point(|k| *k < key);
        self.hash_keys[first..]
            .iter()
            .take_while(|k| **k == key)
            .zip(&self.by_hash[first..])
            .map(|(_, n)| *n)
            .find(|n| self.hash_part(*n) == hash)
    }

    /// The node of base name `<hash>-<name>`.
    pub fn lookup(&self, base: &str) -> Option<Node> {
        let hash = base.get(..HASH_CHARS)?;
        self.lookup_hash(hash).filter(|n| self.name(*n) == base)
    }

    /// What `n` refers to (itself excluded).
    pub fn references(&self, n: Node) -> &[Node] {
        row(&self.ref_start, &self.refs, n)
    }

    /// Calls `f` for every node that `n` keeps alive: its references, with `kinds.outputs`
    /// the outputs of a derivation, with `kinds.derivers` its deriver.
    pub fn for_each_kept(&self, n: Node, kinds: EdgeKinds, mut f: impl FnMut(Node)) {
        for r in self.references(n) {
            f(*r);
        }
        if kinds.outputs {
            for o in row(&self.out_start, &self.outs, n) {
                f(*o);
            }
        }
        if kinds.derivers {
            if let Some(d) = self.deriver.get(n as usize).filter(|d| **d != NONE) {
                f(*d);
            }
        }
    }

    /// Marks in `mark` everything reachable from `start` over liveness edges, skipping
    /// nodes for which `mark` is already set. Returns how many were newly marked.
    pub fn mark_closure(
        &self,
        start: impl IntoIterator<Item = Node>,
        kinds: EdgeKinds,
        mark: &mut [bool],
    ) -> usize {
        let mut todo: Vec<Node> = Vec::new();
        let mut count = 0;
        for s in start {
            if !mark[s as usize] {
                mark[s as usize] = true;
                count += 1;
                todo.push(s);
            }
        }
        while let Some(n) = todo.pop() {
            self.for_each_kept(n, kinds, |m| {
                if !mark[m as usize] {
                    mark[m as usize] = true;
                    count += 1;
                    todo.push(m);
                }
            });
        }
        count
    }

    /// The nodes of `set` ordered so that every referrer comes before what it refers to
    /// (deletion order), and otherwise by descending row id: a path is registered after
    /// what it refers to, so this is mostly plain descending id order, and each batch of
    /// deletions touches a run of neighbouring table and `Refs` pages instead of pages
    /// all over a file that no longer fits SQLite's cache on a large store. Nodes on a
    /// reference cycle, which a sound store does not have, come last in any order.
    pub fn referrers_first(&self, in_set: &[bool]) -> Vec<Node> {
        let n = self.len();
        let mut indegree = vec![0u32; n];
        for v in 0..n {
            if in_set[v] {
                for r in self.references(v as Node) {
                    if in_set[*r as usize] {
                        indegree[*r as usize] += 1;
                    }
                }
            }
        }
        // Nodes are numbered in row id order: the highest ready node first.
        let mut ready: std::collections::BinaryHeap<Node> = (0..n as Node)
            .filter(|v| in_set[*v as usize] && indegree[*v as usize] == 0)
            .collect();
        let mut order = Vec::with_capacity(ready.len());
        while let Some(v) = ready.pop() {
            order.push(v);
            for r in self.references(v) {
                let r = *r as usize;
                if in_set[r] {
                    indegree[r] -= 1;
                    if indegree[r] == 0 {
                        ready.push(r as Node);
                    }
                }
            }
        }
        if order.len() < in_set.iter().filter(|x| **x).count() {
            let mut placed = vec![false; n];
            for v in &order {
                placed[*v as usize] = true;
            }
            order.extend((0..n as Node).filter(|v| in_set[*v as usize] && !placed[*v as usize]));
        }
        order
    }
}

/// The liveness edges reversed: for each node, the nodes that keep it alive (its
/// referrers; with `keep-outputs` the derivations listing it as an output; with
/// `keep-derivations` the paths it is the deriver of). Whatever reaches a dead node
/// over these is dead too.
#[derive(Debug, Default)]
pub struct KeptBy {
    start: Vec<u32>,
    from: Vec<Node>,
}

impl KeptBy {
    pub fn of(&self, n: Node) -> &[Node] {
        row(&self.start, &self.from, n)
    }
}

impl Graph {
    /// [`KeptBy`] for `kinds`.
    pub fn kept_by(&self, kinds: EdgeKinds) -> KeptBy {
        let mut pairs = Vec::new();
        for v in 0..self.len() as Node {
            self.for_each_kept(v, kinds, |m| pairs.push((m, v)));
        }
        let (start, from) = compress(self.len(), pairs);
        KeptBy { start, from }
    }

    /// `items` in the order Nix 2.8 deletes a group of paths in (its `topoSortPaths`):
    /// a depth-first walk over references within the group, starting from each item in
    /// name order and visiting references in name order, reversed post-order. Every
    /// referrer comes before what it refers to.
    pub fn nix_topo_order(&self, items: &[Node]) -> Vec<Node> {
        let mut items: Vec<Node> = items.to_vec();
        items.sort_unstable_by(|a, b| self.name(*a).cmp(self.name(*b)));
        items.dedup();
        let in_items = |v: Node| {
            items
                .binary_search_by(|x| self.name(*x).cmp(self.name(v)))
                .is_ok()
        };
        let mut visited = std::collections::HashSet::new();
        let mut sorted = Vec::with_capacity(items.len());
        // (node, its references in the group in name order, next to visit)
        let mut stack: Vec<(Node, Vec<Node>, usize)> = Vec::new();
        let children = |v: Node| {
            let mut c: Vec<Node> = self
                .references(v)
                .iter()
                .copied()
                .filter(|r| *r != v && in_items(*r))
                .collect();
            c.sort_unstable_by(|a, b| self.name(*a).cmp(self.name(*b)));
            c.dedup();
            c
        };
        for &i in &items {
            if !visited.insert(i) {
                continue;
            }
            stack.push((i, children(i), 0));
            while let Some((v, kids, next)) = stack.last_mut() {
                if let Some(&k) = kids.get(*next) {
                    *next += 1;
                    if visited.insert(k) {
                        stack.push((k, children(k), 0));
                    }
                } else {
                    sorted.push(*v);
                    stack.pop();
                }
            }
        }
        sorted.reverse();
        sorted
    }
}

fn row<'a>(start: &[u32], items: &'a [Node], n: Node) -> &'a [Node] {
    let i = n as usize;
    match (start.get(i), start.get(i + 1)) {
        (Some(s), Some(e)) => &items[*s as usize..*e as usize],
        _ => &[],
    }
}

/// Compressed rows from `(from, to)` pairs over `n` nodes (counting sort by `from`).
fn compress(n: usize, pairs: Vec<(Node, Node)>) -> (Vec<u32>, Vec<Node>) {
    let mut start = vec![0u32; n + 1];
    for (f, _) in &pairs {
        start[*f as usize + 1] += 1;
    }
    for i in 0..n {
        start[i + 1] += start[i];
    }
    let mut fill = start.clone();
    let mut items = vec![0 as Node; pairs.len()];
    for (f, t) in pairs {
        let slot = &mut fill[f as usize];
        items[*slot as usize] = t;
        *slot += 1;
    }
    (start, items)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deletion_order_puts_referrers_first_then_the_highest_id() {
        // Node i refers to refs[i]; node 4 refers to node 5, registered after it (one
        // registration of several paths in any order).
        let refs: [&[Node]; 6] = [&[], &[], &[0], &[0], &[5], &[1, 2]];
        let mut g = Graph::default();
        g.ref_start.push(0);
        for (i, r) in refs.iter().enumerate() {
            g.refs.extend_from_slice(r);
            g.ref_start.push(g.refs.len() as u32);
            g.db_id.push(10 * i as i64);
        }
        // Node 1 is alive: not in the set, so it constrains nothing.
        let in_set = [true, false, true, true, true, true];
        // Ready at first: 3 and 4 (nothing in the set refers to them); 4 is higher and
        // frees 5, which frees 2; then 3, then 2 (higher than 0, which 2 still holds).
        assert_eq!(g.referrers_first(&in_set), vec![4, 5, 3, 2, 0]);
    }

    #[test]
    fn lookup_finds_every_name_among_shared_hash_prefixes() {
        // Hash parts sharing their first 8 characters (the sort key) and more.
        let names = [
            "aaaaaaaa000000000000000000000000-a",
            "aaaaaaaa00000000000000000000000z-b",
            "0000000000000000000000000000000a-c",
            "aaaaaaaa000000000000000000000001-d",
            "zzzzzzzz000000000000000000000000-e",
            "aaaaaaab000000000000000000000000-f",
        ];
        let mut g = Graph::default();
        for (i, name) in names.iter().enumerate() {
            g.names.push_str(name);
            g.name_end.push(g.names.len() as u32);
            g.db_id.push(i as i64);
        }
        g.index_by_hash();
        for (i, name) in names.iter().enumerate() {
            assert_eq!(g.lookup(name), Some(i as Node), "{name}");
        }
        assert_eq!(g.lookup("aaaaaaaa000000000000000000000002-d"), None);
        assert_eq!(g.lookup("aaaaaaaa000000000000000000000001-x"), None);
        assert_eq!(g.lookup_hash("aaaaaaaa"), None);
        assert_eq!(g.lookup_hash("00000000000000000000000000000000"), None);
    }

    /// A graph of named nodes with references, numbered in the order given.
    fn graph_of(nodes: &[(&str, &[usize])]) -> Graph {
        let mut g = Graph::default();
        let mut pairs = Vec::new();
        for (i, (name, refs)) in nodes.iter().enumerate() {
            g.names.push_str(name);
            g.name_end.push(g.names.len() as u32);
            g.db_id.push(i as i64 + 1);
            for r in *refs {
                pairs.push((i as Node, *r as Node));
            }
        }
        (g.ref_start, g.refs) = compress(nodes.len(), pairs);
        g.index_by_hash();
        g
    }

    #[test]
    fn nix_topo_order_is_reversed_post_order_in_name_order() {
        // Names start with their hash parts; what matters is their order: "a..." < "b...".
        let h = |c: char, name: &str| format!("{}-{name}", c.to_string().repeat(32));
        let (a, b, c, d, e) = (
            h('a', "a"),
            h('b', "b"),
            h('c', "c"),
            h('d', "d"),
            h('e', "e"),
        );
        // d -> b -> a, c -> a, e -> d, e refers to itself; a path outside the group (x)
        // is not followed.
        let x = h('0', "x");
        let g = graph_of(&[
            (&a, &[]),
            (&b, &[0]),
            (&c, &[0, 5]),
            (&d, &[1]),
            (&e, &[3, 4]),
            (&x, &[]),
        ]);
        let order: Vec<&str> = g
            .nix_topo_order(&[4, 3, 2, 1, 0])
            .into_iter()
            .map(|v| g.name(v))
            .collect();
        // From a: [a]; from b: [a b]... post-order a, b, c, d, e; reversed.
        assert_eq!(order, vec![&e[..], &d, &c, &b, &a]);
        // A reference to a later name is walked into first: a -> z gives post-order
        // z, a, then b: reversed b, a, z (not a, b, z nor b, z, a).
        let z = h('z', "z");
        let g = graph_of(&[(&a, &[2]), (&b, &[]), (&z, &[])]);
        assert_eq!(g.nix_topo_order(&[2, 1, 0]), vec![1, 0, 2]);
    }

    #[test]
    fn kept_by_reverses_the_liveness_edges() {
        let h = |c: char| format!("{}-{c}", c.to_string().repeat(32));
        let g = graph_of(&[(&h('a'), &[]), (&h('b'), &[0]), (&h('c'), &[0, 1])]);
        let k = g.kept_by(EdgeKinds::default());
        assert_eq!(k.of(0), &[1, 2]);
        assert_eq!(k.of(1), &[2]);
        assert!(k.of(2).is_empty());
    }

    #[test]
    fn compress_groups_by_source() {
        let (s, i) = compress(3, vec![(2, 0), (0, 1), (2, 1), (0, 2)]);
        assert_eq!(s, vec![0, 2, 2, 4]);
        assert_eq!(&i[0..2], &[1, 2]);
        assert_eq!(&i[2..4], &[0, 1]);
    }
}
