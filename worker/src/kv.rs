//! The paged KV cache: fixed-size blocks of `block_size` positions, a free list, and per-layer
//! pools laid out `[block][slot][kv_head][head_dim]` (the layout
//! `switchyard_kernels::attention` reads).
//!
//! Invariants: a block is either on the free list or owned by exactly one sequence;
//! `used() + free() == capacity()` at all times. Pools are zero-allocated lazily by the OS, so
//! resident memory grows with the blocks actually written, not with capacity.

use crate::config::ModelConfig;
use crate::WorkerError;
use switchyard_kernels::attention::KvLayer;

pub struct KvCache {
    pub block_size: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    num_blocks: usize,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    free: Vec<u32>,
}

impl KvCache {
    pub fn new(cfg: &ModelConfig, num_blocks: usize, block_size: usize) -> Self {
        let per_layer = num_blocks * block_size * cfg.num_kv_heads * cfg.head_dim;
        KvCache {
            block_size,
            kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            num_blocks,
            k: (0..cfg.num_layers).map(|_| vec![0.0; per_layer]).collect(),
            v: (0..cfg.num_layers).map(|_| vec![0.0; per_layer]).collect(),
            // Pop from the end: lowest block ids are handed out first.
            free: (0..num_blocks as u32).rev().collect(),
        }
    }

    pub fn capacity(&self) -> usize {
        self.num_blocks
    }
    pub fn free(&self) -> usize {
        self.free.len()
    }
    pub fn used(&self) -> usize {
        self.num_blocks - self.free.len()
    }

    /// Blocks needed to hold `positions` positions.
    pub fn blocks_for(&self, positions: usize) -> usize {
        positions.div_ceil(self.block_size)
    }

    /// Takes `n` blocks, all or none.
    pub fn allocate(&mut self, n: usize) -> Result<Vec<u32>, WorkerError> {
        if n > self.free.len() {
            return Err(WorkerError::KvExhausted {
                needed: n,
                free: self.free.len(),
            });
        }
        Ok(self.free.split_off(self.free.len() - n))
    }

    pub fn release(&mut self, blocks: &[u32]) {
        debug_assert!(blocks
            .iter()
            .all(|b| (*b as usize) < self.num_blocks && !self.free.contains(b)));
        self.free.extend_from_slice(blocks);
    }

    pub fn layer(&self, l: usize) -> KvLayer<'_> {
        KvLayer {
            k: &self.k[l],
            v: &self.v[l],
            block_size: self.block_size,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
        }
    }

    /// Stores one position's keys and values (`[kv_heads * head_dim]` each).
    pub fn write(&mut self, l: usize, table: &[u32], pos: usize, k: &[f32], v: &[f32]) {
        let w = self.kv_heads * self.head_dim;
        let o =
            (table[pos / self.block_size] as usize * self.block_size + pos % self.block_size) * w;
        self.k[l][o..o + w].copy_from_slice(k);
        self.v[l][o..o + w].copy_from_slice(v);
    }
}
