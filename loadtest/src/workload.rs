//! Workloads: what each request asks for (prompt tokens, output length, whether it hangs up
//! early) and when it is sent. Pure and seeded: the same options and seed give the same list.

use crate::rng::{Draws, Rng};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// A length distribution, parsed from `fixed:N`, `uniform:A-B`, `normal:MEAN,STD` or
/// `hist:LEN=WEIGHT,LEN=WEIGHT,...` (a bare `N` is `fixed:N`).
#[derive(Clone, Debug, PartialEq)]
pub enum Dist {
    Fixed(u32),
    Uniform(u32, u32),
    Normal(f64, f64),
    Hist(Vec<(u32, f64)>),
}

impl std::str::FromStr for Dist {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("length distribution {s:?}: {why}");
        let num = |v: &str| {
            v.trim()
                .parse::<u32>()
                .map_err(|_| bad("not a whole number"))
        };
        let (kind, rest) = s.split_once(':').unwrap_or(("fixed", s));
        let d = match kind {
            "fixed" => Dist::Fixed(num(rest)?),
            "uniform" => {
                let (a, b) = rest
                    .split_once('-')
                    .ok_or_else(|| bad("expected uniform:A-B"))?;
                let (a, b) = (num(a)?, num(b)?);
                if a > b {
                    return Err(bad("A > B"));
                }
                Dist::Uniform(a, b)
            }
            "normal" => {
                let (m, sd) = rest
                    .split_once(',')
                    .ok_or_else(|| bad("expected normal:MEAN,STD"))?;
                let m: f64 = m.trim().parse().map_err(|_| bad("bad mean"))?;
                let sd: f64 = sd.trim().parse().map_err(|_| bad("bad std"))?;
                if !(m >= 1.0 && sd >= 0.0) {
                    return Err(bad("mean must be >= 1 and std >= 0"));
                }
                Dist::Normal(m, sd)
            }
            "hist" => {
                let mut v = Vec::new();
                for part in rest.split(',') {
                    let (l, w) = part
                        .split_once('=')
                        .ok_or_else(|| bad("expected hist:LEN=WEIGHT,..."))?;
                    let w: f64 = w.trim().parse().map_err(|_| bad("bad weight"))?;
                    if !(w >= 0.0) {
                        return Err(bad("negative weight"));
                    }
                    v.push((num(l)?, w));
                }
                if v.iter().map(|x| x.1).sum::<f64>() <= 0.0 {
                    return Err(bad("weights sum to zero"));
                }
                Dist::Hist(v)
            }
            _ => return Err(bad("unknown kind (fixed, uniform, normal, hist)")),
        };
        if d.max() == 0 {
            return Err(bad("lengths must be positive"));
        }
        Ok(d)
    }
}

impl Dist {
    /// One draw, at least 1.
    pub fn sample(&self, rng: &mut Rng) -> u32 {
        let v = match self {
            Dist::Fixed(n) => *n,
            Dist::Uniform(a, b) => rng.range(*a as u64, *b as u64) as u32,
            Dist::Normal(m, sd) => (m + sd * rng.normal()).round().max(1.0) as u32,
            Dist::Hist(h) => {
                let total: f64 = h.iter().map(|x| x.1).sum();
                let mut u = rng.f64() * total;
                let mut pick = h[h.len() - 1].0;
                for (l, w) in h {
                    if u < *w {
                        pick = *l;
                        break;
                    }
                    u -= w;
                }
                pick
            }
        };
        v.max(1)
    }

    /// The largest value a draw can take (normal: mean + 6 std).
    pub fn max(&self) -> u32 {
        match self {
            Dist::Fixed(n) => *n,
            Dist::Uniform(_, b) => *b,
            Dist::Normal(m, sd) => (m + 6.0 * sd).ceil() as u32,
            Dist::Hist(h) => h.iter().map(|x| x.0).max().unwrap_or(0),
        }
    }
}

/// When requests are sent.
#[derive(Clone, Debug, PartialEq)]
pub enum Shape {
    /// `n` clients, each sending its next request when the last one ends.
    Concurrency(usize),
    /// Open loop at `rate` requests/s, evenly spaced or Poisson.
    Rate { rate: f64, poisson: bool },
    /// `size` requests at once every `every`.
    Burst { size: usize, every: Duration },
    /// Open loop stepping through `rates`, `step` each (a stepped ramp).
    Ramp { rates: Vec<f64>, step: Duration },
    /// The send times of a trace.
    Trace,
}

/// One request of a workload.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Planned {
    pub index: usize,
    /// Seconds after the start (open-loop shapes; 0 for closed-loop concurrency).
    pub at: f64,
    pub prompt: Vec<u32>,
    /// Chat text instead of token ids (the chat scenario).
    pub chat: Option<String>,
    pub max_tokens: u32,
    /// Hang up after this many tokens (the cancellation scenario).
    pub cancel_after: Option<u32>,
}

/// How prompts are made.
#[derive(Clone, Debug)]
pub struct Prompts {
    pub input: Dist,
    pub output: Dist,
    /// Token ids are drawn from `lo..hi` (hi = the model's vocabulary).
    pub token_range: (u32, u32),
    /// Every prompt starts with the same this-many tokens (the shared-prefix scenario)...
    pub shared_prefix: u32,
    /// ...one of this many different prefixes, drawn at random per request (≥ 1).
    pub prefix_groups: u32,
    /// Send chat messages of random words instead of token ids.
    pub chat: bool,
    /// Fraction of requests that hang up after `cancel_after` tokens.
    pub cancel_fraction: f64,
    pub cancel_after: u32,
}

const WORDS: &[&str] = &[
    "river", "stone", "light", "cloud", "engine", "garden", "signal", "paper", "window", "forest",
    "number", "silver", "market", "bridge", "winter", "planet", "letter", "orange", "story",
    "circle", "valley", "mirror", "rocket", "harbor",
];

impl Prompts {
    fn make(&self, rng: &mut Rng, prefix: &[u32], index: usize, at: f64) -> Planned {
        let n = self.input.sample(rng);
        let (lo, hi) = self.token_range;
        let mut prompt: Vec<u32> = prefix.iter().copied().take(n as usize).collect();
        while prompt.len() < n as usize {
            prompt.push(rng.range(lo as u64, hi as u64 - 1) as u32);
        }
        let chat = self.chat.then(|| {
            (0..n)
                .map(|_| WORDS[rng.range(0, WORDS.len() as u64 - 1) as usize])
                .collect::<Vec<_>>()
                .join(" ")
        });
        let max_tokens = self.output.sample(rng);
        let cancel_after = (self.cancel_fraction > 0.0 && rng.f64() < self.cancel_fraction)
            .then_some(self.cancel_after);
        Planned {
            index,
            at,
            prompt: if self.chat { Vec::new() } else { prompt },
            chat,
            max_tokens,
            cancel_after,
        }
    }
}

/// A line of a replayed trace: `{"timestamp": s, "input_len": n | "text": "...", "output_len": n}`.
#[derive(Clone, Debug, Deserialize)]
pub struct TraceLine {
    pub timestamp: f64,
    pub input_len: Option<u32>,
    pub text: Option<String>,
    pub output_len: u32,
}

/// The send schedule and requests of an open-loop run lasting `duration` (or `limit`
/// requests), or the first `limit` requests of a closed loop (times 0).
pub fn plan(
    shape: &Shape,
    prompts: &Prompts,
    duration: Option<Duration>,
    limit: Option<usize>,
    seed: u64,
    trace: &[TraceLine],
) -> Vec<Planned> {
    let mut rng = Rng::new(seed);
    let mut arrivals = Rng::new(seed ^ 0x5EED_A11C_E5);
    let (lo, hi) = prompts.token_range;
    let prefixes: Vec<Vec<u32>> = (0..prompts.prefix_groups.max(1))
        .map(|_| {
            (0..prompts.shared_prefix)
                .map(|_| rng.range(lo as u64, hi as u64 - 1) as u32)
                .collect()
        })
        .collect();
    let end = duration.map_or(f64::INFINITY, |d| d.as_secs_f64());
    let cap = limit.unwrap_or(usize::MAX);
    let mut out = Vec::new();
    let push = |at: f64, out: &mut Vec<Planned>, rng: &mut Rng| {
        let i = out.len();
        let prefix = if prefixes.len() > 1 {
            &prefixes[rng.range(0, prefixes.len() as u64 - 1) as usize]
        } else {
            &prefixes[0]
        };
        out.push(prompts.make(rng, prefix, i, at));
    };
    match shape {
        Shape::Concurrency(_) => {
            // Closed loop: a generous list; the runner stops at the duration.
            let n = limit.unwrap_or(1_000_000);
            for _ in 0..n {
                push(0.0, &mut out, &mut rng);
            }
        }
        Shape::Rate { rate, poisson } => {
            let mut t = 0.0;
            while t < end && out.len() < cap {
                push(t, &mut out, &mut rng);
                // Constant: i / rate exactly (no accumulated rounding).
                t = if *poisson {
                    t + arrivals.exp(*rate)
                } else {
                    out.len() as f64 / rate
                };
            }
        }
        Shape::Burst { size, every } => {
            let mut t = 0.0;
            while t < end && out.len() < cap {
                for _ in 0..*size {
                    if out.len() < cap {
                        push(t, &mut out, &mut rng);
                    }
                }
                t += every.as_secs_f64();
            }
        }
        Shape::Ramp { rates, step } => {
            let mut t = 0.0;
            for (i, r) in rates.iter().enumerate() {
                let stop = (i + 1) as f64 * step.as_secs_f64();
                while t < stop && t < end && out.len() < cap {
                    push(t, &mut out, &mut rng);
                    t += 1.0 / r;
                }
                t = t.max(stop);
            }
        }
        Shape::Trace => {
            let t0 = trace.first().map_or(0.0, |l| l.timestamp);
            for l in trace.iter().take(cap) {
                let at = l.timestamp - t0;
                if at >= end {
                    break;
                }
                let i = out.len();
                let mut p = prompts.make(&mut rng, &prefixes[0], i, at);
                p.max_tokens = l.output_len.max(1);
                if let Some(text) = &l.text {
                    p.chat = Some(text.clone());
                    p.prompt.clear();
                } else if let Some(n) = l.input_len {
                    p.prompt = (0..n.max(1))
                        .map(|_| rng.range(lo as u64, hi as u64 - 1) as u32)
                        .collect();
                    p.chat = None;
                }
                out.push(p);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompts() -> Prompts {
        Prompts {
            input: "uniform:4-12".parse().unwrap(),
            output: "8".parse().unwrap(),
            token_range: (10, 100),
            shared_prefix: 3,
            prefix_groups: 1,
            chat: false,
            cancel_fraction: 0.25,
            cancel_after: 2,
        }
    }

    #[test]
    fn distributions_parse_and_stay_in_range() {
        let mut rng = Rng::new(1);
        for (s, lo, hi) in [
            ("fixed:7", 7, 7),
            ("9", 9, 9),
            ("uniform:3-5", 3, 5),
            ("normal:50,5", 1, 200),
            ("hist:10=1,20=3", 10, 20),
        ] {
            let d: Dist = s.parse().unwrap();
            for _ in 0..1000 {
                let v = d.sample(&mut rng);
                assert!(v >= lo && v <= hi, "{s}: {v}");
            }
        }
        for bad in [
            "uniform:5-3",
            "fixed:x",
            "normal:0,1",
            "hist:",
            "zipf:3",
            "0",
        ] {
            assert!(bad.parse::<Dist>().is_err(), "{bad}");
        }
    }

    #[test]
    fn prefix_groups_draw_each_prompt_from_that_many_prefixes() {
        let mut p = prompts();
        p.prefix_groups = 3;
        let shape = Shape::Rate {
            rate: 200.0,
            poisson: false,
        };
        let plan = plan(&shape, &p, Some(Duration::from_secs(1)), None, 5, &[]);
        let mut heads: Vec<Vec<u32>> = plan.iter().map(|r| r.prompt[..3].to_vec()).collect();
        heads.sort();
        heads.dedup();
        assert_eq!(heads.len(), 3, "{heads:?}");
    }

    #[test]
    fn same_seed_same_workload_and_shared_prefix() {
        let shape = Shape::Rate {
            rate: 50.0,
            poisson: true,
        };
        let a = plan(
            &shape,
            &prompts(),
            Some(Duration::from_secs(2)),
            None,
            7,
            &[],
        );
        let b = plan(
            &shape,
            &prompts(),
            Some(Duration::from_secs(2)),
            None,
            7,
            &[],
        );
        let c = plan(
            &shape,
            &prompts(),
            Some(Duration::from_secs(2)),
            None,
            8,
            &[],
        );
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.iter().all(|p| p.prompt[..3] == a[0].prompt[..3]));
        assert!(a
            .iter()
            .all(|p| p.at < 2.0 && p.prompt.iter().all(|t| (10..100).contains(t))));
        let cancelled = a.iter().filter(|p| p.cancel_after.is_some()).count() as f64;
        assert!((cancelled / a.len() as f64 - 0.25).abs() < 0.15);
    }

    #[test]
    fn shapes_schedule_as_described() {
        let p = prompts();
        let d = Some(Duration::from_secs(1));
        let even = plan(
            &Shape::Rate {
                rate: 10.0,
                poisson: false,
            },
            &p,
            d,
            None,
            1,
            &[],
        );
        assert_eq!(even.len(), 10);
        assert!((even[3].at - 0.3).abs() < 1e-9);
        let burst = plan(
            &Shape::Burst {
                size: 4,
                every: Duration::from_millis(500),
            },
            &p,
            d,
            None,
            1,
            &[],
        );
        assert_eq!(burst.len(), 8);
        assert_eq!(burst[4].at, 0.5);
        let ramp = plan(
            &Shape::Ramp {
                rates: vec![2.0, 4.0],
                step: Duration::from_secs(1),
            },
            &p,
            Some(Duration::from_secs(2)),
            None,
            1,
            &[],
        );
        assert_eq!(ramp.len(), 6);
        let limited = plan(
            &Shape::Rate {
                rate: 1000.0,
                poisson: true,
            },
            &p,
            None,
            Some(25),
            1,
            &[],
        );
        assert_eq!(limited.len(), 25);
    }
}
