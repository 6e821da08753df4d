//! The two roles run separately with membership in a real etcd server (started by the test):
//! `switchyard worker --etcd` processes register under the cluster prefix with leases,
//! `switchyard coordinator --etcd` leads, finds them and serves the golden tokens; a worker that
//! stops renewing its lease (frozen with SIGSTOP) disappears from ClusterStatus, and comes back
//! when resumed.

mod common;
use common::{
    assert_goldens, block_on, cluster_status, fixture, spawn_serving, Etcd, GoldenStreams, Proc,
};

use std::time::{Duration, Instant};

/// Membership flags for a cluster under `prefix` in `etcd` with a 2 s lease.
fn etcd_flags(etcd: &Etcd, prefix: &str) -> Vec<String> {
    [
        "--etcd",
        &etcd.url,
        "--cluster-prefix",
        prefix,
        "--lease-ttl",
        "2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// `switchyard worker --id ID` with those flags.
fn etcd_worker(model: &str, flags: &[String], id: &str) -> (Proc, String) {
    let mut args = vec!["worker", "--model", model, "--id", id];
    args.extend(flags.iter().map(|s| s.as_str()));
    spawn_serving(&args)
}

/// The arguments of `switchyard coordinator` waiting for `workers` members, with those flags
/// (and `--id ID` when given).
fn coordinator_args(
    model: &str,
    flags: &[String],
    workers: usize,
    id: Option<&str>,
) -> Vec<String> {
    let n = workers.to_string();
    let mut args = vec![
        "coordinator",
        "--model",
        model,
        "--workers",
        &n,
        "--grpc-addr",
        "127.0.0.1:0",
    ];
    if let Some(id) = id {
        args.extend(["--id", id]);
    }
    args.extend(flags.iter().map(|s| s.as_str()));
    args.into_iter().map(String::from).collect()
}

/// Spawns `switchyard ARGS` (owned) as [`spawn_serving`] does.
fn spawn_args(args: &[String]) -> (Proc, String) {
    spawn_serving(&args.iter().map(|s| s.as_str()).collect::<Vec<_>>())
}

/// `switchyard coordinator` waiting for `workers` members, with those flags.
fn etcd_coordinator(model: &str, flags: &[String], workers: usize) -> (Proc, String) {
    spawn_args(&coordinator_args(model, flags, workers, None))
}

fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

#[test]
fn workers_register_in_etcd_and_a_lapsed_lease_leaves_cluster_status() {
    let etcd = Etcd::start();
    let model = fixture("tiny-qwen3-moe");
    let m = model.to_str().unwrap();
    let membership = [
        "--etcd",
        &etcd.url,
        "--cluster-prefix",
        "/switchyard/e2e",
        "--lease-ttl",
        "2",
    ];
    let workers: Vec<_> = (0..2)
        .map(|i| {
            let id = format!("w{i}");
            let mut args = vec!["worker", "--model", m, "--id", &id];
            args.extend(membership);
            spawn_serving(&args)
        })
        .collect();
    let mut args = vec![
        "coordinator",
        "--model",
        m,
        "--workers",
        "2",
        "--redundant-experts",
        "2",
        "--grpc-addr",
        "127.0.0.1:0",
    ];
    args.extend(membership);
    let (_coord, url) = spawn_serving(&args);

    block_on(async {
        assert_goldens(&url, "tiny-qwen3-moe", 2).await;
        let st = cluster_status(&url).await;
        let ids: Vec<&str> = st.workers.iter().map(|w| w.id.as_str()).collect();
        assert_eq!(ids, ["w0", "w1"]);

        // w1 freezes in the middle of 16 streams: it stops answering steps and renewing its
        // lease. When the lease lapses (within the TTL plus etcd's expiry sweep) the step stuck
        // on it is interrupted and the cluster rebuilt without it (a frozen process still
        // accepts connections, so it is left out when it does not greet within 5 s): the
        // streams complete exactly, long before the 30 s step timeout.
        let streams = GoldenStreams::start(&url, "tiny-qwen3-moe", 4);
        streams.wait_started(4).await;
        signal(workers[1].0 .0.id(), "-STOP");
        let t0 = Instant::now();
        streams.finish().await;
        let served_in = t0.elapsed();
        let mut listed = cluster_status(&url).await.workers.len();
        while listed == 2 && t0.elapsed() < Duration::from_secs(20) {
            tokio::time::sleep(Duration::from_millis(200)).await;
            listed = cluster_status(&url).await.workers.len();
        }
        let gone_after = t0.elapsed();
        let st = cluster_status(&url).await;
        signal(workers[1].0 .0.id(), "-CONT");
        assert!(served_in < Duration::from_secs(20), "{served_in:?}");
        let ids: Vec<&str> = st.workers.iter().map(|w| w.id.as_str()).collect();
        assert_eq!(ids, ["w0"], "after {gone_after:?}");
        assert!(gone_after >= Duration::from_secs(1), "{gone_after:?}");
        assert_eq!(st.epoch, 2, "rebuilt without the frozen worker");

        // Resumed, it registers again under a new lease, is listed again, and serves.
        let t0 = Instant::now();
        while cluster_status(&url).await.workers.len() < 2 && t0.elapsed() < Duration::from_secs(20)
        {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let st = cluster_status(&url).await;
        let ids: Vec<&str> = st.workers.iter().map(|w| w.id.as_str()).collect();
        assert_eq!(ids, ["w0", "w1"]);
        assert!(st.epoch >= 3, "taken back in: epoch {}", st.epoch);
        assert_goldens(&url, "tiny-qwen3-moe", 1).await;
    });
}

/// Coordinator replicas: the second waits in the leader election while the first serves; when
/// the first is killed (-9) its lease lapses, the standby leads, takes the workers over in a
/// new epoch and serves the golden tokens.
#[test]
fn a_standby_coordinator_takes_over_when_the_leader_dies() {
    let etcd = Etcd::start();
    let model = fixture("tiny-qwen3-moe");
    let m = model.to_str().unwrap().to_string();
    let membership: Vec<String> = [
        "--etcd",
        &etcd.url,
        "--cluster-prefix",
        "/switchyard/failover",
        "--lease-ttl",
        "2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let _workers: Vec<_> = (0..2)
        .map(|i| {
            let id = format!("w{i}");
            let mut args = vec!["worker", "--model", &m, "--id", &id];
            args.extend(membership.iter().map(|s| s.as_str()));
            spawn_serving(&args)
        })
        .collect();
    let coordinator = |id: &'static str| {
        let mut args: Vec<String> = [
            "coordinator",
            "--model",
            &m,
            "--workers",
            "2",
            "--grpc-addr",
            "127.0.0.1:0",
            "--id",
            id,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(membership.iter().cloned());
        args
    };
    let a = coordinator("leader-a");
    let (mut leader, url_a) = spawn_serving(&a.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    // The standby only announces itself once it leads.
    let b = coordinator("standby-b");
    let standby = std::thread::spawn(move || {
        spawn_serving(&b.iter().map(|s| s.as_str()).collect::<Vec<_>>())
    });
    block_on(assert_goldens(&url_a, "tiny-qwen3-moe", 1));
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !standby.is_finished(),
        "the standby served while the leader lived"
    );

    leader.0.kill().unwrap();
    let _ = leader.0.wait();
    let t0 = Instant::now();
    let (_b, url_b) = standby.join().unwrap();
    let took = t0.elapsed();
    block_on(async {
        assert_goldens(&url_b, "tiny-qwen3-moe", 2).await;
        let ids: Vec<String> = cluster_status(&url_b)
            .await
            .workers
            .iter()
            .map(|w| w.id.clone())
            .collect();
        assert_eq!(ids, ["w0", "w1"]);
    });
    eprintln!("standby took over {took:?} after the leader died");
    assert!(took < Duration::from_secs(20), "{took:?}");
}

/// A worker that registers while 32 streams are in flight is taken in: the coordinator
/// rebuilds over all three workers at a step boundary (a new epoch, experts re-placed), every
/// stream still completes with exactly the golden tokens, and the newcomer holds experts and
/// homes sequences.
#[test]
fn a_worker_that_joins_under_load_is_taken_into_the_cluster() {
    let etcd = Etcd::start();
    let model = fixture("tiny-qwen3-moe");
    let m = model.to_str().unwrap().to_string();
    let flags = etcd_flags(&etcd, "/switchyard/join");
    let _w0 = etcd_worker(&m, &flags, "w0");
    let _w1 = etcd_worker(&m, &flags, "w1");
    let (_coord, url) = etcd_coordinator(&m, &flags, 2);
    let worker = move |id: &str| etcd_worker(&m, &flags, id);
    let w2 = block_on(async {
        assert_eq!(cluster_status(&url).await.epoch, 1);
        let streams = GoldenStreams::start(&url, "tiny-qwen3-moe", 8);
        streams.wait_started(16).await;
        let w2 = tokio::task::spawn_blocking(move || worker("w2"))
            .await
            .unwrap();
        // Watch the newcomer take sequences while the streams run, and while a second wave
        // sent once it is in runs (the first wave's requests may all have been admitted
        // before it joined: cached prompts prefill fast).
        let mut homed = 0;
        let mut second = None;
        while streams.in_flight() > 0
            || second
                .as_ref()
                .is_some_and(|s: &GoldenStreams| s.in_flight() > 0)
        {
            let st = cluster_status(&url).await;
            if let Some(w) = st.workers.iter().find(|w| w.id == "w2") {
                homed = homed.max(w.running_sequences);
                if second.is_none() {
                    second = Some(GoldenStreams::start(&url, "tiny-qwen3-moe", 8));
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        streams.finish().await;
        if let Some(s) = second {
            s.finish().await;
        }
        let st = cluster_status(&url).await;
        let ids: Vec<&str> = st.workers.iter().map(|w| w.id.as_str()).collect();
        assert_eq!(ids, ["w0", "w1", "w2"]);
        assert_eq!(st.epoch, 2);
        // Every expert placed, some on the newcomer.
        assert!(st.placement.iter().all(|p| !p.ranks.is_empty()));
        assert!(st.placement.iter().any(|p| p.ranks.contains(&2)));
        assert!(homed > 0, "the newcomer never homed a sequence");
        assert_goldens(&url, "tiny-qwen3-moe", 2).await;
        w2
    });
    drop(w2);
}

/// etcd killed for 10 s and restarted during traffic: no request fails (the data path does not
/// need etcd), the coordinator keeps leading, the workers' leases are kept, and the
/// membership watch recovers (a worker registering afterwards is taken in).
#[test]
fn etcd_down_for_ten_seconds_fails_no_request() {
    let mut etcd = Etcd::start();
    let model = fixture("tiny-qwen3-moe");
    let m = model.to_str().unwrap().to_string();
    let flags = etcd_flags(&etcd, "/switchyard/outage");
    let worker = |id: &str| etcd_worker(&m, &flags, id);
    let _w0 = worker("w0");
    let _w1 = worker("w1");
    let (mut coord, url) = etcd_coordinator(&m, &flags, 2);
    let rounds = block_on(async {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let traffic = tokio::spawn({
            let (url, stop) = (url.clone(), stop.clone());
            async move {
                let mut rounds = 0;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    assert_goldens(&url, "tiny-qwen3-moe", 2).await;
                    rounds += 1;
                }
                rounds
            }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        tokio::task::block_in_place(|| etcd.stop());
        tokio::time::sleep(Duration::from_secs(10)).await;
        tokio::task::block_in_place(|| etcd.restart());
        tokio::time::sleep(Duration::from_secs(4)).await;
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        traffic.await.unwrap()
    });
    assert!(rounds >= 5, "only {rounds} rounds of traffic");
    assert!(
        coord.0.try_wait().unwrap().is_none(),
        "the coordinator stopped"
    );
    // Leases kept (or renewed): both workers listed; the watch works again.
    let _w2 = worker("w2");
    block_on(async {
        let t0 = Instant::now();
        loop {
            let st = cluster_status(&url).await;
            let ids: Vec<&str> = st.workers.iter().map(|w| w.id.as_str()).collect();
            if ids == ["w0", "w1", "w2"] {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(20), "{ids:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_goldens(&url, "tiny-qwen3-moe", 1).await;
    });
    eprintln!("{rounds} rounds of 8 streams across a 10 s etcd outage, none failed");
}

/// kill -9 of the leading coordinator and of a worker at once, under 16 streams: no
/// coordinator holds the requests whose sequences were on the dead worker, so their clients
/// resume them with the request and the tokens they received (`ResumeRequest.request`) and the
/// standby starts them again from those; the survivors' sequences are adopted with their KV.
/// Every stream completes with exactly the golden tokens.
#[test]
fn streams_survive_the_leader_and_a_worker_dying_at_once() {
    let etcd = Etcd::start();
    let model = fixture("tiny-qwen3-moe");
    let m = model.to_str().unwrap().to_string();
    let flags = etcd_flags(&etcd, "/switchyard/double");
    let _w0 = etcd_worker(&m, &flags, "w0");
    let _w1 = etcd_worker(&m, &flags, "w1");
    let (mut w2, _) = etcd_worker(&m, &flags, "w2");
    let (mut leader, url_a) = spawn_args(&coordinator_args(&m, &flags, 3, Some("leader-a")));
    // The standby serves with the two workers that will be left (the first two by id).
    let b = coordinator_args(&m, &flags, 2, Some("standby-b"));
    let standby = std::thread::spawn(move || spawn_args(&b));
    block_on(async {
        let endpoints = std::sync::Arc::new(std::sync::Mutex::new(vec![url_a.clone()]));
        let streams = GoldenStreams::start_resuming(&url_a, "tiny-qwen3-moe", 4, endpoints.clone());
        streams.wait_started(4).await;
        // Both die while the worker to be lost runs sequences whose clients have tokens.
        let mut c = switchyard_proto::v1::inference_client::InferenceClient::connect(url_a.clone())
            .await
            .unwrap();
        loop {
            let st = c
                .cluster_status(switchyard_proto::v1::ClusterStatusRequest {})
                .await
                .unwrap()
                .into_inner();
            if st
                .workers
                .iter()
                .any(|w| w.id == "w2" && w.running_sequences > 0)
            {
                break;
            }
            assert!(
                streams.in_flight() > 0,
                "every stream finished before w2 ran one"
            );
        }
        w2.0.kill().unwrap();
        leader.0.kill().unwrap();
        let in_flight = streams.in_flight();
        let _ = (leader.0.wait(), w2.0.wait());
        let (_b, url_b) = tokio::task::spawn_blocking(move || standby.join().unwrap())
            .await
            .unwrap();
        endpoints.lock().unwrap().push(url_b.clone());
        streams.finish_with_logprobs(&url_b).await;
        let st = cluster_status(&url_b).await;
        eprintln!(
            "{in_flight} of 16 streams in flight at the kills; all exact; {} adopted with their \
             KV, {} started again by their clients",
            st.sequences_kept, st.requests_restarted
        );
        assert!(st.requests_restarted > 0, "{st:?}");
        assert_eq!(st.workers.len(), 2, "{st:?}");
        assert_goldens(&url_b, "tiny-qwen3-moe", 1).await;
    });
}

/// kill -9 of the leading coordinator under 16 streams: the workers keep their engines and
/// sequences, the standby leads, adopts the requests from the workers' hellos, and every
/// stream resumes on it (`Resume`, through `switchyard_proto::resume`) and completes with
/// exactly the golden tokens, and the logprobs of a run alone (those generated before the
/// takeover but not yet received come from what the workers kept); the workers re-prefill
/// nothing.
#[test]
fn streams_resume_on_the_standby_when_the_leader_dies_and_nothing_is_reprefilled() {
    let etcd = Etcd::start();
    let model = fixture("tiny-qwen3-moe");
    let m = model.to_str().unwrap().to_string();
    let flags = etcd_flags(&etcd, "/switchyard/takeover");
    let _w0 = etcd_worker(&m, &flags, "w0");
    let _w1 = etcd_worker(&m, &flags, "w1");
    let (mut leader, url_a) = spawn_args(&coordinator_args(&m, &flags, 2, Some("leader-a")));
    let b = coordinator_args(&m, &flags, 2, Some("standby-b"));
    let standby = std::thread::spawn(move || spawn_args(&b));
    block_on(async {
        let endpoints = std::sync::Arc::new(std::sync::Mutex::new(vec![url_a.clone()]));
        let streams = GoldenStreams::start_resuming(&url_a, "tiny-qwen3-moe", 4, endpoints.clone());
        streams.wait_started(4).await;
        leader.0.kill().unwrap();
        let in_flight = streams.in_flight();
        let _ = leader.0.wait();
        let (_b, url_b) = tokio::task::spawn_blocking(move || standby.join().unwrap())
            .await
            .unwrap();
        endpoints.lock().unwrap().push(url_b.clone());
        streams.finish_with_logprobs(&url_b).await;
        assert!(in_flight > 0, "every stream had finished before the kill");
        let st = cluster_status(&url_b).await;
        eprintln!(
            "{in_flight} of 16 streams in flight at the kill; all resumed exactly; {} adopted \
             with their KV, {} re-prefilled",
            st.sequences_kept, st.sequences_reprefilled
        );
        assert!(st.sequences_kept > 0, "{st:?}");
        assert_eq!(st.sequences_reprefilled, 0, "{st:?}");
        // A request of the dead leader's, resumed or submitted again and finished, is no
        // longer parked here; an id never seen is unknown.
        let mut c = switchyard_proto::v1::inference_client::InferenceClient::connect(url_b.clone())
            .await
            .unwrap();
        for id in ["req-1", "no-such-request"] {
            let e = c
                .resume(switchyard_proto::v1::ResumeRequest {
                    request_id: id.into(),
                    received_tokens: 0,
                    ..Default::default()
                })
                .await
                .err()
                .unwrap_or_else(|| panic!("{id} resumed twice"));
            assert_eq!(e.code(), tonic::Code::NotFound, "{id}: {e}");
        }
        assert_goldens(&url_b, "tiny-qwen3-moe", 1).await;
    });
}

/// A short run of the chaos benchmark killing the leading coordinator (SIGKILL) under 6
/// clients, with its own etcd and a standby: no request lost or different from the intact
/// cluster's output, every kill taken over, nothing re-prefilled.
#[test]
fn chaos_killing_the_leader_loses_no_request_and_reprefills_nothing() {
    let r = common::bench_chaos(
        "tiny-qwen3-moe",
        &[
            "--kill",
            "coordinator",
            "--lease-ttl",
            "2",
            "--duration",
            "7",
            "--interval",
            "3",
            "--downtime",
            "0.5",
            "--concurrency",
            "6",
            "--prompts",
            "6",
            "--max-tokens",
            "12",
        ],
    );
    assert_eq!(r["lost"], 0, "{r}");
    let kills = r["kills"].as_u64().unwrap();
    assert!(kills >= 1, "{r}");
    assert_eq!(
        r["takeover_ms"].as_array().unwrap().len() as u64,
        kills,
        "{r}"
    );
    assert_eq!(r["sequences_reprefilled"], 0, "{r}");
    assert!(r["requests"].as_u64().unwrap() > 20, "{r}");
    assert_eq!(r["final_workers"], 3, "{r}");
}
