//! Context parallelism: one sequence's KV cache split across ranks by position ranges, its
//! attention computed where the keys are and merged exactly at its home.
//!
//! Invariants:
//! - A context-parallel sequence's positions are held in contiguous ranges, in position
//!   order: its home (the rank that runs its rows) holds `0..spans[0].start`, then each
//!   [`Span`] `start..end` is held by its rank, where the sequence is a *guest* ([`Guest`],
//!   named by the sequence and the range's first position). Ranges never overlap and only the
//!   last grows; a rank may hold several ranges of one sequence, its home included (blocks
//!   freed there after the sequence moved on).
//! - Every key is seen once per query: the home computes the part of each row's attention
//!   over its own range, every guest the part over its range, each left unnormalised
//!   ([`PartialState`]), and the home merges them with the heads' sinks
//!   ([`merge_partial_states`]). The result is one worker's attention up to rounding.
//! - A step with context parallelism on does two more all-to-alls per attention layer, on
//!   every rank of the group (requests, then replies), even a rank with nothing to send;
//!   whether a step does is decided by its plan for all ranks alike, so these exchanges stay
//!   in lockstep with the expert exchange over the same [`Comm`].
//! - In a request, writes come before queries, and a guest applies every write before it
//!   answers any query: a prefill chunk whose positions land on a guest attends to itself
//!   causally, as it does at home.
//!
//! Wire format of a request (little-endian): `writes: u32`, `queries: u32`, then each write
//! (`seq_id: u64`, the range's `start: u64`, `pos: u64`, the position's key row then value
//! row as f32), then each query (`seq_id`, `start`, `pos`, the row's `heads · head_dim` query
//! as f32). A reply holds, per query in the order asked, `m` and `l` (`heads` f32 each) and
//! `acc` (`heads · head_dim`). Anything else is refused as malformed, naming the peer.

use crate::comm::{Comm, CommError};
use crate::kv::KvCache;
use crate::WorkerError;
use std::collections::HashMap;
use switchyard_kernels::attention::{
    merge_partial_states, paged_attention_partial, paged_attention_with, AttnParams, KeySpan,
    PartialState, QueryRow,
};

/// Positions `start..end` of a sequence, held by `rank`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub rank: u32,
    pub start: usize,
    pub end: usize,
}

/// Where the positions of one of this rank's sequences live after the step: this rank holds
/// `0..spans[0].start`, `spans` the rest in order, the last ending at the sequence's length
/// after the step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqLayout {
    pub seq_id: u64,
    pub spans: Vec<Span>,
}

/// A range of another rank's sequence that this rank holds (or starts holding): positions
/// `start..end` after the step, `home` the rank that runs the sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestSpec {
    pub seq_id: u64,
    pub home: u32,
    pub start: usize,
    pub end: usize,
}

/// What a step adds for context parallelism. The default is a step without it.
#[derive(Clone, Copy, Debug, Default)]
pub struct ContextPlan<'a> {
    /// Layouts of this rank's sequences that reach other ranks.
    pub layouts: &'a [SeqLayout],
    /// Ranges of other ranks' sequences this rank holds that grow this step.
    pub guests: &'a [GuestSpec],
    /// Whether every attention layer does the context exchange: true on every rank of the
    /// group as soon as any rank has a layout or a guest in this step.
    pub exchange: bool,
}

/// A range of another rank's sequence held here: positions `start..start + len` in `table`.
#[derive(Clone, Debug, Default)]
pub struct Guest {
    pub home: u32,
    pub start: usize,
    pub len: usize,
    pub table: Vec<u32>,
}

/// The context exchange as one step's attention layers see it.
pub(crate) struct CpStep<'a> {
    pub comm: &'a Comm,
    /// Per row of the step: its sequence and the ranges held elsewhere (empty: all here).
    pub rows: Vec<(u64, &'a [Span])>,
    pub guests: &'a HashMap<(u64, usize), Guest>,
}

fn malformed(peer: usize, detail: impl Into<String>) -> WorkerError {
    WorkerError::Comm(
        CommError::Malformed {
            peer,
            detail: detail.into(),
        }
        .to_string(),
    )
}

/// Keys a query at `pos` sees: `lo..hi`.
fn visible(pos: usize, window: Option<usize>) -> (usize, usize) {
    let hi = pos + 1;
    match window {
        Some(w) if w < hi => (hi - w, hi),
        _ => (0, hi),
    }
}

/// Keys `lo..hi` (absolute) that fall in `start..end`, relative to `start` (empty: `0..0`).
fn clip(lo: usize, hi: usize, start: usize, end: usize) -> (usize, usize) {
    let (a, z) = (lo.max(start), hi.min(end));
    if a < z {
        (a - start, z - start)
    } else {
        (0, 0)
    }
}

fn put_f32s(buf: &mut Vec<u8>, xs: &[f32]) {
    for x in xs {
        buf.extend_from_slice(&x.to_le_bytes());
    }
}

/// A little-endian reader over one peer's buffer that fails as malformed past its end.
struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
    peer: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WorkerError> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.buf.len());
        let Some(end) = end else {
            return Err(malformed(
                self.peer,
                format!("context exchange: {} bytes, more expected", self.buf.len()),
            ));
        };
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32, WorkerError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, WorkerError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn f32s(&mut self, n: usize) -> Result<Vec<f32>, WorkerError> {
        let b = self.take(n.checked_mul(4).unwrap_or(usize::MAX))?;
        Ok(b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
    fn end(&self) -> Result<(), WorkerError> {
        if self.at == self.buf.len() {
            Ok(())
        } else {
            Err(malformed(
                self.peer,
                format!(
                    "context exchange: {} bytes left over",
                    self.buf.len() - self.at
                ),
            ))
        }
    }
}

/// One attention layer of a step: writes each row's key (`k`, `[rows, k_width]`) and value
/// (`v`, `[rows, v_width]`, empty for MLA's latent cache) into layer `li` of the cache, then
/// `out = attention(q)` (`[rows, heads · head_dim]`) over each row's sequence, keys and values
/// read as `p.kv_heads` heads of `p.head_dim`. With a context exchange, rows whose keys are
/// partly held elsewhere are completed from the holders' parts, and this rank answers the
/// parts other ranks ask of the ranges it holds for them.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend(
    rows: &[QueryRow<'_>],
    cp: Option<&CpStep<'_>>,
    li: usize,
    kv: &mut KvCache,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    p: AttnParams,
    sinks: Option<&[f32]>,
    out: &mut [f32],
) -> Result<(), WorkerError> {
    let (kw, vw) = (kv.shape.k_width, kv.shape.v_width);
    let qw = p.heads * p.head_dim;
    let Some(cp) = cp else {
        for (r, row) in rows.iter().enumerate() {
            kv.write(
                li,
                row.table,
                row.pos,
                &k[r * kw..(r + 1) * kw],
                &v[r * vw..(r + 1) * vw],
            );
        }
        paged_attention_with(q, rows, kv.layer(li, p.kv_heads, p.head_dim), p, sinks, out);
        return Ok(());
    };
    let (world, me) = (cp.comm.world(), cp.comm.rank());
    // Requests: the writes and the queries of this rank's rows for each holder.
    let mut writes = vec![Vec::new(); world];
    let mut queries = vec![Vec::new(); world];
    let mut counts = vec![(0u32, 0u32); world];
    // (row, span index) of each query, per holder, in the order asked.
    let mut asked: Vec<Vec<(usize, usize)>> = vec![Vec::new(); world];
    for (r, row) in rows.iter().enumerate() {
        let (seq, spans) = cp.rows[r];
        let here = spans.first().map_or(usize::MAX, |s| s.start);
        let (kr, vr) = (&k[r * kw..(r + 1) * kw], &v[r * vw..(r + 1) * vw]);
        if row.pos < here {
            kv.write(li, row.table, row.pos, kr, vr);
        }
        let (lo, hi) = visible(row.pos, p.window);
        for (si, s) in spans.iter().enumerate() {
            let to = s.rank as usize;
            if (s.start..s.end).contains(&row.pos) {
                let w = &mut writes[to];
                w.extend_from_slice(&seq.to_le_bytes());
                w.extend_from_slice(&(s.start as u64).to_le_bytes());
                w.extend_from_slice(&(row.pos as u64).to_le_bytes());
                put_f32s(w, kr);
                put_f32s(w, vr);
                counts[to].0 += 1;
            }
            if clip(lo, hi, s.start, s.end).1 > 0 {
                let b = &mut queries[to];
                b.extend_from_slice(&seq.to_le_bytes());
                b.extend_from_slice(&(s.start as u64).to_le_bytes());
                b.extend_from_slice(&(row.pos as u64).to_le_bytes());
                put_f32s(b, &q[r * qw..(r + 1) * qw]);
                counts[to].1 += 1;
                asked[to].push((r, si));
            }
        }
    }
    let send: Vec<Vec<u8>> = (0..world)
        .map(|i| {
            let mut b = Vec::with_capacity(8 + writes[i].len() + queries[i].len());
            b.extend_from_slice(&counts[i].0.to_le_bytes());
            b.extend_from_slice(&counts[i].1.to_le_bytes());
            b.append(&mut writes[i]);
            b.append(&mut queries[i]);
            b
        })
        .collect();
    let recv = cp
        .comm
        .all_to_all(send)
        .map_err(|e| WorkerError::Comm(e.to_string()))?;
    // Serve: apply every write, then answer every query over the range held here.
    let mut guest_q = Vec::new();
    let mut served = Vec::new(); // (source rank, guest, relative lo, hi)
    for (src, buf) in recv.iter().enumerate() {
        let mut rd = Reader {
            buf,
            at: 0,
            peer: src,
        };
        let (nw, nq) = (rd.u32()?, rd.u32()?);
        for _ in 0..nw {
            let (seq, start, pos) = (rd.u64()?, rd.u64()? as usize, rd.u64()? as usize);
            let g = guest_of(cp.guests, (seq, start), src, me)?;
            if !(g.start..g.start + g.len).contains(&pos) {
                return Err(malformed(
                    src,
                    format!(
                        "context exchange: write at position {pos} of sequence {seq}, held \
                         here: {}..{}",
                        g.start,
                        g.start + g.len
                    ),
                ));
            }
            let (kr, vr) = (rd.f32s(kw)?, rd.f32s(vw)?);
            kv.write(li, &g.table, pos - g.start, &kr, &vr);
        }
        for _ in 0..nq {
            let (seq, start, pos) = (rd.u64()?, rd.u64()? as usize, rd.u64()? as usize);
            let g = guest_of(cp.guests, (seq, start), src, me)?;
            let (lo, hi) = visible(pos, p.window);
            let (a, z) = clip(lo, hi, g.start, g.start + g.len);
            guest_q.extend(rd.f32s(qw)?);
            served.push((src, g, a, z));
        }
        rd.end()?;
    }
    let spans: Vec<KeySpan<'_>> = served
        .iter()
        .map(|&(_, g, lo, hi)| KeySpan {
            table: &g.table,
            lo,
            hi,
        })
        .collect();
    let layer = kv.layer(li, p.kv_heads, p.head_dim);
    let parts = paged_attention_partial(&guest_q, &spans, layer, p);
    let mut replies = vec![Vec::new(); world];
    for (&(src, ..), st) in served.iter().zip(&parts) {
        put_f32s(&mut replies[src], &st.m);
        put_f32s(&mut replies[src], &st.l);
        put_f32s(&mut replies[src], &st.acc);
    }
    // This rank's rows: whole where all their keys are here, parts where they are not.
    let split: Vec<usize> = (0..rows.len())
        .filter(|&r| !cp.rows[r].1.is_empty())
        .collect();
    if split.is_empty() {
        paged_attention_with(q, rows, layer, p, sinks, out);
    } else {
        let whole: Vec<usize> = (0..rows.len())
            .filter(|&r| cp.rows[r].1.is_empty())
            .collect();
        if !whole.is_empty() {
            let wq: Vec<f32> = whole
                .iter()
                .flat_map(|&r| q[r * qw..(r + 1) * qw].iter().copied())
                .collect();
            let wrows: Vec<QueryRow<'_>> = whole.iter().map(|&r| rows[r]).collect();
            let mut wo = vec![0.0f32; wq.len()];
            paged_attention_with(&wq, &wrows, layer, p, sinks, &mut wo);
            for (i, &r) in whole.iter().enumerate() {
                out[r * qw..(r + 1) * qw].copy_from_slice(&wo[i * qw..(i + 1) * qw]);
            }
        }
    }
    let local_q: Vec<f32> = split
        .iter()
        .flat_map(|&r| q[r * qw..(r + 1) * qw].iter().copied())
        .collect();
    let local_spans: Vec<KeySpan<'_>> = split
        .iter()
        .map(|&r| {
            let (lo, hi) = visible(rows[r].pos, p.window);
            let (a, z) = clip(lo, hi, 0, cp.rows[r].1[0].start);
            KeySpan {
                table: rows[r].table,
                lo: a,
                hi: z,
            }
        })
        .collect();
    let local = paged_attention_partial(&local_q, &local_spans, layer, p);
    let back = cp
        .comm
        .all_to_all(replies)
        .map_err(|e| WorkerError::Comm(e.to_string()))?;
    // Merge: this rank's part first, then the holders' in position order.
    let mut remote: HashMap<(usize, usize), PartialState> = HashMap::new();
    for (src, buf) in back.iter().enumerate() {
        let mut rd = Reader {
            buf,
            at: 0,
            peer: src,
        };
        for &key in &asked[src] {
            let st = PartialState {
                m: rd.f32s(p.heads)?,
                l: rd.f32s(p.heads)?,
                acc: rd.f32s(qw)?,
            };
            remote.insert(key, st);
        }
        rd.end()?;
    }
    for (i, &r) in split.iter().enumerate() {
        let mut parts = vec![&local[i]];
        for si in 0..cp.rows[r].1.len() {
            if let Some(st) = remote.get(&(r, si)) {
                parts.push(st);
            }
        }
        merge_partial_states(&parts, p.head_dim, sinks, &mut out[r * qw..(r + 1) * qw]);
    }
    Ok(())
}

/// The range of a sequence starting at `key.1`, held here for rank `src`.
fn guest_of<'g>(
    guests: &'g HashMap<(u64, usize), Guest>,
    key: (u64, usize),
    src: usize,
    me: usize,
) -> Result<&'g Guest, WorkerError> {
    match guests.get(&key) {
        Some(g) if g.home as usize == src => Ok(g),
        _ => Err(malformed(
            src,
            format!(
                "context exchange: rank {me} holds no range of sequence {} from {} for it",
                key.0, key.1
            ),
        )),
    }
}

/// Checks a layout for a sequence of `len` positions before the step (`new_len` after) homed
/// on a rank of `world`, whose range there already ends at `here` (if it was split before):
/// spans contiguous from the home's range to `new_len`, each on a rank of the group.
pub fn check_layout(
    l: &SeqLayout,
    world: usize,
    len: usize,
    new_len: usize,
    here: Option<usize>,
) -> Result<(), String> {
    let first = l.spans.first().ok_or("a layout with no spans")?;
    if let Some(h) = here {
        if first.start != h {
            return Err(format!(
                "this rank's range ends at {h}, the layout puts it at {}",
                first.start
            ));
        }
    } else if first.start < len.min(new_len) {
        return Err(format!(
            "the first span starts at {}, before the {len} positions held here",
            first.start
        ));
    }
    let mut at = first.start;
    for s in &l.spans {
        if s.start != at || s.end <= s.start {
            return Err(format!("span {}..{} does not follow {at}", s.start, s.end));
        }
        if s.rank as usize >= world {
            return Err(format!(
                "span {}..{} on rank {} of a group of {world}",
                s.start, s.end, s.rank
            ));
        }
        at = s.end;
    }
    if at != new_len {
        return Err(format!("spans end at {at}, the sequence at {new_len}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(rank: u32, start: usize, end: usize) -> Span {
        Span { rank, start, end }
    }

    #[test]
    fn layouts_must_cover_the_rest_of_the_sequence_once() {
        let l = |spans: Vec<Span>| SeqLayout { seq_id: 1, spans };
        let ok =
            |spans, world, len, new_len, here| check_layout(&l(spans), world, len, new_len, here);
        assert!(ok(vec![span(1, 64, 100)], 2, 60, 100, None).is_ok());
        assert!(ok(vec![span(1, 64, 90), span(2, 90, 100)], 3, 0, 100, None).is_ok());
        // A rank may hold several ranges, the home too.
        assert!(ok(vec![span(1, 64, 80), span(0, 80, 100)], 2, 0, 100, None).is_ok());
        // Before what is held here; a gap; short of the end; a rank outside the group.
        assert!(ok(vec![span(1, 64, 100)], 2, 80, 100, None).is_err());
        assert!(ok(vec![span(1, 64, 80), span(2, 81, 100)], 3, 0, 100, None).is_err());
        assert!(ok(vec![span(1, 64, 99)], 2, 0, 100, None).is_err());
        assert!(ok(vec![span(5, 64, 100)], 2, 0, 100, None).is_err());
        // A range already cut here cannot move.
        assert!(ok(vec![span(1, 64, 100)], 2, 99, 100, Some(64)).is_ok());
        assert!(ok(vec![span(1, 70, 100)], 2, 99, 100, Some(64)).is_err());
    }

    #[test]
    fn clipped_key_ranges_are_relative_and_empty_outside() {
        assert_eq!(clip(0, 50, 64, 100), (0, 0));
        assert_eq!(clip(0, 70, 64, 100), (0, 6));
        assert_eq!(clip(80, 120, 64, 100), (16, 36));
        assert_eq!(visible(10, Some(4)), (7, 11));
        assert_eq!(visible(2, Some(4)), (0, 3));
    }
}
