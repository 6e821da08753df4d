//! Switchyard coordinator library: the text pipeline, request validation and generation, the
//! benchmark, and the `switchyard` command line.

pub mod admin;
pub mod api;
pub mod auth;
pub mod bench;
pub mod chaos;
pub mod cli;
pub mod constrain;
pub mod driver;
pub mod generate;
pub mod http;
pub mod local;
pub mod metrics;
pub mod pacer;
pub mod placement;
pub mod rebalance;
pub mod recovery;
pub mod remote;
pub mod scheduler;
pub mod serve;
pub mod server;
pub mod telemetry;
pub mod text;

/// Cases per fuzz property (decoders of outside bytes): `PROPTEST_CASES`, or 2000.
#[cfg(test)]
pub(crate) fn fuzz_cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

/// Errors of a generation request.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("invalid argument: {field}: {detail}")]
    InvalidArgument { field: &'static str, detail: String },
    #[error(transparent)]
    Text(#[from] text::TextError),
    #[error(transparent)]
    Worker(#[from] switchyard_worker::WorkerError),
}
