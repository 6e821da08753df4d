//! The membership contract, checked against both implementations: a real etcd server started
//! by the test, and the in-memory default. Registrations appear in snapshots and watches and
//! leave when withdrawn or when their lease is no longer kept; one leader at a time.

mod common;
use common::Etcd;

use std::time::Duration;
use switchyard_runtime::membership::{
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

/// External etcd as a platform team runs it: TLS with client certificates, then
/// username/password authentication on top. The contract holds over it; a client without its
/// certificate, or with a wrong password, is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_over_tls_with_auth_keeps_the_contract_and_refuses_strangers() {
    use switchyard_runtime::membership::EtcdSecurity;
    let certs = std::env::temp_dir().join(format!("sy-etcd-certs-{}", std::process::id()));
    common::certificates(&certs);
    let etcd = Etcd::start_tls(&certs);
    let tls = EtcdSecurity {
        ca: Some(certs.join("ca.crt")),
        cert: Some(certs.join("client.crt")),
        key: Some(certs.join("client.key")),
        user: None,
    };
    let eps = [etcd.url.clone()];
    let m = EtcdMembership::connect_with(&eps, "/switchyard/tls", &tls)
        .await
        .unwrap();
    contract(&m).await;
    // Without a client certificate: refused (at connect or at the first call).
    let bare = EtcdSecurity {
        cert: None,
        key: None,
        ..tls.clone()
    };
    let refused = match EtcdMembership::connect_with(&eps, "/switchyard/tls", &bare).await {
        Err(_) => true,
        Ok(m) => m.leader("probe").await.is_err(),
    };
    assert!(refused, "a client without a certificate got in");
    // Turn on authentication (root user), then only the right password works.
    let opts = etcd_client::ConnectOptions::new().with_tls(
        etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(
                std::fs::read(certs.join("ca.crt")).unwrap(),
            ))
            .identity(etcd_client::Identity::from_pem(
                std::fs::read(certs.join("client.crt")).unwrap(),
                std::fs::read(certs.join("client.key")).unwrap(),
            )),
    );
    let mut admin = etcd_client::Client::connect(&eps, Some(opts))
        .await
        .unwrap();
    admin.user_add("root", "s3cret", None).await.unwrap();
    admin.user_grant_role("root", "root").await.unwrap();
    admin.auth_enable().await.unwrap();
    let authed = EtcdSecurity {
        user: Some(("root".into(), "s3cret".into())),
        ..tls.clone()
    };
    let m = EtcdMembership::connect_with(&eps, "/switchyard/auth", &authed)
        .await
        .unwrap();
    contract(&m).await;
    let wrong = EtcdSecurity {
        user: Some(("root".into(), "nope".into())),
        ..tls.clone()
    };
    assert!(
        EtcdMembership::connect_with(&eps, "/switchyard/auth", &wrong)
            .await
            .is_err()
    );
    drop(etcd);
    let _ = std::fs::remove_dir_all(&certs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_membership_keeps_the_contract() {
    let etcd = Etcd::start();
    let m = EtcdMembership::connect(&[etcd.url.clone()], "/switchyard/test")
        .await
        .unwrap();
    contract(&m).await;
}
