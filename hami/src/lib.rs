//! vigil-hami: reads the shared region files of HAMi-core's `libvgpu.so`, so that a
//! cluster that keeps HAMi-core still gets Vigil's view of it.
//!
//! HAMi-core's region is a C struct (`shared_region_t`) mapped by every process of a
//! container. We never map it: a reader copies what it needs with `pread` (so a file
//! truncated under us gives a short read, never a SIGBUS), validates every field it
//! uses, and hands out a plain [`HamiRegion`]. Nothing here writes the file.
//!
//! The layout is a fact about HAMi-core's ABI (see [`layout`] and
//! `tests/fixtures/hami/`); no HAMi-core code is used.

pub mod layout;
pub mod read;
pub mod sem;

pub use read::{read_region, HamiError, HamiRegion, HamiSlot, SlotDevice};
pub use sem::SemState;
