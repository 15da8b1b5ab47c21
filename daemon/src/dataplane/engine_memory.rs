//! An engine's KV memory: the regions it registered at attach (host memfds, GPU
//! allocations), imported once, and the one window through which the kernels address all
//! of them. The engine's layout names (region, offset) per layer and plane; attaching it
//! resolves those against the window ([`kvplane_kernels::layout::resolve_regions`]), so a
//! gather or scatter is still one launch over one buffer, however many tensors the engine
//! keeps its KV in.
//!
//! Host regions are mapped one after another into one [`HostWindow`] and registered with
//! the device as one buffer; GPU regions are imported by the device (CUDA IPC or a VMM
//! descriptor) after their GPU is checked to be the daemon's; the device then gives one
//! window over all of them ([`Device::engine_window`]). Everything is imported before the
//! attach is answered, so a bad region refuses that attach, naming the region, and
//! nothing else.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;

use kvplane_cuda::{Device, DeviceBuffer, DeviceError, EngineImport, EventId, LayoutId, StreamId};
use kvplane_ffi::{RegionKind, kvp_kv_layout};
use kvplane_kernels::layout::{LayoutError, PagedLayout, RegionSpan, resolve_regions};
use kvplane_shm::handshake::KvRegion;
use kvplane_shm::window::HostWindow;

use super::mapped::MappedCharge;
use super::mover::EngineTarget;

/// Why an engine's KV memory was refused at attach. The index is the region's, in the
/// order the engine sent them. Short, key words first: refusals travel in a 96-byte reply.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    #[error("KV region #{index}: GPU memory, but the daemon runs the host backend")]
    NoGpu { index: usize },
    #[error("KV region #{index}: GPU {region_gpu}, daemon's GPU is {daemon_gpu}")]
    OtherGpu {
        index: usize,
        region_gpu: String,
        daemon_gpu: String,
    },
    #[error("KV region #{index}: import failed: {source}")]
    Import {
        index: usize,
        #[source]
        source: DeviceError,
    },
    #[error("KV regions: mapping host memfds: {0}")]
    Map(#[source] kvplane_shm::ShmError),
    #[error("KV region #{index}: continues #{} but cannot follow it (not whole pages, or page sizes differ)", index.saturating_sub(1))]
    NotContiguous { index: usize },
    #[error("KV regions from #{index}: a run of continuing regions larger than the address space")]
    RunTooLarge { index: usize },
    #[error("KV regions: registering with the device: {0}")]
    Device(#[source] DeviceError),
}

/// Why an engine's IPC events (KVP_OP_REGISTER_EVENTS) were refused; the events
/// registered before stay. The index is the event's, in the engine's array.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("IPC event #{index}: reserved bytes are not zero")]
    Reserved { index: usize },
    #[error("IPC event #{index}: a GPU event, but the daemon runs the host backend")]
    NoGpu { index: usize },
    #[error("IPC event #{index}: GPU {event_gpu}, daemon's GPU is {daemon_gpu}")]
    OtherGpu {
        index: usize,
        event_gpu: String,
        daemon_gpu: String,
    },
    #[error("IPC event #{index}: import failed: {source}")]
    Import {
        index: usize,
        #[source]
        source: DeviceError,
    },
    #[error("IPC events: the session registered no KV memory to copy with them")]
    NoMemory,
}

/// The engine's IPC event a SAVE or LOAD names, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NamedEvent {
    None,
    Ipc(EventId),
}

/// Whether `r` continues the region before it (`KVP_REGION_F_CONTINUES`; the handshake
/// checked it may).
fn continues(r: &KvRegion) -> bool {
    r.desc.flags & kvplane_ffi::REGION_F_CONTINUES != 0
}

/// Each region's span reaches to the end of its run of continuing regions (mapped back
/// to back, each after one that ends where its allocation does): a plane may start in
/// one and run on into the next.
fn extend_runs(regions: &[KvRegion], mut spans: Vec<RegionSpan>) -> Vec<RegionSpan> {
    for i in (0..spans.len().saturating_sub(1)).rev() {
        if continues(&regions[i + 1]) {
            spans[i].len_bytes += spans[i + 1].len_bytes;
        }
    }
    spans
}

/// A GPU UUID as `nvidia-smi -L` prints it.
fn uuid_text(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "GPU-{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// What this engine's memory is registered as on the daemon's device. Freed on drop:
/// the layout, the window (when it is a handle of its own), then every part.
struct DeviceView {
    device: Arc<dyn Device>,
    parts: Vec<DeviceBuffer>,
    /// Set once every part is in.
    window: Option<DeviceBuffer>,
    owns_window: bool,
    layout: Option<LayoutId>,
    /// One stream per queue pair, with the event recorded after each batch on it (the
    /// data-plane thread polls it): a queue pair's operations run in order, those of
    /// different queue pairs side by side (a LOAD need not wait for a SAVE's copy).
    lanes: Vec<(StreamId, EventId)>,
    /// The engine's CUDA IPC events (KVP_OP_REGISTER_EVENTS), by its index.
    ipc_events: Vec<EventId>,
}

impl Drop for DeviceView {
    fn drop(&mut self) {
        // A session ends only once its batches in flight have completed; waiting here
        // anyway keeps the memory below alive for any copy still queued (a no-op when
        // idle).
        for &(stream, _) in &self.lanes {
            if let Err(e) = self.device.sync_stream(stream) {
                tracing::warn!(error = %e, "waiting for a session's stream before releasing its memory");
            }
        }
        if let Some(layout) = self.layout.take() {
            let _ = self.device.free_layout(layout);
        }
        if let Some(window) = self.window.take()
            && self.owns_window
        {
            let _ = self.device.free(window);
        }
        for part in self.parts.drain(..).rev() {
            if let Err(e) = self.device.free(part) {
                tracing::warn!(error = %e, "releasing an engine's KV region");
            }
        }
        for ev in self.ipc_events.drain(..) {
            let _ = self.device.destroy_event(ev);
        }
        for (stream, event) in self.lanes.drain(..) {
            if let Err(e) = self.device.destroy_event(event) {
                tracing::warn!(error = %e, "destroying a session's event");
            }
            if let Err(e) = self.device.destroy_stream(stream) {
                tracing::warn!(error = %e, "destroying a session's stream");
            }
        }
    }
}

/// The host memfd regions, in order, as the parts of the session's host window: each
/// one's descriptor and size.
pub fn host_parts(regions: &[KvRegion]) -> Vec<(BorrowedFd<'_>, u64)> {
    regions
        .iter()
        .filter(|r| r.kind == RegionKind::HostMemfd)
        .map(|r| {
            let fd =
                r.fd.as_ref()
                    .expect("the handshake checked: memfds carry fds");
            (fd.as_fd(), r.desc.alloc_bytes)
        })
        .collect()
}

/// An engine's KV memory, imported, and the layout attached to it.
pub struct EngineMemory {
    // Field order is drop order: the device's registrations and imports go first, then
    // the host mapping they point into, then the charge that paid for its address space.
    view: Option<DeviceView>,
    /// Each region's place in the window, by the engine's region index.
    spans: Vec<RegionSpan>,
    window_bytes: u64,
    pub(super) layout: Option<PagedLayout>,
    _host: Option<HostWindow>,
    _charge: MappedCharge,
}

impl std::fmt::Debug for EngineMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineMemory")
            .field("regions", &self.spans.len())
            .field("window_bytes", &self.window_bytes)
            .finish()
    }
}

impl EngineMemory {
    /// Maps the host regions into one window and, with a `device`, registers it and
    /// imports the GPU regions. Without a device (a daemon with no block tiers) GPU
    /// regions are refused: nothing could ever copy them. `charge` paid for the host
    /// mapping (see [`super::mapped`]).
    pub fn import(
        device: Option<&Arc<dyn Device>>,
        regions: &[KvRegion],
        queue_pairs: usize,
        charge: MappedCharge,
    ) -> Result<Self, RegionError> {
        let host: Vec<(usize, &KvRegion)> = regions
            .iter()
            .enumerate()
            .filter(|(_, r)| r.kind == RegionKind::HostMemfd)
            .collect();
        let parts = host_parts(regions);
        let host_window = if parts.is_empty() {
            None
        } else {
            Some(HostWindow::map(&parts).map_err(RegionError::Map)?)
        };
        // Where each host memfd starts inside the host window; one that continues the
        // memfd before it must start where that one ends.
        let mut host_start = vec![0u64; regions.len()];
        if let Some(w) = &host_window {
            for ((i, _), &at) in host.iter().zip(w.part_offsets()) {
                host_start[*i] = at;
            }
        }
        for (i, r) in regions.iter().enumerate() {
            if r.kind == RegionKind::HostMemfd
                && continues(r)
                && (i == 0 || host_start[i] != host_start[i - 1] + regions[i - 1].desc.alloc_bytes)
            {
                return Err(RegionError::NotContiguous { index: i });
            }
        }
        let Some(device) = device else {
            if let Some(index) = regions.iter().position(|r| r.kind.is_device()) {
                return Err(RegionError::NoGpu { index });
            }
            let spans = regions
                .iter()
                .enumerate()
                .map(|(i, r)| RegionSpan {
                    window_offset_bytes: host_start[i] + r.desc.offset_bytes,
                    len_bytes: r.desc.len_bytes,
                })
                .collect();
            let spans = extend_runs(regions, spans);
            return Ok(EngineMemory {
                view: None,
                spans,
                window_bytes: host_window.as_ref().map_or(0, |w| w.len_bytes() as u64),
                layout: None,
                _host: host_window,
                _charge: charge,
            });
        };
        let (view, spans, window_bytes) = Self::register(
            device,
            regions,
            queue_pairs,
            host_window.as_ref(),
            &host_start,
        )?;
        Ok(EngineMemory {
            view: Some(view),
            spans,
            window_bytes,
            layout: None,
            _host: host_window,
            _charge: charge,
        })
    }

    /// The device side of [`EngineMemory::import`]: the host window as one part, each GPU
    /// region as one more, and a window over all of them.
    fn register(
        device: &Arc<dyn Device>,
        regions: &[KvRegion],
        queue_pairs: usize,
        host_window: Option<&HostWindow>,
        host_start: &[u64],
    ) -> Result<(DeviceView, Vec<RegionSpan>, u64), RegionError> {
        // Checked before anything is imported: a GPU region the daemon cannot serve.
        let daemon_gpu = device.gpu_uuid();
        for (index, r) in regions.iter().enumerate() {
            if !r.kind.is_device() {
                continue;
            }
            match daemon_gpu {
                None => return Err(RegionError::NoGpu { index }),
                Some(g) if g != r.desc.gpu_uuid => {
                    return Err(RegionError::OtherGpu {
                        index,
                        region_gpu: uuid_text(&r.desc.gpu_uuid),
                        daemon_gpu: uuid_text(&g),
                    });
                }
                Some(_) => {}
            }
        }
        // The view owns every part from the moment it exists, so an error below releases
        // what was imported so far (its drop).
        let mut view = DeviceView {
            device: Arc::clone(device),
            parts: Vec::with_capacity(regions.len() + 1),
            window: None,
            owns_window: false,
            layout: None,
            lanes: Vec::with_capacity(queue_pairs),
            ipc_events: Vec::new(),
        };
        for _ in 0..queue_pairs.max(1) {
            let stream = device.create_stream().map_err(RegionError::Device)?;
            match device.create_event() {
                Ok(event) => view.lanes.push((stream, event)),
                Err(e) => {
                    let _ = device.destroy_stream(stream);
                    return Err(RegionError::Device(e));
                }
            }
        }
        // Which part each region lives in.
        let mut part_of = vec![0usize; regions.len()];
        if let Some(w) = host_window {
            // SAFETY: the window is owned by the EngineMemory this view belongs to and is
            // dropped after the view (field order), so base..base+len stays valid while
            // registered; the engine may write it concurrently, which
            // register_host_memory's contract allows.
            let part = unsafe { device.register_host_memory(w.base(), w.len_bytes()) }
                .map_err(RegionError::Device)?;
            view.parts.push(part);
        }
        // Where each GPU region starts inside its part: VMM regions that continue one
        // another are one part, mapped back to back.
        let mut in_part = vec![0u64; regions.len()];
        let mut index = 0;
        while index < regions.len() {
            let r = &regions[index];
            let (imported, next) = match r.kind {
                RegionKind::HostMemfd => {
                    index += 1;
                    continue;
                }
                RegionKind::CudaIpc => (
                    device.import_engine_memory(
                        EngineImport::CudaIpc {
                            handle: &r.desc.handle,
                        },
                        r.desc.alloc_bytes,
                    ),
                    index + 1,
                ),
                RegionKind::CudaVmmFd => {
                    let run_end = (index + 1..regions.len())
                        .find(|&j| !continues(&regions[j]))
                        .unwrap_or(regions.len());
                    let run = &regions[index..run_end];
                    let chunks: Vec<_> = run
                        .iter()
                        .map(|c| {
                            let fd =
                                c.fd.as_ref()
                                    .expect("the handshake checked: VMM regions carry fds");
                            (fd.as_fd(), c.desc.alloc_bytes)
                        })
                        .collect();
                    let total = run
                        .iter()
                        .try_fold(0u64, |t, c| t.checked_add(c.desc.alloc_bytes))
                        .ok_or(RegionError::RunTooLarge { index })?;
                    (
                        device
                            .import_engine_memory(EngineImport::CudaVmm { chunks: &chunks }, total),
                        run_end,
                    )
                }
            };
            let part = imported.map_err(|source| RegionError::Import { index, source })?;
            let mut at = 0;
            for j in index..next {
                part_of[j] = view.parts.len();
                in_part[j] = at;
                at += regions[j].desc.alloc_bytes;
            }
            view.parts.push(part);
            index = next;
        }
        let window = device
            .engine_window(&view.parts)
            .map_err(RegionError::Device)?;
        view.window = Some(window.buffer);
        view.owns_window = window.owns_buffer;
        let spans = regions
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let part_at = window.part_offsets[part_of[i]];
                let at = if r.kind == RegionKind::HostMemfd {
                    host_start[i]
                } else {
                    in_part[i]
                };
                RegionSpan {
                    window_offset_bytes: part_at + at + r.desc.offset_bytes,
                    len_bytes: r.desc.len_bytes,
                }
            })
            .collect();
        let spans = extend_runs(regions, spans);
        let window_bytes = window.buffer.len_bytes() as u64;
        Ok((view, spans, window_bytes))
    }

    /// The engine's layout resolved against its regions: what the kernels take.
    pub fn resolve_layout(&self, raw: &kvp_kv_layout) -> Result<PagedLayout, LayoutError> {
        resolve_regions(raw, &self.spans, self.window_bytes)
    }

    /// Uploads a resolved layout, replacing the one before; on error that one stays.
    pub fn install_layout(&mut self, layout: PagedLayout) -> Result<(), DeviceError> {
        if let Some(view) = self.view.as_mut() {
            let id = view.device.upload_layout(&layout)?;
            if let Some(old) = view.layout.replace(id) {
                let _ = view.device.free_layout(old);
            }
        }
        self.layout = Some(layout);
        Ok(())
    }

    /// What the mover's launches for queue pair `qp` take (its stream and event), once
    /// a layout is attached.
    pub fn target(&self, qp: usize) -> Option<EngineTarget> {
        let v = self.view.as_ref()?;
        let &(stream, event) = v.lanes.get(qp)?;
        Some(EngineTarget {
            buffer: v.window?,
            layout: v.layout?,
            stream,
            event,
        })
    }

    /// Opens the engine's IPC events, replacing those registered before once every new one
    /// is open (on any refusal the old set stays and nothing new is kept). Only between
    /// operations: none of the session's copies is in flight.
    pub fn register_events(
        &mut self,
        events: &[kvplane_ffi::kvp_ipc_event],
    ) -> Result<(), EventError> {
        let view = self.view.as_mut().ok_or(EventError::NoMemory)?;
        let daemon_gpu = view.device.gpu_uuid();
        for (index, e) in events.iter().enumerate() {
            if e.reserved != [0; 16] {
                return Err(EventError::Reserved { index });
            }
            match daemon_gpu {
                None => return Err(EventError::NoGpu { index }),
                Some(g) if g != e.gpu_uuid => {
                    return Err(EventError::OtherGpu {
                        index,
                        event_gpu: uuid_text(&e.gpu_uuid),
                        daemon_gpu: uuid_text(&g),
                    });
                }
                Some(_) => {}
            }
        }
        let mut opened = Vec::with_capacity(events.len());
        for (index, e) in events.iter().enumerate() {
            match view.device.import_ipc_event(&e.handle) {
                Ok(ev) => opened.push(ev),
                Err(source) => {
                    for ev in opened {
                        let _ = view.device.destroy_event(ev);
                    }
                    return Err(EventError::Import { index, source });
                }
            }
        }
        for old in std::mem::replace(&mut view.ipc_events, opened) {
            let _ = view.device.destroy_event(old);
        }
        Ok(())
    }

    /// The IPC event a SAVE or LOAD names in `param0` (1 + its index; 0: none); `None`
    /// for an index the engine did not register.
    pub fn ipc_event(&self, param0: u64) -> Option<NamedEvent> {
        if param0 == 0 {
            return Some(NamedEvent::None);
        }
        let events = self.view.as_ref().map_or(&[][..], |v| &v.ipc_events[..]);
        usize::try_from(param0 - 1)
            .ok()
            .and_then(|i| events.get(i))
            .map(|e| NamedEvent::Ipc(*e))
    }

    /// The regions, as the engine registered them (their places in the window).
    pub fn spans(&self) -> &[RegionSpan] {
        &self.spans
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_read_like_nvidia_smi() {
        let u = [
            0x5a, 0x1b, 0x2c, 0x3d, 0x4e, 0x5f, 0x60, 0x71, 0x82, 0x93, 0xa4, 0xb5, 0xc6, 0xd7,
            0xe8, 0xf9,
        ];
        assert_eq!(uuid_text(&u), "GPU-5a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9");
    }
}
