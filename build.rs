//! Without the `cuda` feature this does nothing. With it (Cargo sets CARGO_FEATURE_CUDA and
//! compiles this script with `cfg(feature = "cuda")`, which is what makes the optional
//! build-dependencies `cc` and `bindgen` exist), it compiles every `cuda/*.cu` with nvcc
//! into a static library, links the CUDA runtime statically (`cudart_static`, which loads
//! the driver at run time, so the binary starts on machines without one) and generates the
//! Rust bindings of `ffi/rq_cuda.h` into `$OUT_DIR/rq_cuda.rs`.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "cuda")]
    cuda::build();
}

#[cfg(feature = "cuda")]
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

        let mut sources: Vec<PathBuf> = std::fs::read_dir(manifest.join("cuda"))
            .expect("reading cuda/")
            .map(|entry| entry.expect("reading cuda/").path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "cu"))
            .collect();
        sources.sort();

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
            build.flag("-O3").flag("--std=c++17").flag("-cudart").flag("static");
            build.compile(&format!("rq_cuda_{stem}"));
        }

        // cudart_static and what it needs; it dlopens libcuda.so.1 itself at first use.
        let lib_dir = cudart_lib_dir(&nvcc);
        println!("cargo:rustc-link-search=native={}", lib_dir.display());
        println!("cargo:rustc-link-lib=static=cudart_static");
        for lib in ["dl", "rt", "pthread", "stdc++"] {
            println!("cargo:rustc-link-lib=dylib={lib}");
        }

        bindgen::Builder::default()
            .header(manifest.join("ffi/rq_cuda.h").to_str().expect("UTF-8 path of ffi/rq_cuda.h"))
            .allowlist_function("rq_.*")
            .allowlist_type("rq_.*")
            .generate()
            .expect("bindgen failed on ffi/rq_cuda.h (bindgen needs libclang: run tools/cuda-toolchain.sh)")
            .write_to_file(out_dir.join("rq_cuda.rs"))
            .expect("writing $OUT_DIR/rq_cuda.rs");
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
