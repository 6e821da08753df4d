//! The operator API (`switchyard.v1.Admin`): drain a worker, rebalance experts, status.
//!
//! Drain takes a worker's control URL out of the pool the cluster factory builds from, marks
//! the member drained, and rebuilds at the next step boundary: a new epoch over the others
//! (which keep their experts and their sequences' KV), its experts given to them, its
//! sequences re-homed and re-prefilled from their tokens so far (no client sees an error). It is refused (FAILED_PRECONDITION) when the others could not hold
//! every expert, and undone if the rebuild fails. A drained member stays out until its
//! process leaves membership; registering again after that brings it back as a join.
//!
//! Operators apart from tenants: the service is served only on its own listener
//! (`--admin-addr`), never on the public API's port. With admin keys (`--admin-keys-file`,
//! `SWITCHYARD_ADMIN_KEYS`) every call must present one of them; a tenant API key is refused
//! (PERMISSION_DENIED). Without admin keys the listener must be a loopback address (the
//! coordinator refuses to start otherwise), so only someone on the coordinator's own host can
//! operate it.

use crate::server::{status_response, EngineControl, Roster};
use std::sync::{Arc, Mutex};
use switchyard_proto::v1::admin_server::{Admin, AdminServer};
use switchyard_proto::v1::{
    ClusterStatusRequest, ClusterStatusResponse, DrainRequest, DrainResponse, RebalanceRequest,
    RebalanceResponse,
};
use tonic::{Request, Response, Status};

pub struct AdminService {
    control: EngineControl,
    roster: Arc<Mutex<Roster>>,
    /// Control URLs the cluster is built from; `None`: a fixed cluster (no drain).
    pool: Option<Arc<Mutex<Vec<String>>>>,
    num_experts: usize,
    /// One drain at a time.
    draining: tokio::sync::Mutex<()>,
    /// Admin credentials; `None`: open (a loopback listener only).
    keys: Option<Arc<crate::auth::ApiKeys>>,
    /// Tenant API keys, to tell a tenant who knocks here why not.
    tenants: Option<Arc<crate::auth::ApiKeys>>,
}

impl AdminService {
    pub fn new(
        control: EngineControl,
        roster: Arc<Mutex<Roster>>,
        pool: Option<Arc<Mutex<Vec<String>>>>,
        num_experts: usize,
    ) -> Self {
        AdminService {
            control,
            roster,
            pool,
            num_experts,
            draining: Default::default(),
            keys: None,
            tenants: None,
        }
    }

    /// Requires one of the admin `keys` on every call; a key among `tenants` is refused with
    /// PERMISSION_DENIED.
    pub fn with_admin_keys(
        mut self,
        keys: Option<Arc<crate::auth::ApiKeys>>,
        tenants: Option<Arc<crate::auth::ApiKeys>>,
    ) -> Self {
        self.keys = keys;
        self.tenants = tenants;
        self
    }

    fn authorize<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let presented = crate::server::auth_value(req.metadata());
        let Some(k) = &self.keys else {
            return Ok(());
        };
        match k.check(presented) {
            Ok(_) => Ok(()),
            Err(e) => {
                let tenant = self
                    .tenants
                    .as_ref()
                    .is_some_and(|t| t.check(presented).is_ok());
                if tenant {
                    Err(Status::permission_denied(
                        "a tenant API key cannot operate the cluster: the Admin API needs an \
                         admin key",
                    ))
                } else {
                    Err(Status::unauthenticated(format!("admin API: {e}")))
                }
            }
        }
    }

    pub fn into_server(self) -> AdminServer<Self> {
        AdminServer::new(self)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn drain(&self, req: Request<DrainRequest>) -> Result<Response<DrainResponse>, Status> {
        self.authorize(&req)?;
        let worker = req.into_inner().worker;
        let Some(pool) = &self.pool else {
            return Err(Status::unimplemented(
                "this coordinator serves a fixed set of workers",
            ));
        };
        let _one = self.draining.lock().await;
        let snap = self.control.snapshot();
        let url = {
            let r = lock(&self.roster);
            if r.drained.contains(&worker) {
                return Err(Status::failed_precondition(format!(
                    "worker {worker:?} is already drained"
                )));
            }
            match r.ids.iter().find(|(_, id)| **id == worker) {
                Some((url, _)) => url.clone(),
                None => {
                    let mut known: Vec<&String> = r.ids.values().collect();
                    known.sort();
                    return Err(Status::not_found(format!(
                        "no worker {worker:?}; workers: {known:?}"
                    )));
                }
            }
        };
        let Some(rank) = snap.addresses.iter().position(|a| *a == url) else {
            return Err(Status::failed_precondition(format!(
                "worker {worker:?} is not in the cluster now"
            )));
        };
        if snap.addresses.len() < 2 {
            return Err(Status::failed_precondition(format!(
                "worker {worker:?} is the last one"
            )));
        }
        let room: usize = snap
            .expert_slots
            .iter()
            .enumerate()
            .filter(|(r, _)| *r != rank)
            .map(|(_, &s)| if s == 0 { self.num_experts } else { s })
            .sum();
        if room < self.num_experts {
            return Err(Status::failed_precondition(format!(
                "without {worker:?} the workers have room for {room} experts per layer, the \
                 model has {}",
                self.num_experts
            )));
        }
        lock(pool).retain(|u| *u != url);
        lock(&self.roster).drained.insert(worker.clone());
        tracing::warn!(%worker, "draining");
        match self.control.rebuild().await {
            Ok((epoch, world)) => Ok(Response::new(DrainResponse {
                epoch,
                world_size: world as u32,
            })),
            Err(e) => {
                lock(pool).push(url);
                lock(&self.roster).drained.remove(&worker);
                let _ = self.control.rebuild().await;
                Err(Status::unavailable(format!(
                    "drain of {worker:?} failed, undone: {e}"
                )))
            }
        }
    }

    async fn rebalance(
        &self,
        req: Request<RebalanceRequest>,
    ) -> Result<Response<RebalanceResponse>, Status> {
        self.authorize(&req)?;
        let r = self
            .control
            .rebalance()
            .await
            .map_err(Status::unavailable)?;
        Ok(Response::new(RebalanceResponse {
            imbalance_before: r.imbalance_before,
            imbalance_after: r.imbalance_after,
            experts_moved: r.moved as u32,
            expert_version: r.version,
        }))
    }

    async fn status(
        &self,
        req: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        self.authorize(&req)?;
        let s = self.control.snapshot();
        let r = lock(&self.roster).clone();
        Ok(Response::new(status_response(&s, &r)))
    }
}

/// ClusterStatus as JSON (the `admin status --json` output scripts read).
pub fn status_json(s: &ClusterStatusResponse) -> serde_json::Value {
    serde_json::json!({
        "epoch": s.epoch,
        "expert_version": s.expert_version,
        "imbalance": s.imbalance,
        "unavailable": s.unavailable,
        "drained": s.drained,
        "sequences_kept": s.sequences_kept,
        "sequences_reprefilled": s.sequences_reprefilled,
        "requests_restarted": s.requests_restarted,
        "sequences_split": s.sequences_split,
        "workers": s.workers.iter().map(|w| serde_json::json!({
            "id": w.id,
            "rank": w.rank,
            "address": w.address,
            "running_sequences": w.running_sequences,
            "kv_blocks_used": w.kv_blocks_used,
            "kv_blocks_total": w.kv_blocks_total,
            "kv_blocks_cached": w.kv_blocks_cached,
            "prefix_queried_blocks": w.prefix_queried_blocks,
            "prefix_hit_blocks": w.prefix_hit_blocks,
            "prefix_evicted_blocks": w.prefix_evicted_blocks,
        })).collect::<Vec<_>>(),
        "placement": s.placement.iter().map(|p| serde_json::json!({
            "layer": p.layer,
            "expert": p.expert,
            "ranks": p.ranks,
            "load": p.load,
        })).collect::<Vec<_>>(),
    })
}
