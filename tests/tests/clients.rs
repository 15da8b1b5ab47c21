//! The C and Python clients talking to a real `kvplane serve`.

use std::process::Command;

use kvplane_tests::{DaemonProc, lib_dir, repo_root, temp_dir};

#[test]
fn c_client_including_only_the_header_talks_to_the_daemon() {
    let dir = temp_dir("c");
    let daemon = DaemonProc::start(dir.path(), &[]);
    let root = repo_root();
    let exe = dir.path().join("client");
    // Link the static library: the program then needs nothing at run time.
    let lib = lib_dir().join("libkvplane.a");
    let out = Command::new("cc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-O1", "-I"])
        .arg(root.join("ffi/include"))
        .arg(root.join("ffi/examples/client.c"))
        .arg(&lib)
        .args(["-lpthread", "-ldl", "-lm", "-o"])
        .arg(&exe)
        .output()
        .expect("run cc");
    assert!(
        out.status.success(),
        "cc failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(&exe).arg(&daemon.socket).output().unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "C client failed: {stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        stdout.contains("nops_ok=16 stats_ok=1 bad_opcode=1"),
        "{stdout}"
    );
    assert!(stdout.contains("backend=host"), "{stdout}");
}

#[test]
fn c_header_compiles_as_cpp() {
    let dir = temp_dir("cpp");
    let src = dir.path().join("t.cpp");
    std::fs::write(&src, "#include \"kvplane.h\"\nint main() { kvp_sqe s{}; return (int)s.opcode + (int)sizeof(kvp_kv_layout) % 1; }\n").unwrap();
    let out = Command::new("c++")
        .args(["-std=c++17", "-Wall", "-Werror", "-fsyntax-only", "-I"])
        .arg(repo_root().join("ffi/include"))
        .arg(&src)
        .output()
        .expect("run c++");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn python_client_attaches_submits_a_batch_and_reads_completions() {
    let dir = temp_dir("py");
    let daemon = DaemonProc::start(dir.path(), &[]);
    let root = repo_root();
    let run = Command::new("python3")
        .arg(root.join("ffi/python/examples/attach_batch.py"))
        .arg(&daemon.socket)
        .env("KVPLANE_LIB", lib_dir().join("libkvplane.so"))
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "python example failed: {stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        stdout.contains("nops_ok=32 stats=ok bad_opcode=bad opcode"),
        "{stdout}"
    );
}

#[test]
fn python_mirror_detects_abi_drift() {
    // check_abi must fail when a mirror is wrong: shrink Sqe in a copy and expect an error.
    let code = r#"
import sys, ctypes
sys.path.insert(0, sys.argv[1])
import kvplane
lib = kvplane.load()
kvplane.check_abi(lib)
class Bad(ctypes.Structure):
    _fields_ = kvplane.Sqe._fields_[:-1]
kvplane._MIRRORS["kvp_sqe"] = Bad
try:
    kvplane.check_abi(lib)
except kvplane.KvplaneError as e:
    print("drift detected:", e)
    sys.exit(0)
sys.exit(1)
"#;
    let run = Command::new("python3")
        .arg("-c")
        .arg(code)
        .arg(repo_root().join("ffi/python"))
        .env("KVPLANE_LIB", lib_dir().join("libkvplane.so"))
        .output()
        .expect("run python3");
    assert!(
        run.status.success(),
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
}
