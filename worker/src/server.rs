//! The worker's control server: the `switchyard.cluster.v1.Worker` gRPC service.
//!
//! One control stream per epoch. The worker greets with its all-to-all address
//! (`WorkerHello`); the coordinator answers with the `Placement` (rank, every rank's mesh
//! address, every rank's experts); the worker joins the TCP mesh, loads its dense weights and
//! its experts, and acknowledges with an empty `StepResult` (step 0). From then on each
//! `StepPlan` is executed in order on a dedicated thread and answered with its `StepResult`.
//! The stream closing ends the epoch: the engine and its KV are dropped.

use crate::comm::{Comm, TcpComm};
use crate::engine::{read_config, Engine, EngineOptions, ExpertSetup};
use crate::executor::Executor;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use switchyard_proto::cluster::v1::coordinator_message::Msg as CMsg;
use switchyard_proto::cluster::v1::worker_message::Msg as WMsg;
use switchyard_proto::cluster::v1::worker_server::{Worker, WorkerServer};
use switchyard_proto::cluster::v1::{
    CoordinatorMessage, Placement, StepResult, WorkerHello, WorkerMessage,
};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

pub struct WorkerService {
    pub id: String,
    pub model: PathBuf,
    pub opts: EngineOptions,
    comm_addr: String,
    comm_listener: Arc<Mutex<Option<std::net::TcpListener>>>,
    pub comm_timeout: Duration,
}

impl WorkerService {
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
            comm_listener: Arc::new(Mutex::new(Some(comm_listener))),
            comm_timeout: Duration::from_secs(60),
        })
    }

    pub fn into_server(self) -> WorkerServer<Self> {
        WorkerServer::new(self)
    }
}

fn msg(m: WMsg) -> WorkerMessage {
    WorkerMessage { msg: Some(m) }
}

/// `holders[layer][expert]` from a placement's per-rank assignments.
fn holder_table(
    p: &Placement,
    layers: usize,
    experts: usize,
    sparse: &[bool],
) -> Result<Vec<Vec<Vec<u32>>>, Status> {
    let mut t: Vec<Vec<Vec<u32>>> = (0..layers)
        .map(|l| {
            if sparse[l] {
                vec![vec![]; experts]
            } else {
                vec![]
            }
        })
        .collect();
    for rk in &p.holders {
        for a in &rk.assignments {
            let layer = t
                .get_mut(a.layer as usize)
                .filter(|l| !l.is_empty())
                .ok_or_else(|| {
                    Status::invalid_argument(format!(
                        "placement names layer {} which has no experts",
                        a.layer
                    ))
                })?;
            for &e in &a.experts {
                layer
                    .get_mut(e as usize)
                    .ok_or_else(|| {
                        Status::invalid_argument(format!(
                            "placement names expert {e} of layer {}",
                            a.layer
                        ))
                    })?
                    .push(rk.rank);
            }
        }
    }
    for l in &mut t {
        for ranks in l.iter_mut() {
            ranks.sort_unstable();
        }
    }
    Ok(t)
}

type ControlStream = Pin<Box<dyn Stream<Item = Result<WorkerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Worker for WorkerService {
    type ControlStream = ControlStream;

    async fn control(
        &self,
        req: Request<Streaming<CoordinatorMessage>>,
    ) -> Result<Response<ControlStream>, Status> {
        let listener = self
            .comm_listener
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| {
                Status::failed_precondition("this worker already serves a control stream")
            })?;
        let mut inbound = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<WorkerMessage, Status>>(4);
        let hello = WorkerHello {
            worker_id: self.id.clone(),
            comm_address: self.comm_addr.clone(),
            memory_bytes: 0,
        };
        tx.send(Ok(msg(WMsg::Hello(hello))))
            .await
            .map_err(|_| Status::cancelled("stream closed"))?;
        let (model, opts, timeout) = (self.model.clone(), self.opts.clone(), self.comm_timeout);
        tokio::spawn(async move {
            let placement = match inbound.message().await {
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
            std::thread::spawn(move || {
                let setup = (|| -> Result<Executor, Status> {
                    let cfg = read_config(&model)
                        .map_err(|e| Status::failed_precondition(e.to_string()))?;
                    let holders = holder_table(
                        &placement,
                        cfg.num_layers,
                        cfg.num_experts,
                        &cfg.sparse_layers,
                    )?;
                    let addrs = placement
                        .peer_addresses
                        .iter()
                        .map(|a| {
                            a.parse().map_err(|_| {
                                Status::invalid_argument(format!("bad peer address {a:?}"))
                            })
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    let comm = TcpComm::join(placement.rank as usize, &addrs, listener, timeout)
                        .map_err(|e| Status::unavailable(e.to_string()))?;
                    let opts = EngineOptions {
                        kv_blocks: Some(placement.kv_blocks as usize)
                            .filter(|b| *b > 0)
                            .or(opts.kv_blocks),
                        ..opts
                    };
                    let engine = Engine::load_with(
                        &model,
                        &opts,
                        ExpertSetup::Parallel {
                            holders,
                            comm: Comm::Tcp(Arc::new(comm)),
                        },
                    )
                    .map_err(|e| Status::failed_precondition(e.to_string()))?;
                    Ok(Executor::new(engine))
                })();
                let mut ex = match setup {
                    Ok(ex) => {
                        let _ = out.blocking_send(Ok(msg(WMsg::Result(StepResult::default()))));
                        ex
                    }
                    Err(s) => {
                        let _ = out.blocking_send(Err(s));
                        return;
                    }
                };
                while let Ok(plan) = plan_rx.recv() {
                    let r = ex
                        .execute(&plan)
                        .map(|r| msg(WMsg::Result(r)))
                        .map_err(|e| Status::internal(e.to_string()));
                    let failed = r.is_err();
                    if out.blocking_send(r).is_err() || failed {
                        break;
                    }
                }
            });
            while let Ok(Some(m)) = inbound.message().await {
                if let Some(CMsg::Step(plan)) = m.msg {
                    if plan_tx.send(plan).is_err() {
                        break;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
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
