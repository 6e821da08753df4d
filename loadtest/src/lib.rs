//! switchyard-loadtest: capacity testing for Switchyard clusters.
//!
//! - [`workload`] (pure): seeded workloads — length distributions, load shapes (concurrency,
//!   constant rate, Poisson, bursts, stepped ramps, trace replay), shared prefixes, chat,
//!   planned hang-ups.
//! - [`client`] (async shell): drives the gRPC `Generate` stream, one task per request over a
//!   few HTTP/2 connections, and records each request ([`metrics::Record`]).
//! - [`metrics`] (pure): the definitions and the summary (exact percentiles), SLOs, thresholds.
//! - [`report`] (pure): the self-contained HTML report.
//! - [`cli`]: `run`, `sweep`, `compare`, `serve-echo`.
//! - [`echo`]: a trivial endpoint to measure the tool's own headroom.
//!
//! Exit codes: 0 success; 2 bad arguments or a failed run; 3 a `--fail-if` threshold breached.

pub mod cli;
pub mod client;
pub mod echo;
pub mod metrics;
pub mod report;
pub mod rng;
pub mod workload;
