// Bind the library's references to its own functions at link time, as NVIDIA's
// libcuda does. Without it, a preloaded interposer exporting `cuMemAlloc_v2` would also
// replace the address our cuGetProcAddress hands out, hiding whether the interposer's
// cuGetProcAddress handling works.
fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-Bsymbolic");
}
