//! The coordinator role: lead, find the workers, connect, serve.
//!
//! 1. Campaign for leadership of the cluster prefix; a standby replica waits here until the
//!    leader's lease is gone (etcd), so at most one coordinator drives the workers.
//! 2. Wait until `workers` members have registered; ranks follow member ids in sorted order.
//! 3. Connect to their control streams, hand out the expert placement, wait until every worker
//!    has joined the all-to-all mesh and loaded its experts.
//! 4. Serve `switchyard.v1.Inference`, `switchyard.v1.Admin`, `grpc.health.v1.Health` (SERVING once the cluster is up)
//!    and server reflection on `grpc_addr`; keep ClusterStatus's roster current with
//!    membership's watch (a worker whose lease lapses is no longer listed).
//!
//! Prints `serving grpc=URL` on stdout once ready.

use crate::server::InferenceService;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::future::Future;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use switchyard_runtime::membership::{with_backoff, MemberInfo, Membership, MembershipEvent};

#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub model: PathBuf,
    /// Workers to wait for; the cluster's world size.
    pub workers: usize,
    pub redundant_experts: usize,
    pub grpc_addr: String,
    pub kv_blocks: usize,
    pub token_budget: usize,
    pub max_queue: usize,
    pub pace_factor: f64,
    /// Prefix homing's load weight (`--prefix-homing`); `None`: home by free blocks.
    pub prefix_homing: Option<f64>,
    /// Sequences may span several workers' KV (`--context-parallel`).
    pub context_parallel: bool,
    /// Prometheus `/metrics` HTTP address; none: no metrics port.
    pub metrics_addr: Option<String>,
    /// This coordinator's name in the leader election.
    pub candidate: String,
    pub lease_ttl: Duration,
    /// Give up waiting for workers after this long.
    pub join_timeout: Duration,
    pub rebalance: crate::rebalance::RebalancePolicy,
    /// A step with a rank silent this long fails (and the cluster is rebuilt without it).
    pub step_timeout: Duration,
    /// How long a request adopted from a lost leader waits for its client's Resume.
    pub resume_grace: Duration,
    /// OpenAI-style HTTP API address (also `/healthz`, `/readyz`, `/metrics`); none: off.
    pub http_addr: Option<String>,
    /// Required API keys (HTTP and gRPC); none: open.
    pub api_keys: Option<Arc<crate::auth::ApiKeys>>,
    /// Longest prompt + max_tokens of a request (`None`: the model's context or one worker's
    /// KV, whichever is smaller).
    pub max_model_len: Option<usize>,
    /// How the model writes tool calls (`None`: detected from its vocabulary and
    /// architecture).
    pub tool_call_parser: Option<crate::text::tools::ToolFormat>,
    /// Fault injection (supervision tests): the engine loop panics after this many steps.
    pub panic_after_steps: Option<u64>,
    /// The Admin API's own listener; none: no Admin API. Without `admin_keys` it must be a
    /// loopback address.
    pub admin_addr: Option<String>,
    /// Admin credentials (distinct from tenant API keys).
    pub admin_keys: Option<Arc<crate::auth::ApiKeys>>,
    /// TLS on the public gRPC, HTTP and Admin listeners (mutual with a client CA).
    pub tls: Option<switchyard_runtime::tls::ServerTls>,
    /// TLS towards `https://` workers' Control listeners (with this coordinator's identity
    /// for mutual TLS).
    pub control_tls: Option<tonic::transport::ClientTlsConfig>,
}

/// Whether `addr` (HOST:PORT) only accepts connections from this host.
pub fn is_loopback(addr: &str) -> bool {
    match addr.parse::<std::net::SocketAddr>() {
        Ok(a) => a.ip().is_loopback(),
        Err(_) => addr
            .rsplit_once(':')
            .is_some_and(|(h, _)| h.eq_ignore_ascii_case("localhost")),
    }
}

/// Refuses an Admin listener that others could reach without a credential.
pub fn check_admin(addr: Option<&str>, keys: bool) -> Result<()> {
    match addr {
        Some(a) if !keys && !is_loopback(a) => bail!(
            "--admin-addr {a} is reachable from other hosts: give admin keys \
             (--admin-keys-file or SWITCHYARD_ADMIN_KEYS), or bind a loopback address"
        ),
        _ => Ok(()),
    }
}

/// Election name (under the membership prefix) that coordinator replicas campaign on.
pub const LEADER_ELECTION: &str = "coordinator-leader";

/// Runs the coordinator until `shutdown` resolves.
pub async fn serve(
    opts: ServeOptions,
    membership: Arc<dyn Membership>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    if opts.workers == 0 {
        bail!("--workers must be at least 1");
    }
    check_admin(opts.admin_addr.as_deref(), opts.admin_keys.is_some())?;
    if let Some(l) = with_backoff("asking who leads", || membership.leader(LEADER_ELECTION)).await?
    {
        tracing::warn!(leader = %l, "standby: waiting for the leader's lease to end");
    }
    let mut leadership = with_backoff("campaigning", || {
        membership.campaign(LEADER_ELECTION, &opts.candidate, opts.lease_ttl)
    })
    .await?;
    let fence = leadership.fence();
    tracing::info!(candidate = %opts.candidate, fence, "leading");
    // Steps only while leadership is fresh: a leader that cannot renew its lease in time
    // stops driving workers before a standby could be elected (and the workers' fencing
    // refuses it once one has).
    let may_drive = leadership.freshness();

    let (snapshot, mut events) = with_backoff("watching members", || membership.watch()).await?;
    let mut live: BTreeMap<String, MemberInfo> =
        snapshot.into_iter().map(|m| (m.id.clone(), m)).collect();
    let deadline = tokio::time::Instant::now() + opts.join_timeout;
    while live.len() < opts.workers {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(e)) => apply(&mut live, e),
            Ok(None) => bail!("membership watch ended"),
            Err(_) => bail!(
                "{} of {} workers registered after {:?}",
                live.len(),
                opts.workers,
                opts.join_timeout
            ),
        }
    }
    let members: Vec<MemberInfo> = live.values().take(opts.workers).cloned().collect();
    // The workers the cluster is built from: the first K members, then every member that
    // registers later (a join triggers a rebuild that includes it).
    let pool: Arc<std::sync::Mutex<Vec<String>>> = Arc::new(std::sync::Mutex::new(
        members.iter().map(|m| m.control_url.clone()).collect(),
    ));
    let urls = pool.clone();
    tracing::info!(
        workers = ?members.iter().map(|m| m.control_url.as_str()).collect::<Vec<_>>(),
        "workers registered; connecting"
    );

    let name = opts
        .model
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let o = opts.clone();
    // Notified when a cluster worker leaves membership: fails a step stuck on it at once.
    let interrupt = Arc::new(tokio::sync::Notify::new());
    let interrupt_factory = interrupt.clone();
    let svc = tokio::task::spawn_blocking(move || {
        let (model, redundant, kv) = (o.model.clone(), o.redundant_experts, o.kv_blocks);
        let step_timeout = o.step_timeout;
        let interrupt = interrupt_factory.clone();
        let access = crate::remote::ControlAccess {
            fence,
            tls: o.control_tls.clone(),
        };
        InferenceService::start(
            &o.model,
            name,
            // First all workers; after a lost rank, those still reachable (a new epoch).
            move |carry: &crate::driver::Carry| {
                let candidates = urls.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let mut alive: Vec<String> =
                    candidates.into_iter().filter(|u| reachable(u)).collect();
                // A worker that dies while the cluster forms is left out and the rest retried.
                loop {
                    if alive.is_empty() {
                        return Err(crate::driver::DriverError::Unreachable {
                            rank: 0,
                            detail: "no worker is reachable".into(),
                        });
                    }
                    match crate::remote::GrpcCluster::connect_carrying(
                        &alive, &model, redundant, kv, 16, &access, carry,
                    )
                    .map(|c| {
                        c.with_step_timeout(step_timeout)
                            .with_interrupt(interrupt.clone())
                    }) {
                        Err(crate::driver::DriverError::Unreachable { rank, detail })
                            if alive.len() > 1 =>
                        {
                            // The rank named may only be the first to notice a peer's death:
                            // probe again, and leave out the named one only if all answer.
                            let before = alive.len();
                            alive.retain(|u| reachable(u));
                            if alive.len() == before {
                                tracing::warn!(url = %alive[rank], %detail, "leaving out a worker");
                                alive.remove(rank);
                            }
                        }
                        other => return other,
                    }
                }
            },
            crate::server::ServiceOptions {
                token_budget: o.token_budget,
                max_in_flight: o.max_queue,
                pace_factor: o.pace_factor,
                prefix_homing: o.prefix_homing,
                context_parallel: o.context_parallel,
                redundant: o.redundant_experts,
                rebalance: o.rebalance,
                max_model_len: o.max_model_len,
                tool_format: o.tool_call_parser,
                panic_after_steps: o.panic_after_steps,
                may_drive: Some(may_drive),
                resume_grace: o.resume_grace,
            },
        )
    })
    .await??;
    let mut engine_failure = svc.engine_failure();
    let roster = svc.roster();
    let rebuild = svc.rebuilder();
    let control = svc.control();
    tokio::spawn(take_back_returning_workers(control.clone(), pool.clone()));
    let admin = crate::admin::AdminService::new(
        svc.control(),
        roster.clone(),
        Some(pool.clone()),
        switchyard_worker::engine::read_config(&opts.model)?.num_experts,
    )
    .with_admin_keys(opts.admin_keys.clone(), opts.api_keys.clone());
    {
        let mut r = roster.lock().unwrap_or_else(|e| e.into_inner());
        r.ids = members
            .iter()
            .map(|m| (m.control_url.clone(), m.id.clone()))
            .collect();
        r.live = live.keys().cloned().collect();
    }
    let membership_control = control.clone();
    tokio::spawn(async move {
        let control = membership_control;
        while let Some(e) = events.recv().await {
            match &e {
                MembershipEvent::Left(id) => tracing::warn!(%id, "worker left membership"),
                MembershipEvent::Joined(m) => tracing::info!(id = %m.id, "worker registered"),
            }
            if let MembershipEvent::Left(id) = &e {
                // A drained worker whose process is gone may come back as a fresh join.
                let (was_drained, url) = {
                    let mut r = roster.lock().unwrap_or_else(|e| e.into_inner());
                    let url = r.ids.iter().find(|(_, i)| *i == id).map(|(u, _)| u.clone());
                    (r.drained.remove(id), url)
                };
                if was_drained {
                    tracing::info!(%id, "drained worker left membership");
                } else if url.is_some_and(|u| control.snapshot().addresses.contains(&u)) {
                    // Its lease lapsed: dead, frozen or cut off. Rebuild over the workers that
                    // still answer rather than wait for a step to time out.
                    tracing::warn!(%id, "a worker of the cluster left membership; rebuilding");
                    interrupt.notify_one();
                    rebuild();
                }
            }
            if let MembershipEvent::Joined(m) = &e {
                let drained = roster
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .drained
                    .contains(&m.id);
                let mut p = pool.lock().unwrap_or_else(|e| e.into_inner());
                let outside = !control.snapshot().addresses.contains(&m.control_url);
                if !drained && p.contains(&m.control_url) && outside {
                    // Back at its old address (a restarted process): take it in again.
                    tracing::warn!(id = %m.id, "worker registered again; rebuilding to include it");
                    rebuild();
                } else if !drained && !p.contains(&m.control_url) {
                    p.push(m.control_url.clone());
                    roster
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .ids
                        .insert(m.control_url.clone(), m.id.clone());
                    tracing::warn!(id = %m.id, "worker joined; rebuilding the cluster to include it");
                    rebuild();
                }
            }
            apply(&mut live, e);
            roster.lock().unwrap_or_else(|e| e.into_inner()).live = live.keys().cloned().collect();
        }
    });

    let metrics = svc.metrics();
    let svc = Arc::new(svc.with_api_keys(opts.api_keys.clone()));
    // Leadership is watched by a task that holds it: when it is lost, `leading` turns false;
    // aborting the task resigns (the engine failed).
    let (leading_tx, leading) = tokio::sync::watch::channel(true);
    let holder = tokio::spawn(async move {
        leadership.lost().await;
        tracing::error!("leadership lost; stopping");
        let _ = leading_tx.send(false);
    });
    // Readiness: the cluster serves (every expert placed on a live worker) and this replica
    // holds leadership. Both are local state: no etcd round trip, so an etcd outage does not
    // take every coordinator out of the Service (leadership is lost only when etcd says the
    // lease is gone). Read every 100 ms into gRPC health (overall and per service) and /readyz.
    let (health, health_svc) = tonic_health::server::health_reporter();
    let ready_state: Arc<std::sync::Mutex<Result<(), String>>> =
        Arc::new(std::sync::Mutex::new(Err("starting".into())));
    {
        let (control, ready_state, leading) =
            (control.clone(), ready_state.clone(), leading.clone());
        let health = health.clone();
        let first = readiness(&control.snapshot(), *leading.borrow());
        apply_readiness(&health, &ready_state, first).await;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                let r = readiness(&control.snapshot(), *leading.borrow());
                apply_readiness(&health, &ready_state, r).await;
            }
        });
    }
    // Reflection in both versions: v1, and v1alpha for the clients that only speak it (grpcurl
    // falls back to it; grpcio's reflection helpers use it).
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(switchyard_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let listener = tokio::net::TcpListener::bind(&opts.grpc_addr)
        .await
        .with_context(|| format!("--grpc-addr {}", opts.grpc_addr))?;
    let scheme = if opts.tls.is_some() { "https" } else { "http" };
    let grpc_tls = opts.tls.as_ref().map(|t| t.tonic()).transpose()?;
    let http_tls = opts
        .tls
        .as_ref()
        .map(crate::http::rustls_config)
        .transpose()?;
    let mut announce = format!("serving grpc={scheme}://{}", listener.local_addr()?);
    // What /readyz answers, on the HTTP API and on the metrics port alike.
    let ready: crate::http::Readiness = {
        let ready_state = ready_state.clone();
        Arc::new(move || {
            ready_state
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
        })
    };
    if let Some(addr) = &opts.http_addr {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("--http-addr {addr}"))?;
        announce.push_str(&format!(" http={scheme}://{}", l.local_addr()?));
        let state = crate::http::HttpState {
            svc: svc.clone(),
            metrics: metrics.clone(),
            ready: ready.clone(),
        };
        tokio::spawn(async move {
            if let Err(e) = crate::http::serve(l, state, http_tls).await {
                tracing::error!(error = %e, "HTTP server stopped");
            }
        });
    }
    if let Some(addr) = &opts.metrics_addr {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("--metrics-addr {addr}"))?;
        announce.push_str(&format!(" metrics=http://{}/metrics", l.local_addr()?));
        let (m, ready) = (metrics.clone(), ready.clone());
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(l, m, ready).await {
                tracing::error!(error = %e, "metrics server stopped");
            }
        });
    }
    if let Some(addr) = &opts.admin_addr {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("--admin-addr {addr}"))?;
        announce.push_str(&format!(" admin={scheme}://{}", l.local_addr()?));
        let admin = admin.into_server();
        let mut server = tonic::transport::Server::builder();
        // The Admin API's TLS: the same identity, no client certificate required (its
        // credential is the admin key), so a worker's preStop needs only the CA.
        if let Some(t) = &opts.tls {
            let t = switchyard_runtime::tls::ServerTls {
                client_ca: None,
                ..t.clone()
            };
            server = server.tls_config(t.tonic()?)?;
        }
        tokio::spawn(async move {
            let served = server
                .add_service(admin)
                .serve_with_incoming(switchyard_runtime::server::incoming(l))
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "admin server stopped");
            }
        });
    } else {
        drop(admin);
    }
    println!("{announce}");
    std::io::stdout().flush()?;
    let mut lost = leading.clone();
    let failed = async move {
        let why = engine_failure
            .wait_for(|f| f.is_some())
            .await
            .ok()
            .and_then(|f| f.clone());
        why.unwrap_or_else(|| "the engine loop stopped".into())
    };
    let mut failure = None;
    let mut lost_leadership = false;
    let mut server = tonic::transport::Server::builder();
    if let Some(t) = grpc_tls {
        server = server.tls_config(t)?;
    }
    server
        .add_service(health_svc)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(switchyard_proto::v1::inference_server::InferenceServer::from_arc(svc))
        .serve_with_incoming_shutdown(switchyard_runtime::server::incoming(listener), async {
            tokio::select! {
                _ = shutdown => {}
                _ = lost.wait_for(|l| !*l) => {
                    // Fail what is in flight first: a paused stream would otherwise hold the
                    // graceful shutdown forever.
                    control.stop("leadership lost");
                    lost_leadership = true;
                }
                why = failed => failure = Some(why),
            }
        })
        .await?;
    if let Some(why) = failure {
        // Not ready (the snapshot says unavailable), no longer leading (resigned, so a
        // standby takes over at once), and a non-zero exit so the pod is restarted.
        apply_readiness(&health, &ready_state, Err(why.clone())).await;
        holder.abort();
        let _ = holder.await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        bail!("{why}; resigned leadership");
    }
    if lost_leadership {
        // A supervisor restarts the process, which campaigns again as a standby.
        bail!("leadership lost");
    }
    Ok(())
}

/// Every 2 s, checks that the cluster's workers still answer (rebuilding without one that
/// does not), and looks for pool workers outside the cluster (on two ticks in a row) (lost, then restarted at the same
/// address, e.g. a StatefulSet pod; or a static `--worker-url` that answers again) and rebuilds
/// to take them back. A worker that answers but does not make it into the cluster is retried
/// with exponential backoff (up to a minute), so a broken one cannot make the cluster change
/// epoch every 2 s.
async fn take_back_returning_workers(
    control: crate::server::EngineControl,
    pool: Arc<std::sync::Mutex<Vec<String>>>,
) {
    use std::collections::HashMap;
    let mut backoff: HashMap<String, (tokio::time::Instant, Duration)> = HashMap::new();
    // Outside on two ticks in a row: a join's own rebuild (already asked for) is not doubled.
    let mut outside_before: Vec<String> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tick.tick().await;
        let snap = control.snapshot();
        if !snap.unavailable.is_empty() {
            continue; // the engine loop retries on its own
        }
        // A cluster worker that stopped answering while the cluster is idle (no step to fail,
        // no membership lease to lapse with static workers): rebuild without it now, so
        // readiness and capacity reflect it before the next request pays for it.
        let members = snap.addresses.clone();
        let gone = tokio::task::spawn_blocking(move || members.iter().any(|u| !reachable(u)))
            .await
            .unwrap_or(false);
        if gone {
            tracing::warn!("a cluster worker stopped answering; rebuilding without it");
            let _ = control.rebuild().await;
            continue;
        }
        let now = tokio::time::Instant::now();
        let outside: Vec<String> = pool
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|u| !snap.addresses.contains(u))
            .cloned()
            .collect();
        let due: Vec<String> = outside
            .iter()
            .filter(|u| outside_before.contains(u))
            .filter(|u| backoff.get(*u).is_none_or(|(next, _)| *next <= now))
            .cloned()
            .collect();
        outside_before = outside;
        if due.is_empty() {
            continue;
        }
        let probe = due;
        let back: Vec<String> = tokio::task::spawn_blocking(move || {
            probe.into_iter().filter(|u| reachable(u)).collect()
        })
        .await
        .unwrap_or_default();
        if back.is_empty() {
            continue;
        }
        tracing::warn!(workers = ?back, "workers reachable again; rebuilding to take them in");
        let _ = control.rebuild().await;
        let now_in = control.snapshot().addresses;
        for u in back {
            if now_in.contains(&u) {
                backoff.remove(&u);
            } else {
                let wait = backoff.get(&u).map_or(Duration::from_secs(2), |(_, d)| {
                    (*d * 2).min(Duration::from_secs(60))
                });
                backoff.insert(u, (tokio::time::Instant::now() + wait, wait));
            }
        }
    }
}

/// Whether the coordinator can serve: it leads, and the cluster is formed and not
/// unavailable. Pure, from local state only.
fn readiness(s: &crate::driver::Snapshot, leading: bool) -> Result<(), String> {
    if !leading {
        return Err("leadership lost".into());
    }
    if !s.unavailable.is_empty() {
        return Err(s.unavailable.clone());
    }
    if s.addresses.is_empty() {
        return Err("no cluster yet".into());
    }
    Ok(())
}

/// Records readiness and mirrors it into gRPC health (the overall status and the service's).
async fn apply_readiness(
    health: &tonic_health::server::HealthReporter,
    state: &std::sync::Mutex<Result<(), String>>,
    r: Result<(), String>,
) {
    let changed = *state.lock().unwrap_or_else(|e| e.into_inner()) != r;
    if !changed {
        return;
    }
    let status = if r.is_ok() {
        tonic_health::ServingStatus::Serving
    } else {
        tonic_health::ServingStatus::NotServing
    };
    if let Err(why) = &r {
        tracing::warn!(%why, "not ready");
    } else {
        tracing::info!("ready");
    }
    // Health first, so that /readyz never runs ahead of gRPC health.
    health.set_service_status("", status).await;
    health
        .set_service_status("switchyard.v1.Inference", status)
        .await;
    *state.lock().unwrap_or_else(|e| e.into_inner()) = r;
}

/// Whether a worker's control port accepts a connection (within 1 s).
fn reachable(url: &str) -> bool {
    use std::net::ToSocketAddrs;
    let hostport = url
        .trim_start_matches("http://")
        .trim_start_matches("https://")
        .trim_end_matches('/');
    hostport
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .map(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(1)).is_ok())
        .unwrap_or(false)
}

fn apply(live: &mut BTreeMap<String, MemberInfo>, e: MembershipEvent) {
    match e {
        MembershipEvent::Joined(m) => {
            live.insert(m.id.clone(), m);
        }
        MembershipEvent::Left(id) => {
            live.remove(&id);
        }
    }
}
