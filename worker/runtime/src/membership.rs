//! Cluster membership: which workers are alive and which coordinator leads.
//!
//! One trait, [`Membership`], with two implementations:
//! - [`MemoryMembership`], the embedded default: one process (`switchyard up`) starts the
//!   coordinator and its workers and records them here; no external service.
//! - [`EtcdMembership`], a real etcd cluster: each worker puts `PREFIX/workers/ID` under a lease
//!   it keeps alive; coordinators list and watch that prefix, and coordinator replicas campaign
//!   in etcd's election on `PREFIX/leader`.
//!
//! Invariants:
//! - A member is listed (and a watcher has seen it join) exactly while its [`Registration`] is
//!   alive: dropping the registration, or (etcd) failing to keep its lease for the lease's TTL,
//!   removes it and sends watchers a [`MembershipEvent::Left`].
//! - A watch starts from a snapshot and then delivers every later change once, in order (etcd:
//!   the watch starts at the snapshot's revision + 1, so nothing between the two is lost).
//! - At most one [`Leadership`] per election name is held at a time; `campaign` waits until it
//!   is this candidate's turn.
//!
//! etcd out of reach (restarting, partitioned): nothing is declared lost for that alone.
//! Lease keep-alives retry every TTL/3, re-opening their stream; a registration or leadership
//! is lost only when etcd answers that the lease is gone. (A restarted etcd extends every
//! lease by its TTL, so an outage of any length costs nothing if renewals resume in time.) A
//! broken watch lists the prefix again, reports the difference as Joined/Left events, and
//! watches on from that revision. Meanwhile the data path keeps serving; membership changes
//! wait. Trade-off: a coordinator cut off from etcd longer than its TTL while etcd stays up
//! keeps serving until it hears its lease is gone; a standby may lead meanwhile, and the
//! workers (one control stream at a time) side with the newest.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch, Notify};

#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("member record {key:?}: {detail}")]
    BadRecord { key: String, detail: String },
    #[error("etcd connection settings: {0}")]
    Config(String),
}

/// Runs `op` until it succeeds, waiting 250 ms, then twice as long each time (at most 10 s),
/// while it fails for a reason that may pass (etcd not reachable yet, restarting); says so in
/// the log each time. A configuration error (a missing certificate file) is returned at once.
/// Start order therefore does not matter: a process started before etcd waits for it.
pub async fn with_backoff<T, F, Fut>(what: &str, mut op: F) -> Result<T, MembershipError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, MembershipError>>,
{
    let mut wait = Duration::from_millis(250);
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e @ MembershipError::Config(_)) => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?wait, "{what}: etcd not reachable; waiting");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// TLS and authentication for etcd; all absent: plain connections, no auth.
#[derive(Clone, Debug, Default)]
pub struct EtcdSecurity {
    /// PEM file of the CA that signed the servers' certificates.
    pub ca: Option<std::path::PathBuf>,
    /// PEM client certificate and key, for servers that require client certificates.
    pub cert: Option<std::path::PathBuf>,
    pub key: Option<std::path::PathBuf>,
    /// Username and password.
    pub user: Option<(String, String)>,
}

/// What a worker publishes about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    /// Unique within the cluster prefix.
    pub id: String,
    /// The worker's control endpoint (gRPC URL).
    pub control_url: String,
    /// Model directory or name the worker serves.
    #[serde(default)]
    pub model: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MembershipEvent {
    Joined(MemberInfo),
    /// The member's id.
    Left(String),
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A live registration; dropping it withdraws the member.
pub struct Registration {
    lost: watch::Receiver<bool>,
    _guard: Guard,
}

impl Registration {
    /// Resolves when the registration can no longer be kept (etcd unreachable past the lease).
    pub async fn lost(&mut self) {
        let _ = self.lost.wait_for(|l| *l).await;
    }
}

/// Coordinator leadership; dropping it resigns.
pub struct Leadership {
    lost: watch::Receiver<bool>,
    /// True while the lease was renewed within its renew deadline (two thirds of the TTL).
    fresh: watch::Receiver<bool>,
    /// This leadership's fencing token: larger than every earlier leader's of the same
    /// election (etcd: the leader key's creation revision; in memory: a counter).
    fence: u64,
    _guard: Guard,
}

impl Leadership {
    pub fn is_held(&self) -> bool {
        !*self.lost.borrow()
    }
    /// The fencing token workers compare: a stream from a smaller one is refused.
    pub fn fence(&self) -> u64 {
        self.fence
    }
    /// Whether the lease was renewed recently enough that no other candidate can have taken
    /// over: a leader must not drive workers while this is false (it may resume when a
    /// renewal succeeds again, which etcd allows while the lease lives).
    pub fn freshness(&self) -> watch::Receiver<bool> {
        self.fresh.clone()
    }
    /// Resolves when leadership is lost (the lease could not be kept).
    pub async fn lost(&mut self) {
        let _ = self.lost.wait_for(|l| *l).await;
    }
}

/// Runs a closure when dropped (withdraws a registration, resigns a leadership).
struct Guard(Option<Box<dyn FnOnce() + Send + Sync>>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f()
        }
    }
}

/// Where a coordinator learns who the workers are, and who leads.
pub trait Membership: Send + Sync {
    /// Publishes `member` with a lease of `ttl`, kept alive until the registration is dropped.
    fn register(
        &self,
        member: MemberInfo,
        ttl: Duration,
    ) -> BoxFuture<'_, Result<Registration, MembershipError>>;
    /// The current members, by id, and a stream of every later change.
    fn watch(
        &self,
    ) -> BoxFuture<
        '_,
        Result<(Vec<MemberInfo>, mpsc::UnboundedReceiver<MembershipEvent>), MembershipError>,
    >;
    /// Waits until `candidate` leads the election `name`; keeps it with a lease of `ttl`.
    fn campaign(
        &self,
        name: &str,
        candidate: &str,
        ttl: Duration,
    ) -> BoxFuture<'_, Result<Leadership, MembershipError>>;
    /// The current leader of `name`, if any.
    fn leader(&self, name: &str) -> BoxFuture<'_, Result<Option<String>, MembershipError>>;
}

// ---------------------------------------------------------------------------------------------
// In-memory

#[derive(Default)]
struct MemoryState {
    members: BTreeMap<String, MemberInfo>,
    watchers: Vec<mpsc::UnboundedSender<MembershipEvent>>,
    /// Election name -> leader id.
    leaders: BTreeMap<String, String>,
    /// Leaderships granted so far (the fencing tokens).
    elections: u64,
}

/// Membership inside one process: `switchyard up` registers the workers it spawned.
#[derive(Clone, Default)]
pub struct MemoryMembership {
    state: Arc<Mutex<MemoryState>>,
    released: Arc<Notify>,
}

impl MemoryMembership {
    pub fn new() -> Self {
        Self::default()
    }

    fn publish(st: &mut MemoryState, ev: MembershipEvent) {
        st.watchers.retain(|w| w.send(ev.clone()).is_ok());
    }
}

fn lock(m: &Mutex<MemoryState>) -> std::sync::MutexGuard<'_, MemoryState> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Membership for MemoryMembership {
    fn register(
        &self,
        member: MemberInfo,
        _ttl: Duration,
    ) -> BoxFuture<'_, Result<Registration, MembershipError>> {
        Box::pin(async move {
            let id = member.id.clone();
            {
                let mut st = lock(&self.state);
                st.members.insert(id.clone(), member.clone());
                Self::publish(&mut st, MembershipEvent::Joined(member));
            }
            let state = self.state.clone();
            let (_tx, lost) = watch::channel(false);
            Ok(Registration {
                lost,
                _guard: Guard(Some(Box::new(move || {
                    let _keep = _tx;
                    let mut st = lock(&state);
                    if st.members.remove(&id).is_some() {
                        Self::publish(&mut st, MembershipEvent::Left(id));
                    }
                }))),
            })
        })
    }

    fn watch(
        &self,
    ) -> BoxFuture<
        '_,
        Result<(Vec<MemberInfo>, mpsc::UnboundedReceiver<MembershipEvent>), MembershipError>,
    > {
        Box::pin(async move {
            let (tx, rx) = mpsc::unbounded_channel();
            let mut st = lock(&self.state);
            st.watchers.push(tx);
            Ok((st.members.values().cloned().collect(), rx))
        })
    }

    fn campaign(
        &self,
        name: &str,
        candidate: &str,
        _ttl: Duration,
    ) -> BoxFuture<'_, Result<Leadership, MembershipError>> {
        let (name, candidate) = (name.to_string(), candidate.to_string());
        Box::pin(async move {
            let fence = loop {
                let released = self.released.notified();
                {
                    let mut st = lock(&self.state);
                    if !st.leaders.contains_key(&name) {
                        st.leaders.insert(name.clone(), candidate.clone());
                        st.elections += 1;
                        break st.elections;
                    }
                }
                released.await;
            };
            let (state, released) = (self.state.clone(), self.released.clone());
            let (tx, lost) = watch::channel(false);
            let (fresh_tx, fresh) = watch::channel(true);
            Ok(Leadership {
                lost,
                fresh,
                fence,
                _guard: Guard(Some(Box::new(move || {
                    let _keep = (tx, fresh_tx);
                    lock(&state).leaders.remove(&name);
                    released.notify_waiters();
                }))),
            })
        })
    }

    fn leader(&self, name: &str) -> BoxFuture<'_, Result<Option<String>, MembershipError>> {
        let name = name.to_string();
        Box::pin(async move { Ok(lock(&self.state).leaders.get(&name).cloned()) })
    }
}

// ---------------------------------------------------------------------------------------------
// etcd

/// Membership in an etcd cluster under `prefix` (e.g. `/switchyard/prod`).
#[derive(Clone)]
pub struct EtcdMembership {
    client: etcd_client::Client,
    prefix: String,
}

impl EtcdMembership {
    pub async fn connect(endpoints: &[String], prefix: &str) -> Result<Self, MembershipError> {
        Self::connect_with(endpoints, prefix, &EtcdSecurity::default()).await
    }

    /// Connects to a secured etcd: TLS (server verified against `ca`; `cert` + `key` for
    /// mutual TLS) and/or username/password authentication.
    pub async fn connect_with(
        endpoints: &[String],
        prefix: &str,
        sec: &EtcdSecurity,
    ) -> Result<Self, MembershipError> {
        let mut opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(10));
        if let Some((user, password)) = &sec.user {
            opts = opts.with_user(user.clone(), password.clone());
        }
        if sec.ca.is_some() || sec.cert.is_some() {
            let read = |p: &std::path::Path| {
                std::fs::read(p)
                    .map_err(|e| MembershipError::Config(format!("{}: {e}", p.display())))
            };
            let mut tls = etcd_client::TlsOptions::new();
            if let Some(ca) = &sec.ca {
                tls = tls.ca_certificate(etcd_client::Certificate::from_pem(read(ca)?));
            }
            match (&sec.cert, &sec.key) {
                (Some(c), Some(k)) => {
                    tls = tls.identity(etcd_client::Identity::from_pem(read(c)?, read(k)?));
                }
                (None, None) => {}
                _ => {
                    return Err(MembershipError::Config(
                        "a client certificate needs its key (and the key its certificate)".into(),
                    ))
                }
            }
            opts = opts.with_tls(tls);
        }
        let client = etcd_client::Client::connect(endpoints, Some(opts)).await?;
        Ok(EtcdMembership {
            client,
            prefix: prefix.trim_end_matches('/').to_string(),
        })
    }

    fn workers_prefix(&self) -> String {
        format!("{}/workers/", self.prefix)
    }

    /// Grants a lease and keeps it alive from a background task until the returned sender is
    /// dropped; the receiver turns true when the lease is lost.
    async fn leased(
        &self,
        ttl: Duration,
    ) -> Result<
        (
            i64,
            watch::Receiver<bool>,
            watch::Receiver<bool>,
            tokio::task::JoinHandle<()>,
        ),
        MembershipError,
    > {
        let mut c = self.client.clone();
        let ttl_s = ttl.as_secs().max(1) as i64;
        let lease = c.lease_grant(ttl_s, None).await?.id();
        let (keeper, acks) = c.lease_keep_alive(lease).await?;
        let (lost_tx, lost) = watch::channel(false);
        let (fresh_tx, fresh) = watch::channel(true);
        // Past this without a renewal the lease may be about to lapse (etcd counts from its
        // last renewal), so whoever holds it must stop acting on it.
        let renew_deadline = ttl.mul_f64(2.0 / 3.0);
        let period = Duration::from_millis((ttl_s as u64 * 1000 / 3).max(100));
        let task = tokio::spawn(async move {
            let mut stream = Some((keeper, acks));
            let mut unreachable_since: Option<tokio::time::Instant> = None;
            let mut renewed_at = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(period).await;
                // One renewal, bounded by the period; a broken stream is re-opened (etcd
                // restarted or was out of reach: the client reconnects underneath).
                let renewed = tokio::time::timeout(period, async {
                    if stream.is_none() {
                        // Opening the stream renews once; etcd-client reports etcd's answer
                        // "TTL 0" (the lease is gone) as this error, which is as final as a
                        // zero TTL on an open stream.
                        stream = match c.lease_keep_alive(lease).await {
                            Err(etcd_client::Error::LeaseKeepAliveError(m))
                                if m == "lease not found" =>
                            {
                                return Ok(false)
                            }
                            other => Some(other?),
                        };
                    }
                    let (keeper, acks) = stream.as_mut().expect("opened above");
                    keeper.keep_alive().await?;
                    match acks.message().await? {
                        Some(a) => Ok(a.ttl() > 0),
                        None => Err(etcd_client::Error::WatchError(
                            "keep-alive stream closed".into(),
                        )),
                    }
                })
                .await;
                tracing::debug!(lease, ?renewed, "lease renewal");
                if !matches!(renewed, Ok(Ok(true))) && renewed_at.elapsed() > renew_deadline {
                    if *fresh_tx.borrow() {
                        tracing::warn!(lease, "lease not renewed within its deadline");
                    }
                    fresh_tx.send_replace(false);
                }
                match renewed {
                    Ok(Ok(true)) => {
                        renewed_at = tokio::time::Instant::now();
                        fresh_tx.send_replace(true);
                        if let Some(t) = unreachable_since.take() {
                            tracing::info!(
                                lease,
                                after = ?t.elapsed(),
                                "etcd reachable again; lease kept"
                            );
                        }
                    }
                    Ok(Ok(false)) => {
                        // etcd answered: the lease is gone (expired while we were away).
                        tracing::warn!(lease, "lease expired");
                        let _ = lost_tx.send(true);
                        return;
                    }
                    Ok(Err(e)) => {
                        if unreachable_since.is_none() {
                            tracing::warn!(lease, error = %e, "lease keep-alive failed; retrying");
                            unreachable_since = Some(tokio::time::Instant::now());
                        }
                        stream = None;
                    }
                    Err(_) => {
                        if unreachable_since.is_none() {
                            tracing::warn!(lease, "lease keep-alive timed out; retrying");
                            unreachable_since = Some(tokio::time::Instant::now());
                        }
                        stream = None;
                    }
                }
            }
        });
        Ok((lease, lost, fresh, task))
    }

    /// Stops keeping `lease` and revokes it (best effort; it expires anyway).
    fn release(
        &self,
        lease: i64,
        task: tokio::task::JoinHandle<()>,
    ) -> Box<dyn FnOnce() + Send + Sync> {
        let mut c = self.client.clone();
        Box::new(move || {
            task.abort();
            if let Ok(h) = tokio::runtime::Handle::try_current() {
                h.spawn(async move {
                    let _ = c.lease_revoke(lease).await;
                });
            }
        })
    }
}

/// Every registered member and the revision of that view.
async fn list_members(
    c: &mut etcd_client::Client,
    prefix: &str,
) -> Result<(Vec<MemberInfo>, i64), MembershipError> {
    let snap = c
        .get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
        .await?;
    let rev = snap.header().map(|h| h.revision()).unwrap_or(0);
    let members = snap
        .kvs()
        .iter()
        .filter_map(|kv| match parse_member(kv.key(), kv.value()) {
            Ok(m) => Some(m),
            // One bad record (another tool, an older version) must not hide every member.
            Err(e) => {
                tracing::warn!(error = %e, "ignoring member record");
                None
            }
        })
        .collect();
    Ok((members, rev))
}

/// Forwards membership changes from revision `from` until the watch breaks (`Ok`) or the
/// receiver is gone (`Err`), keeping `known` current.
async fn follow(
    c: &mut etcd_client::Client,
    prefix: &str,
    from: i64,
    known: &mut BTreeMap<String, MemberInfo>,
    tx: &mpsc::UnboundedSender<MembershipEvent>,
) -> Result<(), ()> {
    let opts = etcd_client::WatchOptions::new()
        .with_prefix()
        .with_start_revision(from);
    let Ok(mut stream) = c.watch(prefix, Some(opts)).await else {
        return Ok(());
    };
    while let Ok(Some(resp)) = stream.message().await {
        if resp.canceled() {
            break; // e.g. compacted past `from`: resynchronise by listing
        }
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            let e = match ev.event_type() {
                etcd_client::EventType::Put => match parse_member(kv.key(), kv.value()) {
                    Ok(m) => {
                        known.insert(m.id.clone(), m.clone());
                        MembershipEvent::Joined(m)
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "ignoring member record");
                        continue;
                    }
                },
                etcd_client::EventType::Delete => {
                    let id = String::from_utf8_lossy(&kv.key()[prefix.len()..]).into_owned();
                    known.remove(&id);
                    MembershipEvent::Left(id)
                }
            };
            tx.send(e).map_err(|_| ())?;
        }
    }
    Ok(())
}

fn parse_member(key: &[u8], value: &[u8]) -> Result<MemberInfo, MembershipError> {
    serde_json::from_slice(value).map_err(|e| MembershipError::BadRecord {
        key: String::from_utf8_lossy(key).into_owned(),
        detail: e.to_string(),
    })
}

impl Membership for EtcdMembership {
    fn register(
        &self,
        member: MemberInfo,
        ttl: Duration,
    ) -> BoxFuture<'_, Result<Registration, MembershipError>> {
        Box::pin(async move {
            let (lease, lost, _fresh, task) = self.leased(ttl).await?;
            let key = format!("{}{}", self.workers_prefix(), member.id);
            let value = serde_json::to_vec(&member).expect("member serializes");
            self.client
                .clone()
                .put(
                    key,
                    value,
                    Some(etcd_client::PutOptions::new().with_lease(lease)),
                )
                .await?;
            Ok(Registration {
                lost,
                _guard: Guard(Some(self.release(lease, task))),
            })
        })
    }

    fn watch(
        &self,
    ) -> BoxFuture<
        '_,
        Result<(Vec<MemberInfo>, mpsc::UnboundedReceiver<MembershipEvent>), MembershipError>,
    > {
        Box::pin(async move {
            let mut c = self.client.clone();
            let prefix = self.workers_prefix();
            let (members, rev) = list_members(&mut c, &prefix).await?;
            let (tx, rx) = mpsc::unbounded_channel();
            let mut known: BTreeMap<String, MemberInfo> =
                members.iter().map(|m| (m.id.clone(), m.clone())).collect();
            tokio::spawn(async move {
                let mut from = rev + 1;
                loop {
                    if follow(&mut c, &prefix, from, &mut known, &tx)
                        .await
                        .is_err()
                    {
                        return; // the receiver is gone
                    }
                    // The watch broke (etcd restarted or out of reach): list again, report the
                    // difference, and watch on from there.
                    loop {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        match list_members(&mut c, &prefix).await {
                            Ok((now, rev)) => {
                                let now: BTreeMap<String, MemberInfo> =
                                    now.into_iter().map(|m| (m.id.clone(), m)).collect();
                                for id in known.keys().filter(|k| !now.contains_key(*k)) {
                                    if tx.send(MembershipEvent::Left(id.clone())).is_err() {
                                        return;
                                    }
                                }
                                for (id, m) in &now {
                                    if known.get(id) != Some(m)
                                        && tx.send(MembershipEvent::Joined(m.clone())).is_err()
                                    {
                                        return;
                                    }
                                }
                                known = now;
                                from = rev + 1;
                                tracing::info!("membership watch resumed");
                                break;
                            }
                            Err(e) => tracing::debug!(error = %e, "membership list failed"),
                        }
                    }
                }
            });
            Ok((members, rx))
        })
    }

    fn campaign(
        &self,
        name: &str,
        candidate: &str,
        ttl: Duration,
    ) -> BoxFuture<'_, Result<Leadership, MembershipError>> {
        let name = format!("{}/{}", self.prefix, name);
        let candidate = candidate.to_string();
        Box::pin(async move {
            let (lease, lost, fresh, task) = self.leased(ttl).await?;
            // Blocks until every earlier candidate's key is gone.
            let won = self.client.clone().campaign(name, candidate, lease).await?;
            let fence = won.leader().map_or(0, |k| k.rev().max(0) as u64);
            Ok(Leadership {
                lost,
                fresh,
                fence,
                _guard: Guard(Some(self.release(lease, task))),
            })
        })
    }

    fn leader(&self, name: &str) -> BoxFuture<'_, Result<Option<String>, MembershipError>> {
        let name = format!("{}/{}", self.prefix, name);
        Box::pin(async move {
            match self.client.clone().leader(name).await {
                Ok(r) => Ok(r
                    .kv()
                    .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())),
                // etcd answers "election: no leader" as an error.
                Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("no leader") => {
                    Ok(None)
                }
                Err(e) => Err(e.into()),
            }
        })
    }
}
