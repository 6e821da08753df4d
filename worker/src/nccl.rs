//! The NCCL all-to-all (feature `cuda`): the same contract as the other transports in
//! [`crate::comm`] (one buffer to and from every rank, in rank order, every rank joining every
//! exchange), over NCCL point-to-point calls on the GPU.
//!
//! An exchange is two grouped rounds: every rank first sends each peer the length of what it
//! will send (one `u64`), then the payloads, received straight into one device buffer laid out
//! by those lengths. Zero-length payloads are skipped on both sides (both know the lengths).
//!
//! Bootstrap: NCCL needs every rank to hold the same unique id. Rank 0 makes a fresh one at
//! each epoch and hands it to the others over the epoch's TCP mesh ([`NcclComm::over`]), the
//! channel the coordinator already set up for that epoch; ids are never reused across epochs.

use crate::comm::{Comm, CommError};
use std::sync::{Arc, Mutex};
use switchyard_kernels::cuda::cudarc::nccl::{result as nccl, Comm as RawComm, Id};
use switchyard_kernels::cuda::Gpu;

/// One rank of an NCCL communicator.
pub struct NcclComm {
    comm: Mutex<RawComm>,
    gpu: Arc<Gpu>,
    rank: usize,
    world: usize,
}

// SAFETY: the raw communicator is only used under the mutex, one exchange at a time, on the
// stream it was created with.
unsafe impl Send for NcclComm {}
unsafe impl Sync for NcclComm {}

fn nccl_err(e: impl std::fmt::Debug) -> CommError {
    CommError::Io {
        peer: usize::MAX,
        detail: format!("NCCL: {e:?}"),
    }
}

fn dev_err(e: impl std::fmt::Display) -> CommError {
    CommError::Io {
        peer: usize::MAX,
        detail: format!("CUDA: {e}"),
    }
}

impl NcclComm {
    /// A fresh NCCL unique id, as bytes.
    pub fn unique_id() -> Result<Vec<u8>, CommError> {
        let id = Id::new().map_err(nccl_err)?;
        Ok(id.internal().iter().map(|c| *c as u8).collect())
    }

    /// Joins the communicator `id` as `rank` of `world` on GPU `ordinal` (blocks until every
    /// rank has joined).
    pub fn new(ordinal: usize, rank: usize, world: usize, id: &[u8]) -> Result<Self, CommError> {
        let bytes: [u8; 128] = id.try_into().map_err(|_| CommError::Malformed {
            peer: 0,
            detail: format!("NCCL id of {} bytes, expected 128", id.len()),
        })?;
        let gpu = Gpu::get(ordinal).map_err(dev_err)?;
        let id = Id::uninit(bytes.map(|b| b as std::ffi::c_char));
        let comm = RawComm::from_rank(gpu.stream.clone(), rank, world, id).map_err(nccl_err)?;
        Ok(NcclComm {
            comm: Mutex::new(comm),
            gpu,
            rank,
            world,
        })
    }

    /// Bootstraps over `mesh` (this epoch's TCP mesh): rank 0 makes the id and sends it to
    /// every rank; all join on GPU `ordinal`.
    pub fn over(mesh: &Comm, ordinal: usize) -> Result<Self, CommError> {
        let (rank, world) = (mesh.rank(), mesh.world());
        let send = if rank == 0 {
            vec![Self::unique_id()?; world]
        } else {
            vec![Vec::new(); world]
        };
        let got = mesh.all_to_all(send)?;
        Self::new(ordinal, rank, world, &got[0])
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    /// Sends `send[r]` to rank `r`; returns the buffer each rank sent here, by rank.
    pub fn all_to_all(&self, send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, CommError> {
        let w = self.world;
        if send.len() != w {
            return Err(CommError::Arity {
                expected: w,
                got: send.len(),
            });
        }
        let g = &*self.gpu;
        let comm = self.comm.lock().unwrap_or_else(|e| e.into_inner());
        // Round 1: lengths.
        let lens: Vec<u64> = send.iter().map(|b| b.len() as u64).collect();
        let dlens = g.upload(&lens).map_err(dev_err)?;
        let mut rlens = g.zeros::<u64>(w).map_err(dev_err)?;
        nccl::group_start().map_err(nccl_err)?;
        for r in 0..w {
            comm.send(&dlens.slice(r..r + 1), r as i32)
                .map_err(nccl_err)?;
            comm.recv(&mut rlens.slice_mut(r..r + 1), r as i32)
                .map_err(nccl_err)?;
        }
        nccl::group_end().map_err(nccl_err)?;
        let rl = g.download(&rlens.slice(..w)).map_err(dev_err)?;
        // Round 2: payloads.
        let flat: Vec<u8> = send.concat();
        let total_in: usize = rl.iter().map(|n| *n as usize).sum();
        let dsend = g.upload(&flat).map_err(dev_err)?;
        let mut drecv = g.zeros::<u8>(total_in).map_err(dev_err)?;
        nccl::group_start().map_err(nccl_err)?;
        let (mut so, mut ro) = (0usize, 0usize);
        for r in 0..w {
            let (ns, nr) = (send[r].len(), rl[r] as usize);
            if ns > 0 {
                comm.send(&dsend.slice(so..so + ns), r as i32)
                    .map_err(nccl_err)?;
            }
            if nr > 0 {
                comm.recv(&mut drecv.slice_mut(ro..ro + nr), r as i32)
                    .map_err(nccl_err)?;
            }
            so += ns;
            ro += nr;
        }
        nccl::group_end().map_err(nccl_err)?;
        let all = if total_in > 0 {
            g.download(&drecv.slice(..total_in)).map_err(dev_err)?
        } else {
            Vec::new()
        };
        let mut out = Vec::with_capacity(w);
        let mut o = 0;
        for n in rl {
            out.push(all[o..o + n as usize].to_vec());
            o += n as usize;
        }
        Ok(out)
    }
}
