//! vigil-gpusim: a simulated GPU driver, so Vigil builds, runs and is tested on
//! machines without a GPU. The daemon (`vigil-gpusim`) is the GPU; the driver library
//! (crate `vigil-gpusim-driver`, installed as `libcuda.so.1` and `libnvidia-ml.so.1`)
//! talks to it. See `gpusim/README.md`.

pub mod config;
pub mod daemon;
pub mod protocol;
pub mod state;
pub mod sys;
#[cfg(feature = "test-support")]
pub mod testing;
