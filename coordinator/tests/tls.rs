//! Transport security end to end, with certificates made by openssl: the public gRPC, HTTP and
//! Admin listeners over TLS with client certificates required (mutual TLS), and the
//! coordinator ↔ worker Control stream over mutual TLS. A client without the right
//! certificate, or speaking plaintext, is refused.

mod common;
use common::{announced, certificates, fixture, spawn_announcing, switchyard};

/// A TLS request from Python's standard library (a client nobody here wrote): the HTTP status,
/// or the error text when the handshake fails.
fn python_https(url: &str, body: &str, ca: &str, cert: Option<(&str, &str)>) -> String {
    let py = common::python("ssl");
    let load = cert.map_or(String::new(), |(c, k)| {
        format!("ctx.load_cert_chain({c:?}, {k:?})\n")
    });
    let script = format!(
        "import ssl, sys, urllib.request\n\
         ctx = ssl.create_default_context(cafile={ca:?})\n\
         {load}\
         req = urllib.request.Request({url:?}, data={body:?}.encode(), headers={{'content-type': 'application/json'}})\n\
         try:\n    r = urllib.request.urlopen(req, context=ctx, timeout=30)\n    print(r.status, r.read().decode())\n\
         except Exception as e:\n    print('error', e)\n"
    );
    let out = std::process::Command::new(py)
        .args(["-c", &script])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn public_listeners_over_mutual_tls_refuse_clients_without_a_certificate() {
    let certs = std::env::temp_dir().join(format!("sy-tls-public-{}", std::process::id()));
    certificates(&certs);
    let f = |n: &str| certs.join(n).to_str().unwrap().to_string();
    let dir = fixture("tiny-qwen3-moe");
    let (_up, line) = spawn_announcing(&[
        "up",
        "--model",
        dir.to_str().unwrap(),
        "--workers",
        "1",
        "--grpc-addr",
        "127.0.0.1:0",
        "--tls-cert",
        &f("server.crt"),
        "--tls-key",
        &f("server.key"),
        "--tls-client-ca",
        &f("ca.crt"),
    ]);
    let (grpc, http, admin) = (
        announced(&line, "grpc"),
        announced(&line, "http"),
        announced(&line, "admin"),
    );
    assert!(
        grpc.starts_with("https://") && http.starts_with("https://"),
        "{line}"
    );
    let (ca, crt, key) = (f("ca.crt"), f("client.crt"), f("client.key"));
    let tls = ["--tls-ca", &ca, "--client-cert", &crt, "--client-key", &key];
    // gRPC with a client certificate: served.
    let mut args = vec!["generate", "--endpoint", &grpc];
    args.extend(tls);
    args.extend([
        "--prompt",
        "hello",
        "--max-tokens",
        "4",
        "--ignore-eos",
        "--json",
    ]);
    let out = switchyard(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["output_ids"].as_array().unwrap().len(), 4);
    // Trusting the server but presenting no certificate: refused.
    let out = switchyard(&[
        "generate",
        "--endpoint",
        &grpc,
        "--tls-ca",
        &ca,
        "--prompt",
        "hello",
    ]);
    assert!(!out.status.success());
    // Plaintext to the TLS port: refused.
    let plain = grpc.replace("https://", "http://");
    assert!(
        !switchyard(&["generate", "--endpoint", &plain, "--prompt", "hello"])
            .status
            .success()
    );
    // The Admin listener speaks the same TLS; its credential is the admin key (loopback
    // here), so trusting the server's CA is enough.
    let args = vec!["admin", "--endpoint", &admin, "--tls-ca", &ca, "status"];
    let out = switchyard(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // HTTPS from Python's ssl module: with the client certificate a completion, without it
    // the handshake fails.
    let body = r#"{"model": "tiny-qwen3-moe", "prompt": "hello", "max_tokens": 3}"#;
    let url = format!("{http}/v1/completions");
    let ok = python_https(&url, body, &ca, Some((&crt, &key)));
    assert!(
        ok.starts_with("200 ") && ok.contains("text_completion"),
        "{ok}"
    );
    let refused = python_https(&url, body, &ca, None);
    assert!(refused.starts_with("error"), "{refused}");
    let _ = std::fs::remove_dir_all(&certs);
}

#[test]
fn control_streams_over_mutual_tls_admit_only_the_coordinators_certificate() {
    let certs = std::env::temp_dir().join(format!("sy-tls-control-{}", std::process::id()));
    certificates(&certs);
    let f = |n: &str| certs.join(n).to_str().unwrap().to_string();
    let dir = fixture("tiny-qwen3-moe");
    let m = dir.to_str().unwrap();
    let (_worker, line) = spawn_announcing(&[
        "worker",
        "--model",
        m,
        "--tls-cert",
        &f("server.crt"),
        "--tls-key",
        &f("server.key"),
        "--tls-client-ca",
        &f("ca.crt"),
    ]);
    let worker = announced(&line, "grpc");
    assert!(worker.starts_with("https://127.0.0.1:"), "{line}");
    // Trusting the worker but without a client certificate: the cluster cannot form.
    let refused = switchyard(&[
        "coordinator",
        "--model",
        m,
        "--grpc-addr",
        "127.0.0.1:0",
        "--worker-url",
        &worker,
        "--worker-tls-ca",
        &f("ca.crt"),
    ]);
    assert!(!refused.status.success());
    let (_coord, line) = spawn_announcing(&[
        "coordinator",
        "--model",
        m,
        "--grpc-addr",
        "127.0.0.1:0",
        "--worker-url",
        &worker,
        "--worker-tls-ca",
        &f("ca.crt"),
        "--worker-tls-cert",
        &f("client.crt"),
        "--worker-tls-key",
        &f("client.key"),
    ]);
    let url = announced(&line, "grpc");
    common::block_on(common::assert_goldens(&url, "tiny-qwen3-moe", 1));
    let _ = std::fs::remove_dir_all(&certs);
}
