//! Switchyard's engine: model configuration and families, checkpoint loading, the forward
//! pass, the paged KV cache and the engine that runs steps over them. No tonic, tokio or etcd:
//! the cluster runtime (membership, Control server, executor, TLS) is `switchyard-runtime`.
//!
//! - [`config`]: parses a Hugging Face `config.json` into a validated [`config::ModelConfig`].
//! - [`weights`]: memory-mapped safetensors (single file or sharded with an index); a tensor is
//!   only read when a rank asks for it.
//! - [`family`]: one module per model family (config fields, tensor names, which shared
//!   pieces its layers use) and the registry from `architectures` to it.
//! - [`layers`]: the shared pieces (attention variants including MLA, routers, shared experts).
//! - [`model`]: the decoder forward pass every family shares, over a batch of sequence chunks.
//! - [`experts`]: the expert weights a rank holds and the [`experts::ExpertExec`] interface
//!   through which the model reaches experts, local or remote.
//! - [`comm`]: the all-to-all between ranks; [`ep`]: expert parallelism over it.
//! - [`kv`]: the paged KV cache and its block allocator.
//! - [`engine`]: sequences, block tables and steps on one worker.
//! - [`gguf`]: GGUF files (llama.cpp's format): the reader, its block formats'
//!   dequantization and the import into a Hugging Face folder, with upcycling of dense models.
//! - [`presets`]: random-initialised checkpoints for demos and benchmarks.

pub mod blocks;
pub mod comm;
pub mod config;
pub mod context;
pub mod engine;
pub mod ep;
pub mod experts;
pub mod family;
pub mod gguf;
pub mod kv;
pub mod layers;
pub mod model;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod presets;
pub mod weights;

pub use config::{Arch, ModelConfig};

/// Cases per fuzz property (decoders of outside bytes): `PROPTEST_CASES`, or 2000. A longer
/// run: `PROPTEST_CASES=200000 cargo test --release -p switchyard-worker fuzz_`.
#[cfg(test)]
pub(crate) fn fuzz_cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}
pub use engine::{ChunkSpec, Device, Engine, EngineOptions, Logits};
pub use model::Model;
pub use weights::{Checkpoint, WeightDType};

/// Errors of the worker library.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Load(#[from] weights::LoadError),
    #[error("kernel setup: {0}")]
    Kernel(#[from] switchyard_kernels::KernelError),
    #[error("sequence {seq_id}: {detail}")]
    Sequence { seq_id: u64, detail: String },
    #[error("context length exceeded: sequence {seq_id} needs {needed} positions, the model allows {max}")]
    ContextExceeded {
        seq_id: u64,
        needed: usize,
        max: usize,
    },
    #[error("token id {token} is outside the vocabulary (size {vocab})")]
    TokenOutOfRange { token: u32, vocab: usize },
    #[error("KV cache exhausted: {needed} blocks needed, {free} free")]
    KvExhausted { needed: usize, free: usize },
    #[error("expert {expert} of layer {layer} is not held by any shard")]
    ExpertMissing { layer: usize, expert: usize },
    #[error("placement: {0}")]
    Placement(String),
    #[error("expert all-to-all: {0}")]
    Comm(String),
    #[error("device: {0}")]
    Device(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}
