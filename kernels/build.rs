//! Compiles the kernel sources (`cuda/*.cu`) for the CPU through the host shim, so the
//! host backend runs the very text that NVRTC compiles for the GPU.

fn main() {
    let manifest =
        std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let cuda = manifest.join("cuda");
    let shim = manifest.join("shim");
    let ffi_include = manifest.join("../ffi/include");
    cc::Build::new()
        .cpp(true)
        .file(shim.join("host_launch.cpp"))
        .include(&cuda)
        .include(&shim)
        .include(&ffi_include)
        .std("c++17")
        // Kernels run as the daemon's data plane even in debug builds: always optimise.
        .opt_level(3)
        .flag_if_supported("-fno-exceptions")
        .flag_if_supported("-fno-rtti")
        .flag_if_supported("-Wno-unused-parameter")
        .warnings(true)
        .compile("kvplane_kernels_host");
    for dir in [&cuda, &shim] {
        println!("cargo:rerun-if-changed={}", dir.display());
    }
    println!(
        "cargo:rerun-if-changed={}",
        ffi_include.join("kvplane.h").display()
    );
}
