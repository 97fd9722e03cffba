//! Decompression bombs are refused from their header, before any pixel buffer exists.
//! A counting global allocator measures the peak heap use of each refusal; this file
//! holds a single test so that no other test allocates concurrently.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use common::*;
use magpie_media::image::{self, DynamicImage, ImageFormat};
use magpie_media::{decode_bytes, DecodeOptions, Error};

struct Counting;
static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now = CURRENT.fetch_add(layout.size(), Relaxed) + layout.size();
        PEAK.fetch_max(now, Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        CURRENT.fetch_sub(layout.size(), Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Peak bytes allocated (above what was live before) while running `f`.
fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = CURRENT.load(Relaxed);
    PEAK.store(base, Relaxed);
    let out = f();
    (out, PEAK.load(Relaxed) - base)
}

const BUDGET: usize = 8 << 20;

fn assert_refused(bytes: &[u8], name: &str, w: u32, h: u32) {
    let (result, peak) = peak_during(|| decode_bytes(bytes, &DecodeOptions::default(), name));
    let err = result
        .err()
        .unwrap_or_else(|| panic!("{name}: bomb was decoded"));
    match &err {
        Error::TooLarge {
            width,
            height,
            pixels,
            limit,
            ..
        } => {
            assert_eq!((*width, *height), (w, h), "{name}");
            assert_eq!(*pixels, w as u64 * h as u64);
            assert_eq!(*limit, magpie_media::DEFAULT_MAX_PIXELS);
        }
        other => panic!("{name}: expected TooLarge, got {other:?}"),
    }
    assert!(err.to_string().contains("decompression bomb?"), "{err}");
    assert!(err.to_string().starts_with(name), "{err}");
    assert!(
        peak < BUDGET,
        "{name}: refusing the bomb allocated {peak} bytes"
    );
}

#[test]
fn bombs_are_refused_from_the_header_with_bounded_memory() {
    // PNG whose IHDR declares 100,000 × 100,000 (30 GB of RGB) in 80-odd bytes.
    let png = png_declaring(100_000, 100_000);
    assert!(png.len() < 100);
    assert_refused(&png, "bomb.png", 100_000, 100_000);
    let err = decode_bytes(&png, &DecodeOptions::default(), "bomb.png").unwrap_err();
    assert_eq!(
        err.to_string(),
        "bomb.png: image is 100000×100000 = 10000000000 pixels, over the limit of 178956970 (decompression bomb?)"
    );

    // A real small JPEG and GIF with their size fields patched to 65535 × 65535.
    let small = DynamicImage::ImageRgb8(image::RgbImage::from_pixel(16, 16, image::Rgb([1, 2, 3])));
    let mut jpeg = encode_jpeg(&small, 90);
    let sof = jpeg
        .windows(2)
        .position(|w| w == [0xFF, 0xC0])
        .expect("baseline SOF0");
    jpeg[sof + 5..sof + 9].copy_from_slice(&[0xFF, 0xFF, 0xFF, 0xFF]); // height, width
    assert_refused(&jpeg, "bomb.jpg", 65_535, 65_535);
    // …also on the reduced-scale path.
    let (r, peak) = peak_during(|| decode_bytes(&jpeg, &DecodeOptions::for_model(224), "bomb.jpg"));
    assert!(
        matches!(r, Err(Error::TooLarge { .. })) && peak < BUDGET,
        "{r:?} {peak}"
    );

    let mut gif = encode(&small, ImageFormat::Gif);
    gif[6..10].copy_from_slice(&[0xFF, 0xFF, 0xFF, 0xFF]); // logical screen width, height
    assert_refused(&gif, "bomb.gif", 65_535, 65_535);

    // A modest limit refuses a normal-sized image just the same.
    let png = encode(
        &DynamicImage::ImageRgb8(image::RgbImage::new(2000, 1000)),
        ImageFormat::Png,
    );
    let tight = DecodeOptions {
        max_pixels: 1_000_000,
        ..DecodeOptions::default()
    };
    let (r, peak) = peak_during(|| decode_bytes(&png, &tight, "big.png"));
    assert!(
        matches!(
            r,
            Err(Error::TooLarge {
                pixels: 2_000_000,
                ..
            })
        ),
        "{r:?}"
    );
    assert!(
        peak < 2000 * 1000 * 3,
        "refusal allocated {peak} bytes, as much as the image"
    );
}
