//! The data-plane device `[device]` asks for, opened once at start-up: the G1 arena is
//! allocated on it, the host pool and engine KV buffers are registered with it, the mover
//! copies with it, and STATS, the attach reply, `/status` and `/metrics` report it.

use std::sync::Arc;

use kvplane_cuda::{BackendChoice, BackendKind, Device, DeviceError};

use crate::config::{BackendSetting, DeviceConfig};

/// `backend = "cuda"` could not be honoured: the daemon does not start (the cause, e.g.
/// "no NVIDIA driver: libcuda.so could not be loaded", is the source).
#[derive(Debug, thiserror::Error)]
#[error("[device] backend = \"cuda\" asks for CUDA device {ordinal}, which cannot be opened")]
pub struct DeviceOpenError {
    pub ordinal: u32,
    #[source]
    pub source: DeviceError,
}

/// The opened device and how it came to be the one in use.
#[derive(Debug, Clone)]
pub struct DaemonDevice {
    pub device: Arc<dyn Device>,
    /// What `[device] backend` asked for.
    pub choice: BackendSetting,
    /// `[device] ordinal`: the CUDA device asked for (the host backend ignores it).
    pub ordinal: u32,
    /// Why `auto` runs on the host backend (e.g. "no NVIDIA driver: libcuda.so could not
    /// be loaded ..."); `None` when the device is the one asked for.
    pub fallback_reason: Option<String>,
    /// How blocks travel between the NVMe tier and G1 (logged, and in `/status`): set by
    /// `serve` once the tiers are open, from [`crate::tier::NvmeG1Path`].
    pub nvme_g1_path: String,
}

impl DaemonDevice {
    /// Opens what `config` asks for: `auto` falls back to the host backend with the
    /// reason, `cuda` without a driver or that GPU is an error, `host` is the host.
    pub fn open(config: &DeviceConfig) -> Result<DaemonDevice, DeviceOpenError> {
        let ordinal = config.ordinal as usize;
        let choice = match config.backend {
            BackendSetting::Auto => BackendChoice::CudaOrHost { ordinal },
            BackendSetting::Cuda => BackendChoice::Cuda { ordinal },
            BackendSetting::Host => BackendChoice::Host,
        };
        let mut opened = kvplane_cuda::open(choice).map_err(|source| DeviceOpenError {
            ordinal: config.ordinal,
            source,
        })?;
        if opened.device.backend() == BackendKind::Host && config.host_completion_delay_us > 0 {
            let delay = std::time::Duration::from_micros(config.host_completion_delay_us);
            opened.device = Arc::new(kvplane_cuda::host::HostDevice::with_completion_delay(
                kvplane_kernels::HostLaunch::default(),
                delay,
            ));
        }
        Ok(DaemonDevice {
            device: opened.device,
            choice: config.backend,
            ordinal: config.ordinal,
            fallback_reason: opened.fallback_reason,
            nvme_g1_path: String::new(),
        })
    }

    /// The backend in use (which may differ from the choice: `auto`).
    pub fn backend(&self) -> BackendKind {
        self.device.backend()
    }

    /// Logs which device the data plane runs on, and why when `auto` fell back: a warning
    /// when a driver is there but its GPU could not be used (something to fix), news
    /// when the machine simply has no NVIDIA driver.
    pub fn log(&self) {
        let device = self.device.describe();
        let choice = self.choice.as_str();
        match &self.fallback_reason {
            None => {
                tracing::info!(backend = self.backend().as_str(), choice, %device, "data-plane device")
            }
            Some(reason) if kvplane_cuda::cuda::driver_present() => tracing::warn!(
                backend = self.backend().as_str(),
                choice,
                %device,
                %reason,
                "data-plane device: an NVIDIA driver is present but CUDA device {} could not be used; running on the host backend",
                self.ordinal
            ),
            Some(reason) => tracing::info!(
                backend = self.backend().as_str(),
                choice,
                %device,
                %reason,
                "data-plane device: host backend (no usable GPU)"
            ),
        }
    }
}

/// The ABI's `backend` (STATS, the attach reply: 0 host, 1 cuda) of a data plane whose
/// tiers are `blocks`: their device's. A data plane without tiers copies nothing: 0.
pub fn abi_backend(blocks: Option<&Arc<crate::block::BlockManager>>) -> u32 {
    blocks
        .map_or(BackendKind::Host, |b| b.device().backend())
        .abi_code()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_is_the_host_backend_with_no_reason() {
        let d = DaemonDevice::open(&DeviceConfig {
            backend: BackendSetting::Host,
            ordinal: 7,
            host_completion_delay_us: 0,
        })
        .unwrap();
        assert_eq!(d.backend(), BackendKind::Host);
        assert_eq!(d.backend().abi_code(), 0);
        assert_eq!((d.choice, d.ordinal), (BackendSetting::Host, 7));
        assert_eq!(d.fallback_reason, None);
    }

    /// Both branches assert: without a driver `auto` is the host with the driver named
    /// as the reason and `cuda` is refused; with one, both are CUDA device 0.
    #[test]
    fn auto_falls_back_with_the_reason_and_cuda_refuses_without_a_driver() {
        let auto = DaemonDevice::open(&DeviceConfig::default()).unwrap();
        let cuda = DaemonDevice::open(&DeviceConfig {
            backend: BackendSetting::Cuda,
            ordinal: 0,
            host_completion_delay_us: 0,
        });
        if kvplane_cuda::cuda::driver_present() {
            assert_eq!(auto.backend(), BackendKind::Cuda, "{auto:?}");
            assert_eq!(auto.fallback_reason, None);
            assert_eq!(
                cuda.expect("cuda with a driver").backend(),
                BackendKind::Cuda
            );
        } else {
            assert_eq!(auto.backend(), BackendKind::Host);
            let reason = auto
                .fallback_reason
                .expect("auto says why it is on the host");
            assert!(reason.contains("no NVIDIA driver"), "{reason}");
            let err = cuda.expect_err("cuda without a driver is refused");
            assert!(matches!(err.source, DeviceError::NoDriver), "{err}");
            let text = err.to_string();
            assert!(text.contains("backend = \"cuda\""), "{text}");
            let cause = std::error::Error::source(&err)
                .expect("the cause")
                .to_string();
            assert!(cause.contains("libcuda.so"), "{cause}");
        }
        // An ordinal no machine has: `cuda` is always refused, `auto` always falls back.
        let missing = DeviceConfig {
            backend: BackendSetting::Cuda,
            ordinal: crate::config::MAX_DEVICE_ORDINAL,
            host_completion_delay_us: 0,
        };
        assert!(DaemonDevice::open(&missing).is_err());
        let auto_missing = DaemonDevice::open(&DeviceConfig {
            backend: BackendSetting::Auto,
            ..missing
        })
        .unwrap();
        assert_eq!(auto_missing.backend(), BackendKind::Host);
        assert!(auto_missing.fallback_reason.is_some());
    }
}
