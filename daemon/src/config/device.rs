//! `[device]`: which device backend the data plane runs on. Opening it is
//! `crate::device`'s; here only what the file says and whether it is well formed.

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// `[device] backend`.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BackendSetting {
    /// CUDA device `ordinal` when a driver and that GPU are present, else the host
    /// backend (the start-up log and `/status` say why).
    #[default]
    Auto,
    /// CUDA device `ordinal`; the daemon refuses to start without it.
    Cuda,
    /// Host memory and the CPU build of the kernels, GPU or not.
    Host,
}

impl BackendSetting {
    pub const ALL: [BackendSetting; 3] = [
        BackendSetting::Auto,
        BackendSetting::Cuda,
        BackendSetting::Host,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BackendSetting::Auto => "auto",
            BackendSetting::Cuda => "cuda",
            BackendSetting::Host => "host",
        }
    }
}

// By hand, so an unknown value names the key (serde's derived message names only the
// variant), e.g. `device.backend: "gpu" is not one of "auto", "cuda", "host"`.
impl<'de> Deserialize<'de> for BackendSetting {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = String::deserialize(d)?;
        BackendSetting::ALL
            .into_iter()
            .find(|b| b.as_str() == value)
            .ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "device.backend: {value:?} is not one of \"auto\", \"cuda\", \"host\""
                ))
            })
    }
}

/// The highest CUDA device ordinal accepted: far above any node's GPU count, low enough
/// that a typo (a byte count, a PCI id) is an error here, not a confusing "no device".
pub const MAX_DEVICE_ORDINAL: u32 = 255;

/// The longest `host_completion_delay_us` accepted (10 s): longer would stall sessions
/// past their engines' timeouts.
pub const MAX_HOST_COMPLETION_DELAY_US: u64 = 10_000_000;

/// `[device]`: the device the data plane runs on.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DeviceConfig {
    /// `auto`, `cuda` or `host`.
    pub backend: BackendSetting,
    /// The CUDA device (driver ordinal) the daemon uses; ignored by the host backend.
    pub ordinal: u32,
    /// Testing: the host backend reports each copy done only this long after launching
    /// it, as a GPU's asynchronous copies complete later, so the data plane's polling of
    /// device completions runs on machines without one. 0 (the default): at once.
    /// Ignored by the cuda backend.
    pub host_completion_delay_us: u64,
}

impl DeviceConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.ordinal > MAX_DEVICE_ORDINAL {
            return Err(ConfigError::Invalid {
                key: "device.ordinal".into(),
                reason: format!("must be in 0..={MAX_DEVICE_ORDINAL}, got {}", self.ordinal),
            });
        }
        if self.host_completion_delay_us > MAX_HOST_COMPLETION_DELAY_US {
            return Err(ConfigError::Invalid {
                key: "device.host_completion_delay_us".into(),
                reason: format!(
                    "must be at most {MAX_HOST_COMPLETION_DELAY_US} (10 s), got {}",
                    self.host_completion_delay_us
                ),
            });
        }
        Ok(())
    }
}
