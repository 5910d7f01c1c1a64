//! Benchmark fixture: creates REGIONS regions of SLOTS live slots each under DIR
//! (HAMi layout), records a detection per slot, prints "ready", and holds the slots
//! (as live processes would) until killed or stdin closes.
//!
//! cargo run --release --example fixture -- DIR [REGIONS] [SLOTS]

use std::io::Read;
use vigil_region::{DetectOutcome, InitParams, LockId, Region};

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().expect("usage: fixture DIR [REGIONS] [SLOTS]"));
    let regions: usize = args
        .next()
        .map(|a| a.parse().expect("REGIONS"))
        .unwrap_or(64);
    let slots: usize = args.next().map(|a| a.parse().expect("SLOTS")).unwrap_or(32);
    let mut held = Vec::new();
    for i in 0..regions {
        let sub = dir.join(format!("pod-{i:04}_main"));
        std::fs::create_dir_all(&sub).expect("create region dir");
        let params = InitParams {
            device_limits: vec![80 << 30, 80 << 30],
            ..InitParams::default()
        };
        let (r, _) = Region::open(sub.join("vigil.cache"), &params).expect("open region");
        let mut hs = Vec::new();
        for s in 0..slots {
            let me = r.claim_slot().expect("claim slot");
            let g = r.lock(LockId::Detect, me).expect("lock");
            r.record_detection(
                me,
                DetectOutcome::Found,
                Some(10_000 + s as u32),
                250_000_000,
                12,
                200_000_000,
            );
            drop(g);
            let _ = r.reserve(me, 0, 1 << 30);
            hs.push(me);
        }
        held.push((r, hs));
    }
    println!("ready");
    // Hold until stdin closes (the bench script keeps a pipe open) or we are killed.
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
}
