//! The expert-parallel all-to-all: every rank hands one byte buffer to every rank (itself
//! included) and receives one from each, in rank order.
//!
//! A closed set of transports behind one enum: `Local` (ranks are threads of one process;
//! tests and single-host runs) today, the TCP mesh and NCCL next. Invariants: every rank
//! joins every exchange, even with nothing to send (empty buffers), and exchanges complete in
//! the same order on all ranks (lockstep), so buffer `i` of exchange `n` always comes from
//! rank `i`'s exchange `n`.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum CommError {
    #[error("all-to-all: expected {expected} buffers (one per rank), got {got}")]
    Arity { expected: usize, got: usize },
    #[error("all-to-all: peers did not all arrive within {0:?} (a rank stopped answering)")]
    Timeout(Duration),
    #[error("all-to-all: peer {peer} sent a malformed message: {detail}")]
    Malformed { peer: usize, detail: String },
}

/// A reusable barrier whose wait gives up after a timeout instead of blocking forever.
struct TimedBarrier {
    n: usize,
    state: Mutex<(usize, u64)>, // (arrived, generation)
    cv: Condvar,
}

impl TimedBarrier {
    fn wait(&self, timeout: Duration) -> Result<(), CommError> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let gen = st.1;
        st.0 += 1;
        if st.0 == self.n {
            *st = (0, gen + 1);
            self.cv.notify_all();
            return Ok(());
        }
        let deadline = Instant::now() + timeout;
        while st.1 == gen {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                // Withdraw, so a late peer does not count this rank as arrived.
                st.0 -= 1;
                return Err(CommError::Timeout(timeout));
            }
            st = self
                .cv
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }
}

/// Shared mailboxes of an in-process group.
struct Hub {
    world: usize,
    /// `boxes[dst][src]`
    boxes: Mutex<Vec<Vec<Option<Vec<u8>>>>>,
    barrier: TimedBarrier,
    timeout: Duration,
}

/// One rank of an in-process group.
#[derive(Clone)]
pub struct LocalComm {
    rank: usize,
    hub: Arc<Hub>,
}

impl LocalComm {
    /// Endpoints for ranks `0..world`, to hand one to each rank's thread; an exchange that
    /// waits longer than 60 s for a peer fails with [`CommError::Timeout`].
    pub fn group(world: usize) -> Vec<LocalComm> {
        Self::group_with_timeout(world, Duration::from_secs(60))
    }

    pub fn group_with_timeout(world: usize, timeout: Duration) -> Vec<LocalComm> {
        let hub = Arc::new(Hub {
            world,
            boxes: Mutex::new(vec![vec![None; world]; world]),
            barrier: TimedBarrier {
                n: world,
                state: Mutex::new((0, 0)),
                cv: Condvar::new(),
            },
            timeout,
        });
        (0..world)
            .map(|rank| LocalComm {
                rank,
                hub: hub.clone(),
            })
            .collect()
    }

    fn all_to_all(&self, send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, CommError> {
        let w = self.hub.world;
        if send.len() != w {
            return Err(CommError::Arity {
                expected: w,
                got: send.len(),
            });
        }
        {
            let mut boxes = self.hub.boxes.lock().unwrap_or_else(|e| e.into_inner());
            for (dst, buf) in send.into_iter().enumerate() {
                boxes[dst][self.rank] = Some(buf);
            }
        }
        self.hub.barrier.wait(self.hub.timeout)?;
        let recv = {
            let mut boxes = self.hub.boxes.lock().unwrap_or_else(|e| e.into_inner());
            boxes[self.rank]
                .iter_mut()
                .map(|b| b.take().unwrap_or_default())
                .collect()
        };
        // Nobody may post the next exchange before everyone has collected this one.
        self.hub.barrier.wait(self.hub.timeout)?;
        Ok(recv)
    }
}

/// An all-to-all transport.
#[derive(Clone)]
pub enum Comm {
    Local(LocalComm),
}

impl Comm {
    pub fn rank(&self) -> usize {
        match self {
            Comm::Local(c) => c.rank,
        }
    }

    pub fn world(&self) -> usize {
        match self {
            Comm::Local(c) => c.hub.world,
        }
    }

    /// Sends `send[r]` to rank `r`; returns the buffer each rank sent here, by rank.
    pub fn all_to_all(&self, send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, CommError> {
        match self {
            Comm::Local(c) => c.all_to_all(send),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rank_gets_each_peers_buffer_in_rank_order_across_rounds() {
        let world = 4;
        let handles: Vec<_> = LocalComm::group(world)
            .into_iter()
            .map(|c| {
                std::thread::spawn(move || {
                    let comm = Comm::Local(c);
                    let me = comm.rank();
                    for round in 0..50u8 {
                        // Rank 2 sends nothing on odd rounds: it still joins.
                        let send = (0..world)
                            .map(|dst| {
                                if me == 2 && round % 2 == 1 {
                                    vec![]
                                } else {
                                    vec![me as u8, dst as u8, round]
                                }
                            })
                            .collect();
                        let recv = comm.all_to_all(send).unwrap();
                        for (src, buf) in recv.iter().enumerate() {
                            if src == 2 && round % 2 == 1 {
                                assert!(buf.is_empty());
                            } else {
                                assert_eq!(buf, &vec![src as u8, me as u8, round]);
                            }
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    }

    #[test]
    fn a_missing_peer_times_out_instead_of_hanging() {
        let mut g = LocalComm::group_with_timeout(2, Duration::from_millis(100));
        let _silent = g.pop().unwrap();
        let c = Comm::Local(g.pop().unwrap());
        let t = Instant::now();
        assert!(matches!(
            c.all_to_all(vec![vec![1], vec![2]]),
            Err(CommError::Timeout(_))
        ));
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn wrong_arity_is_an_error() {
        let c = Comm::Local(LocalComm::group(1).remove(0));
        assert!(matches!(
            c.all_to_all(vec![]),
            Err(CommError::Arity {
                expected: 1,
                got: 0
            })
        ));
        assert_eq!(c.all_to_all(vec![vec![7]]).unwrap(), vec![vec![7]]);
    }
}
