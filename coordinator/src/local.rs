//! Worker processes started by this process (`switchyard up`, the cluster benchmark): each is
//! `switchyard worker` with `--exit-with-stdin`, so none outlives its parent, and all are
//! killed when the handle drops.

use anyhow::{Context, Result};
use std::io::BufRead;
use std::path::Path;
use switchyard_worker::membership::MemberInfo;

pub struct LocalWorkers {
    children: Vec<std::process::Child>,
    /// `worker-{i}` and its control URL, in start order.
    pub members: Vec<MemberInfo>,
}

impl LocalWorkers {
    /// Starts `k` workers serving `model`, each with `extra` arguments; returns once every one
    /// has announced its control URL.
    pub fn spawn(model: &Path, k: usize, extra: &[String]) -> Result<Self> {
        let exe = std::env::current_exe()?;
        let mut w = LocalWorkers {
            children: Vec::new(),
            members: Vec::new(),
        };
        for i in 0..k {
            let id = format!("worker-{i}");
            let mut child = std::process::Command::new(&exe)
                .args(["worker", "--model"])
                .arg(model)
                .args(["--id", &id, "--exit-with-stdin"])
                .args(extra)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()?;
            let mut line = String::new();
            std::io::BufReader::new(child.stdout.take().context("worker stdout")?)
                .read_line(&mut line)?;
            w.children.push(child);
            let url = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("grpc="))
                .with_context(|| format!("worker {i} did not start: {line:?}"))?;
            w.members.push(MemberInfo {
                id,
                control_url: url.to_string(),
                model: model.display().to_string(),
            });
        }
        Ok(w)
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
