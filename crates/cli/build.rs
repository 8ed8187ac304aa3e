//! Links the `reptrace` binary and the tests with an rpath to libtorch
//! (feature `tch`; torch-sys does not set one), and, with feature `cuda`,
//! force-links libtorch_cuda so that CUDA devices are available.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=CARGO_FEATURE_CUDA");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        if std::env::var_os("CARGO_FEATURE_CUDA").is_some()
            && std::path::Path::new(&lib).join("libtorch_cuda.so").exists()
        {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
            println!("cargo:rustc-link-arg=-ltorch_cuda");
            println!("cargo:rustc-link-arg=-Wl,--as-needed");
        }
    }
}
