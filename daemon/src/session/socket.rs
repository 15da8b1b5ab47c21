//! The engine socket's path, opened as root without trusting it.
//!
//! The daemon walks the socket's directory path one component at a time through
//! directory descriptors: every directory on the way must be owned by root or the daemon's
//! user and not writable by group or others (a sticky directory such as /tmp is allowed:
//! nobody else can rename or remove what root owns in it), a symbolic link on the way is
//! followed only when root or the daemon's user owns it, and the socket directory itself
//! must be a real directory (never a link), owned by the daemon's user, not writable by
//! group or others. A missing socket directory is created 0750 (group: `socket_group`,
//! else the daemon's gid; 0700 when the socket mode grants the group nothing). The
//! directory stays open for the daemon's life and the socket is bound, probed, chmod-ed
//! and removed relative to it, so nothing renamed on the path after the check is used.
//! A file already at the socket's name is removed only when it is a stale socket of the
//! daemon's user; a link, another kind of file or another user's socket is refused and left
//! alone, and at shutdown the socket is removed only if it is still the one bound.

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Component, Path, PathBuf};

/// Why the socket path was refused.
#[derive(Debug, thiserror::Error)]
pub enum SocketPathError {
    #[error("socket path {path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("socket path {path}: {reason}")]
    BadPath { path: PathBuf, reason: &'static str },
    #[error("{path} is a symbolic link; the daemon does not follow it")]
    Symlink { path: PathBuf },
    #[error("{path} is owned by uid {uid}, not by root or the daemon's uid {daemon_uid}")]
    ForeignOwner {
        path: PathBuf,
        uid: u32,
        daemon_uid: u32,
    },
    #[error("{path} is writable by group or others (mode {mode:o})")]
    Writable { path: PathBuf, mode: u32 },
    #[error("{path} is not a directory")]
    NotDirectory { path: PathBuf },
    #[error("{path} exists and is not a socket; it is left in place")]
    NotSocket { path: PathBuf },
    #[error("{path} is in use by a running daemon")]
    InUse { path: PathBuf },
}

/// Who the socket and its directory belong to.
#[derive(Clone, Copy, Debug)]
pub struct SocketOwner {
    /// Owner of what the daemon creates; also accepted as owner of what exists.
    pub uid: u32,
    pub gid: u32,
    /// Permission bits of the socket file.
    pub mode: u32,
}

impl SocketOwner {
    /// Mode of a socket directory the daemon creates: search (and list) for the classes
    /// the socket mode lets connect, nothing more, never writable by others.
    pub fn dir_mode(&self) -> u32 {
        let mut m = 0o700;
        if self.mode & 0o060 != 0 {
            m |= 0o050;
        }
        if self.mode & 0o006 != 0 {
            m |= 0o005;
        }
        m
    }
}

/// What shutdown did with the socket file.
#[derive(Debug, PartialEq, Eq)]
pub enum Removal {
    Removed,
    /// Someone removed it already.
    Gone,
    /// The name now holds another file (not ours): left alone.
    Replaced,
}

/// The bound socket: its directory (held open) and the identity of the file bound.
#[derive(Debug)]
pub struct SocketFile {
    dir: OwnedFd,
    name: CString,
    path: PathBuf,
    dev_ino: (u64, u64),
}

fn stat_at(dir: RawFd, name: &CStr, flags: i32) -> io::Result<libc::stat> {
    // SAFETY: a zeroed stat is a valid out-parameter.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: name is NUL-terminated, st is writable; dir is a descriptor we hold.
    if unsafe { libc::fstatat(dir, name.as_ptr(), &mut st, flags) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

fn open_at(dir: RawFd, name: &CStr, flags: i32) -> io::Result<OwnedFd> {
    // SAFETY: name is NUL-terminated; dir is a descriptor we hold (or AT_FDCWD).
    let fd = unsafe { libc::openat(dir, name.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor from openat, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn is(st: &libc::stat, kind: libc::mode_t) -> bool {
    st.st_mode & libc::S_IFMT == kind
}

fn cstr(name: &OsStr, path: &Path) -> Result<CString, SocketPathError> {
    CString::new(name.as_bytes()).map_err(|_| SocketPathError::BadPath {
        path: path.to_path_buf(),
        reason: "contains a NUL byte",
    })
}

/// Checks and, when missing, creates the socket directory of `path` exactly as [`bind`]
/// does, binding nothing.
pub fn prepare_dir(path: &Path, owner: SocketOwner) -> Result<(), SocketPathError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    open_socket_dir(path, &[0, euid, owner.uid], owner).map(drop)
}

/// Binds the engine socket at `path` (see the module comment for what is refused).
pub fn bind(
    path: &Path,
    owner: SocketOwner,
) -> Result<(UnixListener, SocketFile), SocketPathError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    let owners = [0, euid, owner.uid];
    let name = match path.file_name() {
        Some(n) => cstr(n, path)?,
        None => {
            return Err(SocketPathError::BadPath {
                path: path.to_path_buf(),
                reason: "names no file",
            });
        }
    };
    let dir = open_socket_dir(path, &owners, owner)?;
    let io_err = |what, source| SocketPathError::Io {
        path: path.to_path_buf(),
        what,
        source,
    };
    let bind_path = via_dir(&dir, &name, path);
    match stat_at(dir.as_raw_fd(), &name, libc::AT_SYMLINK_NOFOLLOW) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
        Err(e) => return Err(io_err("stat", e)),
        Ok(st) if is(&st, libc::S_IFLNK) => {
            return Err(SocketPathError::Symlink {
                path: path.to_path_buf(),
            });
        }
        Ok(st) if !is(&st, libc::S_IFSOCK) => {
            return Err(SocketPathError::NotSocket {
                path: path.to_path_buf(),
            });
        }
        Ok(st) if !owners.contains(&st.st_uid) => {
            return Err(SocketPathError::ForeignOwner {
                path: path.to_path_buf(),
                uid: st.st_uid,
                daemon_uid: owner.uid,
            });
        }
        Ok(_) => {
            // A live daemon answers; a stale socket of ours from a crash does not.
            if UnixStream::connect(&bind_path).is_ok() {
                return Err(SocketPathError::InUse {
                    path: path.to_path_buf(),
                });
            }
            // SAFETY: name is NUL-terminated; dir is our socket directory.
            if unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) } != 0 {
                return Err(io_err(
                    "removing a stale socket",
                    io::Error::last_os_error(),
                ));
            }
        }
    }
    let listener = UnixListener::bind(&bind_path).map_err(|e| io_err("bind", e))?;
    // SAFETY: name is NUL-terminated; the entry is in our directory, which nobody else
    // may write, and AT_SYMLINK_NOFOLLOW keeps a link from being followed regardless.
    let rc = unsafe {
        libc::fchownat(
            dir.as_raw_fd(),
            name.as_ptr(),
            owner.uid,
            owner.gid,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        return Err(io_err("chown", io::Error::last_os_error()));
    }
    // SAFETY: as above; fchmodat follows no link here: the entry is the socket just bound
    // in a directory only the daemon's user can write.
    if unsafe { libc::fchmodat(dir.as_raw_fd(), name.as_ptr(), owner.mode, 0) } != 0 {
        return Err(io_err("chmod", io::Error::last_os_error()));
    }
    let st = stat_at(dir.as_raw_fd(), &name, libc::AT_SYMLINK_NOFOLLOW)
        .map_err(|e| io_err("stat after bind", e))?;
    Ok((
        listener,
        SocketFile {
            dir,
            name,
            path: path.to_path_buf(),
            dev_ino: (st.st_dev, st.st_ino),
        },
    ))
}

/// A path to `name` through the open directory (`/proc/self/fd/N/name`), so the bind and
/// the probe land in the directory that was checked; the configured path where /proc is
/// missing or the result would not fit in `sun_path` (the directory is still one only the
/// daemon's user can change, under ancestors only root can change).
fn via_dir(dir: &OwnedFd, name: &CStr, path: &Path) -> PathBuf {
    let p = PathBuf::from(format!(
        "/proc/self/fd/{}/{}",
        dir.as_raw_fd(),
        String::from_utf8_lossy(name.to_bytes())
    ));
    if p.as_os_str().len() <= 107
        && name.to_str().is_ok()
        && Path::new(&format!("/proc/self/fd/{}", dir.as_raw_fd())).is_dir()
    {
        p
    } else {
        path.to_path_buf()
    }
}

/// Walks to the socket's directory (creating it, and missing ancestors, when absent) and
/// returns it open; see the module comment for the checks.
fn open_socket_dir(
    path: &Path,
    owners: &[u32],
    owner: SocketOwner,
) -> Result<OwnedFd, SocketPathError> {
    let parent = path.parent().unwrap_or(Path::new(""));
    let mut shown = PathBuf::new();
    let start: &CStr = if parent.is_absolute() { c"/" } else { c"." };
    let mut dir =
        open_at(libc::AT_FDCWD, start, libc::O_PATH | libc::O_DIRECTORY).map_err(|source| {
            SocketPathError::Io {
                path: PathBuf::from(start.to_string_lossy().as_ref()),
                what: "open",
                source,
            }
        })?;
    let mut names = Vec::new();
    for c in parent.components() {
        match c {
            Component::Normal(n) => names.push(n),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(SocketPathError::BadPath {
                    path: path.to_path_buf(),
                    reason: "`..` is not allowed in the socket path",
                });
            }
        }
    }
    shown.push(if parent.is_absolute() { "/" } else { "." });
    if names.is_empty() {
        // The socket directory is the starting one (relative path in the working
        // directory): reopen it readable to check it like any other.
        let d = open_at(
            libc::AT_FDCWD,
            c".",
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        )
        .map_err(|source| SocketPathError::Io {
            path: shown.clone(),
            what: "open",
            source,
        })?;
        check_dir(&d, &shown, owners, owner.uid, true)?;
        return Ok(d);
    }
    check_dir(&dir, &shown, owners, owner.uid, false)?;
    for (i, n) in names.iter().enumerate() {
        let last = i + 1 == names.len();
        shown.push(n);
        let name = cstr(n, path)?;
        let io_err = |what, source| SocketPathError::Io {
            path: shown.clone(),
            what,
            source,
        };
        let mut created = false;
        let st = match stat_at(dir.as_raw_fd(), &name, libc::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                let mode = if last { 0o700 } else { 0o755 };
                // SAFETY: name is NUL-terminated; dir is a checked directory we hold.
                if unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) } == 0 {
                    created = last;
                } else {
                    let e = io::Error::last_os_error();
                    if e.raw_os_error() != Some(libc::EEXIST) {
                        return Err(io_err("mkdir", e));
                    }
                }
                stat_at(dir.as_raw_fd(), &name, libc::AT_SYMLINK_NOFOLLOW)
                    .map_err(|e| io_err("stat", e))?
            }
            Err(e) => return Err(io_err("stat", e)),
        };
        let next = if is(&st, libc::S_IFLNK) {
            if last {
                return Err(SocketPathError::Symlink { path: shown });
            }
            // A link higher up (e.g. /var/run -> /run) is one root or the daemon's user
            // made, in a directory only they can write (checked): follow it.
            if !owners.contains(&st.st_uid) {
                return Err(SocketPathError::ForeignOwner {
                    path: shown,
                    uid: st.st_uid,
                    daemon_uid: owner.uid,
                });
            }
            open_at(dir.as_raw_fd(), &name, libc::O_PATH | libc::O_DIRECTORY)
                .map_err(|e| io_err("open", e))?
        } else if !is(&st, libc::S_IFDIR) {
            return Err(SocketPathError::NotDirectory { path: shown });
        } else {
            let flags = if last {
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW
            } else {
                libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW
            };
            open_at(dir.as_raw_fd(), &name, flags).map_err(|e| io_err("open", e))?
        };
        if created {
            // SAFETY: fchown/fchmod on the directory we just created and opened.
            let rc = unsafe {
                if libc::fchown(next.as_raw_fd(), owner.uid, owner.gid) != 0 {
                    -1
                } else {
                    libc::fchmod(next.as_raw_fd(), owner.dir_mode())
                }
            };
            if rc != 0 {
                return Err(io_err("setting owner and mode", io::Error::last_os_error()));
            }
            tracing::info!(dir = %shown.display(), mode = format!("{:o}", owner.dir_mode()), uid = owner.uid, gid = owner.gid, "socket directory created");
        }
        check_dir(&next, &shown, owners, owner.uid, last)?;
        dir = next;
    }
    Ok(dir)
}

/// A directory on the path: owned by root or the daemon's user and not writable by group
/// or others; above the socket directory a sticky directory may be world-writable.
fn check_dir(
    fd: &OwnedFd,
    shown: &Path,
    owners: &[u32],
    daemon_uid: u32,
    socket_dir: bool,
) -> Result<(), SocketPathError> {
    // SAFETY: a zeroed stat is a valid out-parameter; fd is a descriptor we hold.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(SocketPathError::Io {
            path: shown.to_path_buf(),
            what: "stat",
            source: io::Error::last_os_error(),
        });
    }
    if !is(&st, libc::S_IFDIR) {
        return Err(SocketPathError::NotDirectory {
            path: shown.to_path_buf(),
        });
    }
    if !owners.contains(&st.st_uid) {
        return Err(SocketPathError::ForeignOwner {
            path: shown.to_path_buf(),
            uid: st.st_uid,
            daemon_uid,
        });
    }
    let mode = st.st_mode & 0o7777;
    let sticky = mode & libc::S_ISVTX != 0;
    if mode & 0o022 != 0 && (socket_dir || !sticky) {
        return Err(SocketPathError::Writable {
            path: shown.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

impl SocketFile {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the socket if the name still holds the one bound; anything else there
    /// (another daemon's socket, a file someone put there) is left alone.
    pub fn remove(&self) -> Removal {
        match stat_at(self.dir.as_raw_fd(), &self.name, libc::AT_SYMLINK_NOFOLLOW) {
            Ok(st) if (st.st_dev, st.st_ino) == self.dev_ino => {
                // SAFETY: name is NUL-terminated; dir is our socket directory.
                if unsafe { libc::unlinkat(self.dir.as_raw_fd(), self.name.as_ptr(), 0) } != 0 {
                    tracing::warn!(path = %self.path.display(), error = %io::Error::last_os_error(), "cannot remove the engine socket");
                }
                Removal::Removed
            }
            Ok(_) => {
                tracing::warn!(path = %self.path.display(), "the engine socket was replaced by another file; left in place");
                Removal::Replaced
            }
            Err(_) => Removal::Gone,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn owner() -> SocketOwner {
        // SAFETY: geteuid/getegid have no preconditions.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        SocketOwner {
            uid,
            gid,
            mode: 0o660,
        }
    }

    #[test]
    fn creates_the_directory_and_removes_only_its_own_socket() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("run/kv.sock");
        let (_l, f) = bind(&path, owner()).unwrap();
        let dir = std::fs::metadata(t.path().join("run")).unwrap();
        assert_eq!(dir.permissions().mode() & 0o7777, 0o750);
        let sock = std::fs::symlink_metadata(&path).unwrap();
        assert_eq!(sock.permissions().mode() & 0o7777, 0o660);
        assert_eq!(sock.uid(), owner().uid);
        // Replaced by another file: shutdown leaves it.
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"not ours").unwrap();
        assert_eq!(f.remove(), Removal::Replaced);
        assert_eq!(std::fs::read(&path).unwrap(), b"not ours");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(f.remove(), Removal::Gone);
    }

    #[test]
    fn refuses_links_other_files_and_writable_dirs() {
        let t = tempfile::tempdir().unwrap();
        let real = t.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, t.path().join("link")).unwrap();
        let e = bind(&t.path().join("link/kv.sock"), owner()).unwrap_err();
        assert!(matches!(e, SocketPathError::Symlink { .. }), "{e}");

        let target = t.path().join("target");
        std::fs::write(&target, b"precious").unwrap();
        std::os::unix::fs::symlink(&target, real.join("kv.sock")).unwrap();
        let e = bind(&real.join("kv.sock"), owner()).unwrap_err();
        assert!(matches!(e, SocketPathError::Symlink { .. }), "{e}");
        assert!(std::fs::symlink_metadata(real.join("kv.sock")).is_ok());
        assert_eq!(std::fs::read(&target).unwrap(), b"precious");

        std::fs::write(real.join("file.sock"), b"x").unwrap();
        let e = bind(&real.join("file.sock"), owner()).unwrap_err();
        assert!(matches!(e, SocketPathError::NotSocket { .. }), "{e}");
        assert_eq!(std::fs::read(real.join("file.sock")).unwrap(), b"x");

        let open = t.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = bind(&open.join("kv.sock"), owner()).unwrap_err();
        assert!(matches!(e, SocketPathError::Writable { .. }), "{e}");
        let e = bind(&t.path().join("a/../kv.sock"), owner()).unwrap_err();
        assert!(matches!(e, SocketPathError::BadPath { .. }), "{e}");
    }

    #[test]
    fn a_stale_socket_is_replaced_and_a_live_one_refused() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("kv.sock");
        let (l, _f) = bind(&path, owner()).unwrap();
        let e = bind(&path, owner()).unwrap_err();
        assert!(matches!(e, SocketPathError::InUse { .. }), "{e}");
        drop(l);
        let (_l, f) = bind(&path, owner()).unwrap();
        assert_eq!(f.remove(), Removal::Removed);
        assert!(std::fs::symlink_metadata(&path).is_err());
    }
}
