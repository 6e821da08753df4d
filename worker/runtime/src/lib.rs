//! Switchyard's worker runtime: what turns the engine (`switchyard-worker`, which has no
//! network or async dependency) into a cluster member.
//!
//! - [`membership`]: who the workers are and which coordinator leads (in-memory or etcd:
//!   leases, watches, elections).
//! - [`server`]: the worker's `Control` gRPC server: one control stream at a time, an epoch per
//!   stream, the TCP mesh and engine built for it.
//! - [`executor`]: applies step plans to the engine and samples (a pure core under the server).
//! - [`tls`]: certificates for the control and public listeners.
//!
//! The all-to-all (`switchyard_worker::comm`: `Local`, `Tcp`, `Nccl`) and expert parallelism
//! over it stay with the engine for now: they use only `std` and the CUDA driver.

pub mod executor;
pub mod membership;
pub mod server;
pub mod tls;
