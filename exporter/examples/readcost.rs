//! Measures what reading one region costs: open + snapshot + unmap, versus a snapshot
//! of a region kept mapped. cargo run --release --example readcost -- REGION_FILE
use std::time::Instant;
use vigil_region::RegionReader;
fn main() {
    let p = std::env::args()
        .nth(1)
        .expect("usage: readcost REGION_FILE");
    let n = 2000;
    let t = Instant::now();
    for _ in 0..n {
        let r = RegionReader::open(&p).unwrap();
        std::hint::black_box(r.snapshot());
    }
    println!("open+snapshot+unmap: {:?}/region", t.elapsed() / n);
    let t = Instant::now();
    for _ in 0..n {
        std::hint::black_box(RegionReader::open(&p).unwrap());
    }
    println!("open+unmap only:     {:?}/region", t.elapsed() / n);
    let r = RegionReader::open(&p).unwrap();
    let t = Instant::now();
    for _ in 0..n {
        std::hint::black_box(r.snapshot());
    }
    println!("snapshot (mapped):   {:?}/region", t.elapsed() / n);
}
