use super::*;
use std::ffi::CStr;
use std::os::unix::fs::PermissionsExt;

/// The unprivileged uid (and gid) the tests act as: `nobody` on Debian.
pub(crate) const OTHER_UID: u32 = 65534;

/// Tests that act as another real uid need root; without it they fail (never pass).
pub(crate) fn require_root() {
    assert_eq!(
        euid(),
        0,
        "this test acts as a real other uid ({OTHER_UID}) and needs root (CI runs as root)"
    );
}

/// Runs `f` in a forked child whose real, effective and saved uid and gid are `OTHER_UID`
/// (no supplementary groups) and returns its exit status, or -1 when setting the ids
/// failed. `f` must only make system calls (no allocation: the child of a multithreaded
/// test process may not take locks another thread held).
pub(crate) fn as_other_user(f: &dyn Fn() -> i32) -> i32 {
    // SAFETY: fork has no memory preconditions; the child only makes system calls (see
    // above) and leaves with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
    if pid == 0 {
        // SAFETY: integer arguments (and a null list of length 0); async-signal-safe.
        let dropped = unsafe {
            libc::setgroups(0, std::ptr::null()) == 0
                && libc::setresgid(OTHER_UID, OTHER_UID, OTHER_UID) == 0
                && libc::setresuid(OTHER_UID, OTHER_UID, OTHER_UID) == 0
        };
        let code = if dropped { f() } else { 255 };
        // SAFETY: ends the child without running the parent's atexit handlers or unwinding.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: `status` is a valid out-pointer; `pid` is our child.
    let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(rc, pid, "waitpid: {}", io::Error::last_os_error());
    assert!(
        libc::WIFEXITED(status),
        "child ended by a signal: {status:#x}"
    );
    match libc::WEXITSTATUS(status) {
        255 => -1,
        code => code,
    }
}

fn errno() -> i32 {
    // SAFETY: __errno_location returns this thread's errno slot.
    unsafe { *libc::__errno_location() }
}

/// `open(path, O_RDONLY)` as `OTHER_UID`: 0 when it opened, else the errno.
pub(crate) fn other_user_open_errno(path: &Path) -> i32 {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let c: &CStr = &c;
    as_other_user(&|| {
        // SAFETY: `c` is NUL-terminated and outlives the child.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
        if fd >= 0 { 0 } else { errno() }
    })
}

/// Creates `link -> target` as `OTHER_UID` (what a local user does to attack a path).
pub(crate) fn other_user_symlink(target: &Path, link: &Path) {
    let t = CString::new(target.as_os_str().as_bytes()).unwrap();
    let l = CString::new(link.as_os_str().as_bytes()).unwrap();
    let (t, l): (&CStr, &CStr) = (&t, &l);
    let code = as_other_user(&|| {
        // SAFETY: both strings are NUL-terminated and outlive the child.
        if unsafe { libc::symlink(t.as_ptr(), l.as_ptr()) } == 0 {
            0
        } else {
            errno()
        }
    });
    assert_eq!(code, 0, "symlink as uid {OTHER_UID} failed (errno {code})");
    let st = std::fs::symlink_metadata(link).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&st), OTHER_UID);
}

/// A directory where anyone may add names but only owners remove them, like /tmp.
pub(crate) fn sticky_dir(parent: &Path, name: &str) -> PathBuf {
    let d = parent.join(name);
    std::fs::create_dir(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o1777)).unwrap();
    d
}

pub(crate) fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

pub(crate) fn chown(p: &Path, uid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(uid)).unwrap();
}

const SECRET_RW: OpenSpec = OpenSpec {
    flags: libc::O_RDWR | libc::O_CREAT,
    create_mode: 0o600,
    kinds: &[Kind::Regular],
    forbidden_mode: 0o077,
    follow_final_link: true,
};

#[test]
fn creates_0600_and_reopens_its_own_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f");
    let o = open(&p, &SECRET_RW).unwrap();
    assert_eq!(o.stat.st_mode & 0o7777, 0o600);
    assert_eq!(o.resolved, p);
    let o = open(&p, &SECRET_RW).unwrap();
    assert_eq!(o.stat.st_uid, euid());
}

/// A hard link at the path to a file of the right owner and mode (planted in a sticky
/// directory where fs.protected_hardlinks is off) passes every other check: opened to be
/// written, it is refused and its target untouched; read-only opens are not affected.
#[test]
fn refuses_a_hard_linked_file_for_writing() {
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("ssh_host_key");
    std::fs::write(&victim, b"secret").unwrap();
    chmod(&victim, 0o600);
    let sticky = sticky_dir(dir.path(), "tmp");
    let planted = sticky.join("nvme.kvp");
    std::fs::hard_link(&victim, &planted).unwrap();
    let e = open(&planted, &SECRET_RW).unwrap_err();
    assert!(matches!(e, PathError::HardLinked { links: 2, .. }), "{e}");
    assert!(e.to_string().contains("2 hard links"), "{e}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"secret");
    let read_only = OpenSpec {
        flags: libc::O_RDONLY,
        ..SECRET_RW
    };
    open(&planted, &read_only).expect("read-only opens of a linked file are not refused");
}

#[test]
fn refuses_group_or_other_bits_and_the_wrong_type() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f");
    std::fs::write(&p, b"x").unwrap();
    chmod(&p, 0o640);
    let e = open(&p, &SECRET_RW).unwrap_err();
    assert!(
        matches!(
            e,
            PathError::Mode {
                mode: 0o640,
                bits: 0o040,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains(&p.display().to_string()), "{e}");
    let e = open(dir.path(), &SECRET_RW).unwrap_err();
    assert!(
        matches!(
            e,
            PathError::Type {
                found: "directory",
                ..
            }
        ),
        "{e}"
    );
    let fifo = dir.path().join("fifo");
    let c = CString::new(fifo.as_os_str().as_bytes()).unwrap();
    // SAFETY: NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let spec = OpenSpec {
        flags: libc::O_RDONLY | libc::O_NONBLOCK,
        ..SECRET_RW
    };
    let e = open(&fifo, &spec).unwrap_err();
    assert!(matches!(e, PathError::Type { found: "FIFO", .. }), "{e}");
}

#[test]
fn refuses_a_file_owned_by_another_user() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f");
    std::fs::write(&p, b"x").unwrap();
    chmod(&p, 0o600);
    chown(&p, OTHER_UID);
    let e = open(&p, &SECRET_RW).unwrap_err();
    assert!(matches!(e, PathError::Owner { uid: OTHER_UID, .. }), "{e}");
}

#[test]
fn refuses_a_link_another_user_planted_and_leaves_its_target_alone() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    chmod(dir.path(), 0o755); // the other user must reach the shared directory
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"root's file").unwrap();
    chmod(&victim, 0o600);
    let shared = sticky_dir(dir.path(), "shared");
    let link = shared.join("tier.kvp");
    other_user_symlink(&victim, &link);
    let spec = OpenSpec {
        flags: libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC,
        ..SECRET_RW
    };
    let e = open(&link, &spec).unwrap_err();
    assert!(
        matches!(&e, PathError::UntrustedSymlink { uid: OTHER_UID, link: l, .. } if *l == link),
        "{e}"
    );
    assert_eq!(std::fs::read(&victim).unwrap(), b"root's file");
    // The same link as a directory on the way is refused too.
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let dirlink = shared.join("dir");
    other_user_symlink(&sub, &dirlink);
    let e = open(&dirlink.join("f"), &SECRET_RW).unwrap_err();
    assert!(matches!(e, PathError::UntrustedSymlink { .. }), "{e}");
    assert!(!sub.join("f").exists());
}

#[test]
fn refuses_a_path_through_a_directory_another_user_can_change() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let open_dir = dir.path().join("open");
    std::fs::create_dir(&open_dir).unwrap();
    std::fs::create_dir(open_dir.join("inner")).unwrap();
    chmod(&open_dir, 0o777); // writable by all, not sticky: entries can be swapped
    let e = open(&open_dir.join("inner").join("f"), &SECRET_RW).unwrap_err();
    assert!(
        matches!(&e, PathError::UntrustedDirectory { dir: d, mode: 0o777, .. } if *d == open_dir),
        "{e}"
    );
    let theirs = dir.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    chown(&theirs, OTHER_UID);
    let e = open(&theirs.join("f"), &SECRET_RW).unwrap_err();
    assert!(
        matches!(e, PathError::UntrustedDirectory { uid: OTHER_UID, .. }),
        "{e}"
    );
    assert!(!theirs.join("f").exists(), "nothing created there");
    // A sticky shared directory is fine for our own file (others cannot replace it).
    let shared = sticky_dir(dir.path(), "shared");
    open(&shared.join("f"), &SECRET_RW).unwrap();
}

#[test]
fn follows_root_links_in_trusted_directories_but_not_when_told_not_to() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real");
    std::fs::create_dir(&real).unwrap();
    // As udev does (/dev/disk/by-id/x -> ../../nvme1n1: relative, through `..`), and a
    // link to a directory.
    let by_id = dir.path().join("by-id");
    std::fs::create_dir(&by_id).unwrap();
    std::os::unix::fs::symlink("../real/f", by_id.join("x")).unwrap();
    std::os::unix::fs::symlink(&real, dir.path().join("alias")).unwrap();
    let o = open(&by_id.join("x"), &SECRET_RW).unwrap();
    assert_eq!(o.resolved, real.join("f"));
    assert!(real.join("f").exists());
    let o = open(&dir.path().join("alias").join("f"), &SECRET_RW).unwrap();
    assert_eq!(o.resolved, real.join("f"));
    let strict = OpenSpec {
        follow_final_link: false,
        ..SECRET_RW
    };
    let e = open(&by_id.join("x"), &strict).unwrap_err();
    assert!(matches!(e, PathError::Symlink { .. }), "{e}");
    // A loop ends with an error, not a hang.
    std::os::unix::fs::symlink("loop", dir.path().join("loop")).unwrap();
    let e = open(&dir.path().join("loop"), &SECRET_RW).unwrap_err();
    assert!(matches!(e, PathError::TooManyLinks { .. }), "{e}");
}

#[test]
fn read_regular_reads_whole_small_files_and_refuses_large_or_readable_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("secret");
    std::fs::write(&p, b"0123456789").unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(read_regular(&p, 0o077, 10).unwrap(), b"0123456789");
    // One byte over the limit.
    let e = read_regular(&p, 0o077, 9).unwrap_err();
    assert!(e.to_string().contains("larger than 9 bytes"), "{e}");
    // A secret others may read.
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(matches!(
        read_regular(&p, 0o077, 10),
        Err(PathError::Mode { mode: 0o644, .. })
    ));
    // The same file as a public one (nobody else may write it) is fine.
    assert_eq!(read_regular(&p, 0o022, 10).unwrap().len(), 10);
}
