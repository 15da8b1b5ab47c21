//! The control socket file: created as root without being tricked, by the same code as the
//! engine socket (`crate::session::socket`): the directory path is walked through
//! directory descriptors from `/`, every directory must be one no other user can change
//! entries of, a link is followed only when root or the daemon's user made it, an existing
//! entry is replaced only if it is the daemon's own stale socket, and the socket is bound,
//! given its group and mode, and removed relative to the directory that was checked.

use std::os::unix::net::UnixListener;
use std::path::Path;

use crate::session::socket::{self, SocketFile, SocketOwner, SocketPathError};

/// Binds the control socket at `path` with permission bits `mode` and, when given, group
/// `gid` (else the daemon's). A missing directory is created for the daemon's user.
pub fn bind_control_socket(
    path: &Path,
    mode: u32,
    gid: Option<u32>,
) -> Result<(UnixListener, SocketFile), SocketPathError> {
    // SAFETY: geteuid/getegid have no preconditions and cannot fail.
    let (uid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
    socket::bind(
        path,
        SocketOwner {
            uid,
            gid: gid.unwrap_or(egid),
            mode,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};

    fn private_dir() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        d
    }

    #[test]
    fn creates_the_socket_with_its_mode_and_replaces_only_a_stale_one() {
        let d = private_dir();
        let p = d.path().join("sub/control.sock");
        let (l, file) = bind_control_socket(&p, 0o600, None).unwrap();
        let real = file.path().to_path_buf();
        let meta = std::fs::symlink_metadata(&real).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
        // Live: refused.
        assert!(matches!(
            bind_control_socket(&p, 0o600, None),
            Err(SocketPathError::InUse { .. })
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
        assert!(matches!(e, SocketPathError::Symlink { .. }), "{e}");
        assert_eq!(std::fs::read(&target).unwrap(), b"root's file");
        let e = bind_control_socket(&target, 0o600, None).unwrap_err();
        assert!(matches!(e, SocketPathError::NotSocket { .. }), "{e}");
        let open = d.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = bind_control_socket(&open.join("c.sock"), 0o600, None).unwrap_err();
        assert!(matches!(e, SocketPathError::Writable { .. }), "{e}");
    }
}
