//! The paged KV cache: fixed-size blocks of `block_size` positions, a free list, and per-layer
//! pools laid out `[block][slot][width]` (for standard attention `width` is
//! `kv_heads · head_dim`, the layout `switchyard_kernels::attention` reads).
//!
//! What a position holds comes from [`crate::config::KvShape`]: keys and values for standard
//! attention; for MLA only the compressed latent and the rope key (`v_width` 0), which the
//! absorbed attention reads as both keys and values.
//!
//! Pools are f32 or bf16 ([`KvDType`]): bf16 halves the bytes per position (and the bytes a
//! long-context decode reads), rounding each value once when written; attention widens what
//! it reads back to f32.
//!
//! Which block is free, held (by one sequence or several sharing a prefix) or cached for
//! reuse is [`crate::blocks::BlockPool`]'s business, with its invariants:
//! `free() + used() + cached() == capacity()` at all times. Pools are zero-allocated lazily by
//! the OS, so resident memory grows with the blocks actually written, not with capacity.

use crate::blocks::BlockPool;
use crate::config::{KvShape, ModelConfig};
use crate::WorkerError;
use switchyard_kernels::attention::{KvLayer, KvSlice};
use switchyard_kernels::bf16;

/// The element type of the KV pools: f32 (the default, exact), or bf16 (half the bytes per
/// cached position; each key and value rounded once, to nearest even, when it is written).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvDType {
    #[default]
    F32,
    Bf16,
}

impl std::str::FromStr for KvDType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(KvDType::F32),
            "bf16" => Ok(KvDType::Bf16),
            _ => Err(format!("kv dtype must be f32 or bf16, got {s:?}")),
        }
    }
}

impl std::fmt::Display for KvDType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KvDType::F32 => "f32",
            KvDType::Bf16 => "bf16",
        })
    }
}

/// One layer's pool of one side (keys or values). bf16 pools are held as their bit patterns
/// (`u16`) so that, like f32 pools, they are zero-allocated lazily by the OS (`vec![0; n]`)
/// rather than written element by element at start.
enum Pool {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
}

impl Pool {
    fn new(dtype: KvDType, len: usize) -> Self {
        match dtype {
            KvDType::F32 => Pool::F32(vec![0.0; len]),
            KvDType::Bf16 => Pool::Bf16(vec![0; len]),
        }
    }
    fn nbytes(&self) -> usize {
        match self {
            Pool::F32(p) => p.len() * 4,
            Pool::Bf16(p) => p.len() * 2,
        }
    }
    fn slice(&self) -> KvSlice<'_> {
        match self {
            Pool::F32(p) => KvSlice::F32(p),
            Pool::Bf16(p) => KvSlice::Bf16(bytemuck::cast_slice(p)),
        }
    }
    fn store(&mut self, at: usize, x: &[f32]) {
        match self {
            Pool::F32(p) => p[at..at + x.len()].copy_from_slice(x),
            Pool::Bf16(p) => {
                for (d, s) in p[at..at + x.len()].iter_mut().zip(x) {
                    *d = bf16::from_f32(*s).to_bits();
                }
            }
        }
    }
}

pub struct KvCache {
    pub block_size: usize,
    pub shape: KvShape,
    pub dtype: KvDType,
    num_blocks: usize,
    k: Vec<Pool>,
    v: Vec<Pool>,
    blocks: BlockPool,
}

impl KvCache {
    /// `caching`: keep released full blocks for reuse by later sequences with the same
    /// prefix (see [`crate::blocks`]).
    pub fn new(
        cfg: &ModelConfig,
        num_blocks: usize,
        block_size: usize,
        dtype: KvDType,
        caching: bool,
    ) -> Self {
        let shape = cfg.kv_shape();
        let slots = num_blocks * block_size;
        KvCache {
            block_size,
            shape,
            dtype,
            num_blocks,
            k: (0..cfg.num_layers)
                .map(|_| Pool::new(dtype, slots * shape.k_width))
                .collect(),
            v: (0..cfg.num_layers)
                .map(|_| Pool::new(dtype, slots * shape.v_width))
                .collect(),
            blocks: BlockPool::new(num_blocks, caching),
        }
    }

    /// Bytes the pools hold per cached position, all layers together (what was allocated,
    /// not a formula).
    pub fn bytes_per_position(&self) -> usize {
        let slots = (self.num_blocks * self.block_size).max(1);
        self.k
            .iter()
            .chain(&self.v)
            .map(Pool::nbytes)
            .sum::<usize>()
            / slots
    }

    pub fn capacity(&self) -> usize {
        self.num_blocks
    }
    /// Blocks neither held nor cached.
    pub fn free(&self) -> usize {
        self.blocks.free()
    }
    /// Blocks held by at least one sequence.
    pub fn used(&self) -> usize {
        self.blocks.used()
    }
    /// Blocks held by none that keep a prefix for reuse (evicted when room is needed).
    pub fn cached(&self) -> usize {
        self.blocks.cached()
    }
    /// Blocks an allocation can get: free or cached.
    pub fn available(&self) -> usize {
        self.blocks.available()
    }

    /// Blocks needed to hold `positions` positions.
    pub fn blocks_for(&self, positions: usize) -> usize {
        positions.div_ceil(self.block_size)
    }

    /// Takes `n` blocks, all or none (evicting cached prefixes when the free list is short).
    pub fn allocate(&mut self, n: usize) -> Result<Vec<u32>, WorkerError> {
        self.blocks
            .allocate(n)
            .map_err(|e| WorkerError::KvExhausted {
                needed: e.needed,
                free: e.available,
            })
    }

    /// Drops one hold on each block; see [`BlockPool::release`] for the order's meaning.
    pub fn release(&mut self, blocks: &[u32]) {
        self.blocks.release(blocks);
    }

    /// The block pool (holds, names, the prefix cache's counters).
    pub fn blocks(&self) -> &BlockPool {
        &self.blocks
    }
    pub fn blocks_mut(&mut self) -> &mut BlockPool {
        &mut self.blocks
    }

    /// Copies the first `n` positions of block `src` into block `dst`, every layer (a
    /// shared block's private copy before its new holder writes past them).
    pub fn copy_positions(&mut self, src: u32, dst: u32, n: usize) {
        let bs = self.block_size;
        assert!(n <= bs && src != dst);
        let (kw, vw) = (self.shape.k_width, self.shape.v_width);
        for (pool, w) in self
            .k
            .iter_mut()
            .map(|p| (p, kw))
            .chain(self.v.iter_mut().map(|p| (p, vw)))
        {
            let (from, to, len) = (src as usize * bs * w, dst as usize * bs * w, n * w);
            match pool {
                Pool::F32(p) => p.copy_within(from..from + len, to),
                Pool::Bf16(p) => p.copy_within(from..from + len, to),
            }
        }
    }

    /// Layer `l`'s pools as `kv_heads` heads of `head_dim`. With no value pool (MLA) the key
    /// pool serves as values too.
    pub fn layer(&self, l: usize, kv_heads: usize, head_dim: usize) -> KvLayer<'_> {
        debug_assert_eq!(kv_heads * head_dim, self.shape.k_width);
        KvLayer {
            k: self.k[l].slice(),
            v: if self.shape.v_width == 0 {
                self.k[l].slice()
            } else {
                self.v[l].slice()
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
        assert!(k.len() == kw && v.len() == vw, "kv write: widths");
        self.k[l].store(slot * kw, k);
        self.v[l].store(slot * vw, v);
    }
}
