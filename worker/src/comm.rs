//! The expert-parallel all-to-all: every rank hands one byte buffer to every rank (itself
//! included) and receives one from each, in rank order.
//!
//! A closed set of transports behind one enum: `Local` (ranks are threads of one process;
//! tests), `Tcp` (a full mesh of TCP streams between processes, the CPU default) and `Nccl`
//! (GPUs; feature `cuda`, [`crate::nccl`]). Invariants: every rank
//! joins every exchange, even with nothing to send (empty buffers), and exchanges complete in
//! the same order on all ranks (lockstep), so buffer `i` of exchange `n` always comes from
//! rank `i`'s exchange `n`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum CommError {
    #[error("all-to-all: expected {expected} buffers (one per rank), got {got}")]
    Arity { expected: usize, got: usize },
    #[error("all-to-all: peers did not all arrive within {0:?} (a rank stopped answering)")]
    Timeout(Duration),
    #[error("all-to-all: peer {peer} did not answer in time")]
    PeerTimeout { peer: usize },
    #[error("all-to-all: connection to peer {peer}: {detail}")]
    Io { peer: usize, detail: String },
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

/// One rank of a TCP mesh: a stream to every other rank, messages framed by a u64 length.
pub struct TcpComm {
    rank: usize,
    world: usize,
    /// `peers[r]` is the connection to rank `r` (`None` for this rank).
    peers: Vec<Option<Peer>>,
}

/// Separate handles for reading and writing one connection, so a reader never waits for a
/// writer's lock (which could deadlock two ranks sending to each other).
struct Peer {
    read: Mutex<TcpStream>,
    write: Mutex<TcpStream>,
    /// A third handle, never locked, to shut the connection down under a blocked reader.
    ctl: TcpStream,
}

fn io_err(peer: usize, e: std::io::Error) -> CommError {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            CommError::PeerTimeout { peer }
        }
        _ => CommError::Io {
            peer,
            detail: e.to_string(),
        },
    }
}

/// Longest a connecting peer may take to present its rank and the epoch's secret; a silent
/// or slow connection is dropped after this without holding up anyone else's.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

/// Whether two byte strings are equal, in time independent of where they differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Reads a connecting peer's handshake (u32 rank, then the epoch's secret) within
/// [`HANDSHAKE_TIMEOUT`]; the rank if it presents the right secret.
fn read_handshake(s: &mut TcpStream, secret: &[u8]) -> Result<usize, String> {
    s.set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut id = [0u8; 4];
    s.read_exact(&mut id)
        .map_err(|e| format!("no rank id: {e}"))?;
    let mut presented = vec![0u8; secret.len()];
    s.read_exact(&mut presented)
        .map_err(|e| format!("no secret: {e}"))?;
    if !same_secret(&presented, secret) {
        return Err("wrong epoch secret".into());
    }
    Ok(u32::from_le_bytes(id) as usize)
}

impl TcpComm {
    /// Joins the mesh: connects to every lower rank at `addrs[r]` (retrying until `timeout`)
    /// and accepts every higher rank on `listener`. Each connection starts with the
    /// connecting rank's id and the epoch's `secret` (handed out in the Placement): a
    /// connection that presents a wrong one, or stays silent past [`HANDSHAKE_TIMEOUT`], is
    /// dropped, and joining goes on. Handshakes are read on their own threads, so no
    /// connection can hold up the accept loop. Reads and writes give up after `timeout`.
    pub fn join(
        rank: usize,
        addrs: &[SocketAddr],
        listener: TcpListener,
        timeout: Duration,
        secret: &[u8],
    ) -> Result<Self, CommError> {
        let world = addrs.len();
        if rank >= world {
            return Err(CommError::Malformed {
                peer: rank,
                detail: format!("rank {rank} outside a world of {world}"),
            });
        }
        let mut peers: Vec<Option<Mutex<TcpStream>>> = (0..world).map(|_| None).collect();
        let deadline = Instant::now() + timeout;
        for (r, addr) in addrs.iter().enumerate().take(rank) {
            let stream = loop {
                match TcpStream::connect_timeout(addr, Duration::from_millis(500)) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() < deadline => {
                        let _ = e;
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(io_err(r, e)),
                }
            };
            let mut stream = stream;
            let mut hello = (rank as u32).to_le_bytes().to_vec();
            hello.extend_from_slice(secret);
            stream.write_all(&hello).map_err(|e| io_err(r, e))?;
            peers[r] = Some(Mutex::new(stream));
        }
        listener
            .set_nonblocking(true)
            .map_err(|e| io_err(rank, e))?;
        let (tx, rx) = std::sync::mpsc::channel::<(usize, TcpStream)>();
        let mut pending = world - rank - 1;
        while pending > 0 {
            while let Ok((r, s)) = rx.try_recv() {
                if r <= rank || r >= world || peers[r].is_some() {
                    tracing::warn!(
                        rank,
                        peer = r,
                        "mesh: dropping a connection claiming an unexpected rank"
                    );
                    continue;
                }
                peers[r] = Some(Mutex::new(s));
                pending -= 1;
            }
            if pending == 0 {
                break;
            }
            match listener.accept() {
                Ok((mut s, from)) => {
                    s.set_nonblocking(false).map_err(|e| io_err(rank, e))?;
                    let (tx, secret) = (tx.clone(), secret.to_vec());
                    std::thread::spawn(move || match read_handshake(&mut s, &secret) {
                        Ok(r) => {
                            let _ = tx.send((r, s));
                        }
                        Err(why) => {
                            tracing::warn!(%from, %why, "mesh: dropping an unauthenticated connection")
                        }
                    });
                }
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => return Err(io_err(rank, e)),
            }
        }
        let mut mesh = Vec::with_capacity(world);
        for (r, s) in peers.into_iter().enumerate() {
            mesh.push(match s {
                None => None,
                Some(s) => {
                    let s = s.into_inner().unwrap_or_else(|e| e.into_inner());
                    s.set_nodelay(true).map_err(|e| io_err(r, e))?;
                    s.set_read_timeout(Some(timeout))
                        .map_err(|e| io_err(r, e))?;
                    s.set_write_timeout(Some(timeout))
                        .map_err(|e| io_err(r, e))?;
                    let w = s.try_clone().map_err(|e| io_err(r, e))?;
                    let ctl = s.try_clone().map_err(|e| io_err(r, e))?;
                    Some(Peer {
                        read: Mutex::new(s),
                        write: Mutex::new(w),
                        ctl,
                    })
                }
            });
        }
        Ok(TcpComm {
            rank,
            world,
            peers: mesh,
        })
    }

    /// Shuts every connection down: exchanges in progress or to come fail at once (with an
    /// I/O error) instead of waiting for their timeout. Used when an epoch ends.
    pub fn abort(&self) {
        for p in self.peers.iter().flatten() {
            let _ = p.ctl.shutdown(std::net::Shutdown::Both);
        }
    }

    /// A whole mesh of `world` ranks on loopback ports, joined from threads of this process
    /// (tests, and local clusters that want the TCP path).
    pub fn loopback_mesh(world: usize, timeout: Duration) -> Result<Vec<TcpComm>, CommError> {
        Self::loopback_mesh_with(world, timeout, b"loopback")
    }

    /// [`loopback_mesh`](Self::loopback_mesh) with the epoch secret `secret`.
    pub fn loopback_mesh_with(
        world: usize,
        timeout: Duration,
        secret: &[u8],
    ) -> Result<Vec<TcpComm>, CommError> {
        let listeners = (0..world)
            .map(|r| TcpListener::bind("127.0.0.1:0").map_err(|e| io_err(r, e)))
            .collect::<Result<Vec<_>, _>>()?;
        let addrs = listeners
            .iter()
            .enumerate()
            .map(|(r, l)| l.local_addr().map_err(|e| io_err(r, e)))
            .collect::<Result<Vec<_>, _>>()?;
        let joins: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(r, l)| {
                let (addrs, secret) = (addrs.clone(), secret.to_vec());
                std::thread::spawn(move || TcpComm::join(r, &addrs, l, timeout, &secret))
            })
            .collect();
        joins
            .into_iter()
            .map(|h| h.join().expect("join thread"))
            .collect()
    }

    fn all_to_all(&self, mut send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, CommError> {
        if send.len() != self.world {
            return Err(CommError::Arity {
                expected: self.world,
                got: send.len(),
            });
        }
        let own = std::mem::take(&mut send[self.rank]);
        // Writers run beside the reader so two ranks sending large buffers to each other
        // cannot both block on full socket buffers.
        std::thread::scope(|sc| {
            let writers: Vec<_> = send
                .iter()
                .enumerate()
                .filter(|(r, _)| *r != self.rank)
                .map(|(r, buf)| {
                    let peer = self.peers[r].as_ref().expect("mesh is complete");
                    sc.spawn(move || {
                        let mut s = peer.write.lock().unwrap_or_else(|e| e.into_inner());
                        write_frame(&mut *s, r, buf)
                    })
                })
                .collect();
            let mut recv = Vec::with_capacity(self.world);
            let mut first_err = None;
            for r in 0..self.world {
                if r == self.rank {
                    recv.push(Vec::new());
                    continue;
                }
                match self.read_frame(r) {
                    Ok(b) => recv.push(b),
                    Err(e) => {
                        first_err.get_or_insert(e);
                        recv.push(Vec::new());
                    }
                }
            }
            for w in writers {
                if let Err(e) = w.join().expect("writer thread") {
                    first_err.get_or_insert(e);
                }
            }
            if let Some(e) = first_err {
                return Err(e);
            }
            recv[self.rank] = own;
            Ok(recv)
        })
    }

    fn read_frame(&self, r: usize) -> Result<Vec<u8>, CommError> {
        let peer = self.peers[r].as_ref().expect("mesh is complete");
        let mut s = peer.read.lock().unwrap_or_else(|e| e.into_inner());
        read_frame(&mut *s, r, MAX_FRAME)
    }
}

/// Largest accepted frame (a step's tokens for one peer): 1 GiB.
pub const MAX_FRAME: usize = 1 << 30;

/// Reads one frame (a u64 little-endian length, then that many bytes) from peer `peer`. A
/// length over `max` is refused before anything is allocated; a short read is an error. Pure
/// over any reader, so any bytes a peer sends end in a frame or an error, never a panic or an
/// allocation it chose.
pub fn read_frame(r: &mut impl Read, peer: usize, max: usize) -> Result<Vec<u8>, CommError> {
    let mut len = [0u8; 8];
    r.read_exact(&mut len).map_err(|e| io_err(peer, e))?;
    let n = u64::from_le_bytes(len);
    if n > max as u64 {
        return Err(CommError::Malformed {
            peer,
            detail: format!("frame of {n} bytes exceeds {max}"),
        });
    }
    let mut buf = vec![0u8; n as usize];
    r.read_exact(&mut buf).map_err(|e| io_err(peer, e))?;
    Ok(buf)
}

/// Writes one frame as [`read_frame`] reads it.
pub fn write_frame(w: &mut impl Write, peer: usize, buf: &[u8]) -> Result<(), CommError> {
    w.write_all(&(buf.len() as u64).to_le_bytes())
        .and_then(|()| w.write_all(buf))
        .map_err(|e| io_err(peer, e))
}

/// An all-to-all transport.
#[derive(Clone)]
pub enum Comm {
    Local(LocalComm),
    Tcp(Arc<TcpComm>),
    /// NCCL between GPUs (feature `cuda`).
    #[cfg(feature = "cuda")]
    Nccl(Arc<crate::nccl::NcclComm>),
}

impl Comm {
    pub fn rank(&self) -> usize {
        match self {
            Comm::Local(c) => c.rank,
            Comm::Tcp(c) => c.rank,
            #[cfg(feature = "cuda")]
            Comm::Nccl(c) => c.rank(),
        }
    }

    pub fn world(&self) -> usize {
        match self {
            Comm::Local(c) => c.hub.world,
            Comm::Tcp(c) => c.world,
            #[cfg(feature = "cuda")]
            Comm::Nccl(c) => c.world(),
        }
    }

    /// Sends `send[r]` to rank `r`; returns the buffer each rank sent here, by rank.
    pub fn all_to_all(&self, send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, CommError> {
        match self {
            Comm::Local(c) => c.all_to_all(send),
            Comm::Tcp(c) => c.all_to_all(send),
            #[cfg(feature = "cuda")]
            Comm::Nccl(c) => c.all_to_all(send),
        }
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::fuzz_cases()))]

        /// Any byte stream from a peer reads as one frame of the length it announces (within
        /// the cap) or an error; never a panic, never an allocation over the cap.
        #[test]
        fn fuzz_mesh_frames(bytes in prop::collection::vec(any::<u8>(), 0..64), max in 0usize..40) {
            let mut r = std::io::Cursor::new(bytes.clone());
            match read_frame(&mut r, 2, max) {
                Ok(f) => {
                    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
                    prop_assert!(n as usize <= max);
                    prop_assert_eq!(&f[..], &bytes[8..8 + n as usize]);
                }
                Err(CommError::Malformed { peer, .. }) | Err(CommError::Io { peer, .. }) => {
                    prop_assert_eq!(peer, 2)
                }
                Err(e) => prop_assert!(false, "unexpected {e}"),
            }
        }

        /// What write_frame writes, read_frame reads back, frame after frame.
        #[test]
        fn fuzz_frames_round_trip(frames in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..32), 0..6)) {
            let mut wire = Vec::new();
            for f in &frames {
                write_frame(&mut wire, 0, f).unwrap();
            }
            let mut r = std::io::Cursor::new(wire);
            for f in &frames {
                prop_assert_eq!(&read_frame(&mut r, 0, 32).unwrap(), f);
            }
            prop_assert!(read_frame(&mut r, 0, 32).is_err());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Intruders at rank 0's mesh port while the mesh forms: one silent, one claiming rank 1
    /// without the epoch's secret, one with garbage. The real ranks still join, in well under
    /// the handshake timeout times the intruders, and exchange intact buffers.
    #[test]
    fn intruders_cannot_join_or_stall_the_mesh() {
        let listeners: Vec<TcpListener> = (0..2)
            .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        let silent = TcpStream::connect(addrs[0]).unwrap();
        let mut forger = TcpStream::connect(addrs[0]).unwrap();
        let mut hello = 1u32.to_le_bytes().to_vec();
        hello.extend_from_slice(&[0u8; 32]);
        forger.write_all(&hello).unwrap();
        let mut garbage = TcpStream::connect(addrs[0]).unwrap();
        garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let secret = [7u8; 32];
        let t0 = Instant::now();
        let joins: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(r, l)| {
                let addrs = addrs.clone();
                std::thread::spawn(move || {
                    TcpComm::join(r, &addrs, l, Duration::from_secs(20), &secret)
                })
            })
            .collect();
        let comms: Vec<Comm> = joins
            .into_iter()
            .map(|h| Comm::Tcp(Arc::new(h.join().unwrap().unwrap())))
            .collect();
        assert!(
            t0.elapsed() < HANDSHAKE_TIMEOUT,
            "an intruder held up the join: {:?}",
            t0.elapsed()
        );
        let out: Vec<_> = comms
            .iter()
            .enumerate()
            .map(|(r, c)| {
                let c = c.clone();
                std::thread::spawn(move || {
                    c.all_to_all(vec![vec![r as u8; 3], vec![r as u8 + 10; 2]])
                })
            })
            .collect();
        let got: Vec<Vec<Vec<u8>>> = out
            .into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect();
        assert_eq!(got[0], vec![vec![0; 3], vec![1; 3]]);
        assert_eq!(got[1], vec![vec![10; 2], vec![11; 2]]);
        drop((silent, forger, garbage));
    }

    fn tcp_group(world: usize) -> Vec<Comm> {
        TcpComm::loopback_mesh(world, Duration::from_secs(10))
            .unwrap()
            .into_iter()
            .map(|c| Comm::Tcp(Arc::new(c)))
            .collect()
    }

    #[test]
    fn tcp_mesh_exchanges_like_local() {
        exchange_rounds(tcp_group(3));
    }

    #[test]
    fn tcp_large_buffers_both_ways_do_not_deadlock() {
        let hs: Vec<_> = tcp_group(2)
            .into_iter()
            .map(|c| {
                std::thread::spawn(move || {
                    let big = vec![c.rank() as u8; 8 << 20];
                    let recv = c.all_to_all(vec![big.clone(), big]).unwrap();
                    assert_eq!(recv[1 - c.rank()].len(), 8 << 20);
                    assert!(recv[1 - c.rank()]
                        .iter()
                        .all(|b| *b == (1 - c.rank()) as u8));
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
    }

    #[test]
    fn every_rank_gets_each_peers_buffer_in_rank_order_across_rounds() {
        exchange_rounds(LocalComm::group(4).into_iter().map(Comm::Local).collect());
    }

    fn exchange_rounds(comms: Vec<Comm>) {
        let world = comms.len();
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                std::thread::spawn(move || {
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
