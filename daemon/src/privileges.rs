//! Dropping privileges after set-up (Firecracker's jailer does the same before running
//! guest code). The daemon needs root or capabilities only to start: CAP_IPC_LOCK to lock
//! the host pool, access to NVMe devices and hugepages, a socket in /run. Once those are
//! open it serves untrusted engines with none of it: a bug in the data plane then cannot
//! be turned into more than the daemon's open files and memory.
//!
//! Order matters: the bounding set needs CAP_SETPCAP to shrink, a uid change needs
//! CAP_SETUID, so capabilities go last. `capset` acts on the calling thread only, so this
//! runs before the daemon starts its long-lived threads (they inherit the empty sets).

use std::io;

/// What to drop (from `[serve]`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropPlan {
    pub run_as_uid: Option<u32>,
    pub run_as_gid: Option<u32>,
}

/// What the process holds after [`drop_privileges`] (read back from the kernel).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Privileges {
    pub uid: u32,
    pub gid: u32,
    /// Effective, permitted, inheritable and bounding capability sets, as bit masks.
    pub cap_effective: u64,
    pub cap_permitted: u64,
    pub cap_inheritable: u64,
    pub cap_bounding: u64,
    pub no_new_privs: bool,
    pub dumpable: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("dropping privileges: {op}: {source}")]
    Syscall {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("dropping privileges: reading {path}: {source}")]
    Status {
        path: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("dropping privileges: {what} still set after the drop ({value:#x})")]
    StillHeld { what: &'static str, value: u64 },
}

fn check(op: &'static str, rc: libc::c_int) -> Result<(), PrivilegeError> {
    if rc == 0 {
        Ok(())
    } else {
        Err(PrivilegeError::Syscall {
            op,
            source: io::Error::last_os_error(),
        })
    }
}

/// The kernel's capability header and data (linux/capability.h, version 3: two 32-bit
/// words per set).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Gives up the bounding set, then (optionally) switches gid/uid, then clears every
/// capability set, then sets no_new_privs and non-dumpable (a core dump or a ptrace by
/// the same uid would expose KV blocks, which are user prompts). Verifies the result.
pub fn drop_privileges(plan: DropPlan) -> Result<Privileges, PrivilegeError> {
    // The bounding set limits what any later exec could regain. Shrinking it needs
    // CAP_SETPCAP; an unprivileged daemon has nothing to drop (EPERM is expected there).
    for cap in 0..=63 {
        // SAFETY: prctl with integer arguments only; no memory is passed.
        let held = unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap as libc::c_ulong, 0, 0, 0) };
        if held <= 0 {
            continue; // not held, or past the kernel's last capability
        }
        // SAFETY: as above.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EPERM) {
                return Err(PrivilegeError::Syscall {
                    op: "prctl(PR_CAPBSET_DROP)",
                    source: e,
                });
            }
        }
    }
    if let Some(gid) = plan.run_as_gid.or(plan.run_as_uid.map(|_| u32::MAX)) {
        // With only a uid given, keep the current gid but still clear supplementary groups.
        let gid = if gid == u32::MAX {
            // SAFETY: getegid has no preconditions.
            unsafe { libc::getegid() }
        } else {
            gid
        };
        // SAFETY: an empty group list (null pointer with length 0) is valid.
        check("setgroups([])", unsafe {
            libc::setgroups(0, std::ptr::null())
        })?;
        // SAFETY: integer arguments only. glibc applies it to every thread.
        check("setresgid", unsafe { libc::setresgid(gid, gid, gid) })?;
    }
    if let Some(uid) = plan.run_as_uid {
        // SAFETY: integer arguments only. glibc applies it to every thread.
        check("setresuid", unsafe { libc::setresuid(uid, uid, uid) })?;
    }
    let header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: header and data are the kernel's v3 layout (one header, two data words),
    // live for the call; the kernel only reads them.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr()) };
    check("capset(all empty)", rc as libc::c_int)?;
    // SAFETY: prctl with integer arguments only.
    check("prctl(PR_SET_NO_NEW_PRIVS)", unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    })?;
    // SAFETY: as above.
    check("prctl(PR_SET_DUMPABLE, 0)", unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0)
    })?;
    let now = current()?;
    for (what, value) in [
        ("effective capabilities", now.cap_effective),
        ("permitted capabilities", now.cap_permitted),
        ("inheritable capabilities", now.cap_inheritable),
    ] {
        if value != 0 {
            return Err(PrivilegeError::StillHeld { what, value });
        }
    }
    if let Some(uid) = plan.run_as_uid
        && now.uid != uid
    {
        return Err(PrivilegeError::StillHeld {
            what: "uid",
            value: u64::from(now.uid),
        });
    }
    Ok(now)
}

/// The calling thread's credentials, from /proc/thread-self/status.
pub fn current() -> Result<Privileges, PrivilegeError> {
    const PATH: &str = "/proc/thread-self/status";
    let text = std::fs::read_to_string(PATH)
        .map_err(|source| PrivilegeError::Status { path: PATH, source })?;
    let mut p = parse_status(&text);
    // SAFETY: prctl(PR_GET_DUMPABLE) takes no memory arguments.
    p.dumpable = unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) } == 1;
    Ok(p)
}

/// Parses the credential lines of a /proc status file (missing lines read as 0), e.g. of
/// another process, as tests and `kvplane status` do.
pub fn parse_status(text: &str) -> Privileges {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or("")
    };
    let hex = |name: &str| u64::from_str_radix(field(name), 16).unwrap_or(0);
    let first = |name: &str| {
        field(name)
            .split_whitespace()
            .nth(1) // effective id (real, effective, saved, fs)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Privileges {
        uid: first("Uid:"),
        gid: first("Gid:"),
        cap_effective: hex("CapEff:"),
        cap_permitted: hex("CapPrm:"),
        cap_inheritable: hex("CapInh:"),
        cap_bounding: hex("CapBnd:"),
        no_new_privs: field("NoNewPrivs:") == "1",
        dumpable: false, // not in the status file; `current` asks the kernel
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_status_credentials() {
        let text = "Name:\tkvplane\nUid:\t0\t990\t990\t990\nGid:\t0\t991\t991\t991\n\
                    CapInh:\t0000000000000000\nCapPrm:\t0000000000000000\n\
                    CapEff:\t0000000000000000\nCapBnd:\t000001ffffffffff\nNoNewPrivs:\t1\n";
        let p = parse_status(text);
        assert_eq!((p.uid, p.gid), (990, 991));
        assert_eq!((p.cap_effective, p.cap_permitted), (0, 0));
        assert_eq!(p.cap_bounding, 0x1ff_ffff_ffff);
        assert!(p.no_new_privs);
    }
}
