//! A [`Cluster`] of worker processes reached over the `switchyard.cluster.v1.Worker` control
//! streams: connect, collect each worker's all-to-all address, hand out the placement, wait
//! until every worker has joined the mesh and loaded its experts, then exchange one
//! `StepPlan`/`StepResult` pair per rank per step.

use crate::driver::{Carry, Cluster, DriverError};
use crate::placement::{plan_holders, rank_experts};
use std::future::Future;
use std::path::Path;
use switchyard_proto::cluster::v1::coordinator_message::Msg as CMsg;
use switchyard_proto::cluster::v1::worker_client::WorkerClient;
use switchyard_proto::cluster::v1::worker_message::Msg as WMsg;
use switchyard_proto::cluster::v1::{
    CoordinatorMessage, ExpertUpdate, HeldSeq, KeptSeq, Placement, StepPlan, StepResult,
    WorkerHello, WorkerMessage,
};
use switchyard_worker::engine::read_config;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

pub struct GrpcCluster {
    rt: tokio::runtime::Runtime,
    txs: Vec<mpsc::Sender<CoordinatorMessage>>,
    rxs: Vec<Streaming<WorkerMessage>>,
    kv_blocks: usize,
    block_size: usize,
    holders: Vec<Vec<Vec<u32>>>,
    slots: Vec<usize>,
    urls: Vec<String>,
    /// Per rank, what its ready answer said it kept from the previous epoch.
    kept: Vec<Vec<(u64, usize)>>,
    /// Taking over ([`Carry::adopt_held`]): the sequences kept that the workers' hellos
    /// described, with their ranks, until the driver takes them.
    adopted: Vec<(usize, HeldSeq)>,
    step_timeout: std::time::Duration,
    interrupt: Option<std::sync::Arc<tokio::sync::Notify>>,
}

/// How long a step may take before the cluster is declared stuck (a worker stopped answering).
pub const DEFAULT_STEP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// How long a worker may take to accept the control stream and greet; one that does not (a
/// frozen process still accepts TCP connections) is unreachable.
pub const HELLO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long the workers may take to join the mesh and load their weights.
pub const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

fn rank_err(rank: usize) -> impl Fn(String) -> DriverError {
    move |detail| DriverError::Rank { rank, detail }
}

fn unreachable(rank: usize) -> impl Fn(String) -> DriverError {
    move |detail| DriverError::Unreachable { rank, detail }
}

/// While forming a cluster, a rank whose stream fails is unreachable (a retry may leave it
/// out); a rank that answers out of turn is a protocol error.
fn forming(e: DriverError) -> DriverError {
    match e {
        DriverError::Rank { rank, detail } => DriverError::Unreachable { rank, detail },
        other => other,
    }
}

/// How a coordinator presents itself to workers: its fencing token and, for `https://`
/// control URLs, its TLS client configuration.
#[derive(Clone, Debug, Default)]
pub struct ControlAccess {
    pub fence: u64,
    pub tls: Option<tonic::transport::ClientTlsConfig>,
}

/// A control channel to `url`: TLS when the URL is `https://` (which then requires `tls`).
async fn connect_worker(
    url: &str,
    tls: Option<&tonic::transport::ClientTlsConfig>,
) -> Result<WorkerClient<tonic::transport::Channel>, String> {
    let mut ep =
        tonic::transport::Endpoint::from_shared(url.to_string()).map_err(|e| e.to_string())?;
    if url.starts_with("https://") {
        let tls = tls.ok_or("an https:// worker needs --worker-tls-ca")?;
        ep = ep.tls_config(tls.clone()).map_err(|e| e.to_string())?;
    } else if tls.is_some() {
        return Err("worker TLS is configured but the worker's URL is plain http://".into());
    }
    let ch = ep
        .connect()
        .await
        .map_err(|e| format!("{e}: {:?}", std::error::Error::source(&e)))?;
    Ok(WorkerClient::new(ch)
        .max_decoding_message_size(switchyard_runtime::server::CONTROL_MESSAGE_LIMIT)
        .max_encoding_message_size(switchyard_runtime::server::CONTROL_MESSAGE_LIMIT))
}

/// 32 fresh random bytes from the operating system: one epoch's mesh secret.
fn epoch_secret() -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut b = vec![0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b)
}

async fn next_message(rank: usize, rx: &mut Streaming<WorkerMessage>) -> Result<WMsg, DriverError> {
    match rx.message().await {
        Ok(Some(WorkerMessage { msg: Some(m) })) => Ok(m),
        Ok(_) => Err(rank_err(rank)("control stream ended".into())),
        Err(s) => Err(rank_err(rank)(format!("{}: {}", s.code(), s.message()))),
    }
}

impl GrpcCluster {
    /// Connects to the workers at `urls` (rank = position) serving `model`, and places the
    /// experts within the room each announces (fails with a placement error when the workers
    /// together cannot hold every expert).
    pub fn connect(
        urls: &[String],
        model: &Path,
        redundant: usize,
        kv_blocks: usize,
        block_size: usize,
    ) -> Result<Self, DriverError> {
        Self::connect_with(
            urls,
            model,
            redundant,
            kv_blocks,
            block_size,
            &ControlAccess::default(),
        )
    }

    /// [`connect`](Self::connect) as the leader holding fencing token `access.fence` (every
    /// control stream carries it; a worker that a newer leader drives refuses the stream with
    /// `DriverError::Fenced`) and, for `https://` workers, TLS (mutual, when the
    /// configuration carries this coordinator's identity).
    pub fn connect_with(
        urls: &[String],
        model: &Path,
        redundant: usize,
        kv_blocks: usize,
        block_size: usize,
        access: &ControlAccess,
    ) -> Result<Self, DriverError> {
        Self::connect_carrying(
            urls,
            model,
            redundant,
            kv_blocks,
            block_size,
            access,
            &Carry::default(),
        )
    }

    /// [`connect_with`](Self::connect_with) for a new epoch after `carry`'s: every worker is
    /// asked to keep its engine and the sequences `carry` lists for its address (each reports
    /// what it kept: [`Cluster::kept`]), and when every worker was in the previous group (or
    /// `carry.live_placement`: a newcomer's share is moved to it live) the experts stay where
    /// they were ([`crate::placement::carry_over`]: only a lost worker's experts move, to the
    /// workers with room, fewest held first); otherwise they are placed afresh.
    pub fn connect_carrying(
        urls: &[String],
        model: &Path,
        redundant: usize,
        kv_blocks: usize,
        block_size: usize,
        access: &ControlAccess,
        carry: &Carry,
    ) -> Result<Self, DriverError> {
        let fence = access.fence;
        let cfg = read_config(model)?;
        let world = urls.len();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| rank_err(0)(e.to_string()))?;
        let (txs, rxs, holders, slots, kept, adopted) = rt.block_on(async {
            let mut txs = Vec::new();
            let mut rxs = Vec::new();
            let mut comm_addrs = Vec::new();
            let mut slots = Vec::new();
            let mut hellos: Vec<WorkerHello> = Vec::new();
            for (rank, url) in urls.iter().enumerate() {
                let hello = async {
                    let mut client = connect_worker(url, access.tls.as_ref())
                        .await
                        .map_err(|e| unreachable(rank)(format!("connect {url}: {e}")))?;
                    let (tx, rx) = mpsc::channel(4);
                    let mut call = tonic::Request::new(ReceiverStream::new(rx));
                    call.metadata_mut().insert(
                        switchyard_runtime::server::FENCE_METADATA,
                        fence
                            .to_string()
                            .parse()
                            .expect("digits are a header value"),
                    );
                    let mut inbound = client
                        .control(call)
                        .await
                        .map_err(|s| {
                            if s.code() == tonic::Code::FailedPrecondition
                                && s.message().starts_with("fenced")
                            {
                                DriverError::Fenced {
                                    rank,
                                    detail: s.message().to_string(),
                                }
                            } else {
                                unreachable(rank)(s.to_string())
                            }
                        })?
                        .into_inner();
                    match next_message(rank, &mut inbound).await.map_err(forming)? {
                        WMsg::Hello(h) => Ok((tx, inbound, h)),
                        other => Err(rank_err(rank)(format!("expected hello, got {other:?}"))),
                    }
                };
                let (tx, inbound, h) =
                    tokio::time::timeout(HELLO_TIMEOUT, hello)
                        .await
                        .map_err(|_| {
                            unreachable(rank)(format!("{url}: no hello within {HELLO_TIMEOUT:?}"))
                        })??;
                comm_addrs.push(h.comm_address.clone());
                slots.push(h.expert_slots as usize);
                txs.push(tx);
                rxs.push(inbound);
                hellos.push(h);
            }
            // Taking over: keep what each worker says it holds (sequences and experts).
            let takeover = carry
                .adopt_held
                .then(|| takeover_carry(&cfg, urls, &hellos));
            let carry = takeover.as_ref().unwrap_or(carry);
            let kept_in_place = carry.holders.as_ref().and_then(|(old_urls, old)| {
                let new_rank = |u: &String| urls.iter().position(|n| n == u).map(|r| r as u32);
                // A worker new to the group gets its share from a fresh placement, unless the
                // driver moves it there live.
                if !carry.live_placement && !urls.iter().all(|u| old_urls.contains(u)) {
                    return None;
                }
                let map: Vec<Option<u32>> = old_urls.iter().map(new_rank).collect();
                crate::placement::carry_over(old, &map, &slots).ok()
            });
            let holders = match kept_in_place {
                Some(h) => h,
                None => plan_holders(&cfg, &slots, redundant, None)?,
            };
            let all = rank_experts(&holders, world);
            let mesh_secret =
                epoch_secret().map_err(|e| rank_err(0)(format!("mesh secret: {e}")))?;
            for (rank, tx) in txs.iter().enumerate() {
                let p = Placement {
                    epoch: 1,
                    world_size: world as u32,
                    rank: rank as u32,
                    assignments: all[rank].assignments.clone(),
                    peer_addresses: comm_addrs.clone(),
                    holders: all.clone(),
                    kv_blocks: kv_blocks as u32,
                    mesh_secret: mesh_secret.clone(),
                    keep_state: true,
                    keep_seqs: carry
                        .seqs
                        .get(&urls[rank])
                        .into_iter()
                        .flatten()
                        .map(|&(seq_id, len)| KeptSeq {
                            seq_id,
                            len: len as u32,
                        })
                        .collect(),
                };
                tx.send(CoordinatorMessage {
                    msg: Some(CMsg::Placement(p)),
                })
                .await
                .map_err(|_| rank_err(rank)("control stream closed".into()))?;
            }
            // Every rank's ready concurrently, failing at the first rank that fails: a dead
            // rank must not leave the others waiting out their mesh-join timeout.
            let ready = join_until_error(rxs.iter_mut().enumerate().map(|(rank, rx)| async move {
                match next_message(rank, rx).await.map_err(forming)? {
                    WMsg::Result(r) => Ok(r
                        .kept
                        .iter()
                        .map(|k| (k.seq_id, k.len as usize))
                        .collect::<Vec<_>>()),
                    other => Err(rank_err(rank)(format!("expected ready, got {other:?}"))),
                }
            }));
            let kept = tokio::time::timeout(READY_TIMEOUT, ready)
                .await
                .map_err(|_| {
                    rank_err(0)(format!("workers not ready within {READY_TIMEOUT:?}"))
                })??;
            // A worker reports only what it was asked to keep (anything else is ignored).
            let kept: Vec<Vec<(u64, usize)>> = kept
                .into_iter()
                .enumerate()
                .map(|(rank, seqs)| {
                    let asked = carry.seqs.get(&urls[rank]);
                    seqs.into_iter()
                        .filter(|k| asked.is_some_and(|a| a.contains(k)))
                        .collect()
                })
                .collect();
            let mut adopted = Vec::new();
            if takeover.is_some() {
                for (rank, h) in hellos.into_iter().enumerate() {
                    for s in h.held {
                        if kept[rank].contains(&(s.seq_id, s.cached as usize)) {
                            adopted.push((rank, s));
                        }
                    }
                }
            }
            Ok::<_, DriverError>((txs, rxs, holders, slots, kept, adopted))
        })?;
        Ok(GrpcCluster {
            rt,
            txs,
            rxs,
            kv_blocks,
            block_size,
            holders,
            slots,
            urls: urls.to_vec(),
            kept,
            adopted,
            step_timeout: DEFAULT_STEP_TIMEOUT,
            interrupt: None,
        })
    }

    /// A step that has not returned every result after `t` fails (naming the silent rank)
    /// instead of waiting forever.
    pub fn with_step_timeout(mut self, t: std::time::Duration) -> Self {
        self.step_timeout = t;
        self
    }

    /// A step in flight (or the next one) fails at once when `n` is notified (a rank's
    /// member left membership: waiting out the step timeout would only delay the rebuild).
    /// A notification from before this cluster was formed is dropped.
    pub fn with_interrupt(mut self, n: std::sync::Arc<tokio::sync::Notify>) -> Self {
        self.rt.block_on(async {
            let _ = tokio::time::timeout(std::time::Duration::ZERO, n.notified()).await;
        });
        self.interrupt = Some(n);
        self
    }
}

impl Cluster for GrpcCluster {
    fn kept(&self) -> Vec<Vec<(u64, usize)>> {
        self.kept.clone()
    }

    fn take_adopted(&mut self) -> Vec<(usize, HeldSeq)> {
        std::mem::take(&mut self.adopted)
    }

    fn world(&self) -> usize {
        self.txs.len()
    }

    fn kv_shape(&self) -> (usize, usize) {
        (self.kv_blocks, self.block_size)
    }

    fn holders(&self) -> &[Vec<Vec<u32>>] {
        &self.holders
    }

    fn addresses(&self) -> Vec<String> {
        self.urls.clone()
    }

    fn expert_slots(&self) -> Vec<usize> {
        self.slots.clone()
    }

    fn prepare_experts(
        &mut self,
        version: u64,
        holders: &[Vec<Vec<u32>>],
    ) -> Result<(), DriverError> {
        let all = rank_experts(holders, self.txs.len());
        let txs = &self.txs;
        self.rt.block_on(async {
            for (rank, tx) in txs.iter().enumerate() {
                tx.send(CoordinatorMessage {
                    msg: Some(CMsg::Experts(ExpertUpdate {
                        version,
                        holders: all.clone(),
                    })),
                })
                .await
                .map_err(|_| rank_err(rank)("control stream closed".into()))?;
            }
            Ok(())
        })
    }

    fn set_holders(&mut self, holders: Vec<Vec<Vec<u32>>>) {
        self.holders = holders;
    }

    fn step(&mut self, plans: Vec<StepPlan>) -> Result<Vec<StepResult>, DriverError> {
        let (txs, rxs, limit) = (&self.txs, &mut self.rxs, self.step_timeout);
        let interrupt = self.interrupt.clone();
        self.rt.block_on(async {
            for (rank, (tx, p)) in txs.iter().zip(plans).enumerate() {
                tx.send(CoordinatorMessage {
                    msg: Some(CMsg::Step(p)),
                })
                .await
                .map_err(|_| rank_err(rank)("control stream closed".into()))?;
            }
            let deadline = tokio::time::Instant::now() + limit;
            // Every rank's result concurrently, returning at the first rank that fails (the
            // others may be stuck in an all-to-all with it until the epoch ends). A rank
            // blocked behind a silent peer is silent too, so a timeout names them all.
            let all = join_until_error(rxs.iter_mut().enumerate().map(|(rank, rx)| async move {
                match tokio::time::timeout_at(deadline, next_message(rank, rx)).await {
                    Ok(Ok(m)) => Ok(Some(m)),
                    Ok(Err(e)) => Err(e),
                    Err(_) => Ok(None),
                }
            }));
            let results = match interrupt {
                Some(n) => tokio::select! {
                    r = all => r?,
                    _ = n.notified() => {
                        return Err(rank_err(0)(
                            "step interrupted: a worker left membership".into(),
                        ))
                    }
                },
                None => all.await?,
            };
            let silent: Vec<usize> = results
                .iter()
                .enumerate()
                .filter(|(_, r)| r.is_none())
                .map(|(rank, _)| rank)
                .collect();
            if let Some(&first) = silent.first() {
                return Err(rank_err(first)(format!(
                    "no step result within {limit:?} from ranks {silent:?}"
                )));
            }
            let mut out = Vec::with_capacity(results.len());
            for (rank, m) in results.into_iter().enumerate() {
                match m.expect("checked above") {
                    WMsg::Result(r) => out.push(r),
                    other => {
                        return Err(rank_err(rank)(format!(
                            "expected a step result, got {other:?}"
                        )))
                    }
                }
            }
            Ok(out)
        })
    }
}

/// What a coordinator taking over keeps, from the workers' hellos: each worker's held
/// sequences at their cached lengths, and the experts where they are (an expert no hello
/// names is placed by [`crate::placement::carry_over`]; no hello naming any: placed afresh).
fn takeover_carry(
    cfg: &switchyard_worker::ModelConfig,
    urls: &[String],
    hellos: &[WorkerHello],
) -> Carry {
    let seqs = urls
        .iter()
        .zip(hellos)
        .map(|(u, h)| {
            let held = h
                .held
                .iter()
                .map(|s| (s.seq_id, s.cached as usize))
                .collect();
            (u.clone(), held)
        })
        .collect();
    let mut table: Vec<Vec<Vec<u32>>> = cfg
        .sparse_layers
        .iter()
        .map(|&sparse| vec![vec![]; if sparse { cfg.num_experts } else { 0 }])
        .collect();
    for (rank, h) in hellos.iter().enumerate() {
        for a in &h.held_experts {
            for &e in &a.experts {
                if let Some(ranks) = table
                    .get_mut(a.layer as usize)
                    .and_then(|l| l.get_mut(e as usize))
                {
                    ranks.push(rank as u32);
                }
            }
        }
    }
    let any = hellos.iter().any(|h| !h.held_experts.is_empty());
    Carry {
        seqs,
        holders: any.then(|| (urls.to_vec(), table)),
        live_placement: false,
        adopt_held: false,
    }
}

/// Awaits every future concurrently (on this task); their outputs in input order, or the
/// first error as soon as any fails (the rest are dropped).
async fn join_until_error<T, E, F: Future<Output = Result<T, E>>>(
    fs: impl IntoIterator<Item = F>,
) -> Result<Vec<T>, E> {
    let mut pinned: Vec<std::pin::Pin<Box<F>>> = fs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<T>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, o) in pinned.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(Ok(v)) => *o = Some(v),
                    std::task::Poll::Ready(Err(e)) => return std::task::Poll::Ready(Err(e)),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(Ok(()))
        }
    })
    .await?;
    Ok(out
        .into_iter()
        .map(|o| o.expect("every future finished"))
        .collect())
}
