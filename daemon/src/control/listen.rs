//! Creating the control socket file as root without being tricked: the directory it goes
//! in (and every directory above it) must be one no other user can change entries of, so
//! nobody can swap a symlink or their own socket in between our checks and `bind`; an
//! existing entry is replaced only if it is our own stale socket; the file is created with
//! its final mode (umask around `bind`, never a world-connectable moment) and then given
//! its group with `lchown`, which does not follow symlinks.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("control socket {path}: {reason}")]
    Unsafe { path: PathBuf, reason: String },
    #[error("control socket {path} is in use by a running daemon")]
    InUse { path: PathBuf },
    #[error("control socket {path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Every directory from `/` down to `dir` (already canonical) is a real directory owned
/// by root or us, and not writable by group or others (a sticky bit is enough above the
/// last one: others may add entries there but not rename or remove ours).
fn check_trusted_dirs(dir: &Path, socket: &Path) -> Result<(), SocketError> {
    let me = euid();
    let ancestors: Vec<&Path> = dir.ancestors().collect();
    for (i, d) in ancestors.iter().enumerate() {
        let meta = std::fs::symlink_metadata(d).map_err(|source| SocketError::Io {
            path: socket.to_path_buf(),
            op: "lstat of a parent directory",
            source,
        })?;
        let unsafe_dir = |reason: String| SocketError::Unsafe {
            path: socket.to_path_buf(),
            reason: format!("directory {}: {reason}", d.display()),
        };
        if !meta.file_type().is_dir() {
            return Err(unsafe_dir("not a directory".into()));
        }
        if meta.uid() != 0 && meta.uid() != me {
            return Err(unsafe_dir(format!(
                "owned by uid {}, not root or the daemon's uid {me}",
                meta.uid()
            )));
        }
        let mode = meta.mode();
        let sticky = mode & libc::S_ISVTX != 0;
        let last = i == 0;
        if mode & 0o022 != 0 && (last || !sticky) {
            return Err(unsafe_dir(format!(
                "mode {:o} lets other users replace its entries",
                mode & 0o7777
            )));
        }
    }
    Ok(())
}

/// Binds the control socket at `path` with permission bits `mode` and, when given, group
/// `gid`. Creates the directory (0755) when missing. Refuses an unsafe directory, a live
/// socket (another daemon) and any existing entry that is not our own socket.
pub fn bind_control_socket(
    path: &Path,
    mode: u32,
    gid: Option<u32>,
) -> Result<(UnixListener, PathBuf), SocketError> {
    let io = |op: &'static str| {
        move |source| SocketError::Io {
            path: path.to_path_buf(),
            op,
            source,
        }
    };
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(SocketError::Unsafe {
            path: path.to_path_buf(),
            reason: "not a file path".into(),
        });
    };
    if !parent.exists() {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(io("creating its directory"))?;
    }
    // Resolve symlinks in the directory part once, then check every directory of the
    // resolved path: from then on nobody else can change what the path names.
    let dir = std::fs::canonicalize(parent).map_err(io("resolving its directory"))?;
    check_trusted_dirs(&dir, path)?;
    let path = dir.join(name);
    let io = |op: &'static str| {
        let path = path.clone();
        move |source| SocketError::Io { path, op, source }
    };
    match std::fs::symlink_metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("lstat")(e)),
        Ok(meta) if meta.file_type().is_socket() && meta.uid() == euid() => {
            // A live daemon answers; a stale socket file from a crash does not.
            if UnixStream::connect(&path).is_ok() {
                return Err(SocketError::InUse { path });
            }
            std::fs::remove_file(&path).map_err(io("removing the stale socket"))?;
        }
        Ok(meta) => {
            let ft = meta.file_type();
            let kind = if ft.is_symlink() {
                "a symlink"
            } else if ft.is_socket() {
                "another user's socket"
            } else if ft.is_dir() {
                "a directory"
            } else {
                "a file"
            };
            return Err(SocketError::Unsafe {
                path,
                reason: format!("already exists and is {kind}; not replacing it"),
            });
        }
    }
    // bind(2) creates the file with 0777 & !umask and never follows a symlink at the last
    // component (an existing entry makes it fail), so set the umask for the final mode
    // around it. The umask is process-wide: this runs at start-up, before any thread that
    // creates files.
    let mask = (!mode & 0o777) as libc::mode_t;
    // SAFETY: umask only swaps the process's file-creation mask.
    let old = unsafe { libc::umask(mask) };
    let bound = UnixListener::bind(&path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(io("bind"))?;
    if let Some(gid) = gid {
        std::os::unix::fs::lchown(&path, None, Some(gid)).map_err(io("lchown"))?;
    }
    // What is at the path now is the socket we made, with the bits asked for.
    let meta = std::fs::symlink_metadata(&path).map_err(io("lstat after bind"))?;
    if !meta.file_type().is_socket()
        || meta.uid() != euid()
        || meta.permissions().mode() & 0o7777 != mode
    {
        return Err(SocketError::Unsafe {
            path,
            reason: format!(
                "after bind: type socket {}, owner {}, mode {:o} (expected {mode:o})",
                meta.file_type().is_socket(),
                meta.uid(),
                meta.permissions().mode() & 0o7777
            ),
        });
    }
    Ok((listener, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn private_dir() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        d
    }

    #[test]
    fn creates_the_socket_with_its_mode_and_replaces_only_a_stale_one() {
        let d = private_dir();
        let p = d.path().join("sub/control.sock");
        let (l, real) = bind_control_socket(&p, 0o600, None).unwrap();
        let meta = std::fs::symlink_metadata(&real).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
        // Live: refused.
        assert!(matches!(
            bind_control_socket(&p, 0o600, None),
            Err(SocketError::InUse { .. })
        ));
        drop(l);
        // Stale (its listener gone): replaced.
        let (_l, _) = bind_control_socket(&p, 0o660, None).unwrap();
        let meta = std::fs::symlink_metadata(&real).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o660);
    }

    #[test]
    fn refuses_a_symlink_a_file_and_a_writable_directory() {
        let d = private_dir();
        let target = d.path().join("victim");
        std::fs::write(&target, b"root's file").unwrap();
        let link = d.path().join("control.sock");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = bind_control_socket(&link, 0o600, None).unwrap_err();
        assert!(e.to_string().contains("symlink"), "{e}");
        assert_eq!(std::fs::read(&target).unwrap(), b"root's file");
        let e = bind_control_socket(&target, 0o600, None).unwrap_err();
        assert!(e.to_string().contains("a file"), "{e}");
        let open = d.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = bind_control_socket(&open.join("c.sock"), 0o600, None).unwrap_err();
        assert!(e.to_string().contains("lets other users"), "{e}");
    }
}
