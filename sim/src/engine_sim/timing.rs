//! NVIDIA Dynamo's mock-engine timing model (its `PerfModel::Polynomial` defaults), so a
//! replay here compares with Dynamo's own replay of the same trace.
//!
//! - prefill ms = 4.209989e-7 * T^2 + 0.01518344 * T + 16.50142 for the T uncached prompt
//!   tokens computed in one pass (0 when the pass computes none);
//! - decode ms = max(1, -25.74 * u^2 + 54.01 * u + 5.74) for KV occupancy u (pages held by
//!   running sequences / pool pages), charged once per pass that decodes;
//! - a pass lasts prefill + decode (+ the transfer time of loads from the daemon in it).

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Timing {
    /// Prefill polynomial (a, b, c): ms = a + b*T + c*T^2.
    pub prefill: [f64; 3],
    /// Decode polynomial (a, b, c): ms = max(floor, a + b*u + c*u^2).
    pub decode: [f64; 3],
    pub decode_floor_ms: f64,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            prefill: [16.50142, 0.01518344, 4.209989e-7],
            decode: [5.74, 54.01, -25.74],
            decode_floor_ms: 1.0,
        }
    }
}

impl Timing {
    /// Prefill time of a pass that computes `tokens` uncached prompt tokens.
    pub fn prefill_ms(&self, tokens: u64) -> f64 {
        if tokens == 0 {
            return 0.0;
        }
        let t = tokens as f64;
        let [a, b, c] = self.prefill;
        a + b * t + c * t * t
    }

    /// Decode step time at KV occupancy `occupancy` (0..=1).
    pub fn decode_ms(&self, occupancy: f64) -> f64 {
        let u = occupancy.clamp(0.0, 1.0);
        let [a, b, c] = self.decode;
        (a + b * u + c * u * u).max(self.decode_floor_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_dynamo_perf_model_values() {
        let t = Timing::default();
        // Values from Dynamo's mocker perf model: prefill(1000) = 32.1058589 ms,
        // decode(0.5) = 26.31 ms, floor 1 ms.
        assert!((t.prefill_ms(1000) - 32.105_858_9).abs() < 1e-6);
        assert!((t.decode_ms(0.5) - 26.31).abs() < 1e-9);
        assert_eq!(t.decode_ms(0.0), 5.74);
        assert_eq!(t.prefill_ms(0), 0.0);
        let floor = Timing {
            decode: [0.1, 0.0, 0.0],
            ..Timing::default()
        };
        assert_eq!(floor.decode_ms(0.3), 1.0);
    }
}
