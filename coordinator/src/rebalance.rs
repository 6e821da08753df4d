//! When to re-place experts while serving: a pure policy over a moving average of the tokens
//! routed to each expert (no I/O; the driver applies its decisions).
//!
//! - Load: each step's tokens per expert (summed over ranks) feed an exponential moving
//!   average with weight `1 / window`; decisions wait until `window` steps are in.
//! - Trigger, with hysteresis: the imbalance (see [`imbalance`]) must exceed `threshold`
//!   while armed; an attempt disarms the trigger, which re-arms when the imbalance falls below
//!   `threshold - hysteresis`, or after `retry_steps` steps (the load may have moved on).
//! - Accept: a plan is switched to only if it moves at least one expert and its predicted
//!   imbalance is at least `min_gain` (a fraction) below the current one.
//!
//! [`imbalance`]: crate::placement::imbalance

/// Tunables of the automatic rebalancer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RebalancePolicy {
    /// Imbalance (busiest rank / mean rank) above which a re-placement is planned; `f64::INFINITY`
    /// turns automatic rebalancing off (an operator can still ask for one).
    pub threshold: f64,
    pub hysteresis: f64,
    pub min_gain: f64,
    /// Steps in the moving average (and the warm-up before any decision).
    pub window: u64,
    pub retry_steps: u64,
}

impl Default for RebalancePolicy {
    fn default() -> Self {
        RebalancePolicy {
            threshold: 1.3,
            hysteresis: 0.1,
            min_gain: 0.1,
            window: 32,
            retry_steps: 512,
        }
    }
}

/// The policy's state: the load average and the trigger.
#[derive(Clone, Debug)]
pub struct Rebalancer {
    pub policy: RebalancePolicy,
    avg: Vec<Vec<f64>>,
    steps: u64,
    armed: bool,
    last_attempt: u64,
}

impl Rebalancer {
    pub fn new(policy: RebalancePolicy) -> Self {
        Rebalancer {
            policy,
            avg: Vec::new(),
            steps: 0,
            armed: true,
            last_attempt: 0,
        }
    }

    /// Adds one step's tokens per expert, `load[layer * experts + e]`.
    pub fn observe(&mut self, load: &[u64], experts: usize) {
        if experts == 0 || load.is_empty() {
            return;
        }
        let layers = load.len() / experts;
        if self.avg.len() != layers || self.avg.iter().any(|l| l.len() != experts) {
            self.avg = vec![vec![0.0; experts]; layers];
        }
        self.steps += 1;
        // Plain mean until the window fills (no bias towards zero), then exponential.
        let a = 1.0 / (self.steps.min(self.policy.window.max(1))) as f64;
        for (i, &n) in load.iter().take(layers * experts).enumerate() {
            let x = &mut self.avg[i / experts][i % experts];
            *x += a * (n as f64 - *x);
        }
    }

    /// Average tokens per step, `[layer][expert]`.
    pub fn load(&self) -> &[Vec<f64>] {
        &self.avg
    }

    /// Whether to plan a re-placement now, given the current placement's imbalance. Counts as
    /// an attempt (disarms) when it says yes.
    pub fn should_plan(&mut self, imbalance: f64) -> bool {
        let p = self.policy;
        if imbalance < p.threshold - p.hysteresis {
            self.armed = true;
        }
        if self.steps < p.window || imbalance <= p.threshold {
            return false;
        }
        if !self.armed && self.steps - self.last_attempt < p.retry_steps {
            return false;
        }
        self.armed = false;
        self.last_attempt = self.steps;
        true
    }

    /// Whether a plan with predicted imbalance `after` that moves `moved` replicas is worth
    /// switching to from `before`.
    pub fn accept(&self, before: f64, after: f64, moved: usize) -> bool {
        moved > 0 && after <= before * (1.0 - self.policy.min_gain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RebalancePolicy {
        RebalancePolicy {
            threshold: 1.5,
            hysteresis: 0.2,
            min_gain: 0.1,
            window: 4,
            retry_steps: 10,
        }
    }

    #[test]
    fn average_is_the_mean_then_exponential() {
        let mut r = Rebalancer::new(policy());
        r.observe(&[2, 0], 2);
        r.observe(&[4, 2], 2);
        assert_eq!(r.load(), &[vec![3.0, 1.0]]);
        r.observe(&[3, 1], 2);
        r.observe(&[3, 1], 2);
        r.observe(&[7, 1], 2);
        assert!((r.load()[0][0] - 4.0).abs() < 1e-12, "{:?}", r.load());
    }

    #[test]
    fn trigger_waits_for_the_window_and_has_hysteresis() {
        let mut r = Rebalancer::new(policy());
        for _ in 0..3 {
            r.observe(&[1], 1);
            assert!(!r.should_plan(3.0), "before the window is full");
        }
        r.observe(&[1], 1);
        assert!(r.should_plan(3.0));
        // Disarmed: still imbalanced, no new attempt until it drops below 1.3 ...
        r.observe(&[1], 1);
        assert!(!r.should_plan(3.0));
        r.observe(&[1], 1);
        assert!(
            !r.should_plan(1.4),
            "between the thresholds: stays disarmed"
        );
        assert!(!r.should_plan(1.2), "re-armed, but balanced");
        assert!(r.should_plan(1.6));
        // ... or until retry_steps have passed.
        for _ in 0..10 {
            r.observe(&[1], 1);
        }
        assert!(r.should_plan(1.6));
    }

    #[test]
    fn accepts_only_real_gains() {
        let r = Rebalancer::new(policy());
        assert!(r.accept(2.0, 1.5, 3));
        assert!(!r.accept(2.0, 1.95, 3));
        assert!(!r.accept(2.0, 1.0, 0));
    }
}
