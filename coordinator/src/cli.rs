//! The `switchyard` command line. Each subcommand is a typed config (clap), validated, then a
//! call into the library; nothing here computes.

use crate::bench::{self, BenchOptions};
use crate::generate::{self, Prompt, Request};
use crate::serve::{serve, ServeOptions};
use crate::text::{Chat, Tokenizer};
use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use switchyard_kernels::sampling::SamplingParams;
use switchyard_runtime::membership::{
    with_backoff, EtcdMembership, MemberInfo, Membership, MemoryMembership, Registration,
};
use switchyard_worker::engine::{Engine, EngineOptions};
use switchyard_worker::{presets, WeightDType};

/// The tokenizer shipped with generated models (the fixture tokenizer).
pub const TOKENIZER_JSON: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/fixtures/tokenizer/tokenizer.json"
));
pub const TOKENIZER_CONFIG_JSON: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/fixtures/tokenizer/tokenizer_config.json"
));

#[derive(Parser, Debug)]
#[command(
    name = "switchyard",
    version,
    about = "Sharded inference for sparse Mixture-of-Experts models"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Export OpenTelemetry traces (OTLP/HTTP) to this collector, e.g. http://otel:4318
    /// (off by default): a span per request and per engine step, linked.
    #[arg(long, global = true, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Log lines as text (ANSI colours only on a terminal) or JSON, one object per line.
    #[arg(long, global = true, env = "SWITCHYARD_LOG_FORMAT", default_value_t)]
    pub log_format: crate::telemetry::LogFormat,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Generate once, in process, and stream the reply.
    Run(RunArgs),
    /// Write a randomly initialised checkpoint in the Hugging Face layout.
    GenModel(GenModelArgs),
    /// Import a GGUF checkpoint (llama.cpp's format: llama, Mixtral, qwen3moe, qwen2moe, olmoe)
    /// as a Hugging Face folder the cluster serves, its weights dequantized to f32 or bf16 and
    /// its tokenizer and chat template from the metadata. With --upcycle-experts a dense model
    /// becomes a Mixtral-layout MoE whose experts are copies of its MLPs.
    Import(ImportArgs),
    /// Measure prefill and decode throughput of a model on this machine.
    Bench(BenchArgs),
    /// Measure decode throughput of local clusters of 1, 2, 4... worker processes: tokens/s,
    /// all-to-all share of step time, coordinator overhead per token.
    BenchCluster(BenchClusterArgs),
    /// Measure one long prompt split over worker processes (context parallelism) against one
    /// worker at the longest prompt its KV holds: prefill tokens/s, decode inter-token
    /// latency, KV bytes per token.
    BenchLong(BenchLongArgs),
    /// Measure a skewed workload on local workers before and after a live expert
    /// re-placement: expert load balance, decode tokens/s, and the switch's cost.
    BenchRebalance(BenchRebalanceArgs),
    /// Kill and restart random workers under steady load: requests lost (must be 0), and the
    /// latency cost of each recovery.
    BenchChaos(BenchChaosArgs),
    /// The cost of constrained decoding on a vocabulary: the token trie, compiling a grammar,
    /// and each step's mask (p50/p90/p99), walking the grammar as a sampler would.
    BenchGrammar(BenchGrammarArgs),
    /// Serve as a cluster worker: the control stream on --listen, the expert all-to-all on
    /// --comm-listen. Prints `worker ready grpc=URL comm=ADDR` once listening.
    Worker(WorkerArgs),
    /// Start a local cluster: K worker processes and the coordinator's gRPC API. Prints
    /// `serving grpc=URL` once ready; serves until stopped.
    Up(UpArgs),
    /// Serve as the coordinator of workers found in etcd (or given by --worker-url). Prints
    /// `serving grpc=URL` once leader and connected.
    Coordinator(CoordinatorArgs),
    /// Stream a generation from a running cluster.
    Generate(GenerateArgs),
    /// Operate a running cluster through its Admin API: status, drain a worker, rebalance.
    Admin(AdminArgs),
}

#[derive(Args, Debug)]
pub struct AdminArgs {
    /// The coordinator's Admin listener (`--admin-addr`; announced as `admin=URL`), e.g.
    /// http://127.0.0.1:50052
    #[arg(long)]
    pub endpoint: String,
    /// Admin key, when the coordinator requires one (a tenant API key is refused). Given a
    /// file's content (one key per line), the first key is used.
    #[arg(long, env = "SWITCHYARD_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<String>,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
    /// Print the reply as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(subcommand)]
    pub action: AdminAction,
}

#[derive(Subcommand, Debug)]
pub enum AdminAction {
    /// Epoch, workers, expert placement and load balance.
    Status,
    /// Move a worker's experts and sequences to the others and leave it out.
    Drain {
        /// The worker's id, as `status` lists it (a pod's preStop hook sets
        /// SWITCHYARD_WORKER_ID to its own).
        #[arg(env = "SWITCHYARD_WORKER_ID")]
        worker: String,
    },
    /// Re-place experts for the current load if that is markedly better.
    Rebalance,
}

#[derive(Args, Debug, Clone)]
pub struct ClusterArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// Worker processes (up) or registered workers to wait for (coordinator).
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Extra expert replicas per layer (hottest experts first).
    #[arg(long, default_value_t = 0)]
    pub redundant_experts: usize,
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub grpc_addr: String,
    /// KV blocks (16 positions each) per worker.
    #[arg(long, default_value_t = 1024)]
    pub kv_blocks: usize,
    /// Tokens computed per step across the cluster.
    #[arg(long, default_value_t = 512)]
    pub token_budget: usize,
    /// Requests in flight (queued or running) before new ones get RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 1024)]
    pub max_queue: usize,
    /// Prefill pacing: a step that carries decodes beside a prefill chunk takes about this many
    /// times a decode-only step (protects streaming latency during long prefills); 0 disables.
    #[arg(long, default_value_t = 2.0)]
    pub pace_factor: f64,
    /// Prefix homing: a new sequence goes to the worker of least `tokens it must compute +
    /// W · positions of the sequences homed there`, where the workers' prefix caches
    /// (reported block names) cut the first term; cached positions are fed without charge
    /// against the token budget. W weighs load against cache reuse (0: the cache alone);
    /// "off" homes by free KV blocks alone.
    #[arg(long, default_value = "0.25", value_parser = prefix_homing_weight)]
    pub prefix_homing: PrefixHoming,
    /// Context parallelism: a sequence whose KV outgrows its home worker's free blocks
    /// continues on the others (each holds a range of its positions; attention parts are
    /// merged exactly), so one request may span the cluster's KV instead of one worker's.
    #[arg(long)]
    pub context_parallel: bool,
    /// Prometheus metrics address (`GET /metrics`); port 0 picks a free port (the serving line
    /// announces it), "off" disables.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub metrics_addr: String,
    /// Live expert rebalancing: re-place experts when the busiest worker's expert load exceeds
    /// the mean worker's by this factor (moving average); "off" leaves it to `admin rebalance`.
    #[arg(long, default_value = "1.3")]
    pub rebalance_threshold: String,
    /// Steps in the expert-load moving average (and warm-up before rebalancing).
    #[arg(long, default_value_t = 32)]
    pub rebalance_window: u64,
    /// A re-placement is switched to only if it cuts the predicted imbalance by this fraction.
    #[arg(long, default_value_t = 0.1)]
    pub rebalance_min_gain: f64,
    /// OpenAI-style HTTP API (`/v1/models`, `/v1/completions`, `/v1/chat/completions`) with
    /// `/healthz`, `/readyz` and `/metrics`; port 0 picks a free port (announced), "off"
    /// disables.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub http_addr: String,
    /// Require API keys (one per line) on HTTP and gRPC; also SWITCHYARD_API_KEYS
    /// (comma-separated).
    #[arg(long)]
    pub api_keys_file: Option<PathBuf>,
    /// Requests in flight per API key before RESOURCE_EXHAUSTED / HTTP 429; 0: no limit.
    #[arg(long, default_value_t = 0)]
    pub max_requests_per_key: usize,
    /// The Admin API's listener (drain, rebalance, status), apart from the public API; port 0
    /// picks a free port (announced), "off" disables. Without admin keys it must be a loopback
    /// address.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub admin_addr: String,
    /// Admin keys (one per line), required on every Admin call; tenant API keys are refused
    /// there. Also SWITCHYARD_ADMIN_KEYS (comma-separated).
    #[arg(long)]
    pub admin_keys_file: Option<PathBuf>,
    #[command(flatten)]
    pub tls: ServerTlsArgs,
    /// CA that signed the workers' Control certificates (workers advertised as https://).
    #[arg(long, env = "SWITCHYARD_WORKER_TLS_CA")]
    pub worker_tls_ca: Option<PathBuf>,
    /// This coordinator's client certificate and key for workers that require mutual TLS.
    #[arg(long, env = "SWITCHYARD_WORKER_TLS_CERT", requires = "worker_tls_key")]
    pub worker_tls_cert: Option<PathBuf>,
    #[arg(long, env = "SWITCHYARD_WORKER_TLS_KEY", requires = "worker_tls_cert")]
    pub worker_tls_key: Option<PathBuf>,
    /// Seconds a step may wait for a silent worker before the cluster is rebuilt without it.
    #[arg(long, default_value_t = 30)]
    pub step_timeout: u64,
    /// Seconds a request taken over from a lost leader keeps running without a client: its
    /// client has that long to call Resume (`switchyard generate` does so by itself).
    #[arg(long, default_value_t = 30)]
    pub resume_grace: u64,
    /// Longest context a request may span (prompt + max_tokens), as vLLM's option; default:
    /// the model's context or what one sequence's KV may take (one worker's cache, or every
    /// worker's with --context-parallel), whichever is smaller. A value the KV cannot hold
    /// refuses to start.
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// How the model writes tool calls, as vLLM's option names them (hermes, mistral,
    /// deepseek_v3, deepseek_v31, kimi_k2, openai); default: from the vocabulary's markers,
    /// else the architecture.
    #[arg(long, value_parser = parse_tool_format)]
    pub tool_call_parser: Option<crate::text::tools::ToolFormat>,
    /// Fault injection for supervision tests: the engine loop panics after N steps.
    #[arg(long, hide = true)]
    pub fault_panic_after_steps: Option<u64>,
    #[command(flatten)]
    pub membership: MembershipArgs,
}

/// TLS on a listener: its certificate and key (PEM), and optionally the CA whose client
/// certificates it requires (mutual TLS).
#[derive(Args, Debug, Clone, Default)]
pub struct ServerTlsArgs {
    /// Certificate chain (PEM) of the public gRPC, HTTP and Admin listeners (a worker: of its
    /// Control listener); with --tls-key turns TLS on.
    #[arg(long, env = "SWITCHYARD_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, env = "SWITCHYARD_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (mutual TLS).
    #[arg(long, env = "SWITCHYARD_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
}

impl ServerTlsArgs {
    fn load(&self) -> Result<Option<switchyard_runtime::tls::ServerTls>> {
        Ok(switchyard_runtime::tls::ServerTls::from_flags(
            self.tls_cert.as_deref(),
            self.tls_key.as_deref(),
            self.tls_client_ca.as_deref(),
            "--tls-cert/--tls-key",
        )?)
    }
}

/// How a client reaches a TLS listener: the CA to trust, and a client identity for mutual TLS.
#[derive(Args, Debug, Clone, Default)]
pub struct ClientTlsArgs {
    /// CA (PEM) that signed the server's certificate; needed for https:// endpoints.
    #[arg(long, env = "SWITCHYARD_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate and key (PEM), for servers that require them.
    #[arg(long, requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    #[arg(long, requires = "client_cert")]
    pub client_key: Option<PathBuf>,
}

impl ClientTlsArgs {
    fn load(&self) -> Result<Option<tonic::transport::ClientTlsConfig>> {
        match &self.tls_ca {
            None if self.client_cert.is_some() => bail!("--client-cert needs --tls-ca"),
            None => Ok(None),
            Some(ca) => Ok(Some(
                switchyard_runtime::tls::ClientTls {
                    ca: ca.clone(),
                    cert: self.client_cert.clone(),
                    key: self.client_key.clone(),
                }
                .tonic()?,
            )),
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct MembershipArgs {
    /// etcd endpoints (comma-separated) for membership and leader election; without it
    /// membership is in-memory.
    #[arg(long, env = "SWITCHYARD_ETCD")]
    pub etcd: Option<String>,
    /// Key prefix of this cluster in etcd.
    #[arg(long, default_value = "/switchyard/default")]
    pub cluster_prefix: String,
    /// Lease time-to-live in seconds: a member that stops renewing disappears after this.
    #[arg(long, default_value_t = 5)]
    pub lease_ttl: u64,
    /// etcd over TLS: the CA certificate (PEM) the servers are verified against.
    #[arg(long, env = "SWITCHYARD_ETCD_CA_FILE")]
    pub etcd_ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for etcd servers that require them.
    #[arg(long, env = "SWITCHYARD_ETCD_CERT_FILE", requires = "etcd_key_file")]
    pub etcd_cert_file: Option<PathBuf>,
    #[arg(long, env = "SWITCHYARD_ETCD_KEY_FILE", requires = "etcd_cert_file")]
    pub etcd_key_file: Option<PathBuf>,
    /// etcd username (with SWITCHYARD_ETCD_PASSWORD).
    #[arg(long, env = "SWITCHYARD_ETCD_USER")]
    pub etcd_user: Option<String>,
    #[arg(
        long,
        env = "SWITCHYARD_ETCD_PASSWORD",
        hide_env_values = true,
        requires = "etcd_user"
    )]
    pub etcd_password: Option<String>,
}

impl MembershipArgs {
    async fn connect(&self) -> Result<Option<Arc<dyn Membership>>> {
        let Some(urls) = &self.etcd else {
            return Ok(None);
        };
        let endpoints: Vec<String> = urls.split(',').map(|u| u.trim().to_string()).collect();
        let sec = switchyard_runtime::membership::EtcdSecurity {
            ca: self.etcd_ca_file.clone(),
            cert: self.etcd_cert_file.clone(),
            key: self.etcd_key_file.clone(),
            user: self
                .etcd_user
                .clone()
                .map(|u| (u, self.etcd_password.clone().unwrap_or_default())),
        };
        let m = with_backoff("connecting", || {
            EtcdMembership::connect_with(&endpoints, &self.cluster_prefix, &sec)
        })
        .await
        .with_context(|| format!("--etcd {urls}"))?;
        Ok(Some(Arc::new(m)))
    }

    fn ttl(&self) -> Result<Duration> {
        if self.lease_ttl == 0 {
            bail!("--lease-ttl must be at least 1 second");
        }
        Ok(Duration::from_secs(self.lease_ttl))
    }
}

#[derive(Args, Debug)]
pub struct UpArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Experts per MoE layer each worker has room for (0: all).
    #[arg(long, default_value_t = 0)]
    pub expert_slots: u32,
    /// Where the workers run the forward pass (cpu, cuda, cuda:N).
    #[arg(long, default_value = "cpu")]
    pub device: switchyard_worker::Device,

    /// Element type of the workers' KV cache: f32 (exact) or bf16 (half the bytes per cached
    /// position, each key and value rounded once to bf16; CPU only).
    #[arg(long, default_value = "f32")]
    pub kv_dtype: switchyard_worker::kv::KvDType,
    /// Turn the workers' automatic prefix caching off (every prompt computed in full).
    #[arg(long)]
    pub no_prefix_cache: bool,
}

#[derive(Args, Debug)]
pub struct CoordinatorArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Worker control URLs, when membership is static (no --etcd); rank follows the order.
    #[arg(long = "worker-url")]
    pub worker_urls: Vec<String>,
    /// This replica's name in the leader election (default: hostname and pid).
    #[arg(long)]
    pub id: Option<String>,
    /// Seconds to wait for --workers workers to register.
    #[arg(long, default_value_t = 300)]
    pub join_timeout: u64,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Coordinator URL, e.g. http://127.0.0.1:50051; several, comma-separated (a leader and
    /// its standbys): the first that answers serves, and a stream whose coordinator is lost
    /// resumes on the one that takes over.
    #[arg(long)]
    pub endpoint: String,
    /// API key, when the coordinator requires one.
    #[arg(long, env = "SWITCHYARD_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
    /// Seconds to keep trying to resume a stream whose coordinator was lost (0: one round
    /// over the endpoints).
    #[arg(long, default_value_t = 30)]
    pub resume_timeout: u64,
    #[command(flatten)]
    pub prompt: PromptArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Print the same JSON object as `run --json` when the stream ends.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct WorkerArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// gRPC control address (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: String,
    /// All-to-all (TCP mesh) address.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub comm_listen: String,
    /// Mesh address published to peers, HOST:PORT (default: the bound address; set it when
    /// binding 0.0.0.0, e.g. to the pod's stable DNS name).
    #[arg(long)]
    pub comm_advertise: Option<String>,
    #[arg(long)]
    pub dtype: Option<WeightDType>,
    /// Worker id (default: the control address).
    #[arg(long)]
    pub id: Option<String>,
    /// Exit when standard input closes (set by `switchyard up`, so workers never outlive it).
    #[arg(long)]
    pub exit_with_stdin: bool,
    /// Control URL published in membership (default: http://LISTEN-ADDRESS).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Experts per MoE layer this worker has room for (its memory budget); 0: all. The
    /// coordinator places within it and refuses service when the workers together fall short.
    #[arg(long, default_value_t = 0)]
    pub expert_slots: u32,
    /// Where the forward pass runs: cpu, cuda or cuda:N (CUDA needs a build with
    /// `--features cuda`; a CUDA worker holds every expert, so one per cluster for now).
    #[arg(long, default_value = "cpu")]
    pub device: switchyard_worker::Device,
    /// Element type of this worker's KV cache: f32 (exact) or bf16 (half the bytes per cached
    /// position, each key and value rounded once to bf16; CPU only).
    #[arg(long, default_value = "f32")]
    pub kv_dtype: switchyard_worker::kv::KvDType,
    /// Turn automatic prefix caching off: full KV blocks are then neither shared between
    /// sequences with the same prefix nor kept after release (every prompt computed in full).
    /// On by default on CPU; CUDA workers do not cache prefixes yet.
    #[arg(long)]
    pub no_prefix_cache: bool,
    /// TLS on the Control listener; with --tls-client-ca only coordinators presenting a
    /// certificate from that CA may drive this worker.
    #[command(flatten)]
    pub tls: ServerTlsArgs,
    #[command(flatten)]
    pub membership: MembershipArgs,
}

#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Maximum number of tokens to generate.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// 0 disables.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// 0 disables.
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    /// 1 disables.
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// OpenAI's presence penalty, in [-2, 2] (generated tokens only); 0 disables.
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    pub presence_penalty: f32,
    /// OpenAI's frequency penalty, in [-2, 2] (generated tokens only); 0 disables.
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    pub frequency_penalty: f32,
    /// `TOKEN_ID=BIAS` added to that token's logit, bias in [-100, 100] (repeatable).
    #[arg(long, value_parser = parse_bias, allow_hyphen_values = true)]
    pub logit_bias: Vec<(u32, f32)>,
    /// Stop strings (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
}

impl SamplingArgs {
    pub fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            logit_bias: self.logit_bias.clone(),
        }
    }
}

fn parse_bias(s: &str) -> Result<(u32, f32), String> {
    let (t, b) = s
        .split_once('=')
        .ok_or_else(|| format!("expected TOKEN_ID=BIAS, got {s:?}"))?;
    let t = t
        .trim()
        .parse()
        .map_err(|e| format!("token id {t:?}: {e}"))?;
    let b = b.trim().parse().map_err(|e| format!("bias {b:?}: {e}"))?;
    Ok((t, b))
}

#[derive(Args, Debug, Clone)]
#[group(required = true, multiple = false)]
pub struct PromptArgs {
    /// Raw text prompt.
    #[arg(long)]
    pub prompt: Option<String>,
    /// Comma-separated token ids.
    #[arg(long)]
    pub prompt_ids: Option<String>,
    /// A user message, rendered with the model's chat template.
    #[arg(long)]
    pub chat: Option<String>,
}

impl PromptArgs {
    pub fn prompt(&self) -> Result<Prompt> {
        if let Some(p) = &self.prompt {
            return Ok(Prompt::Text(p.clone()));
        }
        if let Some(c) = &self.chat {
            return Ok(Prompt::Chat(Chat::user(c.clone())));
        }
        let s = self.prompt_ids.as_deref().unwrap_or_default();
        let ids = s
            .split(',')
            .map(|x| {
                x.trim()
                    .parse::<u32>()
                    .with_context(|| format!("--prompt-ids: {x:?} is not a token id"))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Prompt::Ids(ids))
    }
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Hugging Face model folder.
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
    #[command(flatten)]
    pub prompt: PromptArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Print one JSON object (prompt_ids, output_ids, text, finish_reason, ...) at the end.
    #[arg(long)]
    pub json: bool,
    /// Weight dtype (default: as stored).
    #[arg(long)]
    pub dtype: Option<WeightDType>,
    /// Prefill chunk size in tokens.
    #[arg(long, default_value_t = 512)]
    pub prefill_chunk: usize,
}

#[derive(Args, Debug)]
pub struct GenModelArgs {
    /// A built-in preset (see `presets::PRESETS`: tiny, bench, bench-deepseek-v3,
    /// bench-gpt-oss, ...).
    #[arg(long, conflicts_with = "config", required_unless_present = "config")]
    pub preset: Option<String>,
    /// A config.json to instantiate.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub out: PathBuf,
    /// f32, bf16, fp8 (the released block-scaled layout: `*_proj` matrices in e4m3 with
    /// 128x128 block scales) or mxfp4 (GPT-OSS-shaped models: routed experts as released).
    #[arg(long, default_value = "f32")]
    pub dtype: presets::GenDType,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Largest safetensors shard, in MiB.
    #[arg(long, default_value_t = 512)]
    pub shard_mb: usize,
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// The .gguf file.
    pub gguf: PathBuf,
    /// The folder to write (created; its model files are replaced).
    #[arg(long)]
    pub out: PathBuf,
    /// Weight dtype written: f32 or bf16.
    #[arg(long, default_value = "bf16")]
    pub dtype: WeightDType,
    /// Upcycle a dense model into this many experts per layer (each a copy of the layer's MLP).
    #[arg(long)]
    pub upcycle_experts: Option<usize>,
    /// Experts each token is routed to, with --upcycle-experts.
    #[arg(long, default_value_t = 2, requires = "upcycle_experts")]
    pub experts_per_token: usize,
    /// Relative perturbation of the upcycled experts (each weight times 1 + EPS·u, u uniform in
    /// [-1, 1]) and random router weights; 0 keeps the copies identical and the router zero,
    /// so that the MoE computes exactly what the dense model does.
    #[arg(long, default_value_t = 0.0, requires = "upcycle_experts")]
    pub perturb: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write only the tokenizer files (tokenizer.json, tokenizer_config.json,
    /// generation_config.json): for vocabulary-only GGUF files.
    #[arg(long)]
    pub tokenizer_only: bool,
}

#[derive(Args, Debug)]
pub struct BenchClusterArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// Worker counts, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub workers: Vec<usize>,
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    #[arg(long, default_value_t = 16)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 32)]
    pub decode_steps: usize,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct BenchLongArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Each worker's KV holds this share of a split run's sequence, so every split run does
    /// split (the one-worker run gets the longest split run's per-worker KV).
    #[arg(long, default_value_t = 0.6)]
    pub kv_share: f64,
    /// Prompt lengths of the split runs, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "32768")]
    pub prompt_tokens: Vec<usize>,
    #[arg(long, default_value_t = 16)]
    pub decode_steps: usize,
    /// Prefill tokens per step.
    #[arg(long, default_value_t = 2048)]
    pub chunk: usize,
    /// Instead: this many short streams decoding alone, then beside one prompt of
    /// `--beside` tokens split over the workers (paced): their inter-token latency both ways.
    #[arg(long, default_value_t = 0)]
    pub streams: usize,
    #[arg(long, default_value_t = 131072)]
    pub beside: usize,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct BenchGrammarArgs {
    /// A folder with tokenizer.json (a model's, or one that `switchyard import
    /// --tokenizer-only` wrote from a GGUF vocabulary).
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// A JSON schema file (default: an object with string, integer, enum, boolean and array
    /// fields, the shape of a typical extraction schema).
    #[arg(long)]
    pub schema: Option<PathBuf>,
    /// Masks to time.
    #[arg(long, default_value_t = 2000)]
    pub tokens: usize,
    /// Also time a step's masks for this many constrained streams at once, computed on one
    /// thread and on all of the machine's (the engine loop's way), over `--tokens / streams`
    /// steps (0: skip).
    #[arg(long, default_value_t = 0)]
    pub streams: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct BenchChaosArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, default_value_t = 3)]
    pub workers: usize,
    #[arg(long, default_value_t = 2)]
    pub redundant_experts: usize,
    /// Clients sending requests back to back.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Seconds of chaos.
    #[arg(long, default_value_t = 120)]
    pub duration: u64,
    /// Mean seconds between kills (each jittered by ±50%).
    #[arg(long, default_value_t = 10.0)]
    pub interval: f64,
    /// Seconds a killed worker stays down before it is restarted on its address.
    #[arg(long, default_value_t = 3.0)]
    pub downtime: f64,
    /// Distinct reference prompts.
    #[arg(long, default_value_t = 16)]
    pub prompts: usize,
    #[arg(long, default_value_t = 32)]
    pub max_tokens: u32,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Leave live expert re-placement on (the coordinator's default): a returning worker
    /// loads its share of experts in the background. Off by default here, so the kill figures
    /// compare with earlier runs.
    #[arg(long)]
    pub rebalance: bool,
    /// Leave the workers' prefix caching on (their default). Off by default here: the
    /// clients resend the same reference prompts, which a warm cache would mostly not
    /// compute, so the kill figures would not compare with earlier runs.
    #[arg(long)]
    pub prefix_cache: bool,
    /// What is killed: `workers` (a random one at a time) or `coordinator` (the leader of two
    /// coordinators over etcd; the standby takes over and the clients resume their streams).
    #[arg(long, default_value = "workers", value_parser = ["workers", "coordinator"])]
    pub kill: String,
    /// With `--kill coordinator`: the etcd endpoint to use (default: start `etcd` from PATH
    /// for the run).
    #[arg(long)]
    pub etcd: Option<String>,
    /// With `--kill coordinator`: the membership and leadership lease TTL, seconds (how
    /// long a dead leader's lease outlives it; the coordinator's default).
    #[arg(long, default_value_t = 5)]
    pub lease_ttl: u64,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct BenchRebalanceArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Compute threads per worker (1 on a 2-core machine: each worker stands for a device).
    #[arg(long, default_value_t = 1)]
    pub worker_threads: usize,
    #[arg(long, default_value_t = 0)]
    pub redundant_experts: usize,
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    #[arg(long, default_value_t = 16)]
    pub prompt_tokens: usize,
    /// Distinct prompt tokens across the batch (fewer: more skewed expert routing).
    #[arg(long, default_value_t = 2)]
    pub distinct_tokens: usize,
    #[arg(long, default_value_t = 48)]
    pub decode_steps: usize,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub dtype: Option<WeightDType>,
    #[arg(long, default_value_t = 512)]
    pub prefill_tokens: usize,
    #[arg(long, default_value_t = 64)]
    pub decode_steps: usize,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[arg(long)]
    pub json: bool,
    /// Skip measuring memory bandwidth (profiling runs).
    #[arg(long)]
    pub skip_bandwidth: bool,
    /// cpu, cuda or cuda:N (CUDA needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: switchyard_worker::Device,

    /// Element type of the KV cache: f32 (exact) or bf16 (half the bytes per cached
    /// position, each key and value rounded once to bf16; CPU only).
    #[arg(long, default_value = "f32")]
    pub kv_dtype: switchyard_worker::kv::KvDType,
}

/// `--prefix-homing`: a load weight, or off.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PrefixHoming(pub Option<f64>);

fn prefix_homing_weight(s: &str) -> std::result::Result<PrefixHoming, String> {
    if s == "off" {
        return Ok(PrefixHoming(None));
    }
    match s.parse::<f64>() {
        Ok(w) if w.is_finite() && w >= 0.0 => Ok(PrefixHoming(Some(w))),
        _ => Err(format!("{s:?}: a load weight ≥ 0, or \"off\"")),
    }
}

pub fn main_with(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run(a) => run(a),
        Command::GenModel(a) => gen_model(a),
        Command::Import(a) => import_cmd(a),
        Command::Bench(a) => bench_cmd(a),
        Command::BenchCluster(a) => bench_cluster_cmd(a),
        Command::BenchLong(a) => bench_long_cmd(a),
        Command::BenchRebalance(a) => bench_rebalance_cmd(a),
        Command::BenchChaos(a) => bench_chaos_cmd(a),
        Command::BenchGrammar(a) => bench_grammar_cmd(a),
        Command::Worker(a) => worker_cmd(a),
        // Workers that `up` spawns log the same way.
        Command::Up(a) => up_cmd(a, cli.log_format),
        Command::Coordinator(a) => coordinator_cmd(a),
        Command::Generate(a) => generate_cmd(a),
        Command::Admin(a) => admin_cmd(a),
    }
}

fn run(a: RunArgs) -> Result<()> {
    let tok = Tokenizer::load(&a.model)?;
    let mut engine = Engine::load(
        &a.model,
        &EngineOptions {
            dtype: a.dtype,
            kv_blocks: None,
            ..Default::default()
        },
    )?;
    let req = Request {
        prompt: a.prompt.prompt()?,
        max_tokens: a.sampling.max_tokens,
        sampling: a.sampling.params(),
        stop: a.sampling.stop.clone(),
        ignore_eos: a.sampling.ignore_eos,
        prefill_chunk: a.prefill_chunk,
    };
    let mut stdout = std::io::stdout().lock();
    let mut in_reasoning = false;
    let json = a.json;
    let out = generate::generate(&mut engine, &tok, &req, |d, _| {
        if json {
            return;
        }
        if !d.reasoning.is_empty() {
            if !in_reasoning {
                let _ = write!(stdout, "\x1b[2m[reasoning] ");
                in_reasoning = true;
            }
            let _ = write!(stdout, "{}", d.reasoning);
        }
        if !d.text.is_empty() {
            if in_reasoning {
                let _ = write!(stdout, "\x1b[0m\n[answer] ");
                in_reasoning = false;
            }
            let _ = write!(stdout, "{}", d.text);
        }
        let _ = stdout.flush();
    })?;
    if json {
        println!("{}", serde_json::to_string(&out)?);
    } else {
        if in_reasoning {
            let _ = write!(stdout, "\x1b[0m");
        }
        writeln!(stdout)?;
        eprintln!(
            "[{} prompt tokens, {} generated, finish: {:?}]",
            out.prompt_ids.len(),
            out.output_ids.len(),
            out.finish_reason
        );
    }
    Ok(())
}

fn gen_model(a: GenModelArgs) -> Result<()> {
    let config = match (&a.preset, &a.config) {
        (Some(p), _) => presets::preset(p).with_context(|| {
            format!(
                "--preset: unknown preset {p:?} (known: {})",
                presets::PRESETS.join(", ")
            )
        })?,
        (None, Some(path)) => serde_json::from_str(
            &std::fs::read_to_string(path)
                .with_context(|| format!("--config {}", path.display()))?,
        )
        .with_context(|| format!("--config {}: not JSON", path.display()))?,
        (None, None) => bail!("one of --preset or --config is required"),
    };
    if a.shard_mb == 0 {
        bail!("--shard-mb must be at least 1");
    }
    let files: [(&str, &[u8]); 2] = [
        ("tokenizer.json", TOKENIZER_JSON),
        ("tokenizer_config.json", TOKENIZER_CONFIG_JSON),
    ];
    presets::generate(&config, &a.out, a.dtype, a.seed, a.shard_mb << 20, &files)?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

fn import_cmd(a: ImportArgs) -> Result<()> {
    use switchyard_worker::gguf::import::{import, ImportOptions, Upcycle};
    if !(0.0..1.0).contains(&a.perturb) {
        bail!("--perturb must be in [0, 1), got {}", a.perturb);
    }
    let upcycle = a.upcycle_experts.map(|experts| Upcycle {
        experts,
        top_k: a.experts_per_token,
        perturb: a.perturb,
        seed: a.seed,
    });
    let opts = ImportOptions {
        dtype: a.dtype,
        upcycle,
        tokenizer_only: a.tokenizer_only,
    };
    let t = std::time::Instant::now();
    let done = import(&a.gguf, &a.out, &opts)?;
    if a.tokenizer_only {
        eprintln!(
            "wrote the tokenizer of {} ({} tokens) to {}",
            a.gguf.display(),
            done.vocab_size,
            a.out.display()
        );
        return Ok(());
    }
    let types: Vec<String> = done
        .source_types
        .iter()
        .map(|(t, n)| format!("{n} {t}"))
        .collect();
    eprintln!(
        "wrote {} ({}, {} tensors, {:.1} MB, from {}) in {:.1} s",
        a.out.display(),
        done.architecture,
        done.tensors,
        done.bytes as f64 / 1e6,
        types.join(", "),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn bench_cluster_cmd(a: BenchClusterArgs) -> Result<()> {
    if a.workers.is_empty() || a.workers.contains(&0) || a.batch == 0 || a.decode_steps == 0 {
        bail!("--workers (each at least 1), --batch and --decode-steps must be positive");
    }
    if a.prompt_tokens == 0 {
        bail!("--prompt-tokens must be at least 1");
    }
    let rows = bench::run_cluster(&bench::ClusterBenchOptions {
        model: a.model,
        workers: a.workers,
        batch: a.batch,
        prompt_tokens: a.prompt_tokens,
        decode_steps: a.decode_steps,
    })?;
    if a.json {
        println!("{}", serde_json::to_string(&rows)?);
        return Ok(());
    }
    println!(
        "workers  batch  decode tok/s  step ms  all-to-all share  a2a KB/step  coord us/token"
    );
    let base = rows[0].decode_tok_s;
    for r in &rows {
        println!(
            "{:>7}  {:>5}  {:>8.1} ({:.2}x)  {:>7.2}  {:>15.1}%  {:>11.1}  {:>14.1}",
            r.workers,
            r.batch,
            r.decode_tok_s,
            r.decode_tok_s / base,
            r.step_ms,
            100.0 * r.all_to_all_share,
            r.all_to_all_bytes_per_step / 1e3,
            r.coordinator_us_per_token
        );
    }
    Ok(())
}

fn bench_long_cmd(a: BenchLongArgs) -> Result<()> {
    if a.workers < 2 || a.decode_steps < 2 || a.chunk == 0 {
        bail!("--workers must be at least 2, --decode-steps at least 2, --chunk positive");
    }
    if !(a.kv_share > 1.0 / a.workers as f64 && a.kv_share < 1.0) {
        bail!(
            "--kv-share {} must be below 1 (a worker holds less than the sequence) and above \
             1/{} (the workers hold all of it)",
            a.kv_share,
            a.workers
        );
    }
    if let Some(n) = a.prompt_tokens.iter().chain([&a.beside]).find(|n| **n == 0) {
        bail!("--prompt-tokens and --beside must be at least 1, got {n}");
    }
    let o = bench::LongBenchOptions {
        model: a.model,
        workers: a.workers,
        kv_share: a.kv_share,
        prompt_tokens: a.prompt_tokens,
        decode_steps: a.decode_steps,
        chunk: a.chunk,
    };
    if a.streams > 0 {
        let r = bench::run_long_beside(&o, a.streams, a.beside)?;
        if a.json {
            println!("{}", serde_json::to_string(&r)?);
        } else {
            println!(
                "{} streams beside a {}-token prompt over {} workers: ITL p50 {:.2} ms alone, \
                 {:.2} beside; p99 {:.2} alone, {:.2} beside ({:.2}x); the prompt's prefill {:.1} s",
                r.streams,
                r.long_prompt_tokens,
                r.workers,
                r.itl_ms_p50_alone,
                r.itl_ms_p50_beside,
                r.itl_ms_p99_alone,
                r.itl_ms_p99_beside,
                r.itl_ms_p99_beside / r.itl_ms_p99_alone.max(1e-9),
                r.long_prefill_s
            );
        }
        return Ok(());
    }
    let rows = bench::run_long(&o)?;
    if a.json {
        println!("{}", serde_json::to_string(&rows)?);
        return Ok(());
    }
    println!("workers  prompt  prefill s  prefill tok/s  ITL p50 ms  ITL p99 ms  KV B/token  positions per worker");
    for r in &rows {
        println!(
            "{:>7}  {:>6}  {:>9.1}  {:>13.0}  {:>10.2}  {:>10.2}  {:>10}  {:?}",
            r.workers,
            r.prompt_tokens,
            r.prefill_s,
            r.prefill_tok_s,
            r.itl_ms_p50,
            r.itl_ms_p99,
            r.kv_bytes_per_token,
            r.positions_per_worker
        );
    }
    Ok(())
}

fn bench_grammar_cmd(a: BenchGrammarArgs) -> Result<()> {
    let tok = std::sync::Arc::new(Tokenizer::load(&a.tokenizer)?);
    let schema: serde_json::Value = match &a.schema {
        Some(p) => serde_json::from_str(&std::fs::read_to_string(p)?)?,
        None => serde_json::json!({
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 40},
                "age": {"type": "integer", "minimum": 0, "maximum": 150},
                "role": {"enum": ["admin", "user", "guest"]},
                "active": {"type": "boolean"},
                "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 4}
            },
            "required": ["name", "age", "role", "active", "tags"],
            "additionalProperties": false
        }),
    };
    let g = crate::constrain::Grammar::JsonSchema(schema);
    let r = crate::constrain::measure(tok.clone(), &g, a.tokens, a.seed)?;
    if a.streams > 0 {
        let steps = (a.tokens / a.streams).max(1);
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let pct = |mut v: Vec<f64>, q: f64| {
            v.sort_by(f64::total_cmp);
            v[((v.len() - 1) as f64 * q).round() as usize]
        };
        let one = crate::constrain::step_cost(tok.clone(), &g, a.streams, steps, a.seed, 1)?;
        let all = crate::constrain::step_cost(tok, &g, a.streams, steps, a.seed, threads)?;
        let (s50, s90, p50, p90) = (
            pct(one.clone(), 0.5),
            pct(one, 0.9),
            pct(all.clone(), 0.5),
            pct(all, 0.9),
        );
        println!(
            "{} streams, {steps} steps: a step's masks p50 {s50:.1} us / p90 {s90:.1} on 1 thread, \
             p50 {p50:.1} / p90 {p90:.1} on {threads} ({:.2}x / {:.2}x)",
            a.streams,
            s50 / p50,
            s90 / p90
        );
    }
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "vocab {}: trie {:.0} ms, compile p50 {:.2} ms; {} masks: p50 {:.1} us, p90 {:.1}, p99 {:.1}, max {:.1} (allowed p50 {}); {} outputs",
            r.vocab, r.trie_ms, r.compile_ms_p50, r.masks, r.mask_us_p50, r.mask_us_p90,
            r.mask_us_p99, r.mask_us_max, r.allowed_p50, r.outputs
        );
    }
    Ok(())
}

fn bench_chaos_cmd(a: BenchChaosArgs) -> Result<()> {
    if a.concurrency == 0 || a.duration == 0 || a.max_tokens == 0 || a.prompts == 0 {
        bail!("--concurrency, --duration, --max-tokens and --prompts must be positive");
    }
    if !(a.interval > 0.0 && a.downtime >= 0.0) {
        bail!("--interval must be positive and --downtime not negative");
    }
    let r = crate::chaos::run(&crate::chaos::ChaosOptions {
        model: a.model,
        workers: a.workers,
        redundant: a.redundant_experts,
        concurrency: a.concurrency,
        duration: Duration::from_secs(a.duration),
        interval: Duration::from_secs_f64(a.interval),
        downtime: Duration::from_secs_f64(a.downtime),
        prompts: a.prompts,
        max_tokens: a.max_tokens,
        seed: a.seed,
        rebalance: a.rebalance,
        prefix_cache: a.prefix_cache,
        target: if a.kill == "coordinator" {
            crate::chaos::Target::Coordinator
        } else {
            crate::chaos::Target::Workers
        },
        etcd_url: a.etcd,
        lease_ttl: a.lease_ttl,
    })?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{} workers, {:.0} s: {} requests, {} lost, {} kills ({} restarts), final epoch {}, \
             {} workers serving at the end",
            r.workers,
            r.duration_s,
            r.requests,
            r.lost,
            r.kills,
            r.restarts,
            r.final_epoch,
            r.final_workers
        );
        println!(
            "latency ms  calm p50 {:.0} p99 {:.0}  |  across a kill ({} requests) p50 {:.0} p99 {:.0} ({:.2}x calm p99)",
            r.calm_p50_ms,
            r.calm_p99_ms,
            r.disturbed_requests,
            r.disturbed_p50_ms,
            r.disturbed_p99_ms,
            r.disturbed_p99_ms / r.calm_p99_ms.max(1e-9)
        );
        println!(
            "stall per kill ms (longest token gap across it; median gap {:.1}): {}",
            r.median_itl_ms,
            r.stall_ms
                .iter()
                .map(|s| format!("{s:.0}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        let ms = |v: &[f64]| {
            v.iter()
                .map(|s| format!("{s:.0}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        println!(
            "median stream's pause per kill ms (its token gap across it): {}",
            ms(&r.stall_median_ms)
        );
        if r.target == crate::chaos::Target::Coordinator {
            println!(
                "per kill, ms until the standby served: {}; over every leader: {} sequences \
                 adopted with their KV, {} re-prefilled, {} requests restarted by their clients",
                ms(&r.takeover_ms),
                r.sequences_kept,
                r.sequences_reprefilled,
                r.requests_restarted
            );
        } else {
            println!(
                "per returning worker taken back in, ms: longest gap {}; median stream's {}",
                ms(&r.rejoin_stall_ms),
                ms(&r.rejoin_stall_median_ms)
            );
        }
        for d in &r.lost_detail {
            println!("lost: {d}");
        }
    }
    if r.lost > 0 {
        bail!("{} requests lost", r.lost);
    }
    Ok(())
}

fn bench_rebalance_cmd(a: BenchRebalanceArgs) -> Result<()> {
    if a.workers < 2 || a.worker_threads == 0 || a.batch == 0 || a.decode_steps < 2 {
        bail!("--workers must be at least 2; --worker-threads, --batch, --decode-steps positive");
    }
    let r = bench::run_rebalance(&bench::RebalanceBenchOptions {
        model: a.model,
        workers: a.workers,
        worker_threads: a.worker_threads,
        redundant: a.redundant_experts,
        batch: a.batch,
        prompt_tokens: a.prompt_tokens.max(1),
        distinct_tokens: a.distinct_tokens,
        decode_steps: a.decode_steps,
    })?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    println!(
        "{} workers x {} threads, {} redundant, batch {}",
        r.workers, r.worker_threads, r.redundant, r.batch
    );
    println!("phase            expert load max/mean  decode tok/s  step ms  worker CPU s");
    for (name, p) in [
        ("control first", &r.control_before),
        ("control second", &r.control_after),
        ("before switch", &r.before),
        ("after switch", &r.after),
    ] {
        println!(
            "{name:<15}  {:>20.2}  {:>12.1}  {:>7.1}  {}",
            p.max_over_mean,
            p.decode_tok_s,
            p.step_ms,
            p.worker_cpu_s
                .iter()
                .map(|c| format!("{c:.1}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    println!(
        "switch effect on throughput {:.2}x (after/before over the control's); max/mean {:.2} \
         (predicted {:.2}); {} experts moved, switch after {} steps, longest step {:.2}x the \
         median",
        r.throughput_effect(),
        r.after.max_over_mean,
        r.predicted_max_over_mean,
        r.experts_moved,
        r.transition_steps,
        r.transition_max_step_ratio
    );
    Ok(())
}

fn bench_cmd(a: BenchArgs) -> Result<()> {
    if a.prefill_tokens == 0 || a.decode_steps == 0 || a.batch == 0 {
        bail!("--prefill-tokens, --decode-steps and --batch must be positive");
    }
    let r = bench::run(&BenchOptions {
        model: a.model,
        dtype: a.dtype,
        prefill_tokens: a.prefill_tokens,
        decode_steps: a.decode_steps,
        batch: a.batch,
        seed: 0,
        skip_bandwidth: a.skip_bandwidth,
        device: a.device,
        kv_dtype: a.kv_dtype,
    })?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    println!(
        "model            {} ({}, {}, {} threads)",
        r.model, r.dtype, r.device, r.threads
    );
    println!(
        "weights          {:.1} MB held, {:.1} MB read per decoded token",
        r.weight_bytes as f64 / 1e6,
        r.bytes_per_token as f64 / 1e6
    );
    println!(
        "kv cache         {} bytes per token of context ({}, f32)",
        r.kv_bytes_per_token, r.architecture
    );
    println!(
        "read bandwidth   {:.1} GB/s  -> decode bound {:.1} tok/s",
        r.read_bandwidth_gb_s, r.decode_b1_bound_tok_s
    );
    println!(
        "prefill {:>4}     {:.1} tok/s",
        r.prefill_tokens, r.prefill_tok_s
    );
    println!(
        "decode b=1       {:.1} tok/s ({:.0}% of bound)",
        r.decode_tok_s_b1,
        100.0 * r.decode_b1_fraction_of_bound
    );
    println!(
        "decode b={:<3}     {:.1} tok/s aggregate",
        r.batch, r.decode_tok_s_batch
    );
    println!(
        "peak RSS         {:.1} MB ({:.2}x weights)",
        r.peak_rss_bytes as f64 / 1e6,
        r.peak_rss_bytes as f64 / r.weight_bytes as f64
    );
    Ok(())
}

fn worker_cmd(a: WorkerArgs) -> Result<()> {
    if a.exit_with_stdin {
        std::thread::spawn(|| {
            let mut sink = Vec::new();
            let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
            std::process::exit(0);
        });
    }
    let comm = std::net::TcpListener::bind(&a.comm_listen)
        .with_context(|| format!("--comm-listen {}", a.comm_listen))?;
    let comm_addr = comm.local_addr()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&a.listen)
            .await
            .with_context(|| format!("--listen {}", a.listen))?;
        let addr = listener.local_addr()?;
        let id = a.id.unwrap_or_else(|| addr.to_string());
        let opts = EngineOptions {
            dtype: a.dtype,
            device: a.device,
            kv_dtype: a.kv_dtype,
            prefix_cache: !a.no_prefix_cache,
            ..Default::default()
        };
        let tls = a.tls.load()?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let control_url = a.advertise.unwrap_or_else(|| format!("{scheme}://{addr}"));
        let member = MemberInfo {
            id: id.clone(),
            control_url: control_url.clone(),
            model: a.model.display().to_string(),
        };
        let mut svc = switchyard_runtime::server::WorkerService::new(id, a.model, opts, comm)?;
        svc.expert_slots = a.expert_slots;
        if let Some(c) = &a.comm_advertise {
            svc.advertise_comm(c.clone());
        }
        // Registered only once the control port is bound, so a listed worker is reachable.
        if let Some(m) = a.membership.connect().await? {
            let ttl = a.membership.ttl()?;
            let mut reg = with_backoff("registering", || m.register(member.clone(), ttl)).await?;
            // A lapsed lease (paused process, partition) is re-registered once reachable.
            tokio::spawn(async move {
                loop {
                    reg.lost().await;
                    tracing::warn!("registration lost; registering again");
                    reg = loop {
                        match m.register(member.clone(), ttl).await {
                            Ok(r) => break r,
                            Err(e) => {
                                tracing::warn!(error = %e, "register failed; retrying");
                                tokio::time::sleep(Duration::from_secs(1)).await;
                            }
                        }
                    };
                }
            });
        }
        println!(
            "worker ready grpc={control_url} comm={}",
            a.comm_advertise
                .as_deref()
                .unwrap_or(&comm_addr.to_string())
        );
        std::io::stdout().flush()?;
        let mut server = tonic::transport::Server::builder();
        if let Some(t) = &tls {
            server = server.tls_config(t.tonic()?)?;
        }
        server
            .add_service(svc.into_server())
            .serve_with_incoming(switchyard_runtime::server::incoming(listener))
            .await?;
        Ok(())
    })
}

fn serve_options(
    c: &ClusterArgs,
    candidate: String,
    join_timeout: Duration,
) -> Result<ServeOptions> {
    if !(c.pace_factor == 0.0 || c.pace_factor > 1.0) {
        bail!(
            "--pace-factor must be 0 (off) or above 1, got {}",
            c.pace_factor
        );
    }
    let threshold = match c.rebalance_threshold.as_str() {
        "off" => f64::INFINITY,
        t => match t.parse::<f64>() {
            Ok(x) if x > 1.0 => x,
            _ => bail!("--rebalance-threshold must be above 1 or \"off\", got {t:?}"),
        },
    };
    if c.rebalance_window == 0 {
        bail!("--rebalance-window must be at least 1");
    }
    if !(0.0..1.0).contains(&c.rebalance_min_gain) {
        bail!(
            "--rebalance-min-gain must be in [0, 1), got {}",
            c.rebalance_min_gain
        );
    }
    let admin_keys = crate::auth::ApiKeys::load(
        c.admin_keys_file.as_deref(),
        std::env::var("SWITCHYARD_ADMIN_KEYS").ok().as_deref(),
        0,
    )?
    .map(Arc::new);
    let admin_addr = (c.admin_addr != "off").then(|| c.admin_addr.clone());
    crate::serve::check_admin(admin_addr.as_deref(), admin_keys.is_some())?;
    Ok(ServeOptions {
        model: c.model.clone(),
        workers: c.workers,
        redundant_experts: c.redundant_experts,
        grpc_addr: c.grpc_addr.clone(),
        kv_blocks: c.kv_blocks,
        token_budget: c.token_budget,
        max_queue: c.max_queue,
        pace_factor: c.pace_factor,
        prefix_homing: c.prefix_homing.0,
        context_parallel: c.context_parallel,
        metrics_addr: (c.metrics_addr != "off").then(|| c.metrics_addr.clone()),
        candidate,
        lease_ttl: c.membership.ttl()?,
        join_timeout,
        rebalance: crate::rebalance::RebalancePolicy {
            threshold,
            window: c.rebalance_window,
            min_gain: c.rebalance_min_gain,
            ..Default::default()
        },
        step_timeout: Duration::from_secs(c.step_timeout.max(1)),
        resume_grace: Duration::from_secs(c.resume_grace.max(1)),
        http_addr: (c.http_addr != "off").then(|| c.http_addr.clone()),
        api_keys: crate::auth::ApiKeys::load(
            c.api_keys_file.as_deref(),
            std::env::var("SWITCHYARD_API_KEYS").ok().as_deref(),
            c.max_requests_per_key,
        )?
        .map(Arc::new),
        max_model_len: c.max_model_len,
        tool_call_parser: c.tool_call_parser,
        panic_after_steps: c.fault_panic_after_steps,
        admin_addr,
        admin_keys,
        tls: c.tls.load()?,
        control_tls: ClientTlsArgs {
            tls_ca: c.worker_tls_ca.clone(),
            client_cert: c.worker_tls_cert.clone(),
            client_key: c.worker_tls_key.clone(),
        }
        .load()?,
    })
}

fn parse_tool_format(s: &str) -> Result<crate::text::tools::ToolFormat, String> {
    use crate::text::tools::ToolFormat;
    ToolFormat::from_name(s).ok_or_else(|| {
        let names: Vec<&str> = ToolFormat::ALL
            .into_iter()
            .chain([ToolFormat::Harmony])
            .map(ToolFormat::name)
            .collect();
        format!(
            "unknown tool-call format {s:?} (one of {})",
            names.join(", ")
        )
    })
}

fn ctrl_c() -> impl std::future::Future<Output = ()> + Send {
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn up_cmd(a: UpArgs, log_format: crate::telemetry::LogFormat) -> Result<()> {
    let c = a.cluster;
    if c.workers == 0 {
        bail!("--workers must be at least 1");
    }
    let mut extra = vec!["--log-format".to_string(), log_format.to_string()];
    if let Some(etcd) = &c.membership.etcd {
        extra.extend(["--etcd".to_string(), etcd.clone()]);
        extra.extend([
            "--cluster-prefix".into(),
            c.membership.cluster_prefix.clone(),
        ]);
        extra.extend(["--lease-ttl".into(), c.membership.lease_ttl.to_string()]);
    }
    if a.expert_slots > 0 {
        extra.extend(["--expert-slots".into(), a.expert_slots.to_string()]);
    }
    if a.device != switchyard_worker::Device::Cpu {
        extra.extend(["--device".into(), a.device.to_string()]);
    }
    if a.kv_dtype != switchyard_worker::kv::KvDType::F32 {
        extra.extend(["--kv-dtype".into(), a.kv_dtype.to_string()]);
    }
    if a.no_prefix_cache {
        extra.push("--no-prefix-cache".into());
    }
    // Options are checked before any worker process starts.
    let opts = serve_options(&c, "up".into(), Duration::from_secs(60))?;
    let workers = crate::local::LocalWorkers::spawn(&c.model, c.workers, &extra)?;
    let started = workers.members.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let (membership, _registrations) =
            coordinator_membership(&c.membership, started, opts.lease_ttl).await?;
        serve(opts, membership, ctrl_c()).await
    })?;
    drop(workers);
    Ok(())
}

/// A coordinator's membership: etcd when `--etcd` is given (workers register themselves), else
/// in memory holding `known` (kept registered while the returned registrations live).
async fn coordinator_membership(
    args: &MembershipArgs,
    known: Vec<MemberInfo>,
    ttl: Duration,
) -> Result<(Arc<dyn Membership>, Vec<Registration>)> {
    if let Some(m) = args.connect().await? {
        return Ok((m, Vec::new()));
    }
    let m = MemoryMembership::new();
    let mut registrations = Vec::new();
    for w in known {
        registrations.push(m.register(w, ttl).await?);
    }
    Ok((Arc::new(m), registrations))
}

fn coordinator_cmd(a: CoordinatorArgs) -> Result<()> {
    let c = &a.cluster;
    if c.membership.etcd.is_some() == !a.worker_urls.is_empty() {
        bail!("give either --etcd (workers register there) or --worker-url for each worker");
    }
    let candidate = a.id.clone().unwrap_or_else(|| {
        format!(
            "{}-{}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "coordinator".into()),
            std::process::id()
        )
    });
    let mut opts = serve_options(c, candidate, Duration::from_secs(a.join_timeout))?;
    if !a.worker_urls.is_empty() {
        opts.workers = a.worker_urls.len();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let given: Vec<MemberInfo> = a
        .worker_urls
        .iter()
        .enumerate()
        .map(|(i, url)| MemberInfo {
            // Zero-padded so sorted ids keep the given order.
            id: format!("worker-{i:04}"),
            control_url: url.clone(),
            model: c.model.display().to_string(),
        })
        .collect();
    rt.block_on(async move {
        let (membership, _registrations) =
            coordinator_membership(&c.membership, given, opts.lease_ttl).await?;
        serve(opts, membership, ctrl_c()).await
    })
}

fn generate_cmd(a: GenerateArgs) -> Result<()> {
    use switchyard_proto::v1::generate_response::Event;
    use switchyard_proto::v1::inference_client::InferenceClient;
    use switchyard_proto::v1::*;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let endpoints: Vec<String> = a
            .endpoint
            .split(',')
            .map(|e| e.trim().to_string())
            .filter(|e| !e.is_empty())
            .collect();
        let mut channel = Err(anyhow::anyhow!("--endpoint names no coordinator"));
        for e in &endpoints {
            channel = connect(e, &a.tls).await;
            if channel.is_ok() {
                break;
            }
        }
        let mut client = InferenceClient::with_interceptor(channel?, bearer(a.api_key.clone())?);
        let (input, tok_input) = match a.prompt.prompt()? {
            Prompt::Text(t) => (
                generate_request::Input::Text(t.clone()),
                Some(tokenize_request::Input::Text(t)),
            ),
            Prompt::Chat(c) => {
                let chat = ChatInput {
                    messages: c
                        .messages
                        .into_iter()
                        .map(|m| ChatMessage {
                            role: m.role,
                            content: m.content,
                            ..Default::default()
                        })
                        .collect(),
                    add_generation_prompt: Some(c.add_generation_prompt),
                };
                (
                    generate_request::Input::Chat(chat.clone()),
                    Some(tokenize_request::Input::Chat(chat)),
                )
            }
            Prompt::Ids(ids) => (generate_request::Input::TokenIds(TokenIds { ids }), None),
        };
        let prompt_ids = match (&input, tok_input) {
            (generate_request::Input::TokenIds(t), _) => t.ids.clone(),
            (_, Some(ti)) => {
                client
                    .tokenize(TokenizeRequest {
                        model: String::new(),
                        input: Some(ti),
                        tools: vec![],
                    })
                    .await
                    .map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?
                    .into_inner()
                    .ids
            }
            _ => vec![],
        };
        let p = a.sampling.params();
        let req = GenerateRequest {
            request_id: String::new(),
            model: String::new(),
            input: Some(input),
            sampling: Some(SamplingParams {
                temperature: p.temperature,
                top_p: Some(p.top_p),
                top_k: p.top_k as u32,
                min_p: p.min_p,
                repetition_penalty: Some(p.repetition_penalty),
                seed: Some(p.seed),
                presence_penalty: p.presence_penalty,
                frequency_penalty: p.frequency_penalty,
                logit_bias: p.logit_bias.iter().copied().collect(),
            }),
            max_tokens: a.sampling.max_tokens as u32,
            stop: a.sampling.stop.clone(),
            ignore_eos: a.sampling.ignore_eos,
            priority: 0,
            stream_token_ids: true,
            top_logprobs: 0,
            logprobs: false,
            min_tokens: 0,
            stop_token_ids: vec![],
            constraint: None,
            max_reasoning_tokens: 0,
            ..Default::default()
        };
        let resume: switchyard_proto::resume::ReattachFn = {
            let (endpoints, tls, key) = (
                Arc::new(endpoints.clone()),
                Arc::new(a.tls.clone()),
                a.api_key.clone(),
            );
            Box::new(move |i, req| {
                let (endpoints, tls, key) = (endpoints.clone(), tls.clone(), key.clone());
                Box::pin(async move {
                    let ch = connect(&endpoints[i], &tls)
                        .await
                        .map_err(|e| tonic::Status::unavailable(format!("{e:#}")))?;
                    let auth = bearer(key).map_err(|e| tonic::Status::internal(e.to_string()))?;
                    let mut c = InferenceClient::with_interceptor(ch, auth);
                    switchyard_proto::resume::call(&mut c, req).await
                })
            })
        };
        let mut stream = switchyard_proto::resume::Resuming::start(
            req,
            endpoints.len(),
            resume,
            Duration::from_secs(a.resume_timeout),
        )
        .await
        .map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?;
        let (mut output_ids, mut reasoning, mut answer, mut finish) = (
            Vec::new(),
            String::new(),
            String::new(),
            "error".to_string(),
        );
        let mut out = std::io::stdout().lock();
        while let Some(m) = stream
            .message()
            .await
            .map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?
        {
            match m.event {
                Some(Event::Delta(d)) => {
                    output_ids.extend(d.token_ids);
                    if !a.json {
                        write!(out, "{}{}", d.reasoning_text, d.text)?;
                        out.flush()?;
                    }
                    reasoning.push_str(&d.reasoning_text);
                    answer.push_str(&d.text);
                }
                Some(Event::Finished(f)) => {
                    finish = match FinishReason::try_from(f.reason)
                        .unwrap_or(FinishReason::Unspecified)
                    {
                        FinishReason::Stop => "stop",
                        FinishReason::Length => "length",
                        FinishReason::Cancelled => "cancelled",
                        _ => "error",
                    }
                    .into();
                }
                _ => {}
            }
        }
        if a.json {
            let v = serde_json::json!({
                "prompt_ids": prompt_ids,
                "output_ids": output_ids,
                "text": format!("{reasoning}{answer}"),
                "reasoning": reasoning,
                "answer": answer,
                "finish_reason": finish,
            });
            println!("{v}");
        } else {
            writeln!(out)?;
        }
        Ok(())
    })
}

/// A gRPC channel to a coordinator (TLS for an https:// endpoint, trusting `tls`).
async fn connect(endpoint: &str, tls: &ClientTlsArgs) -> Result<tonic::transport::Channel> {
    let mut ep = tonic::transport::Endpoint::from_shared(endpoint.to_string())
        .with_context(|| format!("--endpoint {endpoint}"))?;
    match tls.load()? {
        Some(t) if endpoint.starts_with("https://") => ep = ep.tls_config(t)?,
        Some(_) => bail!("--tls-ca given for a plain http:// endpoint {endpoint}"),
        None if endpoint.starts_with("https://") => {
            bail!("--endpoint {endpoint} is TLS: give --tls-ca (the CA that signed it)")
        }
        None => {}
    }
    ep.connect()
        .await
        .with_context(|| format!("--endpoint {endpoint}"))
}

/// Adds `authorization: Bearer KEY` to every call when a key is given.
fn bearer(
    key: Option<String>,
) -> Result<impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone> {
    let value: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> = key
        .map(|k| format!("Bearer {k}").parse())
        .transpose()
        .context("the key is not a valid header value")?;
    Ok(move |mut req: tonic::Request<()>| {
        if let Some(v) = &value {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    })
}

fn admin_cmd(a: AdminArgs) -> Result<()> {
    use switchyard_proto::v1::admin_client::AdminClient;
    use switchyard_proto::v1::*;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let status = |s: tonic::Status| anyhow::anyhow!("{}: {}", s.code(), s.message());
    rt.block_on(async move {
        let key = a.admin_key.as_deref().and_then(|k| {
            k.lines()
                .map(str::trim)
                .find(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_string)
        });
        let mut client =
            AdminClient::with_interceptor(connect(&a.endpoint, &a.tls).await?, bearer(key)?);
        match a.action {
            AdminAction::Status => {
                let s = client
                    .status(ClusterStatusRequest {})
                    .await
                    .map_err(status)?
                    .into_inner();
                if a.json {
                    println!("{}", crate::admin::status_json(&s));
                    return Ok(());
                }
                println!(
                    "epoch {}  expert version {}  imbalance {:.2}  recovered sequences: {} kept, {} re-prefilled; {} requests restarted{}",
                    s.epoch,
                    s.expert_version,
                    s.imbalance,
                    s.sequences_kept,
                    s.sequences_reprefilled,
                    s.requests_restarted,
                    if s.unavailable.is_empty() {
                        String::new()
                    } else {
                        format!("  UNAVAILABLE: {}", s.unavailable)
                    }
                );
                println!(
                    "rank  worker                  running  kv used/total  cached  prefix hits  experts"
                );
                for w in &s.workers {
                    let held = s
                        .placement
                        .iter()
                        .filter(|p| p.ranks.contains(&w.rank))
                        .count();
                    let hits = if w.prefix_queried_blocks == 0 {
                        "-".to_string()
                    } else {
                        format!(
                            "{:.0}%",
                            100.0 * w.prefix_hit_blocks as f64 / w.prefix_queried_blocks as f64
                        )
                    };
                    println!(
                        "{:>4}  {:<22}  {:>7}  {:>6}/{:<6}  {:>6}  {:>11}  {:>7}",
                        w.rank,
                        w.id,
                        w.running_sequences,
                        w.kv_blocks_used,
                        w.kv_blocks_total,
                        w.kv_blocks_cached,
                        hits,
                        held
                    );
                }
                if !s.drained.is_empty() {
                    println!("drained: {}", s.drained.join(", "));
                }
            }
            AdminAction::Drain { worker } => {
                let r = client
                    .drain(DrainRequest {
                        worker: worker.clone(),
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                if a.json {
                    println!(
                        "{}",
                        serde_json::json!({"worker": worker, "epoch": r.epoch, "world_size": r.world_size})
                    );
                } else {
                    println!(
                        "drained {worker}: epoch {} over {} workers",
                        r.epoch, r.world_size
                    );
                }
            }
            AdminAction::Rebalance => {
                let r = client
                    .rebalance(RebalanceRequest {})
                    .await
                    .map_err(status)?
                    .into_inner();
                if a.json {
                    println!(
                        "{}",
                        serde_json::json!({
                            "imbalance_before": r.imbalance_before,
                            "imbalance_after": r.imbalance_after,
                            "experts_moved": r.experts_moved,
                            "expert_version": r.expert_version,
                        })
                    );
                } else if r.expert_version == 0 {
                    println!(
                        "kept the placement: imbalance {:.2}, best plan {:.2}",
                        r.imbalance_before, r.imbalance_after
                    );
                } else {
                    println!(
                        "switching to expert version {}: imbalance {:.2} -> {:.2}, {} experts moved",
                        r.expert_version, r.imbalance_before, r.imbalance_after, r.experts_moved
                    );
                }
            }
        }
        Ok(())
    })
}
