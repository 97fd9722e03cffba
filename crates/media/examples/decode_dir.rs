//! `decode_bytes` at CLIP's scale (a shorter side of at least 224) over every file of
//! each folder, read into memory first: the best of three passes, in ms per file.
//!
//! ```text
//! cargo run --release -p magpie-media --example decode_dir DIR [DIR…]
//! ```
//!
//! To compare two builds, copy each binary (`target/release/examples/decode_dir`) aside
//! and run them alternately: the machines this was written on drift by 5–30% between
//! minutes. `scripts/bench/make_phone_jpegs.py` makes phone-like 12 MP test photos.

use std::time::Instant;

use magpie_media::{decode_bytes, DecodeOptions};

fn main() {
    let dirs: Vec<String> = std::env::args().skip(1).collect();
    if dirs.is_empty() {
        eprintln!("usage: decode_dir DIR [DIR…]");
        std::process::exit(2);
    }
    let opts = DecodeOptions { min_side: Some(224), ..Default::default() };
    for dir in dirs {
        let mut files: Vec<_> = match std::fs::read_dir(&dir) {
            Ok(entries) => entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file()).collect(),
            Err(e) => {
                eprintln!("{dir}: {e}");
                std::process::exit(1);
            }
        };
        files.sort();
        let bytes: Vec<Vec<u8>> = files.iter().map(|p| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).collect();
        let mb = bytes.iter().map(Vec::len).sum::<usize>() as f64 / bytes.len().max(1) as f64 / 1e6;
        let mut best = f64::MAX;
        for _ in 0..3 {
            let t = Instant::now();
            for (b, p) in bytes.iter().zip(&files) {
                if let Err(e) = decode_bytes(b, &opts, p) {
                    eprintln!("{}: {e}", p.display());
                }
            }
            best = best.min(t.elapsed().as_secs_f64() / files.len().max(1) as f64);
        }
        println!("{dir}: {} files of {mb:.2} MB on average, {:.3} ms a file", files.len(), best * 1e3);
    }
}
