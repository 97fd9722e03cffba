//! CLIP speed, side by side with PyTorch (transformers) and ONNX Runtime on the same
//! full-size random-weight checkpoint and thread count, in one run:
//!
//!     cargo bench --bench clip
//!
//! Environment: `MAGPIE_BENCH_MODEL` (default `bench-data/clip-vit-base-patch32`, made
//! on first use by `scripts/bench/make_clip_b32.py`), `MAGPIE_BENCH_PYTHON` (a Python with
//! torch, transformers, onnxruntime; default `python3`; `none` skips the peers),
//! `RAYON_NUM_THREADS` (threads for everyone, default all cores), `MAGPIE_BENCH_JPEGS`
//! (number of 12-megapixel JPEGs for the indexing run, default 48).

use magpie_core::{ImageEmbedder, Pixels};
use magpie_engine::{IndexOptions, Library, LibraryConfig};
use magpie_models::Clip;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn timed(min: Duration, min_iters: usize, mut f: impl FnMut()) -> f64 {
    f();
    let (mut n, start) = (0, Instant::now());
    while n < min_iters || start.elapsed() < min {
        f();
        n += 1;
    }
    start.elapsed().as_secs_f64() / n as f64
}

fn python() -> String {
    std::env::var("MAGPIE_BENCH_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn ensure_model(dir: &Path) {
    if dir.join("model.safetensors").is_file() {
        return;
    }
    eprintln!("generating {} (full-size random weights)…", dir.display());
    let ok = Command::new(python()).arg("scripts/bench/make_clip_b32.py").arg(dir).status().map(|s| s.success()).unwrap_or(false);
    assert!(ok, "could not generate the benchmark model; set MAGPIE_BENCH_PYTHON to a Python with torch and transformers");
}

/// A folder of 12-megapixel JPEGs made from the test photos (upscaled, with grain so that
/// they compress like real photos).
fn ensure_jpegs(dir: &Path, n: usize) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    let sources: Vec<PathBuf> = std::fs::read_dir("tests/fixtures/photos")
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "png" || e == "jpg"))
        .collect();
    let mut out = Vec::new();
    for i in 0..n {
        let path = dir.join(format!("photo-{i:03}.jpg"));
        if !path.is_file() {
            let src = magpie_media::decode_file(&sources[i % sources.len()], &Default::default()).unwrap().image;
            let big = src.resize_exact(4000, 3000, magpie_media::image::imageops::FilterType::Triangle).to_rgb8();
            let mut seed = i as u32 * 2654435761 + 1;
            let noisy = magpie_media::image::RgbImage::from_fn(4000, 3000, |x, y| {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                let p = big.get_pixel(x, y).0;
                let g = (seed % 9) as i16 - 4;
                magpie_media::image::Rgb(p.map(|c| (c as i16 + g).clamp(0, 255) as u8))
            });
            let f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
            magpie_media::image::codecs::jpeg::JpegEncoder::new_with_quality(f, 90).encode_image(&noisy).unwrap();
        }
        out.push(path);
    }
    out
}

fn main() {
    let model_dir = PathBuf::from(std::env::var("MAGPIE_BENCH_MODEL").unwrap_or_else(|_| "bench-data/clip-vit-base-patch32".into()));
    ensure_model(&model_dir);
    let threads = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    let clip = Arc::new(Clip::load(model_dir.to_str().unwrap(), magpie_core::Device::Cpu).expect("load model"));
    let size = clip.config().vision_config.image_size;
    let min = Duration::from_secs(3);

    let mut img_rate = Vec::new();
    for b in [1usize, 16] {
        let batch: Vec<Pixels> = (0..b)
            .map(|i| Pixels {
                channels: 3,
                height: size,
                width: size,
                data: (0..3 * size * size).map(|j| (((i * 7919 + j * 104729) % 1000) as f32 / 500.0) - 1.0).collect(),
            })
            .collect();
        let dt = timed(min, 3, || {
            clip.embed_pixels(&batch).unwrap();
        });
        img_rate.push((b, b as f64 / dt));
    }
    let mut text_ms = Vec::new();
    for t in [8usize, 77] {
        let ids = vec![std::iter::once(49406).chain(std::iter::repeat_n(320, t - 2)).chain(std::iter::once(49407)).collect::<Vec<u32>>()];
        let dt = timed(min / 2, 10, || {
            clip.embed_ids(&ids).unwrap();
        });
        text_ms.push((t, dt * 1000.0));
    }
    let q = "a puppy playing in the snow";
    let dt = timed(min / 2, 10, || {
        magpie_core::TextEmbedder::embed_texts(clip.as_ref(), &[q]).unwrap();
    });
    let q_tokens = clip.tokenize(&[q]).unwrap()[0].len();

    // Indexing 12 MP JPEGs end to end (walk, read, hash, decode, preprocess, embed, commit).
    let n_jpegs = std::env::var("MAGPIE_BENCH_JPEGS").ok().and_then(|v| v.parse().ok()).unwrap_or(48);
    let jpeg_dir = PathBuf::from("bench-data/jpeg-12mp");
    ensure_jpegs(&jpeg_dir, n_jpegs);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let data = tempfile::tempdir().unwrap();
    let index_rate = rt.block_on(async {
        let lib = Library::open(data.path(), clip.info(), LibraryConfig::default()).await.unwrap();
        let emb: Arc<dyn ImageEmbedder> = clip.clone();
        let r = lib.index(&[jpeg_dir.clone()], emb, &IndexOptions::default(), &|_| {}).await.unwrap();
        assert_eq!(r.added as usize, n_jpegs, "{:?}", r.failed);
        r.rate()
    });

    let peer: Option<serde_json::Value> = if python() == "none" {
        None
    } else {
        let out = Command::new(python())
            .args(["scripts/bench/peer_clip.py", model_dir.to_str().unwrap(), "--threads", &threads.to_string()])
            .env("OMP_NUM_THREADS", threads.to_string())
            .output();
        match out {
            Ok(o) if o.status.success() => serde_json::from_slice(&o.stdout).ok(),
            Ok(o) => {
                eprintln!("peer script failed: {}", String::from_utf8_lossy(&o.stderr));
                None
            }
            Err(e) => {
                eprintln!("peer script not run: {e}");
                None
            }
        }
    };
    let peer_num = |group: &str, key: usize| peer.as_ref().and_then(|p| p[group][key.to_string()].as_f64());

    println!("\nCLIP {} ({}), {threads} threads", model_dir.display(), clip.info().id);
    println!("{:<28} {:>10} {:>10} {:>10} {:>12} {:>12}", "", "magpie", "PyTorch", "ONNX RT", "vs PyTorch", "vs ONNX RT");
    for (b, r) in &img_rate {
        let (pt, ort) = (peer_num("pytorch", *b), peer_num("onnxruntime", *b));
        println!(
            "{:<28} {:>10.1} {:>10} {:>10} {:>12} {:>12}",
            format!("image embeds/s, batch {b}"),
            r,
            pt.map(|v| format!("{v:.1}")).unwrap_or("-".into()),
            ort.map(|v| format!("{v:.1}")).unwrap_or("-".into()),
            pt.map(|v| format!("{:.2}x", r / v)).unwrap_or("-".into()),
            ort.map(|v| format!("{:.2}x", r / v)).unwrap_or("-".into()),
        );
    }
    for (t, ms) in &text_ms {
        let pt = peer_num("text_ms", *t);
        println!(
            "{:<28} {:>10.2} {:>10} {:>10} {:>12}",
            format!("text query ms, {t} tokens"),
            ms,
            pt.map(|v| format!("{v:.2}")).unwrap_or("-".into()),
            "-",
            pt.map(|v| format!("{:.2}x faster", v / ms)).unwrap_or("-".into()),
        );
    }
    println!("{:<28} {:>10.2}   (tokenize + embed \"{q}\", {q_tokens} tokens)", "text query ms, end to end", dt * 1000.0);
    let pure = img_rate.iter().find(|(b, _)| *b == 16).map(|(_, r)| *r).unwrap();
    println!(
        "{:<28} {:>10.1}   ({n_jpegs} JPEGs of 4000x3000; {:.2}x of pure embedding at batch 16)",
        "indexing 12 MP JPEGs/s",
        index_rate,
        index_rate / pure
    );
    if let Some(p) = &peer {
        println!("peers: torch {}, onnxruntime {}", p["torch"], p["onnxruntime_version"]);
    }
}
