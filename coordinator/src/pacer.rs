//! Prefill pacing: keeps decoding streams' inter-token latency within a factor of a decode-only
//! step while a long prompt is prefilled in chunks beside them.
//!
//! A token budget alone cannot do this: a chunk's cost grows with its context (attention), so
//! the same 512 tokens cost 30 times more at position 16K than at 0 on a small model. The pacer
//! measures step times and sets the scheduler's prefill limit (in [`chunk_cost`] units, which
//! price attention by context) for steps that carry decodes:
//!
//! - `decode_s`: moving average of decode-only step times (the latency to protect);
//! - after a step with decodes and `u` prefill units taking `t`: cost per unit
//!   `c = (t - decode_s) / u` (averaged), and the next limit `(factor - 1) * decode_s / c`, so
//!   that a paced step takes about `factor` times a decode-only one.
//! - No measurement yet, or every `REFRESH` paced steps: limit 0 (one decode-only step) to
//!   measure `decode_s` afresh.
//!
//! Pure: the driver feeds it step outcomes and asks for the next limit.
//!
//! [`chunk_cost`]: crate::scheduler::chunk_cost

/// Paced steps between decode-only measurement steps.
pub const REFRESH: u32 = 64;
const ALPHA: f64 = 0.25;

#[derive(Clone, Debug)]
pub struct Pacer {
    factor: f64,
    decode_s: Option<f64>,
    unit_s: Option<f64>,
    since_refresh: u32,
}

impl Pacer {
    /// `factor` > 1: target step time of a paced step relative to a decode-only step.
    pub fn new(factor: f64) -> Self {
        assert!(factor > 1.0, "pacing factor must exceed 1");
        Pacer {
            factor,
            decode_s: None,
            unit_s: None,
            since_refresh: 0,
        }
    }

    /// The same pacing with nothing measured (a new group of ranks).
    pub fn fresh(&self) -> Self {
        Pacer::new(self.factor)
    }

    /// The prefill limit for the next step (applied by the scheduler only if it has decodes).
    pub fn limit(&self) -> Option<f64> {
        let Some(d) = self.decode_s else {
            return Some(0.0);
        };
        if self.since_refresh >= REFRESH {
            return Some(0.0);
        }
        match self.unit_s {
            // No prefill measured beside decodes yet: start small.
            None => Some(16.0),
            Some(c) => Some(((self.factor - 1.0) * d / c).max(1.0)),
        }
    }

    /// Records a finished step: how many decodes it carried, its prefill units, its duration.
    pub fn observe(&mut self, decodes: usize, prefill_units: f64, secs: f64) {
        if decodes == 0 {
            return;
        }
        if prefill_units <= 0.0 {
            self.decode_s = Some(match self.decode_s {
                Some(d) => d + ALPHA * (secs - d),
                None => secs,
            });
            self.since_refresh = 0;
            return;
        }
        self.since_refresh += 1;
        let Some(d) = self.decode_s else { return };
        let c = ((secs - d) / prefill_units).max(1e-9);
        self.unit_s = Some(match self.unit_s {
            Some(u) => u + ALPHA * (c - u),
            None => c,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A simulated cluster: a decode-only step takes `d`; each prefill unit adds `c`.
    fn simulate(d: f64, c: f64, steps: usize) -> (Pacer, Vec<f64>) {
        let mut p = Pacer::new(2.0);
        let mut times = Vec::new();
        for _ in 0..steps {
            let units = p.limit().unwrap_or(f64::INFINITY).min(1e6);
            let t = d + c * units;
            p.observe(8, units, t);
            times.push(t);
        }
        (p, times)
    }

    #[test]
    fn paced_steps_converge_to_the_target_factor() {
        for (d, c) in [(0.002, 1e-5), (0.01, 1e-3), (0.001, 5e-7)] {
            let (p, times) = simulate(d, c, 200);
            let tail = &times[100..];
            let worst = tail.iter().cloned().fold(0.0, f64::max);
            assert!(worst <= 2.0 * d * 1.05, "d={d} c={c}: worst {worst}");
            // And it does prefill: most steps carry about (factor - 1) * d of it.
            let mean = tail.iter().sum::<f64>() / tail.len() as f64;
            assert!(mean > 1.8 * d, "d={d} c={c}: mean {mean}");
            assert!(p.limit().unwrap() >= 1.0);
        }
    }

    #[test]
    fn starts_and_refreshes_with_a_decode_only_step() {
        let mut p = Pacer::new(3.0);
        assert_eq!(p.limit(), Some(0.0));
        p.observe(4, 0.0, 0.01);
        assert_eq!(p.limit(), Some(16.0));
        for _ in 0..REFRESH {
            p.observe(4, 10.0, 0.02);
            assert!(p.limit().unwrap() > 0.0 || p.since_refresh >= REFRESH);
        }
        assert_eq!(p.limit(), Some(0.0));
        // Prefill-only steps say nothing about decode latency.
        p.observe(0, 100.0, 1.0);
        assert_eq!(p.limit(), Some(0.0));
        p.observe(4, 0.0, 0.01);
        assert!(p.limit().unwrap() > 0.0);
    }
}
