//! Arbitrary bytes through what an upload or a walked file goes through before CLIP sees
//! it: `decode_bytes` (sniffing, EXIF, pixel limit, reduced-scale JPEG, orientation),
//! then the CLIP processor (the tiny fixture's `preprocessor_config.json`: shortest edge
//! 72, centre crop 64) and a thumbnail. Errors are fine; panics, aborts and unbounded
//! allocations (libFuzzer's `-rss_limit_mb`/`-malloc_limit_mb`) are not.
//!
//! A decoder panic inside `decode_bytes` is caught there in a normal build, but
//! libfuzzer-sys aborts on any panic, so the fuzzer reports those too.

#![no_main]

use libfuzzer_sys::fuzz_target;
use magpie_media::{decode_bytes, thumbnail, to_rgb8, DecodeOptions};
use magpie_models::preprocess::ProcessorConfig;
use std::path::Path;
use std::sync::OnceLock;

/// Small enough that a decoded image never costs much memory (64 MB of RGBA f32 at
/// most), big enough for every real photo shape at low resolution.
const MAX_PIXELS: u64 = 4_000_000;

fn processor() -> &'static ProcessorConfig {
    static P: OnceLock<ProcessorConfig> = OnceLock::new();
    P.get_or_init(|| {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/clip/tiny-a/preprocessor_config.json");
        ProcessorConfig::from_file(&path).expect("the tiny CLIP fixture's processor config")
    })
}

fuzz_target!(|data: &[u8]| {
    let p = processor();
    let opts = DecodeOptions { max_pixels: MAX_PIXELS, min_side: Some(224) };
    let Ok(decoded) = decode_bytes(data, &opts, "fuzz") else {
        return;
    };
    let (w, h) = (decoded.image.width(), decoded.image.height());
    assert!(w as u64 * h as u64 <= MAX_PIXELS, "decoded {w}×{h}, over the pixel limit");
    // Orientation swaps the full-size sides exactly when it swaps the decoded ones.
    let (mw, mh) = (decoded.meta.width, decoded.meta.height);
    assert!(w <= mw && h <= mh, "decoded {w}×{h} is larger than the declared {mw}×{mh}");

    let pixels = p.preprocess(&decoded.image).expect("preprocessing a decoded image");
    assert_eq!((pixels.channels, pixels.height, pixels.width), (3, 64, 64));
    assert_eq!(pixels.data.len(), 3 * 64 * 64);
    assert!(pixels.data.iter().all(|v| v.is_finite()));

    let rgb = to_rgb8(&decoded.image);
    assert_eq!(rgb.dimensions(), (w, h));

    let jpeg = thumbnail(&decoded.image, 128).expect("thumbnail of a decoded image");
    assert!(jpeg.starts_with(&[0xFF, 0xD8]));
});
