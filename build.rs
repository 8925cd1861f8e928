//! Without the `cuda` feature this does nothing. With it (Cargo sets CARGO_FEATURE_CUDA and
//! compiles this script with `cfg(feature = "cuda")`, which is what makes the optional
//! build-dependencies `cc` and `bindgen` exist), it compiles every `cuda/*.cu` with nvcc
//! into a static library, links the CUDA runtime statically (`cudart_static`, which loads
//! the driver at run time, so the binary starts on machines without one) and generates the
//! Rust bindings of `ffi/rq_cuda.h` into `$OUT_DIR/rq_cuda.rs`.
//!
//! With the `cuda-emu` feature instead, it compiles the same `cuda/*.cu` with the host C++
//! compiler (g++, C++17, `-include cuda/emu/emu.h`, NVIDIA's headers from the toolchain of
//! tools/cuda-toolchain.sh) together with the emulator runtime `cuda/emu/emu.cpp`, its twin of
//! the tensor-core mma `cuda/emu/mma.cpp` and the emulator's self-test kernels
//! `cuda/emu/selftest.cu`, and runs the same bindgen (plus one on
//! `cuda/emu/selftest.h` for tests/cuda_emu.rs). `RQ_EMU_ASAN=1` builds them with
//! AddressSanitizer. The two features are alternatives: enabling both is an error.

#[cfg(all(feature = "cuda", feature = "cuda-emu"))]
compile_error!(
    "features `cuda` (nvcc, real GPU) and `cuda-emu` (g++, host emulator) are alternatives: enable one"
);

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // Set by the emulator build with RQ_EMU_ASAN=1 (tests/cuda_emu.rs checks that ASan fires).
    println!("cargo::rustc-check-cfg=cfg(rq_emu_asan)");
    #[cfg(all(feature = "cuda", not(feature = "cuda-emu")))]
    cuda::build();
    #[cfg(all(feature = "cuda-emu", not(feature = "cuda")))]
    emu::build();
}

/// What both features share: the kernel sources and the bindings of their C ABI.
#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
mod common {
    use std::path::{Path, PathBuf};

    /// Every `*.cu` directly in `dir`, sorted.
    pub fn cu_files(dir: &Path) -> Vec<PathBuf> {
        let mut sources: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
            .map(|entry| entry.expect("reading a cuda/ folder").path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "cu"))
            .collect();
        sources.sort();
        sources
    }

    /// Rust bindings of the `rq_*` functions and types of `header` into `out`.
    pub fn bindings(header: &Path, out: &Path) {
        bindgen::Builder::default()
            .header(header.to_str().expect("UTF-8 path of a header"))
            .allowlist_function("rq_.*")
            .allowlist_type("rq_.*")
            .allowlist_var("RQ_EMU_.*")
            .generate()
            .unwrap_or_else(|_| {
                panic!(
                    "bindgen failed on {} (bindgen needs libclang: run tools/cuda-toolchain.sh)",
                    header.display()
                )
            })
            .write_to_file(out)
            .unwrap_or_else(|e| panic!("writing {}: {e}", out.display()));
    }
}

#[cfg(all(feature = "cuda", not(feature = "cuda-emu")))]
mod cuda {
    use std::env;
    use std::path::{Path, PathBuf};

    /// Real code for Ada (sm_89), Hopper (sm_90a) and Blackwell (sm_100a), plus compute_90 PTX
    /// that the driver compiles for newer GPUs.
    const GENCODE: [&str; 4] = [
        "arch=compute_89,code=sm_89",
        "arch=compute_90a,code=sm_90a",
        "arch=compute_100a,code=sm_100a",
        "arch=compute_90,code=compute_90",
    ];

    /// Where `tools/cuda-toolchain.sh` installs nvcc, relative to the manifest directory.
    const LOCAL_NVCC: &str = ".cuda-toolchain/nvidia/cu13/bin/nvcc";

    pub fn build() {
        let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
        let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
        for var in ["NVCC", "CUDA_HOME"] {
            println!("cargo:rerun-if-env-changed={var}");
        }
        for dir in ["cuda", "ffi"] {
            println!("cargo:rerun-if-changed={}", manifest.join(dir).display());
        }

        let nvcc = find_nvcc(&manifest);
        // cc takes nvcc from $NVCC (`Build::compiler` sets nvcc's host compiler, -ccbin, instead).
        env::set_var("NVCC", &nvcc);

        let sources = super::common::cu_files(&manifest.join("cuda"));

        // One library per file: with several .cu files in one Build, cc compiles them as
        // relocatable device code (--device-c), and the device link keeps only the SASS, which
        // would drop the compute_90 PTX that newer GPUs JIT-compile. Each file is whole-program.
        for source in &sources {
            let stem = source.file_stem().and_then(|s| s.to_str()).expect("UTF-8 name under cuda/");
            let mut build = cc::Build::new();
            // cudart and libstdc++ are linked once, below: cc would emit them per library, and
            // without the search path of the wheels' layout (lib/ beside bin/).
            build.cuda(true).cudart("none").cpp_link_stdlib(None).file(source);
            for gencode in GENCODE {
                build.flag("-gencode").flag(gencode);
            }
            // Each host thread queues on its own default stream (cuda/runtime.cu says why).
            build.flag("-O3").flag("--std=c++17").flag("-cudart").flag("static").flag("--default-stream").flag("per-thread");
            build.compile(&format!("rq_cuda_{stem}"));
        }

        // cudart_static and what it needs; it dlopens libcuda.so.1 itself at first use.
        let lib_dir = cudart_lib_dir(&nvcc);
        println!("cargo:rustc-link-search=native={}", lib_dir.display());
        println!("cargo:rustc-link-lib=static=cudart_static");
        for lib in ["dl", "rt", "pthread", "stdc++"] {
            println!("cargo:rustc-link-lib=dylib={lib}");
        }

        super::common::bindings(&manifest.join("ffi/rq_cuda.h"), &out_dir.join("rq_cuda.rs"));
    }

    /// nvcc from $NVCC, then $CUDA_HOME/bin/nvcc, then the toolchain that
    /// tools/cuda-toolchain.sh installs in the repository, then $PATH.
    fn find_nvcc(manifest: &Path) -> PathBuf {
        if let Some(nvcc) = env::var_os("NVCC") {
            return PathBuf::from(nvcc);
        }
        let candidates = env::var_os("CUDA_HOME")
            .map(|home| PathBuf::from(home).join("bin/nvcc"))
            .into_iter()
            .chain([manifest.join(LOCAL_NVCC)]);
        for nvcc in candidates {
            if nvcc.is_file() {
                return nvcc;
            }
        }
        println!("cargo:rerun-if-env-changed=PATH");
        let on_path = env::var_os("PATH")
            .and_then(|path| env::split_paths(&path).map(|dir| dir.join("nvcc")).find(|p| p.is_file()));
        on_path.unwrap_or_else(|| {
            panic!(
                "feature `cuda`: nvcc not found. Looked at $NVCC, $CUDA_HOME/bin/nvcc, {} and $PATH. \
                 Run tools/cuda-toolchain.sh to install CUDA 13 from PyPI into .cuda-toolchain/, \
                 or set NVCC / CUDA_HOME.",
                manifest.join(LOCAL_NVCC).display()
            )
        })
    }

    /// The directory holding libcudart_static.a next to nvcc: lib/ in NVIDIA's PyPI wheels,
    /// lib64/ or targets/<arch>-linux/lib/ in a toolkit install.
    fn cudart_lib_dir(nvcc: &Path) -> PathBuf {
        let nvcc = std::fs::canonicalize(nvcc).unwrap_or_else(|e| panic!("{}: {e}", nvcc.display()));
        let root = nvcc.parent().and_then(Path::parent).expect("nvcc lies in <cuda>/bin");
        let arch = env::var("CARGO_CFG_TARGET_ARCH").expect("CARGO_CFG_TARGET_ARCH");
        let dirs = [root.join("lib"), root.join("lib64"), root.join(format!("targets/{arch}-linux/lib"))];
        dirs.iter().find(|dir| dir.join("libcudart_static.a").is_file()).cloned().unwrap_or_else(|| {
            panic!(
                "feature `cuda`: libcudart_static.a not found in {} (nvcc is {}); \
                 tools/cuda-toolchain.sh installs it",
                dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", "),
                nvcc.display()
            )
        })
    }
}

#[cfg(all(feature = "cuda-emu", not(feature = "cuda")))]
mod emu {
    use std::env;
    use std::path::PathBuf;

    /// NVIDIA's headers as tools/cuda-toolchain.sh installs them, relative to the manifest.
    const LOCAL_INCLUDE: &str = ".cuda-toolchain/nvidia/cu13/include";

    pub fn build() {
        let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
        let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
        for var in ["CUDA_HOME", "RQ_EMU_ASAN"] {
            println!("cargo:rerun-if-env-changed={var}");
        }
        for dir in ["cuda", "cuda/emu", "ffi"] {
            println!("cargo:rerun-if-changed={}", manifest.join(dir).display());
        }

        // cuda_runtime.h, cuda_fp8.h...: $CUDA_HOME/include, else the repository's toolchain.
        let candidates = env::var_os("CUDA_HOME")
            .map(|home| PathBuf::from(home).join("include"))
            .into_iter()
            .chain([manifest.join(LOCAL_INCLUDE)]);
        let include = candidates.into_iter().find(|dir| dir.join("cuda_fp8.hpp").is_file()).unwrap_or_else(|| {
            panic!(
                "feature `cuda-emu`: NVIDIA's CUDA headers not found in $CUDA_HOME/include or {}. \
                 Run tools/cuda-toolchain.sh (CUDA 13 from PyPI into .cuda-toolchain/), or set CUDA_HOME.",
                manifest.join(LOCAL_INCLUDE).display()
            )
        });

        let emu_dir = manifest.join("cuda/emu");
        let mut build = cc::Build::new();
        build
            .cpp(true)
            .std("c++17")
            // .cu is not a suffix g++ knows; emu.h first, before NVIDIA's headers.
            .flag("-x")
            .flag("c++")
            .flag("-include")
            .flag(emu_dir.join("emu.h").to_str().expect("UTF-8 path of cuda/emu/emu.h"))
            .flag("-isystem")
            .flag(include.to_str().expect("UTF-8 path of the CUDA headers"))
            .flag("-pthread")
            .files(super::common::cu_files(&manifest.join("cuda")))
            .file(emu_dir.join("selftest.cu"))
            .file(emu_dir.join("emu.cpp"))
            .file(emu_dir.join("mma.cpp"));
        let asan = env::var("RQ_EMU_ASAN").is_ok_and(|v| v == "1");
        if asan {
            build.flag("-fsanitize=address").flag("-fno-omit-frame-pointer");
        }
        build.compile("rq_cuda_emu");
        println!("cargo:rustc-link-lib=dylib=pthread");
        if asan {
            // Rust does not link the ASan runtime first; ASAN_OPTIONS=verify_asan_link_order=0.
            println!("cargo:rustc-link-lib=dylib=asan");
            println!("cargo:rustc-cfg=rq_emu_asan");
        }

        super::common::bindings(&manifest.join("ffi/rq_cuda.h"), &out_dir.join("rq_cuda.rs"));
        super::common::bindings(&emu_dir.join("selftest.h"), &out_dir.join("rq_cuda_emu_selftest.rs"));
    }
}
