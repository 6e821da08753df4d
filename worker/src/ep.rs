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

    fn switch(&mut self, holders: Vec<Vec<Vec<u32>>>, add: ExpertSet) -> Result<(), WorkerError> {
        let sel = ExpertSelection::of_rank(&holders, self.comm.rank() as u32);
        let local = std::mem::replace(&mut self.local, ExpertSet::empty());
        self.local = local.regroup(add, &sel)?;
        self.holders = holders;
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
        let row_bytes = 4 + 4 * hidden;
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
            if buf.len() % row_bytes != 0 {
                return Err(comm_err(CommError::Malformed {
                    peer: src,
                    detail: format!("{} bytes is not a whole number of rows", buf.len()),
                }));
            }
            for item in buf.chunks_exact(row_bytes) {
                let e = u32::from_le_bytes(item[..4].try_into().expect("4 bytes")) as usize;
                items.push((src, e));
                rows.extend(
                    item[4..]
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))),
                );
            }
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
        let outs = run_experts(&work, &rows, hidden);
        let mut result = vec![0.0f32; items.len() * hidden];
        for ((_, idx), y) in work.iter().zip(&outs) {
            for (j, &i) in idx.iter().enumerate() {
                result[i * hidden..(i + 1) * hidden]
                    .copy_from_slice(&y[j * hidden..(j + 1) * hidden]);
            }
        }
        // 4. Combine: outputs back to their sources, in the order received.
        let mut reply: Vec<Vec<u8>> = vec![Vec::new(); world];
        for (i, &(src, _)) in items.iter().enumerate() {
            for v in &result[i * hidden..(i + 1) * hidden] {
                reply[src].extend_from_slice(&v.to_le_bytes());
            }
        }
        let back = self.exchange(reply)?;
        for (dst, buf) in back.iter().enumerate() {
            if buf.len() != sent[dst].len() * hidden * 4 {
                return Err(comm_err(CommError::Malformed {
                    peer: dst,
                    detail: format!("{} result bytes for {} rows", buf.len(), sent[dst].len()),
                }));
            }
            for (row, &p) in buf.chunks_exact(hidden * 4).zip(&sent[dst]) {
                for (o, b) in slots[p * hidden..(p + 1) * hidden]
                    .iter_mut()
                    .zip(row.chunks_exact(4))
                {
                    *o = f32::from_le_bytes(b.try_into().expect("4 bytes"));
                }
            }
        }
        Ok(())
    }

    fn nbytes(&self) -> usize {
        self.local.nbytes()
    }
}
