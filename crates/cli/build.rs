//! Links `reptrace-torch` and the tests with an rpath to libtorch (feature
//! `tch`; torch-sys does not set one), and, with feature `cuda`,
//! force-links libtorch_cuda into them so that CUDA devices are available.
//! The `reptrace` binary links neither: it never loads libtorch.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=CARGO_FEATURE_CUDA");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        let mut args = vec![format!("-Wl,-rpath,{lib}")];
        if std::env::var_os("CARGO_FEATURE_CUDA").is_some()
            && std::path::Path::new(&lib).join("libtorch_cuda.so").exists()
        {
            args.extend(
                ["-Wl,--no-as-needed", "-ltorch_cuda", "-Wl,--as-needed"].map(String::from),
            );
        }
        for arg in args {
            println!("cargo:rustc-link-arg-bin=reptrace-torch={arg}");
            println!("cargo:rustc-link-arg-tests={arg}");
        }
    }
}
