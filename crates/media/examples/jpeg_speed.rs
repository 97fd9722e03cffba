//! Full-size vs reduced-scale JPEG decoding, alone and followed by the bicubic resize to
//! 224 that CLIP preprocessing does.
//!
//! ```text
//! cargo run --release -p magpie-media --example jpeg_speed [FILE.jpg] [ITERATIONS]
//! ```
//!
//! Without a file it synthesises a 4000×3000 (12 MP) JPEG like a phone's (4:2:0,
//! quality 92); `GRAIN=N` sets the amplitude of its pseudo-random sensor grain (default
//! 12, about 4.3 MB; 6 gives 2.9 MB, 0 gives 0.7 MB). `JPEG_SPEED_SAVE=path` writes it out.
//! `RAYON_NUM_THREADS` limits jpeg-decoder's worker threads.

use std::time::{Duration, Instant};

use magpie_media::image::{self, GenericImageView};
use magpie_media::{decode_bytes, DecodeOptions};

fn synth(width: u32, height: u32, grain: u32) -> Vec<u8> {
    let mut state = 0x9E37_79B9u32;
    let img = image::RgbImage::from_fn(width, height, |x, y| {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let grain = (state % (2 * grain + 1)) as f32 - grain as f32;
        let (fx, fy) = (x as f32 / width as f32, y as f32 / height as f32);
        let wave = (fx * 97.0).sin() * (fy * 61.0).cos() * 60.0
            + ((fx * 13.0 + fy * 7.0) * 40.0).sin() * 25.0;
        let c = |v: f32| v.clamp(0.0, 255.0) as u8;
        image::Rgb([
            c(fx * 200.0 + wave + grain),
            c(fy * 200.0 - wave / 2.0 + grain),
            c((fx + fy) * 100.0 + grain),
        ])
    });
    // Like a phone camera: 4:2:0 chroma subsampling, quality 92, standard tables.
    let mut out = Vec::new();
    let mut enc = jpeg_encoder::Encoder::new(&mut out, 92);
    enc.set_sampling_factor(jpeg_encoder::SamplingFactor::R_4_2_0);
    enc.encode(
        img.as_raw(),
        width as u16,
        height as u16,
        jpeg_encoder::ColorType::Rgb,
    )
    .unwrap();
    out
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time(label: &str, iters: usize, mut f: impl FnMut() -> (u32, u32)) -> Duration {
    let dims = f(); // warm-up
    let runs: Vec<Duration> = (0..iters)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(f());
            t.elapsed()
        })
        .collect();
    let m = median(runs);
    println!(
        "{label:<44} {:>5}×{:<5} median {:>8.1} ms",
        dims.0,
        dims.1,
        m.as_secs_f64() * 1e3
    );
    m
}

fn main() {
    let mut args = std::env::args().skip(1);
    let file = args.next();
    let iters: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(9);
    // Amplitude of the synthetic sensor grain: the file's entropy, hence its size.
    let grain: u32 = std::env::var("GRAIN")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    let bytes = match &file {
        Some(p) => std::fs::read(p).expect("read file"),
        None => synth(4000, 3000, grain),
    };
    if let Ok(out) = std::env::var("JPEG_SPEED_SAVE") {
        std::fs::write(out, &bytes).unwrap();
    }
    println!(
        "{}: {:.1} MB, {} iterations, {} cores",
        file.clone()
            .unwrap_or(format!("synthetic 4000×3000 4:2:0 q92, grain ±{grain}")),
        bytes.len() as f64 / 1e6,
        iters,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );

    let full = time(
        "decode_bytes, full size (zune-jpeg via image)",
        iters,
        || {
            decode_bytes(&bytes, &DecodeOptions::default(), "x")
                .unwrap()
                .image
                .dimensions()
        },
    );
    time("jpeg-decoder, full size (for reference)", iters, || {
        let mut d = jpeg_decoder::Decoder::new(&bytes[..]);
        let px = d.decode().unwrap();
        std::hint::black_box(px);
        let i = d.info().unwrap();
        (i.width as u32, i.height as u32)
    });
    for (num, label) in [(4u16, "1/2"), (2, "1/4"), (1, "1/8")] {
        time(&format!("jpeg-decoder alone, scale {label}"), iters, || {
            let mut d = jpeg_decoder::Decoder::new(&bytes[..]);
            d.read_info().unwrap();
            let i = d.info().unwrap();
            let (w, h) = d.scale(i.width * num / 8, i.height * num / 8).unwrap();
            std::hint::black_box(d.decode().unwrap());
            (w as u32, h as u32)
        });
    }
    time(
        "header only (image::ImageReader::into_decoder)",
        iters,
        || {
            use magpie_media::image::ImageDecoder;
            let r = image::ImageReader::with_format(
                std::io::Cursor::new(&bytes[..]),
                image::ImageFormat::Jpeg,
            );
            r.into_decoder().unwrap().dimensions()
        },
    );
    for side in [448, 384, 224] {
        let t = time(&format!("decode_bytes, min_side {side}"), iters, || {
            decode_bytes(&bytes, &DecodeOptions::for_model(side), "x")
                .unwrap()
                .image
                .dimensions()
        });
        println!(
            "{:<44} speed-up ×{:.1}",
            "",
            full.as_secs_f64() / t.as_secs_f64()
        );
    }

    // What the model pipeline pays: decode, then bicubic-resize the shorter side to 224
    // (CLIP's preprocessing; cropping is negligible).
    let resize_224 = |img: &image::DynamicImage| {
        let (w, h) = img.dimensions();
        let (nw, nh) = if w < h {
            (224, (h as u64 * 224 / w as u64) as u32)
        } else {
            ((w as u64 * 224 / h as u64) as u32, 224)
        };
        img.resize_exact(nw, nh, image::imageops::FilterType::CatmullRom)
    };
    let to_224 = |img: &image::DynamicImage| resize_224(img).dimensions();
    let full_pipe = time("full decode + bicubic resize to 224", iters, || {
        to_224(
            &decode_bytes(&bytes, &DecodeOptions::default(), "x")
                .unwrap()
                .image,
        )
    });
    let reduced_pipe = time("min_side 224 decode + bicubic resize to 224", iters, || {
        to_224(
            &decode_bytes(&bytes, &DecodeOptions::for_model(224), "x")
                .unwrap()
                .image,
        )
    });
    println!(
        "{:<44} speed-up ×{:.1}",
        "",
        full_pipe.as_secs_f64() / reduced_pipe.as_secs_f64()
    );

    // What each reduction does to the pixels the model sees: the 224 resize of a reduced
    // decode against the 224 resize of the full-size one, in 8-bit levels.
    let resized = |img: &image::DynamicImage| resize_224(img).to_rgb8();
    let reference = resized(
        &decode_bytes(&bytes, &DecodeOptions::default(), "x")
            .unwrap()
            .image,
    );
    let mut d = jpeg_decoder::Decoder::new(&bytes[..]);
    d.read_info().unwrap();
    let i = d.info().unwrap();
    let (w, h) = d.scale(i.width / 4, i.height / 4).unwrap();
    let quarter = image::RgbImage::from_raw(w as u32, h as u32, d.decode().unwrap());
    let candidates = [
        (
            "min_side 224 path",
            Some(
                decode_bytes(&bytes, &DecodeOptions::for_model(224), "x")
                    .unwrap()
                    .image,
            ),
        ),
        (
            "jpeg-decoder 1/4",
            quarter.map(image::DynamicImage::ImageRgb8),
        ),
    ];
    for (label, img) in candidates {
        let Some(img) = img else { continue };
        let r = resized(&img);
        if r.dimensions() != reference.dimensions() {
            println!(
                "{label}: resized to {:?}, reference {:?}",
                r.dimensions(),
                reference.dimensions()
            );
            continue;
        }
        let diffs: Vec<f64> = r
            .as_raw()
            .iter()
            .zip(reference.as_raw())
            .map(|(&a, &b)| (a as f64 - b as f64).abs())
            .collect();
        let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
        let max = diffs.iter().cloned().fold(0.0, f64::max);
        println!("{label:<44} vs full decode at 224: mean |Δ| {mean:.2}, max {max:.0} levels");
    }
}
