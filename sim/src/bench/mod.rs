//! Benchmarks behind `kvplane bench`, as library code so the criterion benches and the
//! bench binaries drive the same measurements.
pub mod ring;
pub mod serve_child;
pub mod served;
pub mod soak;

/// p50, p99 and p99.9 of `samples` (sorted in place), in the samples' unit.
pub fn percentiles(samples: &mut [u64]) -> (u64, u64, u64) {
    if samples.is_empty() {
        return (0, 0, 0);
    }
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    (at(0.50), at(0.99), at(0.999))
}
