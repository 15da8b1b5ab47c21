//! Opening the files the daemon uses as root (NVMe tier files and devices, the slot key,
//! the config file) so that no other local user can redirect them.
//!
//! How: the path is resolved one component at a time from `/` with
//! `openat(O_PATH | O_NOFOLLOW)`, and every check is made with `fstat` on the descriptor
//! that the next step then uses, so nothing can be swapped between a check and its use.
//!
//! - Every directory passed through must be owned by root or the daemon's euid and not
//!   writable by group or other, unless it is sticky (`/tmp`): there others may add names
//!   but not replace ours, and whatever they add fails the owner checks below.
//! - A symbolic link is followed only if root or the daemon's euid owns it (a link in such
//!   a directory was put there by root or by us, e.g. udev's `/dev/disk/by-id`); a link
//!   another user planted is refused, also as the last component. Links are resolved by
//!   the same walk (at most [`MAX_LINKS`]).
//!   Callers may refuse every link at the last component (the slot key does).
//! - The final object is opened with `O_NOFOLLOW | O_CLOEXEC` relative to its checked
//!   directory and then checked on that descriptor: owner (root or euid), file type, and
//!   permission bits the caller forbids.
//!
//! Resolving from `/` (rather than only checking the parent directory) is what stops an
//! ancestor directory writable by another user from pointing the whole path elsewhere,
//! e.g. at `/root/.ssh`: each directory is trusted only if every one above it was.

use std::collections::VecDeque;
use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// Symbolic links followed in one path at most (the kernel's own limit is 40).
pub const MAX_LINKS: u32 = 40;

/// A file type the caller accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Regular,
    BlockDevice,
}

impl Kind {
    fn matches(self, mode: u32) -> bool {
        let fmt = mode & libc::S_IFMT;
        match self {
            Kind::Regular => fmt == libc::S_IFREG,
            Kind::BlockDevice => fmt == libc::S_IFBLK,
        }
    }
}

/// How to open the final component and what it must look like once open.
#[derive(Clone, Copy, Debug)]
pub struct OpenSpec {
    /// `open(2)` access and creation flags (`O_RDWR | O_CREAT | O_DIRECT` ...);
    /// `O_NOFOLLOW | O_CLOEXEC` are always added.
    pub flags: libc::c_int,
    /// Mode for `O_CREAT`.
    pub create_mode: libc::mode_t,
    /// Accepted file types.
    pub kinds: &'static [Kind],
    /// Permission bits that must all be clear (e.g. `0o077`: no group/other access).
    pub forbidden_mode: u32,
    /// Follow a root's or the daemon's own link at the last component (e.g. udev's
    /// `/dev/disk/by-id/...`); when false any link there is refused.
    pub follow_final_link: bool,
}

/// A file opened and checked by [`open`].
#[derive(Debug)]
pub struct Opened {
    pub file: File,
    /// `fstat` of `file`, taken after the open (the values the checks passed on).
    pub stat: libc::stat,
    /// The path as resolved (links replaced by their targets).
    pub resolved: PathBuf,
    /// The checked directory holding it (an `O_PATH` descriptor).
    dir: OwnedFd,
}

impl Opened {
    pub fn is_block_device(&self) -> bool {
        Kind::BlockDevice.matches(self.stat.st_mode)
    }

    /// fsyncs the directory holding the file, so a file just created survives a crash
    /// (its directory entry is durable only then).
    pub fn sync_dir(&self) -> io::Result<()> {
        let d = openat(
            self.dir.as_raw_fd(),
            OsStr::new("."),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            0,
        )?;
        File::from(d).sync_all()
    }
}

/// Why a path was refused. Every variant names the configured path.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    #[error("{path}: {op} {at}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        at: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path}: directory {dir} (owner uid {uid}, mode {mode:04o}) can be changed by another \
         user (owner must be root or uid {euid}, no group/other write unless sticky); refused"
    )]
    UntrustedDirectory {
        path: PathBuf,
        dir: PathBuf,
        uid: u32,
        mode: u32,
        euid: u32,
    },
    #[error(
        "{path}: symbolic link {link} is owned by uid {uid} (only root's or uid {euid}'s links \
         are followed); refused"
    )]
    UntrustedSymlink {
        path: PathBuf,
        link: PathBuf,
        uid: u32,
        euid: u32,
    },
    #[error("{path}: {link} is a symbolic link, which is not followed for this file; refused")]
    Symlink { path: PathBuf, link: PathBuf },
    #[error("{path}: more than {MAX_LINKS} symbolic links; refused")]
    TooManyLinks { path: PathBuf },
    #[error("{path}: {at} is not a directory")]
    NotADirectory { path: PathBuf, at: PathBuf },
    #[error("{path}: owned by uid {uid}, not by root or the daemon (uid {euid}); refused")]
    Owner { path: PathBuf, uid: u32, euid: u32 },
    #[error("{path}: is a {found}, expected {expected}; refused")]
    Type {
        path: PathBuf,
        found: &'static str,
        expected: String,
    },
    #[error(
        "{path}: a regular file with {links} hard links, opened for writing: another name may \
         belong to a file the daemon must not change (a link planted in a sticky directory); \
         refused"
    )]
    HardLinked { path: PathBuf, links: u64 },
    #[error("{path}: mode {mode:04o}, but {rule} (bits {bits:04o} set); refused")]
    Mode {
        path: PathBuf,
        mode: u32,
        bits: u32,
        rule: &'static str,
    },
}

impl PathError {
    /// The errno behind an I/O failure (e.g. `EEXIST` for `O_EXCL`), if that is the cause.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            PathError::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

fn type_name(mode: u32) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFREG => "regular file",
        libc::S_IFDIR => "directory",
        libc::S_IFBLK => "block device",
        libc::S_IFCHR => "character device",
        libc::S_IFIFO => "FIFO",
        libc::S_IFSOCK => "socket",
        libc::S_IFLNK => "symbolic link",
        _ => "file of unknown type",
    }
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: an all-zero stat is a valid value to be overwritten.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid out-pointer for the call's duration.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

fn openat(dir: RawFd, name: &OsStr, flags: libc::c_int, mode: libc::mode_t) -> io::Result<OwnedFd> {
    let c =
        CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `c` is NUL-terminated and outlives the call; `dir` is an open descriptor or
    // AT_FDCWD is not used (callers pass descriptors they own).
    let fd = unsafe { libc::openat(dir, c.as_ptr(), flags, libc::c_uint::from(mode)) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by openat and is owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn readlink(fd: RawFd) -> io::Result<PathBuf> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: an empty path with an O_PATH|O_NOFOLLOW descriptor of a link reads that link
    // (Linux >= 2.6.39); `buf` is writable for its length.
    let n = unsafe { libc::readlinkat(fd, c"".as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(PathBuf::from(OsString::from(std::ffi::OsStr::from_bytes(
        &buf,
    ))))
}

/// May a directory with this `stat` hold entries we rely on?
fn dir_trusted(st: &libc::stat, euid: u32) -> bool {
    let owner_ok = st.st_uid == 0 || st.st_uid == euid;
    let shared_write = st.st_mode & 0o022 != 0;
    let sticky = st.st_mode & libc::S_ISVTX != 0;
    owner_ok && (!shared_write || sticky)
}

fn push_components(pending: &mut VecDeque<OsString>, path: &Path) {
    // Prepended in order, so the link target's components come before what followed it.
    let comps: Vec<OsString> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect();
    for c in comps.into_iter().rev() {
        pending.push_front(c);
    }
}

/// Reads a small regular file the daemon trusts (its config, credentials): opened as
/// [`open`] does, following only root's or the daemon's links, refused if any of
/// `forbidden_mode`'s bits is set (`0o022`: nobody else may change it; `0o077`: a secret,
/// nobody else may read it either) or if it is over `max_bytes`.
pub fn read_regular(
    path: &Path,
    forbidden_mode: u32,
    max_bytes: u64,
) -> Result<Vec<u8>, PathError> {
    use std::io::Read;
    let spec = OpenSpec {
        flags: libc::O_RDONLY,
        create_mode: 0,
        kinds: &[Kind::Regular],
        forbidden_mode,
        follow_final_link: true,
    };
    let opened = open(path, &spec)?;
    let io_err = |source| PathError::Io {
        path: path.to_path_buf(),
        op: "read",
        at: opened.resolved.clone(),
        source,
    };
    let mut bytes = Vec::new();
    (&opened.file)
        .take(max_bytes.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io_err)?;
    if bytes.len() as u64 > max_bytes {
        return Err(io_err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {max_bytes} bytes"),
        )));
    }
    Ok(bytes)
}

/// Opens `path` as described in the module documentation and checks the result against
/// `spec`. A relative path is taken from the current directory (as `getcwd` names it) and
/// resolved from `/` like any other.
pub fn open(path: &Path, spec: &OpenSpec) -> Result<Opened, PathError> {
    let euid = euid();
    let shown = path.to_path_buf();
    let io_err = |op: &'static str, at: &Path, source: io::Error| PathError::Io {
        path: shown.clone(),
        op,
        at: at.to_path_buf(),
        source,
    };
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| io_err("getcwd", Path::new("."), e))?
            .join(path)
    };
    let dir_flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC;
    let open_root = || -> Result<(OwnedFd, libc::stat), PathError> {
        let root = openat(libc::AT_FDCWD, OsStr::new("/"), dir_flags, 0)
            .map_err(|e| io_err("open", Path::new("/"), e))?;
        let st = fstat(root.as_raw_fd()).map_err(|e| io_err("fstat", Path::new("/"), e))?;
        Ok((root, st))
    };
    let check_dir = |st: &libc::stat, at: &Path| -> Result<(), PathError> {
        if dir_trusted(st, euid) {
            Ok(())
        } else {
            Err(PathError::UntrustedDirectory {
                path: shown.clone(),
                dir: at.to_path_buf(),
                uid: st.st_uid,
                mode: st.st_mode & 0o7777,
                euid,
            })
        }
    };
    let (mut dir, st) = open_root()?;
    let mut at = PathBuf::from("/");
    check_dir(&st, &at)?;
    let mut pending = VecDeque::new();
    push_components(&mut pending, &abs);
    if pending.is_empty() {
        return Err(io_err(
            "open",
            &at,
            io::Error::from_raw_os_error(libc::EISDIR),
        ));
    }
    let mut links = 0u32;
    while let Some(name) = pending.pop_front() {
        let last = pending.is_empty();
        let here = at.join(&name);
        if name == ".." {
            let parent = openat(dir.as_raw_fd(), &name, dir_flags | libc::O_NOFOLLOW, 0)
                .map_err(|e| io_err("open", &here, e))?;
            let st = fstat(parent.as_raw_fd()).map_err(|e| io_err("fstat", &here, e))?;
            at.pop();
            check_dir(&st, &at)?;
            dir = parent;
            if last {
                return Err(io_err(
                    "open",
                    &at,
                    io::Error::from_raw_os_error(libc::EISDIR),
                ));
            }
            continue;
        }
        // Looked at without opening first (O_PATH): a link is decided below before any
        // open with the caller's flags could act on it (or the kernel's protected_symlinks
        // refuse it with a bare EACCES).
        let fd = match openat(
            dir.as_raw_fd(),
            &name,
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0,
        ) {
            Ok(fd) => fd,
            Err(e) if last && e.raw_os_error() == Some(libc::ENOENT) => {
                return open_final(&dir, &name, here, &shown, spec, euid);
            }
            Err(e) => return Err(io_err("open", &here, e)),
        };
        let st = fstat(fd.as_raw_fd()).map_err(|e| io_err("fstat", &here, e))?;
        match st.st_mode & libc::S_IFMT {
            libc::S_IFLNK => {
                if last && !spec.follow_final_link {
                    return Err(PathError::Symlink {
                        path: shown.clone(),
                        link: here,
                    });
                }
                if st.st_uid != 0 && st.st_uid != euid {
                    return Err(PathError::UntrustedSymlink {
                        path: shown.clone(),
                        link: here,
                        uid: st.st_uid,
                        euid,
                    });
                }
                links += 1;
                if links > MAX_LINKS {
                    return Err(PathError::TooManyLinks {
                        path: shown.clone(),
                    });
                }
                let target = readlink(fd.as_raw_fd()).map_err(|e| io_err("readlink", &here, e))?;
                if target.is_absolute() {
                    let (root, st) = open_root()?;
                    check_dir(&st, Path::new("/"))?;
                    dir = root;
                    at = PathBuf::from("/");
                }
                push_components(&mut pending, &target);
                if pending.is_empty() {
                    return Err(io_err(
                        "open",
                        &here,
                        io::Error::from_raw_os_error(libc::EISDIR),
                    ));
                }
            }
            libc::S_IFDIR if !last => {
                check_dir(&st, &here)?;
                dir = fd;
                at = here;
            }
            _ if !last => {
                return Err(PathError::NotADirectory {
                    path: shown.clone(),
                    at: here,
                });
            }
            // The final object, not a link: its type is checked before an open with the
            // caller's flags (opening a device or FIFO can act on it), then it is opened
            // (never following) and checked again on that descriptor.
            _ => {
                check_kind(&st, spec, &shown)?;
                return open_final(&dir, &name, here, &shown, spec, euid);
            }
        }
    }
    // Only reached when the last link target ended in `..`.
    Err(io_err(
        "open",
        &at,
        io::Error::from_raw_os_error(libc::EISDIR),
    ))
}

fn check_kind(st: &libc::stat, spec: &OpenSpec, shown: &Path) -> Result<(), PathError> {
    if spec.kinds.iter().any(|k| k.matches(st.st_mode)) {
        return Ok(());
    }
    let expected = spec
        .kinds
        .iter()
        .map(|k| match k {
            Kind::Regular => "regular file",
            Kind::BlockDevice => "block device",
        })
        .collect::<Vec<_>>()
        .join(" or ");
    Err(PathError::Type {
        path: shown.to_path_buf(),
        found: type_name(st.st_mode),
        expected,
    })
}

/// Opens the last component relative to its checked directory with the caller's flags plus
/// `O_NOFOLLOW | O_CLOEXEC` (a link swapped in since it was looked at fails with ELOOP), then
/// checks type, owner and mode on that descriptor.
fn open_final(
    dir: &OwnedFd,
    name: &OsStr,
    resolved: PathBuf,
    shown: &Path,
    spec: &OpenSpec,
    euid: u32,
) -> Result<Opened, PathError> {
    let flags = spec.flags | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    let fd =
        openat(dir.as_raw_fd(), name, flags, spec.create_mode).map_err(|source| PathError::Io {
            path: shown.to_path_buf(),
            op: "open",
            at: resolved.clone(),
            source,
        })?;
    let stat = fstat(fd.as_raw_fd()).map_err(|source| PathError::Io {
        path: shown.to_path_buf(),
        op: "fstat",
        at: resolved.clone(),
        source,
    })?;
    check_kind(&stat, spec, shown)?;
    if stat.st_uid != 0 && stat.st_uid != euid {
        return Err(PathError::Owner {
            path: shown.to_path_buf(),
            uid: stat.st_uid,
            euid,
        });
    }
    // The owner and mode checks pass a hard link to any root-owned file: one planted at
    // the path (in a sticky directory, with fs.protected_hardlinks off) would have that
    // file grown, zeroed and overwritten.
    let writes = spec.flags & libc::O_ACCMODE != libc::O_RDONLY;
    if writes && stat.st_mode & libc::S_IFMT == libc::S_IFREG && stat.st_nlink != 1 {
        return Err(PathError::HardLinked {
            path: shown.to_path_buf(),
            links: stat.st_nlink as u64,
        });
    }
    let bits = stat.st_mode & spec.forbidden_mode;
    if bits != 0 {
        return Err(PathError::Mode {
            path: shown.to_path_buf(),
            mode: stat.st_mode & 0o7777,
            bits,
            rule: match spec.forbidden_mode {
                0o077 => "group and other must have no access (it holds secrets)",
                0o022 => "group and other must not be able to write it",
                _ => "some permission bits must be clear",
            },
        });
    }
    let dir = dir.try_clone().map_err(|source| PathError::Io {
        path: shown.to_path_buf(),
        op: "dup",
        at: resolved.clone(),
        source,
    })?;
    Ok(Opened {
        file: File::from(fd),
        stat,
        resolved,
        dir,
    })
}

#[cfg(test)]
pub(crate) mod tests;
