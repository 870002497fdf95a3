// The shared library names itself libcuda.so: once the engine has opened it by path
// (LOOKAHEAD_CUDA_LIB), cudarc's own dlopen("libcuda.so") finds this already-loaded library by its
// soname instead of searching the loader path.
fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libcuda.so");
}
