//! Seeded draws for workloads, on Switchyard's generator (xoshiro256** seeded through
//! SplitMix64, `switchyard_kernels::rng`): the same seed gives the same workload anywhere.

pub use switchyard_kernels::rng::Rng;

/// Draws beyond the generator's own.
pub trait Draws {
    /// Uniform in [0, 1).
    fn f64(&mut self) -> f64;
    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64;
    /// Exponential with the given rate (Poisson inter-arrival gaps).
    fn exp(&mut self, rate: f64) -> f64;
}

impl Draws for Rng {
    fn f64(&mut self) -> f64 {
        self.next_f64()
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
    fn exp(&mut self, rate: f64) -> f64 {
        -(1.0 - self.next_f64()).ln() / rate
    }
}
