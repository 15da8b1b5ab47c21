//! The kernel sources as text, for NVRTC. [`flattened`] inlines the two local headers
//! (`kvp_compat.h`, `kvplane.h`) so a program compiles with no include path, which is
//! how the cuda backend compiles them at start-up on a machine without the repository.

/// `ffi/include/kvplane.h`, the ABI header the kernels take their structs from.
pub const KVPLANE_H: &str = include_str!("../../ffi/include/kvplane.h");
/// `kernels/cuda/kvp_compat.h`.
pub const KVP_COMPAT_H: &str = include_str!("../cuda/kvp_compat.h");

/// One `.cu` file and the `extern "C"` kernels it defines.
#[derive(Debug, Clone, Copy)]
pub struct KernelSource {
    /// File name under `kernels/cuda/`.
    pub file: &'static str,
    pub text: &'static str,
    pub kernels: &'static [&'static str],
}

pub const PAGED: KernelSource = KernelSource {
    file: "paged.cu",
    text: include_str!("../cuda/paged.cu"),
    kernels: &["kvp_paged_gather", "kvp_paged_scatter"],
};
pub const COPY: KernelSource = KernelSource {
    file: "copy.cu",
    text: include_str!("../cuda/copy.cu"),
    kernels: &["kvp_copy_batch"],
};
pub const CHECKSUM: KernelSource = KernelSource {
    file: "checksum.cu",
    text: include_str!("../cuda/checksum.cu"),
    kernels: &["kvp_checksum_partial", "kvp_checksum_finalize"],
};

pub const MAC: KernelSource = KernelSource {
    file: "mac.cu",
    text: include_str!("../cuda/mac.cu"),
    kernels: &["kvp_mac_chunks", "kvp_mac_parents"],
};

/// Every kernel source, in a fixed order.
pub const ALL: [KernelSource; 4] = [PAGED, COPY, CHECKSUM, MAC];

/// Repository-relative include directories a `.cu` file needs when compiled in place.
pub const INCLUDE_DIRS: [&str; 2] = ["ffi/include", "kernels/cuda"];

fn inline_includes(text: &str, out: &mut String, depth: u32) {
    for line in text.lines() {
        let trimmed = line.trim_start();
        let header = match trimmed.strip_prefix("#include") {
            Some(rest) => match rest.trim() {
                "\"kvp_compat.h\"" => Some(KVP_COMPAT_H),
                "\"kvplane.h\"" => Some(KVPLANE_H),
                _ => None,
            },
            None => None,
        };
        match header {
            // Headers are include-guarded, so inlining every occurrence is harmless.
            Some(h) if depth < 4 => inline_includes(h, out, depth + 1),
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
}

/// `src` with `#include "kvp_compat.h"` and `#include "kvplane.h"` replaced by their text.
pub fn flattened(src: &KernelSource) -> String {
    let mut out = String::with_capacity(src.text.len() + KVPLANE_H.len() + KVP_COMPAT_H.len());
    inline_includes(src.text, &mut out, 0);
    out
}

/// Hash of everything that determines a kernel's PTX apart from the target: the
/// flattened text (v1 checksum; a cache key, not a security boundary).
pub fn source_hash(src: &KernelSource) -> u64 {
    crate::checksum64(flattened(src).as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flattened_sources_are_self_contained() {
        for src in ALL {
            let flat = flattened(&src);
            for line in flat.lines() {
                let t = line.trim_start();
                if t.starts_with("#include") {
                    // Only the host-shim and libc includes remain, each inside a branch
                    // NVRTC does not take.
                    assert!(
                        t.contains("kvp_host_shim.h") || t.contains('<'),
                        "{}: unexpected include left: {t}",
                        src.file
                    );
                }
            }
            assert!(flat.contains("struct kvp_kv_layout {"), "{}", src.file);
            for k in src.kernels {
                assert!(flat.contains(&format!("void {k}(")), "{}: {k}", src.file);
            }
        }
        assert_ne!(source_hash(&PAGED), source_hash(&COPY));
    }
}
