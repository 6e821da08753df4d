//! The membership contract, checked against both implementations: a real etcd server started
//! by the test, and the in-memory default. Registrations appear in snapshots and watches and
//! leave when withdrawn or when their lease is no longer kept; one leader at a time.

mod common;
use common::Etcd;

use std::time::Duration;
use switchyard_worker::membership::{
    EtcdMembership, MemberInfo, Membership, MembershipEvent, MemoryMembership,
};
use tokio::time::timeout;

fn member(id: &str) -> MemberInfo {
    MemberInfo {
        id: id.into(),
        control_url: format!("http://{id}:1"),
        model: "m".into(),
    }
}

async fn next(rx: &mut tokio::sync::mpsc::UnboundedReceiver<MembershipEvent>) -> MembershipEvent {
    timeout(Duration::from_secs(15), rx.recv())
        .await
        .expect("an event within 15 s")
        .expect("watch open")
}

async fn contract(m: &dyn Membership) {
    let ttl = Duration::from_secs(2);
    let a = m.register(member("a"), ttl).await.unwrap();
    let (snap, mut events) = m.watch().await.unwrap();
    assert_eq!(snap, vec![member("a")]);

    let b = m.register(member("b"), ttl).await.unwrap();
    assert_eq!(
        next(&mut events).await,
        MembershipEvent::Joined(member("b"))
    );
    // Outlives several TTLs: the lease is being kept.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (snap, _) = m.watch().await.unwrap();
    assert_eq!(snap, vec![member("a"), member("b")]);

    drop(a);
    assert_eq!(next(&mut events).await, MembershipEvent::Left("a".into()));
    let (snap, _) = m.watch().await.unwrap();
    assert_eq!(snap, vec![member("b")]);
    drop(b);
    assert_eq!(next(&mut events).await, MembershipEvent::Left("b".into()));

    // Leader election: the second candidate waits until the first resigns.
    assert_eq!(m.leader("leader").await.unwrap(), None);
    let first = m.campaign("leader", "c1", ttl).await.unwrap();
    assert!(first.is_held());
    assert_eq!(m.leader("leader").await.unwrap().as_deref(), Some("c1"));
    let second = m.campaign("leader", "c2", ttl);
    tokio::pin!(second);
    assert!(
        timeout(Duration::from_millis(500), &mut second)
            .await
            .is_err(),
        "a second leader while the first holds"
    );
    drop(first);
    let second = timeout(Duration::from_secs(10), second)
        .await
        .expect("the standby takes over")
        .unwrap();
    assert!(second.is_held());
    assert_eq!(m.leader("leader").await.unwrap().as_deref(), Some("c2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_membership_keeps_the_contract() {
    contract(&MemoryMembership::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_membership_keeps_the_contract() {
    let etcd = Etcd::start();
    let m = EtcdMembership::connect(&[etcd.url.clone()], "/switchyard/test")
        .await
        .unwrap();
    contract(&m).await;
}
