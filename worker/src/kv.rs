//! The paged KV cache: fixed-size blocks of `block_size` positions, a free list, and per-layer
//! pools laid out `[block][slot][width]` (for standard attention `width` is
//! `kv_heads · head_dim`, the layout `switchyard_kernels::attention` reads).
//!
//! What a position holds comes from [`crate::config::KvShape`]: keys and values for standard
//! attention; for MLA only the compressed latent and the rope key (`v_width` 0), which the
//! absorbed attention reads as both keys and values.
//!
//! Invariants: a block is either on the free list or owned by exactly one sequence;
//! `used() + free() == capacity()` at all times. Pools are zero-allocated lazily by the OS, so
//! resident memory grows with the blocks actually written, not with capacity.

use crate::config::{KvShape, ModelConfig};
use crate::WorkerError;
use switchyard_kernels::attention::KvLayer;

pub struct KvCache {
    pub block_size: usize,
    pub shape: KvShape,
    num_blocks: usize,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    free: Vec<u32>,
}

impl KvCache {
    pub fn new(cfg: &ModelConfig, num_blocks: usize, block_size: usize) -> Self {
        let shape = cfg.kv_shape();
        let slots = num_blocks * block_size;
        KvCache {
            block_size,
            shape,
            num_blocks,
            k: (0..cfg.num_layers)
                .map(|_| vec![0.0; slots * shape.k_width])
                .collect(),
            v: (0..cfg.num_layers)
                .map(|_| vec![0.0; slots * shape.v_width])
                .collect(),
            // Pop from the end: lowest block ids are handed out first.
            free: (0..num_blocks as u32).rev().collect(),
        }
    }

    /// Bytes the pools hold per cached position, all layers together (what was allocated,
    /// not a formula).
    pub fn bytes_per_position(&self) -> usize {
        let slots = (self.num_blocks * self.block_size).max(1);
        self.k
            .iter()
            .chain(&self.v)
            .map(|p| p.len() * std::mem::size_of::<f32>())
            .sum::<usize>()
            / slots
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

    /// Layer `l`'s pools as `kv_heads` heads of `head_dim`. With no value pool (MLA) the key
    /// pool serves as values too.
    pub fn layer(&self, l: usize, kv_heads: usize, head_dim: usize) -> KvLayer<'_> {
        debug_assert_eq!(kv_heads * head_dim, self.shape.k_width);
        KvLayer {
            k: &self.k[l],
            v: if self.shape.v_width == 0 {
                &self.k[l]
            } else {
                &self.v[l]
            },
            block_size: self.block_size,
            kv_heads,
            head_dim,
        }
    }

    /// Stores one position's keys (`k_width`) and values (`v_width`, possibly empty).
    pub fn write(&mut self, l: usize, table: &[u32], pos: usize, k: &[f32], v: &[f32]) {
        let slot = table[pos / self.block_size] as usize * self.block_size + pos % self.block_size;
        let (kw, vw) = (self.shape.k_width, self.shape.v_width);
        self.k[l][slot * kw..(slot + 1) * kw].copy_from_slice(k);
        self.v[l][slot * vw..(slot + 1) * vw].copy_from_slice(v);
    }
}
