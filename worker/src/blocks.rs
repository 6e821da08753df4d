//! The KV cache's block pool: which blocks are free, which sequences hold them, and which
//! keep a computed prefix for reuse (automatic prefix caching).
//!
//! A full block is named by a hash chained over its tokens and every token before it
//! ([`chain_hash`]): two sequences whose first `n · block_size` tokens agree compute the same
//! `n` hashes, so the second can take the first's blocks instead of recomputing them
//! (attention at a position depends only on the tokens up to it).
//!
//! Every block is in exactly one state:
//! - *free*: on the free list, contents meaningless;
//! - *used*: held by `refs > 0` sequences (several when they share a prefix); it may carry a
//!   hash, which makes it findable;
//! - *cached*: held by none but carrying a hash: its contents are still the prefix the hash
//!   names. A lookup revives it; an allocation that finds the free list empty evicts the
//!   cached block released longest ago (its hash forgotten) and hands it out.
//!
//! Invariants (checked by [`BlockPool::check`] in the tests): `free() + used() + cached() ==
//! capacity()`; a hash names at most one block and that block carries it; a cached block
//! carries a hash and no reference; no block is on the free list twice or while held. With
//! caching off nothing is ever registered, so no block is ever cached.

use std::collections::{BTreeMap, HashMap};

/// A full block's name: 128 bits of SHA-256 over the previous block's name and this block's
/// tokens (little-endian u32s). Stable across processes and builds, so a coordinator can
/// compute the names of the blocks a worker holds from the tokens alone.
pub type BlockHash = u128;

/// The name of the block holding `tokens` after the block named `prev` (`None` for a
/// sequence's first block).
pub fn chain_hash(prev: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    match prev {
        Some(p) => ctx.update(&p.to_le_bytes()),
        // A first block hashes a distinct 17-byte prefix, so it can never collide with a
        // later block by construction.
        None => ctx.update(b"switchyard-prefix"),
    }
    for t in tokens {
        ctx.update(&t.to_le_bytes());
    }
    let d = ctx.finish();
    u128::from_le_bytes(d.as_ref()[..16].try_into().expect("SHA-256 is 32 bytes"))
}

/// The names of the full blocks of `tokens`, in order (a last partial block has none).
pub fn prefix_hashes(tokens: &[u32], block_size: usize) -> Vec<BlockHash> {
    let mut prev = None;
    tokens
        .chunks_exact(block_size)
        .map(|b| {
            let h = chain_hash(prev, b);
            prev = Some(h);
            h
        })
        .collect()
}

/// Counters of the prefix cache since the engine started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefixStats {
    /// Full prompt blocks looked up.
    pub queried_blocks: u64,
    /// Of those, found cached or held by another sequence (their positions not recomputed).
    pub hit_blocks: u64,
    /// Cached blocks evicted to make room.
    pub evicted_blocks: u64,
}

pub struct BlockPool {
    refs: Vec<u32>,
    hash: Vec<Option<BlockHash>>,
    index: HashMap<BlockHash, u32>,
    free: Vec<u32>,
    /// Cached blocks by release stamp: the first entry is evicted first.
    lru: BTreeMap<u64, u32>,
    stamp: Vec<u64>,
    clock: u64,
    used: usize,
    caching: bool,
    stats: PrefixStats,
    /// Names made findable and names forgotten since the last [`BlockPool::take_events`],
    /// while recording ([`BlockPool::record_events`]).
    events: Option<(Vec<BlockHash>, Vec<BlockHash>)>,
}

/// An allocation that cannot be met: `needed` blocks asked, `available` free or cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exhausted {
    pub needed: usize,
    pub available: usize,
}

impl BlockPool {
    pub fn new(blocks: usize, caching: bool) -> Self {
        BlockPool {
            refs: vec![0; blocks],
            hash: vec![None; blocks],
            index: HashMap::new(),
            // Pop from the end: lowest block ids are handed out first.
            free: (0..blocks as u32).rev().collect(),
            lru: BTreeMap::new(),
            stamp: vec![0; blocks],
            clock: 0,
            used: 0,
            caching,
            stats: PrefixStats::default(),
            events: None,
        }
    }

    /// Starts recording which names become findable and which are forgotten (evicted or
    /// unregistered), for whoever mirrors this pool's contents (a coordinator homing by
    /// cached prefix); they accumulate until [`take_events`](Self::take_events).
    pub fn record_events(&mut self) {
        self.events.get_or_insert_with(Default::default);
    }

    /// The names made findable and those forgotten since the last call (in that order of
    /// the pair; a name may appear in both when it came and went).
    pub fn take_events(&mut self) -> (Vec<BlockHash>, Vec<BlockHash>) {
        self.events.as_mut().map(std::mem::take).unwrap_or_default()
    }

    pub fn caching(&self) -> bool {
        self.caching
    }
    pub fn capacity(&self) -> usize {
        self.refs.len()
    }
    /// Blocks on the free list.
    pub fn free(&self) -> usize {
        self.free.len()
    }
    /// Blocks held by at least one sequence.
    pub fn used(&self) -> usize {
        self.used
    }
    /// Blocks held by none that keep a prefix (evictable).
    pub fn cached(&self) -> usize {
        self.lru.len()
    }
    /// Blocks an allocation can get: free and cached.
    pub fn available(&self) -> usize {
        self.free.len() + self.lru.len()
    }
    pub fn stats(&self) -> PrefixStats {
        self.stats
    }
    /// Sequences holding block `b`.
    pub fn refs(&self, b: u32) -> u32 {
        self.refs[b as usize]
    }

    /// Takes `n` blocks, all or none, each held once: from the free list first, then by
    /// evicting the cached blocks released longest ago.
    pub fn allocate(&mut self, n: usize) -> Result<Vec<u32>, Exhausted> {
        if n > self.available() {
            return Err(Exhausted {
                needed: n,
                available: self.available(),
            });
        }
        let from_free = n.min(self.free.len());
        let mut out = self.free.split_off(self.free.len() - from_free);
        while out.len() < n {
            let (_, b) = self.lru.pop_first().expect("counted above");
            let h = self.hash[b as usize]
                .take()
                .expect("a cached block has a hash");
            self.index.remove(&h);
            self.stats.evicted_blocks += 1;
            if let Some((_, gone)) = &mut self.events {
                gone.push(h);
            }
            out.push(b);
        }
        for &b in &out {
            self.refs[b as usize] = 1;
        }
        self.used += n;
        Ok(out)
    }

    /// Drops one hold on each block, in the order given: a block no longer held is cached if
    /// it carries a hash (the later in `blocks`, the later it is evicted), else freed.
    pub fn release(&mut self, blocks: &[u32]) {
        for &b in blocks {
            let r = &mut self.refs[b as usize];
            assert!(*r > 0, "block {b} released while not held");
            *r -= 1;
            if *r == 0 {
                self.used -= 1;
                if self.hash[b as usize].is_some() {
                    self.clock += 1;
                    self.stamp[b as usize] = self.clock;
                    self.lru.insert(self.clock, b);
                } else {
                    self.free.push(b);
                }
            }
        }
    }

    /// The block holding the prefix named `h`, cached or held (nothing changes).
    pub fn lookup(&self, h: BlockHash) -> Option<u32> {
        self.index.get(&h).copied()
    }

    /// Takes one more hold on block `b` (a cached one is revived).
    pub fn acquire(&mut self, b: u32) {
        let i = b as usize;
        if self.refs[i] == 0 {
            let removed = self.lru.remove(&self.stamp[i]);
            assert_eq!(removed, Some(b), "block {b} neither held nor cached");
            self.used += 1;
        }
        self.refs[i] += 1;
    }

    /// Makes held, full block `b` findable as `h`: false (nothing changes) when caching is
    /// off, `b` already has a name, or another block already holds `h` (computed twice: this
    /// copy stays private and is freed when released).
    pub fn register(&mut self, b: u32, h: BlockHash) -> bool {
        let i = b as usize;
        assert!(self.refs[i] > 0, "block {b} registered while not held");
        if !self.caching || self.hash[i].is_some() || self.index.contains_key(&h) {
            return false;
        }
        self.index.insert(h, b);
        self.hash[i] = Some(h);
        if let Some((stored, _)) = &mut self.events {
            stored.push(h);
        }
        true
    }

    /// Forgets held block `b`'s name (its holder is about to overwrite it).
    pub fn unregister(&mut self, b: u32) {
        let i = b as usize;
        assert!(self.refs[i] > 0, "block {b} unregistered while not held");
        if let Some(h) = self.hash[i].take() {
            self.index.remove(&h);
            if let Some((_, gone)) = &mut self.events {
                gone.push(h);
            }
        }
    }

    /// Whether block `b` carries a name (others may find and share it).
    pub fn is_named(&self, b: u32) -> bool {
        self.hash[b as usize].is_some()
    }

    /// Counts a lookup of `queried` prompt blocks of which `hits` were found.
    pub fn note_lookup(&mut self, queried: usize, hits: usize) {
        self.stats.queried_blocks += queried as u64;
        self.stats.hit_blocks += hits as u64;
    }

    /// Checks the invariants in the module doc.
    pub fn check(&self) -> Result<(), String> {
        let n = self.capacity();
        if self.free() + self.used() + self.cached() != n {
            return Err(format!(
                "free {} + used {} + cached {} != {n}",
                self.free(),
                self.used(),
                self.cached()
            ));
        }
        let held = self.refs.iter().filter(|r| **r > 0).count();
        if held != self.used {
            return Err(format!("{held} blocks held, {} counted", self.used));
        }
        let mut seen = vec![false; n];
        for &b in &self.free {
            let i = b as usize;
            if seen[i] || self.refs[i] > 0 || self.hash[i].is_some() {
                return Err(format!("free block {b} twice, held or named"));
            }
            seen[i] = true;
        }
        for (&s, &b) in &self.lru {
            let i = b as usize;
            if seen[i] || self.refs[i] > 0 || self.hash[i].is_none() || self.stamp[i] != s {
                return Err(format!("cached block {b} free, held, unnamed or misfiled"));
            }
            seen[i] = true;
        }
        for (h, &b) in &self.index {
            if self.hash[b as usize] != Some(*h) {
                return Err(format!("hash names block {b}, which carries another"));
            }
        }
        let named = self.hash.iter().filter(|h| h.is_some()).count();
        if named != self.index.len() {
            return Err(format!(
                "{named} blocks named, {} in the index",
                self.index.len()
            ));
        }
        if !self.caching && !self.index.is_empty() {
            return Err("caching off, yet blocks are named".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hashes_chain_over_everything_before() {
        let a = prefix_hashes(&[1, 2, 3, 4, 5, 6, 7], 2);
        assert_eq!(a.len(), 3);
        let b = prefix_hashes(&[1, 2, 3, 4, 9, 9], 2);
        assert_eq!(a[..2], b[..2]);
        assert_ne!(a[2], b[2]);
        // The same tokens after a different prefix name a different block.
        let c = prefix_hashes(&[0, 2, 3, 4], 2);
        assert_ne!(a[1], c[1]);
        assert_eq!(chain_hash(None, &[1, 2]), a[0]);
        assert_eq!(chain_hash(Some(a[0]), &[3, 4]), a[1]);
    }

    #[test]
    fn released_named_blocks_are_cached_then_evicted_oldest_first() {
        let mut p = BlockPool::new(4, true);
        let a = p.allocate(2).unwrap();
        assert!(p.register(a[0], 10) && p.register(a[1], 11));
        p.release(&[a[1], a[0]]);
        assert_eq!((p.free(), p.used(), p.cached()), (2, 0, 2));
        // A lookup revives a cached block; a second holder shares it.
        let b = p.lookup(10).unwrap();
        p.acquire(b);
        p.acquire(b);
        assert_eq!((p.used(), p.cached(), p.refs(b)), (1, 1, 2));
        // Allocation drains the free list, then evicts the cached block (11).
        let c = p.allocate(3).unwrap();
        assert_eq!(p.lookup(11), None);
        assert_eq!(p.stats().evicted_blocks, 1);
        assert!(c.contains(&a[1]));
        assert_eq!(
            p.allocate(1),
            Err(Exhausted {
                needed: 1,
                available: 0
            })
        );
        p.check().unwrap();
    }

    #[test]
    fn recorded_events_name_what_became_findable_and_what_was_forgotten() {
        let mut p = BlockPool::new(2, true);
        let a = p.allocate(1).unwrap();
        p.register(a[0], 5);
        assert_eq!(p.take_events(), (vec![], vec![]), "not recording yet");
        p.record_events();
        let b = p.allocate(1).unwrap();
        p.register(b[0], 6);
        p.release(&a);
        p.allocate(1).unwrap(); // evicts 5
        p.unregister(b[0]);
        assert_eq!(p.take_events(), (vec![6], vec![5, 6]));
        assert_eq!(p.take_events(), (vec![], vec![]));
    }

    #[test]
    fn a_name_already_held_is_not_registered_twice_and_caching_off_names_nothing() {
        let mut p = BlockPool::new(3, true);
        let a = p.allocate(2).unwrap();
        assert!(p.register(a[0], 7));
        assert!(!p.register(a[1], 7));
        p.release(&a);
        assert_eq!((p.free(), p.cached()), (2, 1));
        let mut off = BlockPool::new(2, false);
        let b = off.allocate(1).unwrap();
        assert!(!off.register(b[0], 7));
        off.release(&b);
        assert_eq!((off.free(), off.cached()), (2, 0));
        p.check().unwrap();
        off.check().unwrap();
    }

    #[derive(Clone, Debug)]
    enum Op {
        /// A sequence of `len` blocks whose first `shared` blocks are a common prefix.
        Start {
            shared: usize,
            len: usize,
        },
        Release(usize),
        /// Cut a sequence to its first `keep` blocks.
        Truncate(usize, usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0usize..6, 1usize..8).prop_map(|(shared, len)| Op::Start { shared, len }),
            (0usize..8).prop_map(Op::Release),
            (0usize..8, 0usize..6).prop_map(|(s, k)| Op::Truncate(s, k)),
        ]
    }

    proptest! {
        /// Any mix of shared, cached, evicted, cut and released sequences keeps the counts
        /// exact, and releasing everything leaves every block free or cached.
        #[test]
        fn accounting_stays_exact(ops in proptest::collection::vec(op(), 1..60), caching: bool) {
            let mut p = BlockPool::new(16, caching);
            let mut seqs: Vec<Vec<u32>> = Vec::new();
            let mut next = 1000u128;
            for op in ops {
                match op {
                    Op::Start { shared, len } => {
                        let mut table = Vec::new();
                        for i in 0..shared.min(len) {
                            match p.lookup(i as u128) {
                                Some(b) => { p.acquire(b); table.push(b); }
                                None => break,
                            }
                        }
                        let hits = table.len();
                        p.note_lookup(shared.min(len), hits);
                        match p.allocate(len - hits) {
                            Ok(more) => {
                                for (j, b) in more.iter().enumerate() {
                                    let i = hits + j;
                                    let h = if i < shared { i as u128 } else { next += 1; next };
                                    p.register(*b, h);
                                }
                                table.extend(more);
                                seqs.push(table);
                            }
                            Err(e) => {
                                prop_assert_eq!(e.available, p.available());
                                let mut t = table;
                                t.reverse();
                                p.release(&t);
                            }
                        }
                    }
                    Op::Release(i) if i < seqs.len() => {
                        let mut t = seqs.swap_remove(i);
                        t.reverse();
                        p.release(&t);
                    }
                    Op::Truncate(i, keep) if i < seqs.len() => {
                        let t = &mut seqs[i];
                        if keep < t.len() {
                            let mut extra = t.split_off(keep);
                            extra.reverse();
                            p.release(&extra);
                        }
                    }
                    _ => {}
                }
                prop_assert!(p.check().is_ok(), "{}", p.check().unwrap_err());
                let held: usize = {
                    let mut all: Vec<u32> = seqs.iter().flatten().copied().collect();
                    all.sort();
                    all.dedup();
                    all.len()
                };
                prop_assert_eq!(held, p.used());
            }
            for mut t in seqs.drain(..) {
                t.reverse();
                p.release(&t);
            }
            prop_assert_eq!(p.used(), 0);
            prop_assert_eq!(p.free() + p.cached(), 16);
            if !caching {
                prop_assert_eq!(p.cached(), 0);
            }
            let s = p.stats();
            prop_assert!(s.hit_blocks <= s.queried_blocks);
        }
    }
}
