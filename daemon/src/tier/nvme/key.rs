//! The secret key that authenticates NVMe slots ([`super::header`]): 32 random bytes in a
//! file only the daemon can read, created on first start and loaded at every start-up
//! (before privileges are dropped).
//!
//! Two keys are derived from it with BLAKE3's key derivation (one per use, so a header can
//! never be presented as a block or the reverse): one for the MAC of a block's bytes, one
//! for the MAC of the header that carries it. Losing the file loses the NVMe cache (every
//! slot then fails its MAC and is dropped at the next start), nothing else.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use zeroize::Zeroize;

use crate::secure_open::{self, Kind, OpenSpec, PathError};

/// Bytes of key material in the key file.
pub const KEY_BYTES: usize = 32;
/// Bytes of each MAC (BLAKE3's default output).
pub const MAC_BYTES: usize = 32;

const HEADER_CONTEXT: &str = "kvplane 2026-12-04 NVMe slot header MAC v2";
const DATA_CONTEXT: &str = "kvplane 2026-12-04 NVMe slot data MAC v2";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("NVMe slot key: {0}")]
    Path(PathError),
    #[error("NVMe slot key {path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "NVMe slot key {path}: {size} bytes, expected {KEY_BYTES} (a start interrupted while \
         creating it leaves it short: remove it; the NVMe cache is then rebuilt empty)"
    )]
    Size { path: PathBuf, size: u64 },
}

/// Keys derived from the key file. Never printed (its `Debug` is redacted).
pub struct SlotKey {
    header: [u8; 32],
    data: [u8; 32],
}

impl std::fmt::Debug for SlotKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SlotKey(<redacted>)")
    }
}

impl Drop for SlotKey {
    fn drop(&mut self) {
        self.header.zeroize();
        self.data.zeroize();
    }
}

impl SlotKey {
    /// Derives the header and data keys from 32 bytes of key material.
    pub fn from_material(material: &[u8; KEY_BYTES]) -> SlotKey {
        SlotKey {
            header: blake3::derive_key(HEADER_CONTEXT, material),
            data: blake3::derive_key(DATA_CONTEXT, material),
        }
    }

    /// The key of the data MAC, for MAC kernels run where a block landed.
    pub(crate) fn data_key(&self) -> &[u8; 32] {
        &self.data
    }

    /// MAC of a block's bytes.
    pub fn data_mac(&self, data: &[u8]) -> [u8; MAC_BYTES] {
        *blake3::keyed_hash(&self.data, data).as_bytes()
    }

    /// The data MAC computed piece by piece (equal to [`Self::data_mac`] of the pieces
    /// joined).
    pub fn data_hasher(&self) -> blake3::Hasher {
        blake3::Hasher::new_keyed(&self.data)
    }

    /// MAC of a header's authenticated bytes.
    pub fn header_mac(&self, bytes: &[u8]) -> [u8; MAC_BYTES] {
        *blake3::keyed_hash(&self.header, bytes).as_bytes()
    }

    /// Compares in constant time (BLAKE3's `Hash` equality is constant-time).
    pub fn mac_eq(a: &[u8; MAC_BYTES], b: &[u8]) -> bool {
        let Ok(b) = <[u8; MAC_BYTES]>::try_from(b) else {
            return false;
        };
        blake3::Hash::from_bytes(*a) == blake3::Hash::from_bytes(b)
    }

    /// Loads the key file at `path`, creating it (0600, `O_EXCL`, from the kernel's random
    /// source) if there is none. Either way the path is opened through
    /// [`secure_open`]: no link is followed at the key itself, every directory above it
    /// must be the daemon's or root's, and an existing file must be a regular file owned by
    /// root or the daemon with no group/other permission bits.
    pub fn load_or_create(path: &Path) -> Result<(SlotKey, bool), KeyError> {
        let create = OpenSpec {
            flags: libc::O_RDWR | libc::O_CREAT | libc::O_EXCL,
            create_mode: 0o600,
            kinds: &[Kind::Regular],
            forbidden_mode: 0o077,
            follow_final_link: false,
        };
        match secure_open::open(path, &create) {
            Ok(opened) => {
                let mut material = [0u8; KEY_BYTES];
                fill_random(&mut material).map_err(|source| KeyError::Io {
                    path: path.to_path_buf(),
                    op: "getrandom",
                    source,
                })?;
                let mut file = &opened.file;
                let r = file
                    .write_all(&material)
                    .and_then(|()| file.sync_all())
                    .and_then(|()| opened.sync_dir());
                let key = SlotKey::from_material(&material);
                material.zeroize();
                r.map_err(|source| KeyError::Io {
                    path: path.to_path_buf(),
                    op: "write",
                    source,
                })?;
                Ok((key, true))
            }
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok((Self::load(path)?, false)),
            Err(e) => Err(KeyError::Path(e)),
        }
    }

    /// Loads an existing key file (same checks as [`SlotKey::load_or_create`]).
    pub fn load(path: &Path) -> Result<SlotKey, KeyError> {
        let spec = OpenSpec {
            flags: libc::O_RDONLY,
            create_mode: 0,
            kinds: &[Kind::Regular],
            forbidden_mode: 0o077,
            follow_final_link: false,
        };
        let opened = secure_open::open(path, &spec).map_err(KeyError::Path)?;
        let size = opened.stat.st_size as u64;
        if size != KEY_BYTES as u64 {
            return Err(KeyError::Size {
                path: path.to_path_buf(),
                size,
            });
        }
        let mut material = [0u8; KEY_BYTES];
        let mut file = opened.file;
        file.read_exact(&mut material)
            .map_err(|source| KeyError::Io {
                path: path.to_path_buf(),
                op: "read",
                source,
            })?;
        let key = SlotKey::from_material(&material);
        material.zeroize();
        Ok(key)
    }
}

/// Fills `buf` from the kernel's CSPRNG (`getrandom(2)`, blocking until it is seeded).
fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is writable for its length for the call's duration.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}
