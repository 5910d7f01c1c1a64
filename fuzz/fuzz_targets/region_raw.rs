//! region_raw: `RegionReader` on arbitrary file contents.
//!
//! Input: one length-policy byte, then the file's bytes.
//!   policy & 3 == 0: the file is exactly the bytes;
//!               1: zero-padded (or cut) to the layout size;
//!               2: padded to the layout size plus some (a larger file is allowed);
//!               3: cut short of the layout size by some (a truncated region).
//! Small inputs therefore reach past the header checks (zero padding), and the
//! generated seeds (whole real regions, policy 0) reach the slots and the ring.
//!
//! With VIGIL_FUZZ_WRITE_SEEDS=DIR set, the process writes the base regions there as
//! seeds and exits before fuzzing (scripts/fuzz.sh does this).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use vigil_fuzz::reader::{check_file, Image};
use vigil_fuzz::scratch::Scratch;
use vigil_region::layout::REGION_SIZE;

fn scratch() -> &'static Scratch {
    static S: OnceLock<Scratch> = OnceLock::new();
    S.get_or_init(|| Scratch::new("region_raw"))
}

fuzz_target!(
    init: {
        vigil_region::install_sigbus_guard();
        if let Some(dir) = std::env::var_os("VIGIL_FUZZ_WRITE_SEEDS") {
            vigil_fuzz::bases::write_raw_seeds(std::path::Path::new(&dir));
            std::process::exit(0);
        }
    },
    |data: &[u8]| {
        let Some((&policy, bytes)) = data.split_first() else {
            return;
        };
        let extra = (policy >> 2) as u64;
        let len = match policy & 3 {
            0 => bytes.len() as u64,
            1 => REGION_SIZE as u64,
            2 => REGION_SIZE as u64 + extra * 4099,
            _ => REGION_SIZE as u64 - 1 - extra * 27_733,
        };
        let s = scratch();
        s.write(bytes, len);
        let img = Image { bytes, len };
        check_file(&s.path, img, policy);
    }
);
