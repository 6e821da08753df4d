//! Per-request records and the summary computed from them (pure).
//!
//! Definitions (all times in seconds; a request's clock starts when it is sent):
//! - schedule lag = sent − scheduled (open loops; how late the client was; a saturated client
//!   shows here instead of silently lowering the offered load);
//! - TTFT = first stream message carrying any token (reasoning or answer) − sent;
//! - TTFA = first message carrying answer text − sent (absent when the reply is all reasoning);
//! - ITL per message = the gap between consecutive token-carrying messages;
//!   ITL per token = each such gap divided evenly among the tokens of the later message;
//! - TPOT = (last token message − first token message) / (tokens − 1), requests with ≥ 2
//!   tokens (the first token excluded);
//! - E2E = end of stream − sent;
//! - tokens: counted on the stream (token ids) and as the server reports them (usage).
//!
//! The measured window is [warm-up, end of sending − cool-down]. A request belongs to it when
//! it was *sent* inside it; latency percentiles are over those requests (successful ones for
//! the token latencies), requests/s and output tokens/s are their successful completions and
//! tokens over the window's length, goodput the successful ones meeting every per-request SLO.
//! Percentiles are exact: nearest rank on the sorted values, `p(q) = v[ceil(q·n) − 1]`.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One request as it happened (a line of `requests.jsonl`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Record {
    pub index: usize,
    pub scheduled_s: f64,
    pub sent_s: f64,
    pub end_s: f64,
    /// "ok", the gRPC status code name of an error (e.g. "UNAVAILABLE"), "cancelled" (the
    /// client hung up, as planned) or "deadline" (the client's per-request deadline passed).
    pub status: String,
    pub finish: String,
    pub error: String,
    pub in_window: bool,
    pub prompt_tokens: u32,
    /// Tokens asked for.
    pub max_tokens: u32,
    pub ttft_s: Option<f64>,
    pub ttfa_s: Option<f64>,
    /// First and last token-carrying message, from sent.
    pub first_token_s: Option<f64>,
    pub last_token_s: Option<f64>,
    pub output_tokens: u32,
    pub reasoning_tokens_seen: u32,
    pub server_completion_tokens: Option<u32>,
    pub server_reasoning_tokens: Option<u32>,
    /// Tokens of each token-carrying message, in order.
    pub message_tokens: Vec<u32>,
    /// Gaps before each token-carrying message after the first.
    pub message_gaps_s: Vec<f64>,
    /// Times the stream broke (its coordinator lost) and was taken up again (gRPC `Resume`).
    #[serde(default)]
    pub resumes: u32,
}

impl Record {
    pub fn ok(&self) -> bool {
        self.status == "ok"
    }
    pub fn lag_s(&self) -> f64 {
        self.sent_s - self.scheduled_s
    }
    pub fn e2e_s(&self) -> f64 {
        self.end_s - self.sent_s
    }
    pub fn tpot_s(&self) -> Option<f64> {
        match (self.first_token_s, self.last_token_s) {
            (Some(a), Some(b)) if self.output_tokens >= 2 => {
                Some((b - a) / (self.output_tokens - 1) as f64)
            }
            _ => None,
        }
    }
    /// ITL of every token after the first.
    pub fn itl_tokens(&self) -> Vec<f64> {
        let mut v = Vec::new();
        for (gap, n) in self.message_gaps_s.iter().zip(&self.message_tokens[1..]) {
            for _ in 0..*n {
                v.push(gap / *n as f64);
            }
        }
        v
    }
}

/// Exact percentiles of a sample.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Stats {
    pub count: usize,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p95: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

impl Stats {
    pub fn of(mut v: Vec<f64>) -> Stats {
        if v.is_empty() {
            return Stats::default();
        }
        v.sort_by(f64::total_cmp);
        Stats {
            count: v.len(),
            mean: v.iter().sum::<f64>() / v.len() as f64,
            p50: percentile(&v, 0.50),
            p90: percentile(&v, 0.90),
            p95: percentile(&v, 0.95),
            p99: percentile(&v, 0.99),
            p999: percentile(&v, 0.999),
            max: v[v.len() - 1],
        }
    }
    fn get(&self, p: &str) -> Option<f64> {
        Some(match p {
            "mean" => self.mean,
            "p50" => self.p50,
            "p90" => self.p90,
            "p95" => self.p95,
            "p99" => self.p99,
            "p999" => self.p999,
            "max" => self.max,
            _ => return None,
        })
    }
}

/// Per-request service level objectives (a request meets them all or it does not count as
/// goodput): `ttft=2s,tpot=100ms,e2e=30s,ttfa=3s`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Slos(pub BTreeMap<String, f64>);

/// Seconds from `2s`, `150ms`, `40us` or a bare number of seconds.
pub fn parse_seconds(s: &str) -> Result<f64, String> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 2s, 150ms)"))?;
    if !(v >= 0.0) {
        return Err(format!("{s:?} must not be negative"));
    }
    Ok(v * scale)
}

impl std::str::FromStr for Slos {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut m = BTreeMap::new();
        for part in s.split(',').filter(|p| !p.trim().is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("SLO {part:?}: expected NAME=DURATION"))?;
            let k = k.trim();
            if !["ttft", "ttfa", "tpot", "e2e", "itl"].contains(&k) {
                return Err(format!(
                    "SLO {k:?}: one of ttft, ttfa, tpot, itl (max), e2e"
                ));
            }
            m.insert(k.to_string(), parse_seconds(v)?);
        }
        Ok(Slos(m))
    }
}

impl Slos {
    pub fn met(&self, r: &Record) -> bool {
        r.ok()
            && self.0.iter().all(|(k, lim)| {
                let v = match k.as_str() {
                    "ttft" => r.ttft_s,
                    "ttfa" => r.ttfa_s,
                    "tpot" => r.tpot_s(),
                    "e2e" => Some(r.e2e_s()),
                    "itl" => r.itl_tokens().into_iter().reduce(f64::max).or(Some(0.0)),
                    _ => None,
                };
                v.is_some_and(|v| v <= *lim)
            })
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    pub window_start_s: f64,
    pub window_end_s: f64,
    pub window_s: f64,
    /// Requests sent in the window / ended OK / by other status.
    pub requests: usize,
    pub ok: usize,
    pub by_status: BTreeMap<String, usize>,
    pub error_rate: f64,
    pub target_rate: Option<f64>,
    /// Sends per second inside the window.
    pub measured_rate: f64,
    pub requests_per_s: f64,
    pub output_tokens_per_s: f64,
    pub goodput_per_s: f64,
    pub slos: Slos,
    pub output_tokens: u64,
    pub reasoning_tokens: u64,
    pub answer_tokens: u64,
    pub ttft: Stats,
    pub ttfa: Stats,
    pub itl_token: Stats,
    pub itl_message: Stats,
    pub tpot: Stats,
    pub e2e: Stats,
    pub schedule_lag: Stats,
}

/// The summary of `records` over the window `[start, end)` (seconds from the run's start).
pub fn summarize(
    records: &[Record],
    start: f64,
    end: f64,
    target_rate: Option<f64>,
    slos: &Slos,
) -> Summary {
    let w: Vec<&Record> = records.iter().filter(|r| r.in_window).collect();
    let ok: Vec<&Record> = w.iter().copied().filter(|r| r.ok()).collect();
    let secs = (end - start).max(1e-9);
    let mut by_status = BTreeMap::new();
    for r in &w {
        *by_status.entry(r.status.clone()).or_insert(0) += 1;
    }
    let output_tokens: u64 = ok.iter().map(|r| r.output_tokens as u64).sum();
    let reasoning_tokens: u64 = ok
        .iter()
        .map(|r| r.server_reasoning_tokens.unwrap_or(r.reasoning_tokens_seen) as u64)
        .sum();
    let errors = w
        .iter()
        .filter(|r| !r.ok() && r.status != "cancelled")
        .count();
    Summary {
        window_start_s: start,
        window_end_s: end,
        window_s: secs,
        requests: w.len(),
        ok: ok.len(),
        by_status,
        error_rate: if w.is_empty() {
            0.0
        } else {
            errors as f64 / w.len() as f64
        },
        target_rate,
        measured_rate: w.len() as f64 / secs,
        requests_per_s: ok.len() as f64 / secs,
        output_tokens_per_s: output_tokens as f64 / secs,
        goodput_per_s: ok.iter().filter(|r| slos.met(r)).count() as f64 / secs,
        slos: slos.clone(),
        output_tokens,
        reasoning_tokens,
        answer_tokens: output_tokens.saturating_sub(reasoning_tokens),
        ttft: Stats::of(ok.iter().filter_map(|r| r.ttft_s).collect()),
        ttfa: Stats::of(ok.iter().filter_map(|r| r.ttfa_s).collect()),
        itl_token: Stats::of(ok.iter().flat_map(|r| r.itl_tokens()).collect()),
        itl_message: Stats::of(ok.iter().flat_map(|r| r.message_gaps_s.clone()).collect()),
        tpot: Stats::of(ok.iter().filter_map(|r| r.tpot_s()).collect()),
        e2e: Stats::of(ok.iter().map(|r| r.e2e_s()).collect()),
        schedule_lag: Stats::of(w.iter().map(|r| r.lag_s()).collect()),
    }
}

impl Summary {
    /// A metric by name: `ttft_p99`, `itl_token_p50`, `e2e_max`, `schedule_lag_p99`,
    /// `error_rate`, `requests_per_s`, `output_tokens_per_s`, `goodput_per_s`,
    /// `measured_rate`.
    pub fn metric(&self, name: &str) -> Option<f64> {
        match name {
            "error_rate" => return Some(self.error_rate),
            "requests_per_s" => return Some(self.requests_per_s),
            "output_tokens_per_s" => return Some(self.output_tokens_per_s),
            "goodput_per_s" => return Some(self.goodput_per_s),
            "measured_rate" => return Some(self.measured_rate),
            _ => {}
        }
        let (base, p) = name.rsplit_once('_')?;
        let s = match base {
            "ttft" => &self.ttft,
            "ttfa" => &self.ttfa,
            "itl" | "itl_token" => &self.itl_token,
            "itl_message" => &self.itl_message,
            "tpot" => &self.tpot,
            "e2e" => &self.e2e,
            "schedule_lag" => &self.schedule_lag,
            _ => return None,
        };
        s.get(p)
    }

    /// Every numeric metric by name (for `compare`).
    pub fn flat(&self) -> Vec<(String, f64)> {
        let mut v = vec![
            ("requests_per_s".to_string(), self.requests_per_s),
            ("output_tokens_per_s".into(), self.output_tokens_per_s),
            ("goodput_per_s".into(), self.goodput_per_s),
            ("error_rate".into(), self.error_rate),
            ("measured_rate".into(), self.measured_rate),
        ];
        for (n, s) in [
            ("ttft", &self.ttft),
            ("ttfa", &self.ttfa),
            ("itl_token", &self.itl_token),
            ("itl_message", &self.itl_message),
            ("tpot", &self.tpot),
            ("e2e", &self.e2e),
            ("schedule_lag", &self.schedule_lag),
        ] {
            for p in ["p50", "p90", "p99", "max"] {
                v.push((format!("{n}_{p}"), s.get(p).unwrap_or(f64::NAN)));
            }
        }
        v
    }
}

/// A gate: `ttft_p99>2s`, `error_rate>0.01`, `output_tokens_per_s<100`.
#[derive(Clone, Debug, PartialEq)]
pub struct Threshold {
    pub metric: String,
    pub above: bool,
    pub limit: f64,
}

impl std::str::FromStr for Threshold {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (metric, above, v) = if let Some((m, v)) = s.split_once('>') {
            (m, true, v)
        } else if let Some((m, v)) = s.split_once('<') {
            (m, false, v)
        } else {
            return Err(format!(
                "threshold {s:?}: expected METRIC>VALUE or METRIC<VALUE"
            ));
        };
        let metric = metric.trim().to_string();
        if Summary::default().metric(&metric).is_none() {
            return Err(format!("threshold {s:?}: unknown metric {metric:?}"));
        }
        Ok(Threshold {
            metric,
            above,
            limit: parse_seconds(v)?,
        })
    }
}

impl Threshold {
    /// The breach message, if `s` breaches this threshold.
    pub fn breached(&self, s: &Summary) -> Option<String> {
        let v = s.metric(&self.metric)?;
        let bad = if self.above {
            v > self.limit
        } else {
            v < self.limit
        };
        bad.then(|| {
            format!(
                "{} = {v:.6} {} {}",
                self.metric,
                if self.above { ">" } else { "<" },
                self.limit
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(|x| x as f64).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 0.999), 100.0);
        assert_eq!(percentile(&[3.0], 0.5), 3.0);
        let s = Stats::of(vec![5.0, 1.0, 3.0]);
        assert_eq!((s.p50, s.max, s.count), (3.0, 5.0, 3));
    }

    #[test]
    fn thresholds_and_slos_parse() {
        let t: Threshold = "ttft_p99>2s".parse().unwrap();
        assert_eq!((t.above, t.limit), (true, 2.0));
        let t: Threshold = "output_tokens_per_s<100".parse().unwrap();
        assert!(!t.above);
        assert!("nonsense>1".parse::<Threshold>().is_err());
        let s: Slos = "ttft=150ms,e2e=2s".parse().unwrap();
        assert_eq!(s.0["ttft"], 0.15);
        assert!("foo=1s".parse::<Slos>().is_err());
    }

    #[test]
    fn itl_splits_message_gaps_among_tokens() {
        let r = Record {
            index: 0,
            scheduled_s: 0.0,
            sent_s: 0.0,
            end_s: 1.0,
            status: "ok".into(),
            finish: "length".into(),
            error: String::new(),
            in_window: true,
            prompt_tokens: 3,
            max_tokens: 5,
            ttft_s: Some(0.1),
            ttfa_s: Some(0.1),
            first_token_s: Some(0.1),
            last_token_s: Some(0.5),
            output_tokens: 5,
            reasoning_tokens_seen: 0,
            server_completion_tokens: Some(5),
            server_reasoning_tokens: Some(0),
            message_tokens: vec![1, 2, 2],
            message_gaps_s: vec![0.2, 0.2],
            resumes: 0,
        };
        assert_eq!(r.itl_tokens(), vec![0.1, 0.1, 0.1, 0.1]);
        assert!((r.tpot_s().unwrap() - 0.1).abs() < 1e-12);
        let slo: Slos = "tpot=0.1s,itl=0.1s".parse().unwrap();
        assert!(slo.met(&r));
        let slo: Slos = "ttft=50ms".parse().unwrap();
        assert!(!slo.met(&r));
    }
}
