//! The attach handshake's checks on an engine's host memfd KV region: only a memfd that
//! cannot shrink, of exactly the announced size, on shmem or hugetlbfs, comes through;
//! everything whose backing could vanish under the daemon's mapping is refused with a
//! reason.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use kvplane_ffi as ffi;
use kvplane_shm::handshake::{EngineRegion, build_request, read_request, send_request};
use kvplane_shm::sys::{self, Backing};

/// Sends a request with one host memfd region of `bytes` carrying `fd`, returns what the
/// daemon side made of it.
fn attach_with(fd: &OwnedFd, bytes: u64) -> Result<kvplane_shm::handshake::AttachRequest, String> {
    let (engine, daemon) = UnixStream::pair().expect("socketpair");
    let req = build_request(1, 8, 8, 4096, &["ns"], 1).expect("request");
    let dup = fd.try_clone().expect("dup");
    send_request(&engine, &req, &[EngineRegion::host_memfd(dup, bytes)]).expect("send");
    read_request(&daemon).map_err(|e| e.to_string())
}

fn memfd(flags: u32, bytes: u64) -> OwnedFd {
    let file = std::fs::File::from(sys::memfd_create("kv-test", flags).expect("memfd_create"));
    file.set_len(bytes).expect("size the memfd");
    file.into()
}

fn expect_refused(fd: &OwnedFd, bytes: u64, why: &str) {
    match attach_with(fd, bytes) {
        Ok(r) => panic!(
            "accepted ({:?}); expected a refusal naming {why:?}",
            r.kv_regions
        ),
        Err(e) => assert!(e.contains(why), "refusal {e:?} does not say {why:?}"),
    }
}

#[test]
fn a_sealed_memfd_of_the_announced_size_is_accepted() {
    let fd = sys::memfd_create_sealed("kv", 1 << 20).expect("memfd");
    let req = attach_with(&fd, 1 << 20).expect("accepted");
    let kv = &req.kv_regions[0];
    assert_eq!(kv.kind, ffi::RegionKind::HostMemfd);
    assert_eq!(
        (kv.desc.alloc_bytes, kv.desc.len_bytes, kv.backing),
        (1 << 20, 1 << 20, Some(Backing::Shmem))
    );
}

#[test]
fn a_memfd_that_can_shrink_is_refused() {
    // No MFD_ALLOW_SEALING: F_SEAL_SEAL is set from birth, F_SEAL_SHRINK can never be.
    expect_refused(&memfd(0, 4096), 4096, "F_SEAL_SHRINK");
    // Sealable but not sealed.
    expect_refused(&memfd(libc::MFD_ALLOW_SEALING, 4096), 4096, "F_SEAL_SHRINK");
}

#[test]
fn a_size_other_than_the_announced_one_is_refused() {
    let fd = sys::memfd_create_sealed("kv", 8192).expect("memfd");
    expect_refused(&fd, 4096, "must equal");
    expect_refused(&fd, 16384, "must equal");
}

#[test]
fn files_that_are_not_memfds_are_refused() {
    // A regular file on disk (could be truncated by anyone who can write it).
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("kv");
    std::fs::write(&path, vec![0u8; 4096]).expect("write");
    let file: OwnedFd = std::fs::File::options()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open")
        .into();
    expect_refused(&file, 4096, "not a memfd");
    // A tmpfs file (e.g. /dev/shm, which may have a size= limit that turns a touch of a
    // hole into SIGBUS): shmem, but born sealed against new seals.
    let shm_path =
        std::path::Path::new("/dev/shm").join(format!("kvplane-test-{}", std::process::id()));
    std::fs::write(&shm_path, vec![0u8; 4096]).expect("write /dev/shm file");
    let shm: OwnedFd = std::fs::File::options()
        .read(true)
        .write(true)
        .open(&shm_path)
        .expect("open")
        .into();
    std::fs::remove_file(&shm_path).expect("unlink");
    assert_eq!(
        sys::backing(shm.as_raw_fd()).expect("fstatfs"),
        Backing::Shmem
    );
    expect_refused(&shm, 4096, "F_SEAL_SHRINK");
    // A character device.
    let null: OwnedFd = std::fs::File::open("/dev/zero").expect("/dev/zero").into();
    expect_refused(&null, 4096, "not a memfd");
}

#[test]
fn a_hugetlb_memfd_is_reported_as_such() {
    // Creating and sizing a hugetlb memfd needs no reserved hugepages (they are taken at
    // mmap and fault time), only kernel support, which a failure here would show.
    let fd = memfd(libc::MFD_HUGETLB | libc::MFD_ALLOW_SEALING, 2 << 20);
    sys::seal_no_shrink(fd.as_raw_fd()).expect("seal");
    let req = attach_with(&fd, 2 << 20).expect("the handshake reports, the daemon decides");
    assert_eq!(req.kv_regions[0].backing, Some(Backing::Hugetlb));
}
