//! The worker's control server: the `switchyard.cluster.v1.Worker` gRPC service.
//!
//! One control stream per epoch. The worker greets with its all-to-all address
//! (`WorkerHello`); the coordinator answers with the `Placement` (rank, every rank's mesh
//! address, every rank's experts); the worker joins the TCP mesh, loads its dense weights and
//! its experts, and acknowledges with an empty `StepResult` (step 0). From then on each
//! `StepPlan` is executed in order on a dedicated thread and answered with its `StepResult`.
//! The stream closing (or a step failing) ends the epoch; the engine, its KV and its
//! experts are kept aside for the next one.
//!
//! Epochs: a worker serves one control stream at a time, and a new one (a new leader, or the
//! same coordinator re-placing after a lost, drained or joining worker) ends the current epoch
//! first: its all-to-all connections are shut down (an exchange in flight fails at once), its
//! plan loop stops and its old stream ends. A `Placement` with `keep_state` from the same
//! coordinator, or from a newer leader taking over (a fence at least the one that drove it),
//! with the same KV capacity, then carries the kept engine into the
//! new group ([`Executor::rejoin`]: new mesh and rank, experts gained loaded before the
//! ready answer, the sequences in `keep_seqs` kept and reported in the ready answer's `kept`,
//! every other one released). Any other placement drops the kept engine before loading a
//! fresh one, so two engines are never held at once. To a newer leader than the one that drove
//! the kept engine, the hello reports what it holds (each sequence's tokens and request, the
//! experts, the fence that drove it), which is how a coordinator that takes over after the
//! leader was lost adopts the requests in flight. Control messages may be up to
//! [`CONTROL_MESSAGE_LIMIT`] long (long prompts ride in plans and hellos).
//!
//! Within an epoch, an `ExpertUpdate` re-places experts without stopping: see
//! [`Executor`](crate::executor::Executor). A worker started with an expert budget
//! (`expert_slots`) refuses a placement or update that gives it more experts per layer.

use crate::executor::{holder_table, Executor};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use switchyard_proto::cluster::v1::coordinator_message::Msg as CMsg;
use switchyard_proto::cluster::v1::worker_message::Msg as WMsg;
use switchyard_proto::cluster::v1::worker_server::{Worker, WorkerServer};
use switchyard_proto::cluster::v1::{
    CoordinatorMessage, ExpertAssignment, KeptSeq, Placement, StepResult, WorkerHello,
    WorkerMessage,
};
use switchyard_worker::comm::{Comm, TcpComm};
use switchyard_worker::engine::{read_config, Engine, EngineOptions, ExpertSetup};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

pub struct WorkerService {
    pub id: String,
    pub model: PathBuf,
    pub opts: EngineOptions,
    comm_addr: String,
    comm_listener: std::net::TcpListener,
    pub comm_timeout: Duration,
    /// Experts per MoE layer this worker has room for (0: all); announced in the hello, and a
    /// placement giving it more is refused.
    pub expert_slots: u32,
    current: Arc<tokio::sync::Mutex<Option<Epoch>>>,
    /// The largest fencing token a coordinator has driven this worker with.
    fence: Arc<std::sync::atomic::AtomicU64>,
    /// The previous epoch's engine, until the next placement keeps or drops it.
    retained: Arc<Mutex<Option<Retained>>>,
}

/// The engine of the last epoch, kept for the next one; who drove it and its KV capacity.
struct Retained {
    fence: u64,
    kv_blocks: usize,
    ex: Executor,
}

/// Largest control-stream message either side accepts: a plan whose chunks start long
/// sequences (each carries its prompt), or a hello handing a new leader many long sequences.
pub const CONTROL_MESSAGE_LIMIT: usize = 1 << 30;

/// The Control call's metadata key carrying the coordinator's fencing token (its leadership's
/// election revision). Read before anything else, so a stale leader cannot end the epoch a
/// newer one drives.
pub const FENCE_METADATA: &str = "x-switchyard-fence";

/// The epoch being served: how to stop it, its mesh, and its executor thread (started once
/// the placement arrives; the slot's lock orders "stop" against "start").
struct Epoch {
    stop: tokio::sync::watch::Sender<bool>,
    comm: Arc<Mutex<Option<Arc<TcpComm>>>>,
    thread: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl Epoch {
    /// Stops the epoch and waits until its plan loop has ended (its engine set aside for the
    /// next epoch). A mesh join in progress finishes (or times out) first.
    async fn end(self) {
        let _ = self.stop.send(true);
        if let Some(c) = self.comm.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            c.abort();
        }
        let handle = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            let comm = self.comm.clone();
            let _ = tokio::task::spawn_blocking(move || {
                // The mesh may have been joined after the abort above.
                while !h.is_finished() {
                    if let Some(c) = comm.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                        c.abort();
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                h.join()
            })
            .await;
        }
    }
}

impl WorkerService {
    /// The all-to-all address peers dial, when it differs from the bound one (a pod binds
    /// 0.0.0.0 and is reached by its stable DNS name).
    pub fn advertise_comm(&mut self, addr: String) {
        self.comm_addr = addr;
    }

    pub fn new(
        id: String,
        model: PathBuf,
        opts: EngineOptions,
        comm_listener: std::net::TcpListener,
    ) -> std::io::Result<Self> {
        let comm_addr = comm_listener.local_addr()?.to_string();
        Ok(WorkerService {
            id,
            model,
            opts,
            comm_addr,
            comm_listener,
            comm_timeout: Duration::from_secs(60),
            expert_slots: 0,
            current: Arc::new(tokio::sync::Mutex::new(None)),
            fence: Arc::default(),
            retained: Arc::default(),
        })
    }

    pub fn into_server(self) -> WorkerServer<Self> {
        // A plan may carry long prompts (each starting chunk carries its request's prompt).
        WorkerServer::new(self)
            .max_decoding_message_size(CONTROL_MESSAGE_LIMIT)
            .max_encoding_message_size(CONTROL_MESSAGE_LIMIT)
    }
}

fn msg(m: WMsg) -> WorkerMessage {
    WorkerMessage { msg: Some(m) }
}

type ControlStream = Pin<Box<dyn Stream<Item = Result<WorkerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Worker for WorkerService {
    type ControlStream = ControlStream;

    async fn control(
        &self,
        req: Request<Streaming<CoordinatorMessage>>,
    ) -> Result<Response<ControlStream>, Status> {
        let fence = match req.metadata().get(FENCE_METADATA) {
            None => 0,
            Some(v) => v
                .to_str()
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| {
                    Status::invalid_argument(format!("{FENCE_METADATA}: not a number"))
                })?,
        };
        // One epoch at a time: end the current one (and free its engine) before starting.
        let mut current = self.current.lock().await;
        // Fencing: a coordinator whose leadership is older than the one driving this worker
        // (it lost its lease and a standby took over) is refused, and the epoch goes on.
        let newest = self.fence.load(std::sync::atomic::Ordering::Acquire);
        if fence < newest {
            tracing::warn!(worker = %self.id, fence, newest, "refusing a stale coordinator");
            return Err(Status::failed_precondition(format!(
                "fenced: a newer coordinator (fence {newest}) drives this worker; this stream \
                 carries fence {fence}"
            )));
        }
        self.fence
            .store(fence, std::sync::atomic::Ordering::Release);
        if let Some(old) = current.take() {
            tracing::warn!(worker = %self.id, "new control stream; ending the current epoch");
            old.end().await;
        }
        let listener = self
            .comm_listener
            .try_clone()
            .map_err(|e| Status::internal(format!("comm listener: {e}")))?;
        let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
        let epoch_comm: Arc<Mutex<Option<Arc<TcpComm>>>> = Arc::default();
        let mut inbound = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<WorkerMessage, Status>>(4);
        let (held, held_experts, held_fence) = self
            .retained
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            // Only a newer leader needs to be told (the same one knows what it ran).
            .filter(|r| r.fence < fence)
            .map(|r| {
                let (seqs, experts) = r.ex.held();
                (seqs, experts, r.fence)
            })
            .unwrap_or_default();
        let hello = WorkerHello {
            worker_id: self.id.clone(),
            comm_address: self.comm_addr.clone(),
            memory_bytes: 0,
            expert_slots: self.expert_slots,
            held,
            held_experts,
            held_fence,
        };
        tx.send(Ok(msg(WMsg::Hello(hello))))
            .await
            .map_err(|_| Status::cancelled("stream closed"))?;
        let (model, opts, timeout) = (self.model.clone(), self.opts.clone(), self.comm_timeout);
        let slots = self.expert_slots;
        let retained = self.retained.clone();
        let thread_slot: Arc<Mutex<Option<std::thread::JoinHandle<()>>>> = Arc::default();
        let (comm_slot, thread_stop, slot) =
            (epoch_comm.clone(), stop_rx.clone(), thread_slot.clone());
        tokio::spawn(async move {
            let first = tokio::select! {
                m = inbound.message() => m,
                _ = stop_rx.changed() => return,
            };
            let placement = match first {
                Ok(Some(CoordinatorMessage {
                    msg: Some(CMsg::Placement(p)),
                })) => p,
                other => {
                    let _ = tx
                        .send(Err(Status::invalid_argument(format!(
                            "expected a placement first, got {other:?}"
                        ))))
                        .await;
                    return;
                }
            };
            let (plan_tx, plan_rx) = std::sync::mpsc::sync_channel(1);
            let out = tx.clone();
            let started = {
                let mut guard = slot.lock().unwrap_or_else(|e| e.into_inner());
                if *stop_rx.borrow() {
                    false
                } else {
                    *guard = Some(std::thread::spawn(move || {
                        let setup = (|| -> Result<(Executor, Vec<KeptSeq>), Status> {
                            let cfg = read_config(&model)
                                .map_err(|e| Status::failed_precondition(e.to_string()))?;
                            let holders = holder_table(
                                &placement.holders,
                                cfg.num_layers,
                                cfg.num_experts,
                                &cfg.sparse_layers,
                            )
                            .map_err(|e| Status::invalid_argument(e.to_string()))?;
                            check_placement(&placement)?;
                            check_slots(&placement.assignments, slots)?;
                            let addrs = placement
                                .peer_addresses
                                .iter()
                                .map(|a| {
                                    a.parse().map_err(|_| {
                                        Status::invalid_argument(format!("bad peer address {a:?}"))
                                    })
                                })
                                .collect::<Result<Vec<_>, _>>()?;
                            let comm = TcpComm::join(
                                placement.rank as usize,
                                &addrs,
                                listener,
                                timeout,
                                &placement.mesh_secret,
                            )
                            .map_err(|e| Status::unavailable(e.to_string()))?;
                            let comm = Arc::new(comm);
                            *comm_slot.lock().unwrap_or_else(|e| e.into_inner()) =
                                Some(comm.clone());
                            if *thread_stop.borrow() {
                                return Err(Status::aborted("epoch ended"));
                            }
                            let opts = EngineOptions {
                                kv_blocks: Some(placement.kv_blocks as usize)
                                    .filter(|b| *b > 0)
                                    .or(opts.kv_blocks),
                                ..opts
                            };
                            // The last epoch's engine: carried on, or dropped before a load.
                            let previous = retained
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .take()
                                .filter(|r| {
                                    // This leader, or an older one it took over from
                                    // (a stream older than this worker's newest fence was
                                    // refused above).
                                    placement.keep_state
                                        && r.fence <= fence
                                        && opts.kv_blocks.is_none_or(|b| b == r.kv_blocks)
                                });
                            if let Some(mut r) = previous {
                                match r.ex.rejoin(
                                    Comm::Tcp(comm.clone()),
                                    holders.clone(),
                                    &placement.keep_seqs,
                                ) {
                                    Ok(kept) => return Ok((r.ex, kept)),
                                    Err(e) => tracing::warn!(
                                        error = %e,
                                        "could not carry the engine into the new epoch; loading afresh"
                                    ),
                                }
                            }
                            let engine = Engine::load_with(
                                &model,
                                &opts,
                                ExpertSetup::Parallel {
                                    holders,
                                    comm: Comm::Tcp(comm),
                                },
                            )
                            .map_err(|e| Status::failed_precondition(e.to_string()))?;
                            Ok((Executor::new(engine), vec![]))
                        })();
                        let mut ex = match setup {
                            Ok((ex, kept)) => {
                                let ready = StepResult {
                                    kept,
                                    ..Default::default()
                                };
                                let _ = out.blocking_send(Ok(msg(WMsg::Result(ready))));
                                ex
                            }
                            Err(s) => {
                                let _ = out.blocking_send(Err(s));
                                return;
                            }
                        };
                        while let Ok(m) = plan_rx.recv() {
                            if *thread_stop.borrow() {
                                break;
                            }
                            let r = match m {
                                CMsg::Step(plan) => ex
                                    .execute(&plan)
                                    .map(|r| Some(msg(WMsg::Result(r))))
                                    .map_err(|e| Status::internal(e.to_string())),
                                CMsg::Experts(u) => {
                                    let gained: Vec<_> = u
                                        .holders
                                        .iter()
                                        .filter(|r| r.rank == placement.rank)
                                        .flat_map(|r| r.assignments.clone())
                                        .collect();
                                    let world = placement.world_size as usize;
                                    let outside =
                                        u.holders.iter().find(|r| r.rank as usize >= world);
                                    let in_world = match outside {
                                        Some(r) => Err(Status::invalid_argument(format!(
                                            "expert update names rank {} outside a world of {world}",
                                            r.rank
                                        ))),
                                        None => Ok(()),
                                    };
                                    in_world
                                        .and_then(|()| check_slots(&gained, slots))
                                        .and_then(|()| {
                                            ex.prepare(&u).map_err(|e| {
                                                Status::invalid_argument(e.to_string())
                                            })
                                        })
                                        .map(|()| None)
                                }
                                CMsg::Placement(_) => {
                                    Err(Status::invalid_argument("a second placement in one epoch"))
                                }
                            };
                            let failed = r.is_err();
                            let sent = match r.transpose() {
                                Some(r) => out.blocking_send(r).is_ok(),
                                None => true,
                            };
                            if !sent || failed {
                                break;
                            }
                        }
                        // Kept for the next epoch (a failed step leaves every sequence at
                        // the length it had before that step).
                        let kv_blocks = ex.engine.kv_capacity();
                        *retained.lock().unwrap_or_else(|e| e.into_inner()) = Some(Retained {
                            fence,
                            kv_blocks,
                            ex,
                        });
                    }));
                    true
                }
            };
            if !started {
                return;
            }
            loop {
                tokio::select! {
                    m = inbound.message() => match m {
                        Ok(Some(CoordinatorMessage { msg: Some(m) })) => {
                            if plan_tx.send(m).is_err() {
                                break;
                            }
                        }
                        Ok(Some(_)) => {}
                        _ => break,
                    },
                    _ = stop_rx.changed() => break,
                }
            }
            // Dropping the plan sender ends the executor loop; dropping `tx` ends the stream.
        });
        *current = Some(Epoch {
            stop: stop_tx,
            comm: epoch_comm,
            thread: thread_slot,
        });
        drop(current);
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Refuses assignments that give this worker more experts in a layer than it has room for.
fn check_slots(assignments: &[ExpertAssignment], slots: u32) -> Result<(), Status> {
    match assignments
        .iter()
        .find(|a| slots > 0 && a.experts.len() > slots as usize)
    {
        Some(a) => Err(Status::failed_precondition(format!(
            "layer {}: {} experts assigned, this worker has room for {slots}",
            a.layer,
            a.experts.len()
        ))),
        None => Ok(()),
    }
}

/// Connections accepted on `listener` with Nagle's algorithm off: a step plan, a step result or
/// a streamed token is one small write that must leave at once (with Nagle on, it waits for
/// the peer's delayed ACK, ~40 ms).
pub fn incoming(
    listener: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|s| {
        let s = s?;
        s.set_nodelay(true)?;
        Ok(s)
    })
}

/// A placement this worker can act on: a world of at least one rank, this rank inside it, one
/// mesh address per rank and a holder entry naming only ranks of the world.
fn check_placement(p: &Placement) -> Result<(), Status> {
    let world = p.world_size as usize;
    if world == 0 || p.rank as usize >= world {
        return Err(Status::invalid_argument(format!(
            "placement: rank {} outside a world of {world}",
            p.rank
        )));
    }
    if p.peer_addresses.len() != world {
        return Err(Status::invalid_argument(format!(
            "placement: {} peer addresses for a world of {world}",
            p.peer_addresses.len()
        )));
    }
    if let Some(r) = p.holders.iter().find(|r| r.rank as usize >= world) {
        return Err(Status::invalid_argument(format!(
            "placement: holders name rank {} outside a world of {world}",
            r.rank
        )));
    }
    Ok(())
}
