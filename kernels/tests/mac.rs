//! The MAC kernels (`kernels/cuda/mac.cu`, keyed BLAKE3) against the `blake3` crate: the
//! NVMe slot MAC a block gets on the CPU must be what the device computes where the
//! block landed.

use kvplane_ffi::kvp_copy_desc;
use kvplane_kernels::host::emulate;
use kvplane_kernels::{HostLaunch, KernelError, mac_batch};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

fn desc(src_offset: u64, bytes: u64) -> kvp_copy_desc {
    kvp_copy_desc {
        src_offset,
        dst_offset: 0,
        bytes,
    }
}

fn expected(key: &[u8; 32], data: &[u8], d: &kvp_copy_desc) -> [u8; 32] {
    let r = d.src_offset as usize..(d.src_offset + d.bytes) as usize;
    *blake3::keyed_hash(key, &data[r]).as_bytes()
}

/// Lengths around every boundary the tree has: empty, inside one 64-byte block, one
/// chunk (1 KiB) and its edges, two and three chunks (a carried odd node), powers of
/// two, a 2 MiB block (2048 chunks, 11 levels) and odd sizes past it.
const LENGTHS: &[u64] = &[
    0,
    1,
    63,
    64,
    65,
    1023,
    1024,
    1025,
    2047,
    2048,
    2049,
    3072,
    3073,
    5 * 1024 + 7,
    7 * 1024,
    16 * 1024,
    31 * 1024 + 1,
    65_536,
    2 << 20,
    (2 << 20) + 4096 + 3,
];

#[test]
fn mac_kernels_equal_keyed_blake3() {
    let mut rng = StdRng::seed_from_u64(0xb1a3);
    let mut data = vec![0u8; (2 << 20) + 8192];
    rng.fill_bytes(&mut data);
    let mut key = [0u8; 32];
    rng.fill_bytes(&mut key);
    // One descriptor per length, each alone and all in one batch (their trees have
    // different depths, so later levels merge some descriptors and not others); an odd
    // source offset for the unaligned load path.
    let descs: Vec<kvp_copy_desc> = LENGTHS
        .iter()
        .enumerate()
        .map(|(i, &bytes)| desc(i as u64 % 2 + (i as u64 % 3) * 4, bytes))
        .collect();
    for threads in [1u32, 3] {
        let mut macs = vec![[0xAAu8; 32]; descs.len()];
        mac_batch(&data, &descs, &key, &mut macs, HostLaunch { threads }).expect("mac");
        for (d, mac) in descs.iter().zip(&macs) {
            assert_eq!(
                *mac,
                expected(&key, &data, d),
                "{} bytes at {}, {threads} threads",
                d.bytes,
                d.src_offset
            );
        }
        for d in &descs {
            let mut one = [[0u8; 32]];
            mac_batch(&data, &[*d], &key, &mut one, HostLaunch { threads }).expect("mac");
            assert_eq!(one[0], expected(&key, &data, d), "{} bytes alone", d.bytes);
        }
    }
    // Random ranges under another key.
    rng.fill_bytes(&mut key);
    let descs: Vec<kvp_copy_desc> = (0..24)
        .map(|_| {
            let bytes = rng.random_range(0..40_000);
            desc(rng.random_range(0..data.len() as u64 - bytes), bytes)
        })
        .collect();
    let mut macs = vec![[0u8; 32]; descs.len()];
    mac_batch(&data, &descs, &key, &mut macs, HostLaunch { threads: 2 }).expect("mac");
    for (d, mac) in descs.iter().zip(&macs) {
        assert_eq!(*mac, expected(&key, &data, d), "{} bytes", d.bytes);
    }
}

/// The same under the grid and block shapes the cuda backend launches with, every CUDA
/// thread run in turn.
#[test]
fn mac_kernels_under_gpu_launch_shapes_equal_keyed_blake3() {
    let mut rng = StdRng::seed_from_u64(0xb1a4);
    let mut data = vec![0u8; (2 << 20) + 8192];
    rng.fill_bytes(&mut data);
    let mut key = [0u8; 32];
    rng.fill_bytes(&mut key);
    let descs: Vec<kvp_copy_desc> = LENGTHS.iter().map(|&bytes| desc(4, bytes)).collect();
    let mut macs = vec![[0u8; 32]; descs.len()];
    emulate::mac_batch(&data, &descs, &key, &mut macs).expect("mac");
    for (d, mac) in descs.iter().zip(&macs) {
        assert_eq!(*mac, expected(&key, &data, d), "{} bytes", d.bytes);
    }
}

#[test]
fn a_changed_byte_or_key_changes_the_mac() {
    let mut data = vec![7u8; 5000];
    let key = [9u8; 32];
    let d = [desc(0, 5000)];
    let mut before = [[0u8; 32]];
    mac_batch(&data, &d, &key, &mut before, HostLaunch::default()).unwrap();
    data[4321] ^= 1;
    let mut after = [[0u8; 32]];
    mac_batch(&data, &d, &key, &mut after, HostLaunch::default()).unwrap();
    assert_ne!(before, after);
    let mut other_key = [[0u8; 32]];
    mac_batch(&data, &d, &[8u8; 32], &mut other_key, HostLaunch::default()).unwrap();
    assert_ne!(after, other_key);
}

#[test]
fn mac_refuses_bad_descriptors() {
    let data = vec![0u8; 4096];
    let mut one = [[0u8; 32]];
    assert!(matches!(
        mac_batch(
            &data,
            &[desc(1, 4096)],
            &[0; 32],
            &mut one,
            HostLaunch::default()
        ),
        Err(KernelError::DescOutOfRange { op: "mac", .. })
    ));
    assert!(matches!(
        mac_batch(
            &data,
            &[desc(u64::MAX, 2)],
            &[0; 32],
            &mut one,
            HostLaunch::default()
        ),
        Err(KernelError::DescOutOfRange { op: "mac", .. })
    ));
    let mut none: [[u8; 32]; 0] = [];
    assert!(matches!(
        mac_batch(
            &data,
            &[desc(0, 16)],
            &[0; 32],
            &mut none,
            HostLaunch::default()
        ),
        Err(KernelError::SumsLength { op: "mac", .. })
    ));
}
