//! The Helm chart (`helm/switchyard`), checked offline with the real tools: `helm lint
//! --strict` over a matrix of value files, the schema rejecting a broken one, every rendered
//! manifest validated against the Kubernetes 1.32 schemas (`kubernetes-validate --strict`) and
//! the ServiceMonitor against the prometheus-operator models; and the commands the chart
//! renders run for real: the coordinator and two workers started with exactly the rendered
//! arguments and environment (against a local etcd) serve the golden tokens.
//!
//! The tools come from `scripts/ensure-deps.sh test` (SWITCHYARD_HELM, SWITCHYARD_NPM,
//! SWITCHYARD_KUBERNETES_VALIDATE); helm from PATH is accepted when it is 3.17.

mod common;
use common::{fixture, Etcd};
use serde_json::Value;
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../helm/switchyard")
}

fn tool(env: &str, fallback: &str) -> PathBuf {
    let p = std::env::var_os(env)
        .map(PathBuf::from)
        .unwrap_or_else(|| fallback.into());
    assert!(
        Command::new(&p)
            .arg("--help")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok(),
        "{} not found: run scripts/ensure-deps.sh test (sets {env})",
        p.display()
    );
    p
}

fn helm(args: &[&str]) -> std::process::Output {
    Command::new(tool("SWITCHYARD_HELM", "helm"))
        .args(args)
        .output()
        .unwrap()
}

const MATRIX: &[&str] = &[
    "",
    "ci/cpu.yaml",
    "ci/gpu.yaml",
    "ci/external-etcd-tls.yaml",
    "ci/etcd-3.yaml",
    "ci/monitoring.yaml",
    "ci/tls.yaml",
];

fn with_values(v: &str) -> Vec<String> {
    if v.is_empty() {
        vec![]
    } else {
        vec!["-f".into(), chart().join(v).to_str().unwrap().into()]
    }
}

#[test]
fn lint_strict_passes_the_matrix_and_the_schema_rejects_bad_values() {
    let c = chart();
    let v = helm(&["version", "--short"]);
    assert!(
        String::from_utf8_lossy(&v.stdout).starts_with("v3.17"),
        "helm {:?}",
        v
    );
    for vf in MATRIX {
        let mut args = vec![
            "lint".to_string(),
            "--strict".into(),
            c.to_str().unwrap().into(),
        ];
        args.extend(with_values(vf));
        let o = helm(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(
            o.status.success(),
            "lint {vf:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let bad = c.join("ci/bad-values.yaml");
    let o = helm(&[
        "lint",
        "--strict",
        c.to_str().unwrap(),
        "-f",
        bad.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        text.contains("workers.device") && text.contains("workers.replicas"),
        "{text}"
    );
    // External etcd without endpoints is refused by the schema too.
    let o = helm(&[
        "template",
        "sy",
        c.to_str().unwrap(),
        "--set",
        "etcd.enabled=false",
    ]);
    assert!(!o.status.success());
}

#[test]
fn rendered_manifests_validate_against_kubernetes_1_32() {
    let c = chart();
    let validate = tool("SWITCHYARD_KUBERNETES_VALIDATE", "kubernetes-validate");
    let npm = std::env::var("SWITCHYARD_NPM")
        .unwrap_or_else(|_| format!("{}/.cache/switchyard/npm", std::env::var("HOME").unwrap()));
    let dir = std::env::temp_dir().join(format!("sy-helm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut monitors = 0;
    for (i, vf) in MATRIX.iter().enumerate() {
        let mut args = vec![
            "template".to_string(),
            "sy".into(),
            c.to_str().unwrap().into(),
            "--namespace".into(),
            "serving".into(),
        ];
        args.extend(with_values(vf));
        let o = helm(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let file = dir.join(format!("render-{i}.yaml"));
        std::fs::write(&file, &o.stdout).unwrap();
        let v = Command::new(&validate)
            .args(["--strict", "-k", "1.32.0", file.to_str().unwrap()])
            .output()
            .unwrap();
        let out = format!(
            "{}{}",
            String::from_utf8_lossy(&v.stdout),
            String::from_utf8_lossy(&v.stderr)
        );
        assert!(
            v.status.success() && !out.contains("ERROR"),
            "{vf:?}:\n{out}"
        );
        let passed = out.matches(" passed for resource ").count();
        assert!(
            passed >= 8,
            "{vf:?}: only {passed} resources validated:\n{out}"
        );
        // Custom resources against their models.
        let mut node = Command::new("node")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../helm/scripts/validate-crds.mjs"))
            .env("SWITCHYARD_NPM", &npm)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut node.stdin.take().unwrap(), &o.stdout).unwrap();
        let n = node.wait_with_output().unwrap();
        assert!(
            n.status.success(),
            "{vf:?}: {}",
            String::from_utf8_lossy(&n.stderr)
        );
        monitors += String::from_utf8_lossy(&n.stdout)
            .matches("valid ServiceMonitor")
            .count();
    }
    assert_eq!(
        monitors, 1,
        "the monitoring values render one ServiceMonitor"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Rendered documents as JSON (PyYAML from the test venv does the parsing).
fn render_json(args: &[String]) -> Vec<Value> {
    let o = helm(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut py = Command::new(common::python("yaml"))
        .args(["-c", "import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d]))"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut py.stdin.take().unwrap(), &o.stdout).unwrap();
    serde_json::from_slice(&py.wait_with_output().unwrap().stdout).unwrap()
}

/// The container's args and environment as Kubernetes would give them to the process:
/// `$(VAR)` expanded from the env list in order, fieldRefs from `fields`, ConfigMap
/// `envFrom` from the rendered ConfigMap, `overrides` replacing values that only cluster DNS
/// could provide.
fn process(
    container: &Value,
    configmap: &Value,
    secrets: &[Value],
    fields: &HashMap<&str, String>,
    overrides: &HashMap<&str, String>,
) -> (Vec<String>, HashMap<String, String>) {
    let mut env: HashMap<String, String> = HashMap::new();
    for (k, v) in configmap["data"].as_object().unwrap() {
        env.insert(k.clone(), v.as_str().unwrap().to_string());
    }
    let expand = |s: &str, env: &HashMap<String, String>| {
        let mut out = s.to_string();
        for (k, v) in env {
            out = out.replace(&format!("$({k})"), v);
        }
        out
    };
    for e in container["env"].as_array().unwrap() {
        let name = e["name"].as_str().unwrap();
        let value = if let Some(v) = overrides.get(name) {
            v.clone()
        } else if let Some(v) = e["value"].as_str() {
            expand(v, &env)
        } else if let Some(r) = e["valueFrom"].get("secretKeyRef") {
            // A Secret the chart renders itself (string data).
            let name = r["name"].as_str().unwrap();
            let secret = secrets
                .iter()
                .find(|d| d["kind"] == "Secret" && d["metadata"]["name"] == name)
                .unwrap_or_else(|| panic!("env {name}: no rendered Secret {name}"));
            secret["stringData"][r["key"].as_str().unwrap()]
                .as_str()
                .unwrap_or_else(|| panic!("Secret {name} has no {r}"))
                .to_string()
        } else {
            let path = e["valueFrom"]["fieldRef"]["fieldPath"]
                .as_str()
                .unwrap_or_else(|| panic!("env {name}: {e}"));
            fields[path].clone()
        };
        env.insert(name.to_string(), value);
    }
    let args = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let a = expand(a.as_str().unwrap(), &env);
            assert!(!a.contains("$("), "unexpanded {a}");
            a
        })
        .collect();
    (args, env)
}

fn find<'a>(docs: &'a [Value], kind: &str, suffix: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"].as_str().unwrap().ends_with(suffix))
        .unwrap_or_else(|| panic!("no {kind} *{suffix}"))
}

/// `workers.prefixCache: false` reaches the worker command line; the default leaves the
/// worker's own default (on).
#[test]
fn the_prefix_cache_switch_reaches_the_workers() {
    for (vf, off) in [("", false), ("ci/gpu.yaml", true)] {
        let mut args: Vec<String> = vec!["template".into(), "sy".into()];
        args.push(chart().to_str().unwrap().into());
        args.extend(with_values(vf));
        let docs = render_json(&args);
        let sts = find(&docs, "StatefulSet", "-worker");
        let a = &sts["spec"]["template"]["spec"]["containers"][0]["args"];
        let has = a
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x.as_str() == Some("--no-prefix-cache"));
        assert_eq!(has, off, "{vf:?}: {a}");
    }
}

#[test]
fn the_rendered_commands_form_a_cluster_that_serves() {
    let etcd = Etcd::start();
    let model = fixture("tiny-qwen3-moe");
    let port = || common::free_port().to_string();
    let (grpc, http, metrics, control, comm) = (port(), port(), port(), port(), port());
    let admin = port();
    let sets = [
        format!("etcd.external.endpoints={}", etcd.url),
        format!("model.path={}", model.display()),
        format!("coordinator.grpcPort={grpc}"),
        format!("coordinator.httpPort={http}"),
        format!("coordinator.metricsPort={metrics}"),
        format!("coordinator.adminPort={admin}"),
        format!("workers.controlPort={control}"),
        format!("workers.commPort={comm}"),
        format!(
            "membership.clusterPrefix=/switchyard/helm-{}",
            std::process::id()
        ),
    ];
    let mut args: Vec<String> = vec![
        "template".into(),
        "sy".into(),
        chart().to_str().unwrap().into(),
        "--namespace".into(),
        "serving".into(),
        "-f".into(),
        chart().join("ci/cpu.yaml").to_str().unwrap().into(),
        "--set".into(),
        "etcd.enabled=false".into(),
    ];
    for s in &sets {
        args.push("--set".into());
        args.push(s.clone());
    }
    let docs = render_json(&args);
    let cm = find(&docs, "ConfigMap", "switchyard");
    let sts = find(&docs, "StatefulSet", "-worker");
    let dep = find(&docs, "Deployment", "-coordinator");
    let replicas = sts["spec"]["replicas"].as_u64().unwrap() as usize;
    assert_eq!(replicas, 2);
    let bin = env!("CARGO_BIN_EXE_switchyard");
    let mut procs = Vec::new();
    for i in 0..replicas {
        // Each pod's own address: a loopback IP of its own (cluster DNS stands in by it).
        let ip = format!("127.0.0.{}", i + 2);
        let fields = HashMap::from([
            ("metadata.name", format!("sy-switchyard-worker-{i}")),
            ("status.podIP", ip.clone()),
        ]);
        let overrides = HashMap::from([("PEER_HOST", ip.clone())]);
        let c = &sts["spec"]["template"]["spec"]["containers"][0];
        let (a, env) = process(c, cm, &docs, &fields, &overrides);
        assert_eq!(a[0], "worker");
        assert!(a.contains(&format!("--listen={ip}:{control}")), "{a:?}");
        let mut cmd = Command::new(bin);
        cmd.args(&a).envs(&env).stdout(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.contains(&format!("comm={ip}:{comm}")), "{line}");
        procs.push(common::Proc(child));
    }
    let fields = HashMap::from([("metadata.name", "sy-switchyard-coordinator-abc".to_string())]);
    let c = &dep["spec"]["template"]["spec"]["containers"][0];
    let (a, env) = process(c, cm, &docs, &fields, &HashMap::new());
    assert_eq!(a[0], "coordinator");
    assert_eq!(env["SWITCHYARD_ETCD"], etcd.url);
    let mut child = Command::new(bin)
        .args(&a)
        .envs(&env)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    procs.push(common::Proc(child));
    assert!(line.contains(&format!(":{grpc}")), "{line}");
    let url = format!("http://127.0.0.1:{grpc}");
    common::block_on(async {
        common::assert_goldens(&url, "tiny-qwen3-moe", 1).await;
        let st = common::cluster_status(&url).await;
        assert_eq!(st.workers.len(), 2);
    });
    // The readiness probe the chart declares: gRPC health of switchyard.v1.Inference.
    let probe = &c["readinessProbe"]["grpc"];
    assert_eq!(probe["service"], "switchyard.v1.Inference");
    assert_eq!(probe["port"].as_u64().unwrap().to_string(), grpc);
    // A worker pod stopping runs its preStop drain: the rendered command with the pod's env
    // (its id, the generated admin key) reaches the Admin API (cluster DNS stands in by
    // loopback) and moves the worker out; without the key the same command is refused.
    let w = &sts["spec"]["template"]["spec"]["containers"][0];
    let fields = HashMap::from([
        ("metadata.name", "sy-switchyard-worker-1".to_string()),
        ("status.podIP", "127.0.0.3".to_string()),
    ]);
    let (_, wenv) = process(
        w,
        cm,
        &docs,
        &fields,
        &HashMap::from([("PEER_HOST", "127.0.0.3".to_string())]),
    );
    let pre: Vec<String> = w["lifecycle"]["preStop"]["exec"]["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let a = a.as_str().unwrap();
            match a.strip_prefix("--endpoint=") {
                Some(e) => {
                    assert!(e.ends_with(&format!(":{admin}")), "preStop reaches {e}");
                    format!("--endpoint=http://127.0.0.1:{admin}")
                }
                None => a.to_string(),
            }
        })
        .collect();
    assert_eq!(pre[0], "switchyard");
    let run = |env: &HashMap<String, String>| {
        Command::new(bin)
            .args(&pre[1..])
            .env_clear()
            .envs(env)
            .output()
            .unwrap()
    };
    let mut keyless = wenv.clone();
    keyless.remove("SWITCHYARD_ADMIN_KEY");
    let refused = run(&keyless);
    assert!(
        !refused.status.success(),
        "a drain without the admin key was accepted"
    );
    let drained = run(&wenv);
    assert!(
        drained.status.success(),
        "{}",
        String::from_utf8_lossy(&drained.stderr)
    );
    common::block_on(async {
        let st = common::cluster_status(&url).await;
        assert_eq!(st.workers.len(), 1);
        assert_eq!(st.drained, vec!["sy-switchyard-worker-1".to_string()]);
        common::assert_goldens(&url, "tiny-qwen3-moe", 1).await;
    });
    drop(procs);
}

/// With TLS values the chart wires the certificates the binaries take: the coordinator's
/// public listeners (client certificates required) and its client side of Control, the
/// workers' Control listener on https, a preStop drain that trusts the public CA, and a
/// readiness probe kubelet can make without TLS.
#[test]
fn tls_values_wire_certificates_into_every_role() {
    let args: Vec<String> = vec![
        "template".into(),
        "sy".into(),
        chart().to_str().unwrap().into(),
        "-f".into(),
        chart().join("ci/tls.yaml").to_str().unwrap().into(),
    ];
    let docs = render_json(&args);
    let strs = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect()
    };
    let dep = find(&docs, "Deployment", "-coordinator");
    let c = &dep["spec"]["template"]["spec"]["containers"][0];
    let a = strs(&c["args"]);
    for want in [
        "--tls-cert=/etc/switchyard/tls/public/tls.crt",
        "--tls-client-ca=/etc/switchyard/tls/public/ca.crt",
        "--worker-tls-ca=/etc/switchyard/tls/control/ca.crt",
        "--worker-tls-cert=/etc/switchyard/tls/control/tls.crt",
    ] {
        assert!(
            a.iter().any(|x| x == want),
            "coordinator lacks {want}: {a:?}"
        );
    }
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    let sts = find(&docs, "StatefulSet", "-worker");
    let w = &sts["spec"]["template"]["spec"]["containers"][0];
    let a = strs(&w["args"]);
    assert!(
        a.iter().any(|x| x.starts_with("--advertise=https://")),
        "{a:?}"
    );
    assert!(
        a.iter()
            .any(|x| x == "--tls-client-ca=/etc/switchyard/tls/control/ca.crt"),
        "{a:?}"
    );
    let pre = strs(&w["lifecycle"]["preStop"]["exec"]["command"]);
    assert!(
        pre.iter().any(|x| x.starts_with("--endpoint=https://")),
        "{pre:?}"
    );
    assert!(
        pre.iter()
            .any(|x| x == "--tls-ca=/etc/switchyard/tls/public/ca.crt"),
        "{pre:?}"
    );
}

/// The bundled etcd's generated certificates work as the chart uses them: a real etcd serving
/// mutual TLS with the rendered Secret's certificate, and Switchyard's membership client
/// presenting the same certificate, registering and seeing a member; without it, refused.
#[test]
fn the_bundled_etcds_generated_certificates_serve_mutual_tls() {
    use switchyard_runtime::membership::{EtcdMembership, EtcdSecurity, MemberInfo, Membership};
    let docs = render_json(&[
        "template".into(),
        "sy".into(),
        chart().to_str().unwrap().into(),
    ]);
    let secret = find(&docs, "Secret", "-etcd-tls");
    let dir = std::env::temp_dir().join(format!("sy-helm-etcd-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for (key, file) in [
        ("ca.crt", "ca.crt"),
        ("tls.crt", "server.crt"),
        ("tls.key", "server.key"),
    ] {
        let b64 = secret["data"][key].as_str().unwrap();
        let out = Command::new("base64")
            .arg("-d")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().unwrap().write_all(b64.as_bytes())?;
                c.wait_with_output()
            })
            .unwrap();
        std::fs::write(dir.join(file), out.stdout).unwrap();
    }
    let etcd = Etcd::start_tls(&dir);
    let sts = find(&docs, "StatefulSet", "-etcd");
    let cmd = sts["spec"]["template"]["spec"]["containers"][0]["command"].to_string();
    assert!(
        cmd.contains("--client-cert-auth") && cmd.contains("--peer-client-cert-auth"),
        "{cmd}"
    );
    common::block_on(async {
        let f = |n: &str| Some(dir.join(n));
        let tls = EtcdSecurity {
            ca: f("ca.crt"),
            cert: f("server.crt"),
            key: f("server.key"),
            user: None,
        };
        let m = EtcdMembership::connect_with(&[etcd.url.clone()], "/switchyard/bundled", &tls)
            .await
            .unwrap();
        let member = MemberInfo {
            id: "w0".into(),
            control_url: "http://127.0.0.1:1".into(),
            model: "m".into(),
        };
        let _reg = m
            .register(member.clone(), std::time::Duration::from_secs(5))
            .await
            .unwrap();
        let (now, _) = m.watch().await.unwrap();
        assert_eq!(now, vec![member]);
        let bare = EtcdSecurity {
            cert: None,
            key: None,
            ..tls
        };
        let refused = async {
            let m = EtcdMembership::connect_with(&[etcd.url.clone()], "/x", &bare).await?;
            m.watch().await.map(|_| ())
        };
        let r = tokio::time::timeout(std::time::Duration::from_secs(15), refused).await;
        assert!(
            !matches!(r, Ok(Ok(()))),
            "a client without the certificate was served"
        );
    });
    drop(etcd);
    let _ = std::fs::remove_dir_all(&dir);
}
