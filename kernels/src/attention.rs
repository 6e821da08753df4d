//! Attention with grouped-query heads over a paged KV cache.
//!
//! Layout of one layer's pool: `[num_blocks][block_size][kv_heads][head_dim]` for keys and the
//! same for values. A sequence's block table maps its logical block `p / block_size` to a
//! physical block.
//!
//! Every query is processed block by block with an online softmax (running max, running sum,
//! rescaled accumulator), so memory stays `O(block_size + head_dim)` per query whatever the
//! context length. Causality is positional: a query at position `p` sees keys `0..=p`
//! (restricted to the last `window` positions when a sliding window is set).

use crate::simd;
use rayon::prelude::*;

/// One layer's KV pool, borrowed.
#[derive(Clone, Copy)]
pub struct KvLayer<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub block_size: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl KvLayer<'_> {
    #[inline]
    fn offset(&self, table: &[u32], pos: usize, g: usize) -> usize {
        let b = table[pos / self.block_size] as usize;
        ((b * self.block_size + pos % self.block_size) * self.kv_heads + g) * self.head_dim
    }
    /// Key vector of kv head `g` at position `pos` of the sequence with `table`.
    pub fn key(&self, table: &[u32], pos: usize, g: usize) -> &[f32] {
        let o = self.offset(table, pos, g);
        &self.k[o..o + self.head_dim]
    }
    pub fn value(&self, table: &[u32], pos: usize, g: usize) -> &[f32] {
        let o = self.offset(table, pos, g);
        &self.v[o..o + self.head_dim]
    }
}

/// Shape and masking parameters of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttnParams {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    pub window: Option<usize>,
}

/// One query row: its sequence's block table and its absolute position.
#[derive(Clone, Copy)]
pub struct QueryRow<'a> {
    pub table: &'a [u32],
    pub pos: usize,
}

/// `out[t, h, :] = softmax(q[t, h] · K[..=pos]ᵀ · scale) · V[..=pos]` for every row `t` and head
/// `h`, with kv head `h / (heads / kv_heads)`. `q` and `out` are `[rows, heads * head_dim]`.
pub fn paged_attention(
    q: &[f32],
    rows: &[QueryRow<'_>],
    kv: KvLayer<'_>,
    p: AttnParams,
    out: &mut [f32],
) {
    let d = p.head_dim;
    assert_eq!(q.len(), rows.len() * p.heads * d);
    assert_eq!(out.len(), q.len());
    assert_eq!(p.heads % p.kv_heads, 0);
    let group = p.heads / p.kv_heads;
    let work = |(i, o): (usize, &mut [f32])| {
        let (t, h) = (i / p.heads, i % p.heads);
        let row = rows[t];
        attend_one(&q[i * d..(i + 1) * d], row, kv, h / group, p, o);
    };
    let total_keys: usize = rows.iter().map(|r| r.pos + 1).sum();
    if total_keys * p.heads * d < 64 * 1024 {
        out.chunks_mut(d).enumerate().for_each(work);
    } else {
        out.par_chunks_mut(d)
            .enumerate()
            .with_min_len(4)
            .for_each(work);
    }
}

fn attend_one(
    q: &[f32],
    row: QueryRow<'_>,
    kv: KvLayer<'_>,
    g: usize,
    p: AttnParams,
    out: &mut [f32],
) {
    let hi = row.pos + 1;
    let lo = match p.window {
        Some(w) if w < hi => hi - w,
        _ => 0,
    };
    let bs = kv.block_size;
    let mut m = f32::NEG_INFINITY;
    let mut l = 0.0f32;
    out.fill(0.0);
    let mut scores = [0.0f32; 64];
    let mut start = lo;
    while start < hi {
        // Positions start..end lie in one physical block.
        let end = ((start / bs + 1) * bs).min(hi).min(start + scores.len());
        let n = end - start;
        let mut bmax = f32::NEG_INFINITY;
        for (j, s) in scores[..n].iter_mut().enumerate() {
            *s = simd::dot(q, kv.key(row.table, start + j, g)) * p.scale;
            bmax = bmax.max(*s);
        }
        let m_new = m.max(bmax);
        let corr = (m - m_new).exp();
        if corr != 1.0 {
            l *= corr;
            for o in out.iter_mut() {
                *o *= corr;
            }
        }
        for (j, s) in scores[..n].iter().enumerate() {
            let e = (s - m_new).exp();
            l += e;
            simd::axpy(out, e, kv.value(row.table, start + j, g));
        }
        m = m_new;
        start = end;
    }
    let inv = 1.0 / l;
    for o in out.iter_mut() {
        *o *= inv;
    }
}
