// Shared by each crate's `tests/fuzz_regressions.rs` (`include!`d, so the crates need no
// common test dependency): checks that the checked-in seed corpus is what the generators
// produce, then replays the corpus and every saved crash through the target's property.
//
// Regenerate the seeds after changing an encoder or a generator with
// `KVPLANE_BLESS=1 cargo test -p <crate> --test fuzz_regressions`.

/// A fuzz target as the replay sees it: its name (the directory under `fuzz/corpus/` and
/// `fuzz/regressions/`), its property check (panics when the property fails; returns
/// whether the input got past the parser) and its seed generator.
struct ReplayTarget {
    name: &'static str,
    check: fn(&[u8]) -> bool,
    seeds: fn() -> Vec<(String, Vec<u8>)>,
}

fn fuzz_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn files_in(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<_> = entries
        .map(|e| e.expect("readable directory entry").path())
        .filter(|p| p.is_file() && p.file_name().is_none_or(|n| n != "README.md"))
        .collect();
    files.sort();
    files
}

/// Seeds are files named `seed-*`; anything else in the corpus directory (an input worth
/// keeping that a fuzzer found) is replayed but not managed.
fn check_seed_corpus(t: &ReplayTarget) {
    let dir = fuzz_dir().join("corpus").join(t.name);
    let seeds = (t.seeds)();
    assert!(!seeds.is_empty(), "{}: no seeds", t.name);
    let is_seed = |p: &std::path::Path| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("seed-"))
    };
    if std::env::var_os("KVPLANE_BLESS").is_some_and(|v| v == "1") {
        std::fs::create_dir_all(&dir).expect("create corpus directory");
        for old in files_in(&dir).into_iter().filter(|p| is_seed(p)) {
            std::fs::remove_file(old).expect("remove old seed");
        }
        for (name, bytes) in &seeds {
            std::fs::write(dir.join(name), bytes).expect("write seed");
        }
        return;
    }
    let hint = concat!(
        "regenerate with KVPLANE_BLESS=1 cargo test -p ",
        env!("CARGO_PKG_NAME"),
        " --test fuzz_regressions"
    );
    for (name, bytes) in &seeds {
        assert!(
            name.starts_with("seed-"),
            "{name}: seed names start with seed-"
        );
        let path = dir.join(name);
        let on_disk =
            std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}; {hint}", path.display()));
        assert!(
            &on_disk == bytes,
            "{} differs from its generator; {hint}",
            path.display()
        );
    }
    let stale: Vec<_> = files_in(&dir)
        .into_iter()
        .filter(|p| is_seed(p) && !seeds.iter().any(|(n, _)| p.ends_with(n)))
        .collect();
    assert!(stale.is_empty(), "stale seeds {stale:?}; {hint}");
}

/// Every file of the corpus and of the saved regressions through the property; returns
/// (inputs replayed, inputs accepted).
fn replay(t: &ReplayTarget) -> (usize, usize) {
    let mut replayed = 0;
    let mut accepted = 0;
    for sub in ["corpus", "regressions"] {
        for path in files_in(&fuzz_dir().join(sub).join(t.name)) {
            let bytes = std::fs::read(&path).expect("readable input");
            let outcome = std::panic::catch_unwind(|| (t.check)(&bytes));
            let Ok(ok) = outcome else {
                panic!("{}: {} fails the property", t.name, path.display());
            };
            replayed += 1;
            accepted += usize::from(ok);
        }
    }
    (replayed, accepted)
}

fn run_replay(targets: &[ReplayTarget]) {
    for t in targets {
        check_seed_corpus(t);
        let (replayed, accepted) = replay(t);
        // The seeds must reach the accepting paths, or the property is checked vacuously.
        assert!(
            accepted > 0,
            "{}: none of {replayed} inputs accepted",
            t.name
        );
    }
}
