//! Expert parallelism: an [`ExpertExec`] that dispatches routed tokens to the ranks holding
//! their experts over a [`Comm`] all-to-all, runs the experts it holds on what it receives,
//! and combines the results back.
//!
//! Per MoE layer, every rank (even one with no tokens this step):
//! 1. picks a holder for each (token, slot): itself when it holds the expert, otherwise the
//!    replica `(token + slot) mod replicas` of the expert's sorted holder list (deterministic,
//!    spreads load over replicas);
//! 2. dispatch: sends each holder its items (`expert: u32`, then `hidden` f32) in (token, slot)
//!    order;
//! 3. runs its experts on everything received, grouped per expert in (source rank, item) order;
//! 4. combine: returns each source its outputs in the order received; the source writes them
//!    to their (token, slot) rows. The model then sums slots in slot order, so the result does
//!    not depend on the number of ranks or the placement.

use crate::comm::{Comm, CommError};
use crate::experts::{run_experts, ExpertExec, ExpertSelection, ExpertSet, Mlp};
use crate::WorkerError;

pub struct EpExperts {
    pub local: ExpertSet,
    /// `holders[layer][expert]`: ranks holding the expert, ascending.
    pub holders: Vec<Vec<Vec<u32>>>,
    pub comm: Comm,
    /// Time spent in, and bytes sent by, this rank's all-to-alls since last taken.
    pub stats: ExchangeStats,
}

/// Cumulative all-to-all time and bytes, taken (and reset) once per step.
#[derive(Debug, Default)]
pub struct ExchangeStats {
    nanos: std::sync::atomic::AtomicU64,
    bytes: std::sync::atomic::AtomicU64,
}

impl ExchangeStats {
    fn add(&self, d: std::time::Duration, bytes: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        self.nanos.fetch_add(d.as_nanos() as u64, Relaxed);
        self.bytes.fetch_add(bytes as u64, Relaxed);
    }

    /// Seconds and bytes since the last call.
    pub fn take(&self) -> (f64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.nanos.swap(0, Relaxed) as f64 * 1e-9,
            self.bytes.swap(0, Relaxed),
        )
    }
}

fn comm_err(e: CommError) -> WorkerError {
    WorkerError::Comm(e.to_string())
}

impl EpExperts {
    /// The all-to-all, timed and counted (bytes leaving this rank).
    fn exchange(&self, send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, WorkerError> {
        let me = self.comm.rank();
        let bytes = send
            .iter()
            .enumerate()
            .filter(|(r, _)| *r != me)
            .map(|(_, b)| b.len())
            .sum();
        let t0 = std::time::Instant::now();
        let out = self.comm.all_to_all(send).map_err(comm_err);
        self.stats.add(t0.elapsed(), bytes);
        out
    }

    fn target(&self, layer: usize, e: usize, t: usize, s: usize) -> Result<usize, WorkerError> {
        let hs = self
            .holders
            .get(layer)
            .and_then(|l| l.get(e))
            .filter(|h| !h.is_empty())
            .ok_or(WorkerError::ExpertMissing { layer, expert: e })?;
        let me = self.comm.rank() as u32;
        if hs.contains(&me) {
            return Ok(me as usize);
        }
        Ok(hs[(t + s) % hs.len()] as usize)
    }
}

impl ExpertExec for EpExperts {
    fn take_exchange_stats(&self) -> (f64, u64) {
        self.stats.take()
    }

    fn placement(&self) -> Option<(u32, &[Vec<Vec<u32>>])> {
        Some((self.comm.rank() as u32, &self.holders))
    }

    fn comm(&self) -> Option<&Comm> {
        Some(&self.comm)
    }

    fn switch(&mut self, holders: Vec<Vec<Vec<u32>>>, add: ExpertSet) -> Result<(), WorkerError> {
        let sel = ExpertSelection::of_rank(&holders, self.comm.rank() as u32);
        let local = std::mem::replace(&mut self.local, ExpertSet::empty());
        self.local = local.regroup(add, &sel)?;
        self.holders = holders;
        Ok(())
    }

    fn rejoin(
        &mut self,
        comm: Comm,
        holders: Vec<Vec<Vec<u32>>>,
        add: ExpertSet,
    ) -> Result<(), WorkerError> {
        let sel = ExpertSelection::of_rank(&holders, comm.rank() as u32);
        let local = std::mem::replace(&mut self.local, ExpertSet::empty());
        self.local = local.regroup(add, &sel)?;
        self.holders = holders;
        self.comm = comm;
        self.stats.take();
        Ok(())
    }

    fn run(
        &self,
        layer: usize,
        x: &[f32],
        hidden: usize,
        ids: &[u32],
        k: usize,
        slots: &mut [f32],
    ) -> Result<(), WorkerError> {
        let world = self.comm.world();
        // 1-2. Dispatch.
        let mut sent: Vec<Vec<usize>> = vec![Vec::new(); world]; // per dst: pair indices
        let mut send: Vec<Vec<u8>> = vec![Vec::new(); world];
        for (p, &e) in ids.iter().enumerate() {
            let (t, s) = (p / k, p % k);
            let dst = self.target(layer, e as usize, t, s)?;
            let buf = &mut send[dst];
            buf.extend_from_slice(&e.to_le_bytes());
            for v in &x[t * hidden..(t + 1) * hidden] {
                buf.extend_from_slice(&v.to_le_bytes());
            }
            sent[dst].push(p);
        }
        let recv = self.exchange(send)?;
        // 3. Run local experts on everything received.
        let mut rows: Vec<f32> = Vec::new();
        let mut items: Vec<(usize, usize)> = Vec::new(); // (src, expert) per received row
        for (src, buf) in recv.iter().enumerate() {
            decode_rows(src, buf, hidden, &mut items, &mut rows).map_err(comm_err)?;
        }
        let mut by_expert: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
        for (i, &(_, e)) in items.iter().enumerate() {
            by_expert.entry(e).or_default().push(i);
        }
        let work: Vec<(&Mlp, Vec<usize>)> = by_expert
            .iter()
            .map(|(&e, idx)| {
                Ok((
                    self.local
                        .get(layer, e)
                        .ok_or(WorkerError::ExpertMissing { layer, expert: e })?,
                    idx.clone(),
                ))
            })
            .collect::<Result<_, WorkerError>>()?;
        let mut result = vec![0.0f32; items.len() * hidden];
        run_experts(&work, &rows, hidden, |i| i, &mut result);
        // 4. Combine: outputs back to their sources, in the order received.
        let mut reply: Vec<Vec<u8>> = vec![Vec::new(); world];
        for (i, &(src, _)) in items.iter().enumerate() {
            for v in &result[i * hidden..(i + 1) * hidden] {
                reply[src].extend_from_slice(&v.to_le_bytes());
            }
        }
        let back = self.exchange(reply)?;
        for (dst, buf) in back.iter().enumerate() {
            decode_results(dst, buf, hidden, &sent[dst], slots).map_err(comm_err)?;
        }
        Ok(())
    }

    fn nbytes(&self) -> usize {
        self.local.nbytes()
    }
}

/// Splits the dispatch buffer peer `src` sent into its rows: each is a u32 expert id then
/// `hidden` f32s. Appends `(src, expert)` to `items` and the row to `rows`. Any bytes end in
/// rows or an error (a buffer that is not a whole number of rows); an expert id is not
/// trusted here: the caller looks it up among the experts it holds.
pub fn decode_rows(
    src: usize,
    buf: &[u8],
    hidden: usize,
    items: &mut Vec<(usize, usize)>,
    rows: &mut Vec<f32>,
) -> Result<(), CommError> {
    let row_bytes = 4 + 4 * hidden;
    if buf.len() % row_bytes != 0 {
        return Err(CommError::Malformed {
            peer: src,
            detail: format!("{} bytes is not a whole number of rows", buf.len()),
        });
    }
    for item in buf.chunks_exact(row_bytes) {
        let e = u32::from_le_bytes([item[0], item[1], item[2], item[3]]) as usize;
        items.push((src, e));
        rows.extend(
            item[4..]
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        );
    }
    Ok(())
}

/// Writes the expert outputs peer `dst` returned for the (token, slot) pairs `pairs` sent to
/// it into their rows of `slots`; the buffer must hold exactly one row per pair.
pub fn decode_results(
    dst: usize,
    buf: &[u8],
    hidden: usize,
    pairs: &[usize],
    slots: &mut [f32],
) -> Result<(), CommError> {
    if buf.len() != pairs.len() * hidden * 4 {
        return Err(CommError::Malformed {
            peer: dst,
            detail: format!("{} result bytes for {} rows", buf.len(), pairs.len()),
        });
    }
    if hidden == 0 {
        return Ok(());
    }
    for (row, &p) in buf.chunks_exact(hidden * 4).zip(pairs) {
        for (o, b) in slots[p * hidden..(p + 1) * hidden]
            .iter_mut()
            .zip(row.chunks_exact(4))
        {
            *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
    }
    Ok(())
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::fuzz_cases()))]

        /// Any bytes from a peer decode to whole rows or an error; the rows decoded are the
        /// bytes given, in order.
        #[test]
        fn fuzz_dispatch_rows(buf in prop::collection::vec(any::<u8>(), 0..600), hidden in 0usize..12) {
            let (mut items, mut rows) = (Vec::new(), Vec::new());
            match decode_rows(3, &buf, hidden, &mut items, &mut rows) {
                Ok(()) => {
                    let n = buf.len() / (4 + 4 * hidden);
                    prop_assert_eq!(buf.len() % (4 + 4 * hidden), 0);
                    prop_assert_eq!(items.len(), n);
                    prop_assert_eq!(rows.len(), n * hidden);
                    for (i, &(src, e)) in items.iter().enumerate() {
                        prop_assert_eq!(src, 3);
                        let at = i * (4 + 4 * hidden);
                        prop_assert_eq!(e as u32, u32::from_le_bytes(buf[at..at + 4].try_into().unwrap()));
                    }
                }
                Err(CommError::Malformed { peer, .. }) => prop_assert_eq!(peer, 3),
                Err(e) => prop_assert!(false, "unexpected {e}"),
            }
        }

        /// Results of the wrong size are refused; the right size lands in the pairs' rows.
        #[test]
        fn fuzz_result_rows(
            buf in prop::collection::vec(any::<u8>(), 0..400),
            hidden in 1usize..8,
            pairs in prop::collection::vec(0usize..6, 0..6),
        ) {
            let mut slots = vec![0.0f32; 6 * hidden];
            let ok = decode_results(1, &buf, hidden, &pairs, &mut slots).is_ok();
            prop_assert_eq!(ok, buf.len() == pairs.len() * hidden * 4);
        }
    }
}
