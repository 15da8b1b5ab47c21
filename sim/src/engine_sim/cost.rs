//! What the replay's virtual clock charges for moving KV: the declared model geometry (bytes
//! per token) and the link model (measured bandwidths).
//!
//! The simulated engines move small pages (their real content is checked byte for byte);
//! the clock charges every transfer as if each page had the declared model's size:
//! - a LOAD delays its request's prefill by its pages' bytes over the link (after the
//!   saves already on that link), plus NVMe -> host staging at the NVMe read bandwidth for
//!   pages that came from NVMe;
//! - a SAVE occupies the link for the bytes the daemon actually stored (a block it already
//!   held costs nothing); a save forced by an eviction delays the pass that needs the page;
//! - a LOOKUP costs its measured ring round trip.

use serde::{Deserialize, Serialize};

/// KV shape of a model: K and V for every layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelGeometry {
    pub name: String,
    pub layers: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
    pub dtype_bytes: u32,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CostError {
    #[error(
        "--model {0:?}: expected llama-3.1-8b, llama-3.1-70b or layers=L,kv_heads=H,head_dim=D,dtype_bytes=B"
    )]
    UnknownModel(String),
    #[error("--model {spec:?}: {reason}")]
    BadModel { spec: String, reason: String },
    #[error("--link {spec:?}: {reason}")]
    BadLink { spec: String, reason: String },
}

impl ModelGeometry {
    /// Llama-3.1-8B, bf16: 32 layers, 8 KV heads (GQA), head_dim 128.
    pub fn llama_3_1_8b() -> Self {
        ModelGeometry {
            name: "llama-3.1-8b".into(),
            layers: 32,
            kv_heads: 8,
            head_dim: 128,
            dtype_bytes: 2,
        }
    }

    /// Llama-3.1-70B, bf16: 80 layers, 8 KV heads, head_dim 128.
    pub fn llama_3_1_70b() -> Self {
        ModelGeometry {
            name: "llama-3.1-70b".into(),
            layers: 80,
            ..Self::llama_3_1_8b()
        }
    }

    /// A preset name, or `layers=L,kv_heads=H,head_dim=D,dtype_bytes=B` (any order, all
    /// four required).
    pub fn parse(spec: &str) -> Result<Self, CostError> {
        match spec.to_ascii_lowercase().as_str() {
            "llama-3.1-8b" | "8b" => return Ok(Self::llama_3_1_8b()),
            "llama-3.1-70b" | "70b" => return Ok(Self::llama_3_1_70b()),
            _ => {}
        }
        if !spec.contains('=') {
            return Err(CostError::UnknownModel(spec.into()));
        }
        let bad = |reason: String| CostError::BadModel {
            spec: spec.into(),
            reason,
        };
        let (mut l, mut h, mut d, mut b) = (None, None, None, None);
        for part in spec.split(',') {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("{part:?} is not key=value")))?;
            let v: u32 = v
                .trim()
                .parse()
                .map_err(|_| bad(format!("{k}: {v:?} is not a whole number")))?;
            if v == 0 {
                return Err(bad(format!("{k} must be at least 1")));
            }
            match k.trim() {
                "layers" => l = Some(v),
                "kv_heads" => h = Some(v),
                "head_dim" => d = Some(v),
                "dtype_bytes" => b = Some(v),
                other => return Err(bad(format!("unknown key {other:?}"))),
            }
        }
        match (l, h, d, b) {
            (Some(layers), Some(kv_heads), Some(head_dim), Some(dtype_bytes)) => {
                Ok(ModelGeometry {
                    name: format!("custom({spec})"),
                    layers,
                    kv_heads,
                    head_dim,
                    dtype_bytes,
                })
            }
            _ => Err(bad(
                "layers, kv_heads, head_dim and dtype_bytes are all required".into(),
            )),
        }
    }

    /// K and V of one token over all layers.
    pub fn bytes_per_token(&self) -> u64 {
        2 * u64::from(self.layers)
            * u64::from(self.kv_heads)
            * u64::from(self.head_dim)
            * u64::from(self.dtype_bytes)
    }
}

/// Measured bandwidths of the transfer paths (a committed profile, see
/// `data/profiles/*.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LinkProfile {
    pub name: String,
    #[serde(default)]
    pub about: String,
    /// Host -> device pages (LOAD).
    pub load_gbps: f64,
    pub load_source: String,
    /// Device pages -> host (SAVE).
    pub save_gbps: f64,
    pub save_source: String,
    #[serde(default)]
    pub link_note: String,
    /// NVMe -> host staging of a LOAD from the NVMe tier.
    pub nvme_read_gbps: f64,
    pub nvme_read_source: String,
    /// Reported only (the daemon writes NVMe behind the host tier).
    pub nvme_write_gbps: f64,
    pub nvme_write_source: String,
    #[serde(default)]
    pub lookup: String,
}

/// The H200 profile, from the committed file (its figures are GPU-NOTES.md's).
const H200_PROFILE: &str = include_str!("../../../data/profiles/h200.json");

impl LinkProfile {
    /// The committed H200 profile.
    pub fn h200() -> Self {
        Self::parse("h200").expect("the embedded H200 profile parses (tested)")
    }

    /// `h200` (the committed profile) or a path to a profile JSON file.
    pub fn parse(spec: &str) -> Result<Self, CostError> {
        let bad = |reason: String| CostError::BadLink {
            spec: spec.into(),
            reason,
        };
        let text = if spec.eq_ignore_ascii_case("h200") {
            H200_PROFILE.to_owned()
        } else {
            std::fs::read_to_string(spec).map_err(|e| {
                bad(format!(
                    "not a profile name (h200) nor a readable file: {e}"
                ))
            })?
        };
        let p: LinkProfile =
            serde_json::from_str(&text).map_err(|e| bad(format!("profile JSON: {e}")))?;
        p.validate().map_err(bad)?;
        Ok(p)
    }

    fn validate(&self) -> Result<(), String> {
        for (k, v) in [
            ("load_gbps", self.load_gbps),
            ("save_gbps", self.save_gbps),
            ("nvme_read_gbps", self.nvme_read_gbps),
            ("nvme_write_gbps", self.nvme_write_gbps),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(format!("{k} must be a positive number, got {v}"));
            }
        }
        Ok(())
    }
}

/// What the engine's clock charges, per page of the declared model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TransferCost {
    /// Declared bytes of one engine page (bytes per token x page tokens).
    pub page_bytes: u64,
    pub load_gbps: f64,
    pub save_gbps: f64,
    pub nvme_read_gbps: f64,
    /// Charge each LOOKUP its measured ring round trip.
    pub charge_lookups: bool,
}

impl Default for TransferCost {
    /// Llama-3.1-8B pages of 64 tokens over the H200 link.
    fn default() -> Self {
        TransferCost::new(&ModelGeometry::llama_3_1_8b(), 64, &LinkProfile::h200())
    }
}

impl TransferCost {
    pub fn new(model: &ModelGeometry, page_tokens: u32, link: &LinkProfile) -> Self {
        TransferCost {
            page_bytes: model.bytes_per_token() * u64::from(page_tokens),
            load_gbps: link.load_gbps,
            save_gbps: link.save_gbps,
            nvme_read_gbps: link.nvme_read_gbps,
            charge_lookups: true,
        }
    }

    /// Milliseconds to move `pages` declared pages at `gbps` (10^9 bytes/s).
    pub fn ms(&self, pages: u64, gbps: f64) -> f64 {
        (pages * self.page_bytes) as f64 / (gbps * 1e6)
    }
}

/// One engine's link to its daemon on the virtual clock: busy until `free_ms`.
#[derive(Clone, Debug, Default)]
pub struct LinkClock {
    pub free_ms: f64,
}

impl LinkClock {
    /// Occupies the link for `ms` from `at_ms` or when it frees up; returns the end.
    pub fn occupy(&mut self, at_ms: f64, ms: f64) -> f64 {
        let start = self.free_ms.max(at_ms);
        self.free_ms = start + ms;
        self.free_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometries_and_their_bytes_per_token() {
        assert_eq!(ModelGeometry::llama_3_1_8b().bytes_per_token(), 128 << 10);
        assert_eq!(ModelGeometry::llama_3_1_70b().bytes_per_token(), 320 << 10);
        let m = ModelGeometry::parse("layers=61,kv_heads=1,head_dim=576,dtype_bytes=1").unwrap();
        assert_eq!(m.bytes_per_token(), 2 * 61 * 576);
        assert_eq!(
            ModelGeometry::parse("LLAMA-3.1-70B").unwrap(),
            ModelGeometry::llama_3_1_70b()
        );
        assert!(matches!(
            ModelGeometry::parse("gpt-9"),
            Err(CostError::UnknownModel(_))
        ));
        assert!(ModelGeometry::parse("layers=2,kv_heads=1,head_dim=8").is_err());
        assert!(ModelGeometry::parse("layers=0,kv_heads=1,head_dim=8,dtype_bytes=2").is_err());
    }

    #[test]
    fn h200_profile_is_the_committed_file_with_sources() {
        let p = LinkProfile::parse("h200").unwrap();
        assert_eq!(p.name, "h200");
        assert_eq!(p.load_gbps, 52.3);
        assert_eq!(p.save_gbps, 52.0);
        assert!(p.load_source.contains("GPU-NOTES"));
        assert!(p.nvme_read_source.contains("bench nvme"));
        assert!(LinkProfile::parse("/nonexistent/profile.json").is_err());
    }

    #[test]
    fn cost_scales_with_declared_bytes() {
        let link = LinkProfile::parse("h200").unwrap();
        let c8 = TransferCost::new(&ModelGeometry::llama_3_1_8b(), 64, &link);
        let c70 = TransferCost::new(&ModelGeometry::llama_3_1_70b(), 64, &link);
        assert_eq!(c8.page_bytes, 8 << 20);
        // 8 MiB at 52.3 GB/s: 0.16 ms a page.
        assert!((c8.ms(1, c8.load_gbps) - 8388608.0 / 52.3e6).abs() < 1e-12);
        assert!((c70.ms(10, 52.3) / c8.ms(10, 52.3) - 2.5).abs() < 1e-12);
        let mut l = LinkClock::default();
        assert_eq!(l.occupy(10.0, 2.0), 12.0);
        // Busy until 12: a transfer wanted at 11 starts at 12.
        assert_eq!(l.occupy(11.0, 1.0), 13.0);
        assert_eq!(l.occupy(20.0, 1.0), 21.0);
    }
}
