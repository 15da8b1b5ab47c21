//! GPUDirect Storage: NVMe <-> HBM through cuFile, loaded dynamically (libcufile.so.0),
//! used where the driver and libcufile are present; otherwise transfers are staged
//! through the pinned host pool. [`choose_path`] decides per transfer and says why, so
//! the tier can report which path each transfer took.
//!
//! Not verifiable here (no driver, no libcufile): only the probe and the path choice run
//! in tests.

use crate::cuda::{CudaDevice, driver_present};
use crate::device::{BackendKind, DeviceError, DeviceRange};
use std::ffi::c_void;
use std::os::fd::{AsRawFd, BorrowedFd};

/// How one NVMe <-> device transfer moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferPath {
    /// cuFile DMA between the file and device memory.
    Gds,
    /// NVMe <-> pinned host pool (io_uring), then a copy-engine copy to/from the device.
    StagedPinned,
}

/// The chosen path and the reason, for per-transfer reporting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathChoice {
    pub path: TransferPath,
    pub reason: &'static str,
}

/// cuFile's DMA granularity: GDS is used only for 4 KiB-aligned offsets and lengths
/// (unaligned requests would bounce inside cuFile anyway).
pub const GDS_ALIGN_BYTES: u64 = 4096;

/// Picks the path for one transfer.
pub fn choose_path(
    backend: BackendKind,
    gds_ready: bool,
    file_offset: u64,
    bytes: u64,
    device_offset: u64,
) -> PathChoice {
    let staged = |reason| PathChoice {
        path: TransferPath::StagedPinned,
        reason,
    };
    if backend == BackendKind::Host {
        return staged("host backend: no device memory to DMA into");
    }
    if !gds_ready {
        return staged("cuFile unavailable (no libcufile or cuFileDriverOpen failed)");
    }
    if (file_offset | bytes | device_offset) % GDS_ALIGN_BYTES != 0 {
        return staged("not 4 KiB aligned");
    }
    PathChoice {
        path: TransferPath::Gds,
        reason: "cuFile DMA",
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GdsError {
    #[error("GPUDirect Storage needs the NVIDIA driver, and none is loaded")]
    NoDriver,
    #[error("libcufile not found ({0}); transfers are staged through the pinned pool")]
    NoLibrary(String),
    #[error("libcufile lacks symbol {symbol}: {reason}")]
    Symbol {
        symbol: &'static str,
        reason: String,
    },
    #[error("{op} failed: cuFile error {err}, CUDA error {cu_err}")]
    CuFile {
        op: &'static str,
        err: i32,
        cu_err: i32,
    },
    #[error("{op} on fd {fd}: {what} (returned {ret})")]
    Io {
        op: &'static str,
        fd: i32,
        what: &'static str,
        ret: isize,
    },
    #[error(transparent)]
    Device(#[from] DeviceError),
}

/// `CUfileError_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct CuFileError {
    err: i32,
    cu_err: i32,
}

/// `CUfileDescr_t` for an fd.
#[repr(C)]
struct CuFileDescr {
    type_: u32,
    handle: *mut c_void, // union { int fd; void *handle; }: fd in the low 32 bits
    fs_ops: *const c_void,
}

type DriverOpen = unsafe extern "C" fn() -> CuFileError;
type DriverClose = unsafe extern "C" fn() -> CuFileError;
type HandleRegister = unsafe extern "C" fn(*mut *mut c_void, *mut CuFileDescr) -> CuFileError;
type HandleDeregister = unsafe extern "C" fn(*mut c_void);
type Read = unsafe extern "C" fn(*mut c_void, *mut c_void, usize, i64, i64) -> isize;
type Write = unsafe extern "C" fn(*mut c_void, *const c_void, usize, i64, i64) -> isize;

/// An opened cuFile driver.
pub struct Gds {
    _lib: libloading::Library,
    close: DriverClose,
    register: HandleRegister,
    deregister: HandleDeregister,
    read: Read,
    write: Write,
}

impl std::fmt::Debug for Gds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Gds")
    }
}

fn check(op: &'static str, e: CuFileError) -> Result<(), GdsError> {
    if e.err == 0 {
        Ok(())
    } else {
        Err(GdsError::CuFile {
            op,
            err: e.err,
            cu_err: e.cu_err,
        })
    }
}

impl Gds {
    /// Probes the driver first (never panics without one), loads libcufile and opens
    /// the cuFile driver.
    pub fn open() -> Result<Self, GdsError> {
        if !driver_present() {
            return Err(GdsError::NoDriver);
        }
        let mut last = String::new();
        let mut lib = None;
        for name in ["libcufile.so.0", "libcufile.so"] {
            // SAFETY: loading libcufile runs its initialisers only.
            match unsafe { libloading::Library::new(name) } {
                Ok(l) => {
                    lib = Some(l);
                    break;
                }
                Err(e) => last = e.to_string(),
            }
        }
        let lib = lib.ok_or(GdsError::NoLibrary(last))?;
        fn sym<T: Copy>(lib: &libloading::Library, symbol: &'static str) -> Result<T, GdsError> {
            // SAFETY: T is the documented C signature of `symbol` in cufile.h.
            unsafe { lib.get::<T>(symbol.as_bytes()) }
                .map(|s| *s)
                .map_err(|e| GdsError::Symbol {
                    symbol,
                    reason: e.to_string(),
                })
        }
        let open: DriverOpen = sym(&lib, "cuFileDriverOpen")?;
        let gds = Self {
            close: sym(&lib, "cuFileDriverClose")?,
            register: sym(&lib, "cuFileHandleRegister")?,
            deregister: sym(&lib, "cuFileHandleDeregister")?,
            read: sym(&lib, "cuFileRead")?,
            write: sym(&lib, "cuFileWrite")?,
            _lib: lib,
        };
        // SAFETY: no arguments; the library is loaded.
        check("cuFileDriverOpen", unsafe { open() })?;
        Ok(gds)
    }

    /// Registers an O_DIRECT file descriptor with cuFile; the handle is deregistered
    /// when the returned file is dropped.
    pub fn register(&self, fd: BorrowedFd<'_>) -> Result<GdsFile<'_>, GdsError> {
        Ok(GdsFile {
            gds: self,
            handle: self.register_handle(fd)?,
        })
    }

    /// Registers `fd` with cuFile and returns the bare handle, for a caller that keeps it
    /// as long as the descriptor lives (cuFile refuses a second registration of the
    /// same descriptor, so concurrent readers must share one).
    pub fn register_handle(&self, fd: BorrowedFd<'_>) -> Result<GdsHandle, GdsError> {
        let mut descr = CuFileDescr {
            type_: 1, // CU_FILE_HANDLE_TYPE_OPAQUE_FD
            handle: fd.as_raw_fd() as usize as *mut c_void,
            fs_ops: std::ptr::null(),
        };
        let mut handle: *mut c_void = std::ptr::null_mut();
        // SAFETY: valid out pointer and descriptor.
        check("cuFileHandleRegister", unsafe {
            (self.register)(&mut handle, &mut descr)
        })?;
        Ok(GdsHandle {
            raw: handle,
            fd: fd.as_raw_fd(),
        })
    }

    /// Reads `dst.len_bytes` at `file_offset` of `file` straight into device memory.
    pub fn read(
        &self,
        file: GdsHandle,
        dev: &CudaDevice,
        dst: DeviceRange,
        file_offset: u64,
    ) -> Result<(), GdsError> {
        let (base, offset) = dev.raw_range("cuFileRead", dst)?;
        // SAFETY: a checked range of a live device buffer; a registered handle.
        let ret = unsafe {
            (self.read)(
                file.raw,
                base as *mut c_void,
                dst.len_bytes,
                file_offset as i64,
                offset as i64,
            )
        };
        done(file, "cuFileRead", ret, dst.len_bytes)
    }

    /// Writes `src.len_bytes` of device memory at `file_offset` of `file`.
    pub fn write(
        &self,
        file: GdsHandle,
        dev: &CudaDevice,
        src: DeviceRange,
        file_offset: u64,
    ) -> Result<(), GdsError> {
        let (base, offset) = dev.raw_range("cuFileWrite", src)?;
        // SAFETY: as in read.
        let ret = unsafe {
            (self.write)(
                file.raw,
                base as *const c_void,
                src.len_bytes,
                file_offset as i64,
                offset as i64,
            )
        };
        done(file, "cuFileWrite", ret, src.len_bytes)
    }
}

/// A cuFile handle of a registered descriptor.
#[derive(Debug, Clone, Copy)]
pub struct GdsHandle {
    raw: *mut c_void,
    fd: i32,
}

// SAFETY: a cuFile handle is an opaque token cuFile accepts from any thread.
unsafe impl Send for GdsHandle {}
// SAFETY: as above.
unsafe impl Sync for GdsHandle {}

fn done(file: GdsHandle, op: &'static str, ret: isize, want: usize) -> Result<(), GdsError> {
    // -1: a POSIX error, its cause in errno (cuFile's own errors are other negatives):
    // reported as -errno, as the callers read an errno.
    let ret = match ret {
        -1 => {
            -(std::io::Error::last_os_error()
                .raw_os_error()
                .filter(|&e| e > 0)
                .unwrap_or(libc::EIO) as isize)
        }
        ret => ret,
    };
    if ret < 0 {
        Err(GdsError::Io {
            op,
            fd: file.fd,
            what: "error",
            ret,
        })
    } else if ret as usize != want {
        Err(GdsError::Io {
            op,
            fd: file.fd,
            what: "short transfer",
            ret,
        })
    } else {
        Ok(())
    }
}

impl Drop for Gds {
    fn drop(&mut self) {
        // SAFETY: every GdsFile borrows self, so all handles are deregistered by now.
        let _ = unsafe { (self.close)() };
    }
}

/// A file registered with cuFile.
pub struct GdsFile<'a> {
    gds: &'a Gds,
    handle: GdsHandle,
}

impl std::fmt::Debug for GdsFile<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GdsFile")
            .field("fd", &self.handle.fd)
            .finish()
    }
}

impl GdsFile<'_> {
    /// Reads `dst.len_bytes` at `file_offset` straight into device memory.
    pub fn read(
        &self,
        dev: &CudaDevice,
        dst: DeviceRange,
        file_offset: u64,
    ) -> Result<(), GdsError> {
        self.gds.read(self.handle, dev, dst, file_offset)
    }

    /// Writes `src.len_bytes` of device memory at `file_offset`.
    pub fn write(
        &self,
        dev: &CudaDevice,
        src: DeviceRange,
        file_offset: u64,
    ) -> Result<(), GdsError> {
        self.gds.write(self.handle, dev, src, file_offset)
    }
}

impl Drop for GdsFile<'_> {
    fn drop(&mut self) {
        // SAFETY: registered in Gds::register, deregistered once.
        unsafe { (self.gds.deregister)(self.handle.raw) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_choice_per_transfer() {
        let c = choose_path(BackendKind::Cuda, true, 8192, 1 << 20, 0);
        assert_eq!(c.path, TransferPath::Gds);
        for (backend, ready, off, bytes, dev_off) in [
            (BackendKind::Host, true, 0, 4096, 0),
            (BackendKind::Cuda, false, 0, 4096, 0),
            (BackendKind::Cuda, true, 512, 4096, 0),
            (BackendKind::Cuda, true, 0, 4095, 0),
            (BackendKind::Cuda, true, 0, 4096, 100),
        ] {
            let c = choose_path(backend, ready, off, bytes, dev_off);
            assert_eq!(c.path, TransferPath::StagedPinned, "{c:?}");
            assert!(!c.reason.is_empty());
        }
    }

    #[test]
    fn open_without_driver_is_an_error_not_a_panic() {
        if driver_present() {
            // With a driver, open may succeed or report a missing libcufile; both fine.
            let _ = Gds::open();
            return;
        }
        assert!(matches!(Gds::open(), Err(GdsError::NoDriver)));
    }
}
