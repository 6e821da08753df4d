//! Worker processes started by this process (`switchyard up`, the cluster benchmark): each is
//! `switchyard worker` with `--exit-with-stdin`, so none outlives its parent, and all are
//! killed when the handle drops.

use anyhow::{Context, Result};
use std::io::BufRead;
use std::path::Path;
use switchyard_runtime::membership::MemberInfo;

pub struct LocalWorkers {
    children: Vec<std::process::Child>,
    /// `worker-{i}` and its control URL, in start order.
    pub members: Vec<MemberInfo>,
    model: std::path::PathBuf,
    args: Vec<Vec<String>>,
    env: Vec<(String, String)>,
}

/// Starts one `switchyard worker`; returns it once it has announced its control URL.
fn start_one(
    model: &Path,
    id: &str,
    args: &[String],
    env: &[(String, String)],
) -> Result<(std::process::Child, String)> {
    let exe = std::env::current_exe()?;
    let mut child = std::process::Command::new(&exe)
        .args(["worker", "--model"])
        .arg(model)
        .args(["--id", id, "--exit-with-stdin"])
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().context("worker stdout")?).read_line(&mut line)?;
    let url = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("grpc="))
        .with_context(|| format!("worker {id} did not start: {line:?}"))?
        .to_string();
    Ok((child, url))
}

impl LocalWorkers {
    /// Starts `k` workers serving `model`, each with `extra` arguments; returns once every one
    /// has announced its control URL.
    pub fn spawn(model: &Path, k: usize, extra: &[String]) -> Result<Self> {
        Self::spawn_each(model, vec![extra.to_vec(); k], &[])
    }

    /// As [`spawn`](Self::spawn), with extra environment variables for the workers (e.g.
    /// `RAYON_NUM_THREADS`).
    pub fn spawn_with_env(
        model: &Path,
        k: usize,
        extra: &[String],
        env: &[(String, String)],
    ) -> Result<Self> {
        Self::spawn_each(model, vec![extra.to_vec(); k], env)
    }

    /// One worker per entry of `args` (its own extra arguments, e.g. a fixed `--listen`).
    pub fn spawn_each(
        model: &Path,
        args: Vec<Vec<String>>,
        env: &[(String, String)],
    ) -> Result<Self> {
        let mut w = LocalWorkers {
            children: Vec::new(),
            members: Vec::new(),
            model: model.to_path_buf(),
            args,
            env: env.to_vec(),
        };
        for i in 0..w.args.len() {
            let id = format!("worker-{i}");
            let (child, url) = start_one(model, &id, &w.args[i], env)?;
            w.children.push(child);
            w.members.push(MemberInfo {
                id,
                control_url: url,
                model: model.display().to_string(),
            });
        }
        Ok(w)
    }

    /// Kills worker `i` with SIGKILL (no goodbye) and reaps it.
    pub fn kill(&mut self, i: usize) {
        let _ = self.children[i].kill();
        let _ = self.children[i].wait();
    }

    /// Starts worker `i` again with its arguments (a fixed `--listen` brings it back on its
    /// address).
    pub fn restart(&mut self, i: usize) -> Result<()> {
        let (child, url) = start_one(&self.model, &self.members[i].id, &self.args[i], &self.env)?;
        self.children[i] = child;
        self.members[i].control_url = url;
        Ok(())
    }

    /// CPU seconds (user + system) each worker process has used so far (Linux `/proc`).
    pub fn cpu_seconds(&self) -> Vec<f64> {
        self.children
            .iter()
            .map(|c| {
                std::fs::read_to_string(format!("/proc/{}/stat", c.id()))
                    .ok()
                    .and_then(|s| {
                        // Fields after the parenthesised command name; utime and stime are
                        // fields 14 and 15 (1-based), in clock ticks (100 per second).
                        let rest = &s[s.rfind(')')? + 2..];
                        let f: Vec<&str> = rest.split_whitespace().collect();
                        let ticks: f64 =
                            f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
                        Some(ticks / 100.0)
                    })
                    .unwrap_or(0.0)
            })
            .collect()
    }

    pub fn urls(&self) -> Vec<String> {
        self.members.iter().map(|m| m.control_url.clone()).collect()
    }
}

impl Drop for LocalWorkers {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
