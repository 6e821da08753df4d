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

/// One pool of cached vectors: f32, or bf16 (half the bytes; widened to f32 a tile of 64
/// positions at a time as attention reads them, so every product is still f32).
#[derive(Clone, Copy)]
pub enum KvSlice<'a> {
    F32(&'a [f32]),
    Bf16(&'a [half::bf16]),
}

impl KvSlice<'_> {
    fn same_as(&self, o: &KvSlice<'_>) -> bool {
        match (self, o) {
            (KvSlice::F32(a), KvSlice::F32(b)) => std::ptr::eq(*a, *b),
            (KvSlice::Bf16(a), KvSlice::Bf16(b)) => std::ptr::eq(*a, *b),
            _ => false,
        }
    }
}

/// One layer's KV pool, borrowed.
#[derive(Clone, Copy)]
pub struct KvLayer<'a> {
    pub k: KvSlice<'a>,
    pub v: KvSlice<'a>,
    pub block_size: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl<'a> KvLayer<'a> {
    #[inline]
    fn offset(&self, table: &[u32], pos: usize, g: usize) -> usize {
        let b = table[pos / self.block_size] as usize;
        ((b * self.block_size + pos % self.block_size) * self.kv_heads + g) * self.head_dim
    }

    /// Vectors of kv head `g` at positions `start..start + n` (`n <= KEY_TILE`) of `pool`:
    /// borrowed in place (f32), or widened into `scratch` (bf16, `KEY_TILE · head_dim` long).
    fn tile<'s>(
        &self,
        pool: KvSlice<'a>,
        table: &[u32],
        start: usize,
        n: usize,
        g: usize,
        scratch: &'s mut [f32],
    ) -> [&'s [f32]; KEY_TILE]
    where
        'a: 's,
    {
        let d = self.head_dim;
        let mut out: [&'s [f32]; KEY_TILE] = [&[]; KEY_TILE];
        match pool {
            KvSlice::F32(p) => {
                for (j, o) in out.iter_mut().enumerate().take(n) {
                    let at = self.offset(table, start + j, g);
                    *o = &p[at..at + d];
                }
            }
            KvSlice::Bf16(p) => {
                for (j, dst) in scratch.chunks_mut(d).enumerate().take(n) {
                    let at = self.offset(table, start + j, g);
                    crate::simd::widen_bf16(&p[at..at + d], dst);
                }
                for (o, row) in out.iter_mut().zip(scratch.chunks(d)).take(n) {
                    *o = row;
                }
            }
        }
        out
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
    paged_attention_with(q, rows, kv, p, None, out)
}

/// [`paged_attention`] with optional attention sinks (one logit per query head, as GPT-OSS):
/// each head's softmax runs over its scores and its sink, and the sink's share is dropped, so
/// `out = Σ exp(s - M) v / (Σ exp(s - M) + exp(sink - M))`.
///
/// Work is split by (row, kv head, chunk of at most 16 of the query heads sharing that kv
/// head): each key and value vector is read once per chunk. Many heads on one kv head (MLA's
/// absorbed form: all heads on one latent) therefore still spread over threads.
pub fn paged_attention_with(
    q: &[f32],
    rows: &[QueryRow<'_>],
    kv: KvLayer<'_>,
    p: AttnParams,
    sinks: Option<&[f32]>,
    out: &mut [f32],
) {
    let d = p.head_dim;
    assert_eq!(q.len(), rows.len() * p.heads * d);
    assert_eq!(out.len(), q.len());
    assert_eq!(p.heads % p.kv_heads, 0);
    assert!(
        d <= MAX_HEAD_DIM,
        "attention: head_dim above {MAX_HEAD_DIM}"
    );
    if let Some(s) = sinks {
        assert_eq!(s.len(), p.heads, "attention: one sink per query head");
    }
    let group = p.heads / p.kv_heads;
    let mut hc = head_chunk(group);
    // Few rows on few kv heads (MLA's decode: all heads on one latent) would be one work
    // item: split the heads further, in multiples of four so every head's scores are still
    // computed four at a time (the same arithmetic, whatever the split).
    let threads = rayon::current_num_threads();
    while hc % 8 == 0 && rows.len() * p.kv_heads * (group / hc) < 2 * threads {
        hc /= 2;
    }
    let per_group = group / hc;
    let avx2 = crate::simd::has_avx2();
    let avx512 = crate::simd::has_avx512() && avx2;
    let work = |(i, o): (usize, &mut [f32])| {
        let (t, r) = (i / (p.kv_heads * per_group), i % (p.kv_heads * per_group));
        let (g, c) = (r / per_group, r % per_group);
        let h0 = g * group + c * hc;
        let qs = &q[(t * p.heads + h0) * d..(t * p.heads + h0 + hc) * d];
        let sk = sinks.map(|s| &s[h0..h0 + hc]);
        #[cfg(target_arch = "x86_64")]
        if avx512 && d % 16 == 0 {
            // SAFETY: AVX-512 F/BW, AVX2 and FMA are present (checked above), d % 16 == 0.
            unsafe { attend_group_avx512(qs, rows[t], kv, g, hc, p, sk, o) };
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if avx2 && d % 8 == 0 {
            // SAFETY: avx2 and fma are present (checked above) and d is a multiple of 8.
            unsafe { attend_group_avx2(qs, rows[t], kv, g, hc, p, sk, o) };
            return;
        }
        let _ = avx512;
        attend_group::<Portable>(qs, rows[t], kv, g, hc, p, sk, o);
    };
    let longest = rows
        .iter()
        .map(|r| key_range(r.pos, p.window))
        .map(|(l, h)| h - l)
        .max();
    if longest.unwrap_or(0) > SPLIT_KEYS && rayon::current_num_threads() > 1 {
        return split_attention(q, rows, kv, p, sinks, out);
    }
    let total_keys: usize = rows.iter().map(|r| r.pos + 1).sum();
    if total_keys * p.heads * d < 64 * 1024 {
        out.chunks_mut(hc * d).enumerate().for_each(work);
    } else {
        crate::pool::for_each(out.chunks_mut(hc * d).enumerate().collect(), work);
    }
}

/// The largest divisor of `group` that is at most [`MAX_GROUP`].
fn head_chunk(group: usize) -> usize {
    (1..=group.min(MAX_GROUP))
        .rev()
        .find(|c| group % c == 0)
        .unwrap_or(1)
}

/// Rows with more visible keys than this are split into segments of this many keys, computed
/// in parallel and merged (split-K, as flash-decoding): one long sequence then uses every
/// thread instead of one per kv head.
const SPLIT_KEYS: usize = 1024;

/// One unit of split attention: row `t`, kv head `g`, head chunk `c`, keys `lo..hi`.
#[derive(Clone, Copy)]
struct Segment {
    t: usize,
    g: usize,
    c: usize,
    lo: usize,
    hi: usize,
}

fn split_attention(
    q: &[f32],
    rows: &[QueryRow<'_>],
    kv: KvLayer<'_>,
    p: AttnParams,
    sinks: Option<&[f32]>,
    out: &mut [f32],
) {
    let spans: Vec<KeySpan<'_>> = rows
        .iter()
        .map(|r| {
            let (lo, hi) = key_range(r.pos, p.window);
            KeySpan {
                table: r.table,
                lo,
                hi,
            }
        })
        .collect();
    let (segs, partial, stats) = run_segments(q, &spans, kv, p);
    let d = p.head_dim;
    let group = p.heads / p.kv_heads;
    let hc = head_chunk(group);
    let stride = hc * d;
    // Merge each (row, kv head, chunk)'s segments, in key order.
    let mut i = 0;
    while i < segs.len() {
        let (t, g, c) = (segs[i].t, segs[i].g, segs[i].c);
        let mut j = i;
        while j < segs.len() && segs[j].t == t && segs[j].g == g && segs[j].c == c {
            j += 1;
        }
        let h0 = g * group + c * hc;
        let o = &mut out[(t * p.heads + h0) * d..(t * p.heads + h0 + hc) * d];
        for h in 0..hc {
            let parts = (i..j).map(|k| {
                let at = k * stride + h * d;
                (stats[k].0[h], stats[k].1[h], &partial[at..at + d])
            });
            merge_head(parts, sinks.map(|s| s[h0 + h]), &mut o[h * d..(h + 1) * d]);
        }
        i = j;
    }
}

/// Keys `lo..hi` of one row, positions counted from the first its block table covers.
#[derive(Clone, Copy)]
pub struct KeySpan<'a> {
    pub table: &'a [u32],
    pub lo: usize,
    pub hi: usize,
}

/// One query row's attention over part of its keys, left unnormalised so that parts over
/// disjoint key ranges (held by different workers) merge exactly: per head the running max
/// `m`, the sum of exponentials `l` (relative to `m`) and `acc = Σ exp(s - m) v`. A part with
/// no keys has `m = -inf`, `l = 0`, `acc = 0`, and merges as nothing.
#[derive(Clone, Debug, PartialEq)]
pub struct PartialState {
    /// `[heads]`
    pub m: Vec<f32>,
    /// `[heads]`
    pub l: Vec<f32>,
    /// `[heads, head_dim]`
    pub acc: Vec<f32>,
}

impl PartialState {
    /// The state of no keys at all.
    pub fn empty(heads: usize, head_dim: usize) -> Self {
        PartialState {
            m: vec![f32::NEG_INFINITY; heads],
            l: vec![0.0; heads],
            acc: vec![0.0; heads * head_dim],
        }
    }
}

/// Attention of each row of `q` (`[rows, heads · head_dim]`) over the keys of its span only,
/// as unnormalised [`PartialState`]s (one per row). Long spans are split over threads as
/// [`paged_attention`] splits them, and their segments combined here, so a part costs what
/// the same keys cost in one worker.
pub fn paged_attention_partial(
    q: &[f32],
    spans: &[KeySpan<'_>],
    kv: KvLayer<'_>,
    p: AttnParams,
) -> Vec<PartialState> {
    let d = p.head_dim;
    assert_eq!(q.len(), spans.len() * p.heads * d);
    assert_eq!(p.heads % p.kv_heads, 0);
    assert!(
        d <= MAX_HEAD_DIM,
        "attention: head_dim above {MAX_HEAD_DIM}"
    );
    let (segs, partial, stats) = run_segments(q, spans, kv, p);
    let group = p.heads / p.kv_heads;
    let hc = head_chunk(group);
    let stride = hc * d;
    let mut states: Vec<PartialState> = (0..spans.len())
        .map(|_| PartialState::empty(p.heads, d))
        .collect();
    let mut i = 0;
    while i < segs.len() {
        let (t, g, c) = (segs[i].t, segs[i].g, segs[i].c);
        let mut j = i;
        while j < segs.len() && segs[j].t == t && segs[j].g == g && segs[j].c == c {
            j += 1;
        }
        let st = &mut states[t];
        let h0 = g * group + c * hc;
        for h in 0..hc {
            let mx = (i..j)
                .map(|k| stats[k].0[h])
                .fold(f32::NEG_INFINITY, f32::max);
            let acc = &mut st.acc[(h0 + h) * d..(h0 + h + 1) * d];
            let mut l = 0.0;
            for k in i..j {
                let w = (stats[k].0[h] - mx).exp();
                l += w * stats[k].1[h];
                let at = k * stride + h * d;
                axpy8(acc, w, &partial[at..at + d]);
            }
            st.m[h0 + h] = mx;
            st.l[h0 + h] = l;
        }
        i = j;
    }
    states
}

/// Merges one row's partial states (over disjoint key ranges, any order) into its attention
/// output `out` (`[heads, head_dim]`), each head's sink (if any) joining the normalisation.
pub fn merge_partial_states(
    parts: &[&PartialState],
    head_dim: usize,
    sinks: Option<&[f32]>,
    out: &mut [f32],
) {
    let d = head_dim;
    for (h, o) in out.chunks_mut(d).enumerate() {
        let each = parts
            .iter()
            .map(|s| (s.m[h], s.l[h], &s.acc[h * d..(h + 1) * d]));
        merge_head(each, sinks.map(|s| s[h]), o);
    }
}

/// `out = Σ_s exp(m_s - M) o_s / (Σ_s exp(m_s - M) l_s [+ exp(sink - M)])` with
/// `M = max_s m_s` (and the sink). Parts with `m = -inf` contribute nothing.
fn merge_head<'a>(
    parts: impl Iterator<Item = (f32, f32, &'a [f32])> + Clone,
    sink: Option<f32>,
    out: &mut [f32],
) {
    let mut mx = parts
        .clone()
        .map(|(m, _, _)| m)
        .fold(f32::NEG_INFINITY, f32::max);
    if let Some(s) = sink {
        mx = mx.max(s);
    }
    out.fill(0.0);
    let mut l = sink.map_or(0.0, |s| (s - mx).exp());
    for (m, ls, o) in parts {
        if m == f32::NEG_INFINITY {
            continue;
        }
        let w = (m - mx).exp();
        l += w * ls;
        axpy8(out, w, o);
    }
    scale8(out, 1.0 / l);
}

/// Splits each span into segments of at most [`SPLIT_KEYS`] keys per (row, kv head, head
/// chunk), in that order, and computes every segment's unnormalised attention in parallel.
#[allow(clippy::type_complexity)]
fn run_segments(
    q: &[f32],
    spans: &[KeySpan<'_>],
    kv: KvLayer<'_>,
    p: AttnParams,
) -> (
    Vec<Segment>,
    Vec<f32>,
    Vec<([f32; MAX_GROUP], [f32; MAX_GROUP])>,
) {
    let avx2 = crate::simd::has_avx2();
    let avx512 = crate::simd::has_avx512() && avx2;
    let d = p.head_dim;
    let group = p.heads / p.kv_heads;
    let hc = head_chunk(group);
    let mut segs = Vec::new();
    for (t, r) in spans.iter().enumerate() {
        for g in 0..p.kv_heads {
            for c in 0..group / hc {
                let mut s = r.lo;
                while s < r.hi {
                    let e = (s + SPLIT_KEYS).min(r.hi);
                    segs.push(Segment {
                        t,
                        g,
                        c,
                        lo: s,
                        hi: e,
                    });
                    s = e;
                }
            }
        }
    }
    let stride = hc * d;
    let mut partial = vec![0.0f32; segs.len() * stride];
    let mut stats = vec![([0.0f32; MAX_GROUP], [0.0f32; MAX_GROUP]); segs.len()];
    let items: Vec<_> = partial
        .chunks_mut(stride)
        .zip(stats.iter_mut())
        .zip(segs.iter())
        .collect();
    crate::pool::for_each(items, |((o, st), s)| {
        let h0 = s.g * group + s.c * hc;
        let qs = &q[(s.t * p.heads + h0) * d..(s.t * p.heads + h0 + hc) * d];
        let row = QueryRow {
            table: spans[s.t].table,
            pos: s.hi - 1,
        };
        #[cfg(target_arch = "x86_64")]
        if avx512 && d % 16 == 0 {
            // SAFETY: AVX-512 F/BW, AVX2 and FMA present (checked above), d % 16 == 0.
            *st = unsafe { attend_range_avx512(qs, row, kv, s.g, hc, p, s.lo, s.hi, o) };
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if avx2 && d % 8 == 0 {
            // SAFETY: avx2 and fma are present (checked above) and d % 8 == 0.
            *st = unsafe { attend_range_avx2(qs, row, kv, s.g, hc, p, s.lo, s.hi, o) };
            return;
        }
        let _ = (avx2, avx512);
        *st = attend_range::<Portable>(qs, row, kv, s.g, hc, p, s.lo, s.hi, o);
    });
    (segs, partial, stats)
}

/// Large enough for MLA's absorbed form (kv_lora_rank 512 + rope 64 in DeepSeek-V3).
const MAX_HEAD_DIM: usize = 1024;
const MAX_GROUP: usize = 16;
const KEY_TILE: usize = 64;

/// The `#[target_feature]` entry points of one instruction set: [`attend_group`] and
/// [`attend_range`] monomorphised over its [`Ops`].
macro_rules! isa_entry_points {
    ($feat:literal, $ops:ty, $group:ident, $range:ident) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feat)]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $group(
            q: &[f32],
            row: QueryRow<'_>,
            kv: KvLayer<'_>,
            g: usize,
            group: usize,
            p: AttnParams,
            sinks: Option<&[f32]>,
            out: &mut [f32],
        ) {
            attend_group::<$ops>(q, row, kv, g, group, p, sinks, out)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feat)]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $range(
            q: &[f32],
            row: QueryRow<'_>,
            kv: KvLayer<'_>,
            g: usize,
            group: usize,
            p: AttnParams,
            lo: usize,
            hi: usize,
            out: &mut [f32],
        ) -> ([f32; MAX_GROUP], [f32; MAX_GROUP]) {
            attend_range::<$ops>(q, row, kv, g, group, p, lo, hi, out)
        }
    };
}

isa_entry_points!("avx2,fma", Avx2, attend_group_avx2, attend_range_avx2);
isa_entry_points!(
    "avx512f,avx512bw,avx2,fma",
    Avx512,
    attend_group_avx512,
    attend_range_avx512
);

/// The vector primitives attention needs: portable, AVX2, or AVX-512 (head dims that are a
/// multiple of 16) for the score and value products.
trait Ops {
    fn dot(a: &[f32], b: &[f32]) -> f32;
    fn dot4(q4: &[f32], key: &[f32]) -> [f32; 4];
    fn axpy(y: &mut [f32], a: f32, x: &[f32]);
    /// `x[i] = exp(x[i] - m)`; returns the sum.
    fn exp_sub_sum(x: &mut [f32], m: f32) -> f32;
    /// `out[h] += Σ_j p[h][j] · vals[j]` for `h < group` (rows of `out` are `d` long).
    fn pv(out: &mut [f32], d: usize, group: usize, p: &[[f32; KEY_TILE]], vals: &[&[f32]]) {
        for (j, val) in vals.iter().enumerate() {
            for h in 0..group {
                Self::axpy(&mut out[h * d..(h + 1) * d], p[h][j], val);
            }
        }
    }
}

struct Portable;
impl Ops for Portable {
    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        dot8(a, b)
    }
    #[inline(always)]
    fn dot4(q4: &[f32], key: &[f32]) -> [f32; 4] {
        let d = key.len();
        [0, 1, 2, 3].map(|h| dot8(&q4[h * d..(h + 1) * d], key))
    }
    #[inline(always)]
    fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
        axpy8(y, a, x)
    }
    #[inline(always)]
    fn exp_sub_sum(x: &mut [f32], m: f32) -> f32 {
        let mut s = 0.0;
        for v in x.iter_mut() {
            *v = (*v - m).exp();
            s += *v;
        }
        s
    }
}

#[cfg(target_arch = "x86_64")]
struct Avx2;
#[cfg(target_arch = "x86_64")]
impl Ops for Avx2 {
    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        dot8(a, b)
    }
    #[inline(always)]
    fn dot4(q4: &[f32], key: &[f32]) -> [f32; 4] {
        // SAFETY: only reached from attend_group_avx2, which runs with avx2+fma and d % 8 == 0.
        unsafe { crate::simd::avx2::dot4(q4, key) }
    }
    #[inline(always)]
    fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
        // SAFETY: as above.
        unsafe { crate::simd::avx2::axpy(y, a, x) }
    }
    #[inline(always)]
    fn exp_sub_sum(x: &mut [f32], m: f32) -> f32 {
        // SAFETY: as above.
        unsafe { crate::simd::avx2::exp_sub_sum(x, m) }
    }
    #[inline(always)]
    fn pv(out: &mut [f32], d: usize, group: usize, p: &[[f32; KEY_TILE]], vals: &[&[f32]]) {
        // SAFETY: as above.
        unsafe { crate::simd::avx2::pv(out, d, group, p, vals) }
    }
}

#[cfg(target_arch = "x86_64")]
struct Avx512;
/// AVX2's primitives, but the score and value products 16 lanes wide.
#[cfg(target_arch = "x86_64")]
impl Ops for Avx512 {
    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        Avx2::dot(a, b)
    }
    #[inline(always)]
    fn dot4(q4: &[f32], key: &[f32]) -> [f32; 4] {
        // SAFETY: only reached from the *_avx512 entry points, which run with AVX-512 F/BW,
        // AVX2 and FMA and d % 16 == 0.
        unsafe { crate::simd::avx512::dot4(q4, key) }
    }
    #[inline(always)]
    fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
        Avx2::axpy(y, a, x)
    }
    #[inline(always)]
    fn exp_sub_sum(x: &mut [f32], m: f32) -> f32 {
        Avx2::exp_sub_sum(x, m)
    }
    #[inline(always)]
    fn pv(out: &mut [f32], d: usize, group: usize, p: &[[f32; KEY_TILE]], vals: &[&[f32]]) {
        // SAFETY: as above.
        unsafe { crate::simd::avx512::pv(out, d, group, p, vals) }
    }
}

#[inline(always)]
fn dot8(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let n = a.len() / 8 * 8;
    for (ca, cb) in a[..n].chunks_exact(8).zip(b[..n].chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += ca[l] * cb[l];
        }
    }
    let mut s = (acc[0] + acc[4]) + (acc[1] + acc[5]) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for i in n..a.len() {
        s += a[i] * b[i];
    }
    s
}

#[inline(always)]
fn axpy8(y: &mut [f32], a: f32, x: &[f32]) {
    for (yv, xv) in y.iter_mut().zip(x) {
        *yv += a * xv;
    }
}

#[inline(always)]
fn scale8(y: &mut [f32], a: f32) {
    for v in y.iter_mut() {
        *v *= a;
    }
}

/// Keys visible to a query at `pos`: `lo..hi`.
fn key_range(pos: usize, window: Option<usize>) -> (usize, usize) {
    let hi = pos + 1;
    match window {
        Some(w) if w < hi => (hi - w, hi),
        _ => (0, hi),
    }
}

/// Online-softmax attention of `group` query heads (`q`: `[group, d]`) against kv head `g`,
/// with each head's sink (if any) joining the normalisation.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn attend_group<O: Ops>(
    q: &[f32],
    row: QueryRow<'_>,
    kv: KvLayer<'_>,
    g: usize,
    group: usize,
    p: AttnParams,
    sinks: Option<&[f32]>,
    out: &mut [f32],
) {
    let (lo, hi) = key_range(row.pos, p.window);
    let (m, l) = attend_range::<O>(q, row, kv, g, group, p, lo, hi, out);
    let d = p.head_dim;
    for h in 0..group {
        let f = match sinks {
            None => 1.0 / l[h],
            Some(sk) => {
                let mx = m[h].max(sk[h]);
                let corr = (m[h] - mx).exp();
                corr / (l[h] * corr + (sk[h] - mx).exp())
            }
        };
        scale8(&mut out[h * d..(h + 1) * d], f);
    }
}

/// Attention over keys `lo..hi` only, left unnormalised: returns each head's running max and
/// sum of exponentials; `out` holds `Σ exp(s - m) v`. Partial results over disjoint ranges
/// merge exactly ([`merge_partial_states`]).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn attend_range<O: Ops>(
    q: &[f32],
    row: QueryRow<'_>,
    kv: KvLayer<'_>,
    g: usize,
    group: usize,
    p: AttnParams,
    lo: usize,
    hi: usize,
    out: &mut [f32],
) -> ([f32; MAX_GROUP], [f32; MAX_GROUP]) {
    let d = p.head_dim;
    let mut m = [f32::NEG_INFINITY; MAX_GROUP];
    let mut l = [0.0f32; MAX_GROUP];
    let mut scores = [[0.0f32; KEY_TILE]; MAX_GROUP];
    out.fill(0.0);
    // Widened bf16 tiles (keys, then values unless they are the keys, as MLA's latent).
    let shared = kv.k.same_as(&kv.v);
    let wide = |s: KvSlice<'_>| match s {
        KvSlice::F32(_) => Vec::new(),
        KvSlice::Bf16(_) => vec![0.0f32; KEY_TILE * d],
    };
    let (mut kscr, mut vscr) = (wide(kv.k), if shared { Vec::new() } else { wide(kv.v) });
    let mut start = lo;
    while start < hi {
        let end = hi.min(start + KEY_TILE);
        let n = end - start;
        let keys = kv.tile(kv.k, row.table, start, n, g, &mut kscr);
        for (j, key) in keys.iter().enumerate().take(n) {
            let key = *key;
            let mut h = 0;
            while h + 4 <= group {
                let s4 = O::dot4(&q[h * d..(h + 4) * d], key);
                for i in 0..4 {
                    scores[h + i][j] = s4[i] * p.scale;
                }
                h += 4;
            }
            while h < group {
                scores[h][j] = O::dot(&q[h * d..(h + 1) * d], key) * p.scale;
                h += 1;
            }
        }
        for h in 0..group {
            let sc = &mut scores[h][..n];
            let bmax = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let m_new = m[h].max(bmax);
            let corr = (m[h] - m_new).exp();
            let o = &mut out[h * d..(h + 1) * d];
            if corr != 1.0 {
                l[h] *= corr;
                scale8(o, corr);
            }
            l[h] += O::exp_sub_sum(sc, m_new);
            m[h] = m_new;
        }
        if shared {
            O::pv(out, d, group, &scores, &keys[..n]);
        } else {
            let vals = kv.tile(kv.v, row.table, start, n, g, &mut vscr);
            O::pv(out, d, group, &scores, &vals[..n]);
        }
        start = end;
    }
    (m, l)
}
