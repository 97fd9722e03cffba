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

mod common;
use common::{python, timed, timed_median};
use magpie_core::{ImageEmbedder, Pixels};
use magpie_engine::{IndexOptions, Library, LibraryConfig};
use magpie_models::cpu::encoder::profile;
use magpie_models::{Clip, ClipPrecision};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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

/// One precision's figures.
struct Run {
    precision: &'static str,
    /// (batch, images per second)
    img_rate: Vec<(usize, f64)>,
    /// (tokens, median milliseconds per query)
    text_ms: Vec<(usize, f64)>,
    /// Per batch size (1 and 16): per encoder stage (name, ms per image, GFLOP/s), and the
    /// ms per image outside the encoder layers (patch embedding, pre/post LN, projection).
    stages: Vec<(usize, Vec<(&'static str, f64, f64)>, f64)>,
    /// The same for text queries of 8 and 77 tokens (ms per query).
    text_stages: Vec<(usize, Vec<(&'static str, f64, f64)>, f64)>,
}

fn pixels(size: usize, b: usize) -> Vec<Pixels> {
    (0..b)
        .map(|i| Pixels {
            channels: 3,
            height: size,
            width: size,
            data: (0..3 * size * size).map(|j| (((i * 7919 + j * 104729) % 1000) as f32 / 500.0) - 1.0).collect(),
        })
        .collect()
}

fn measure(clip: &Clip, min: Duration) -> Run {
    let size = clip.config().vision_config.image_size;
    let mut img_rate = Vec::new();
    for b in [1usize, 16] {
        let batch = pixels(size, b);
        let dt = timed(min, 3, || {
            clip.embed_pixels(&batch).unwrap();
        });
        img_rate.push((b, b as f64 / dt));
    }
    let mut text_ms = Vec::new();
    for t in [8usize, 77] {
        let ids = vec![std::iter::once(49406).chain(std::iter::repeat_n(320, t - 2)).chain(std::iter::once(49407)).collect::<Vec<u32>>()];
        let dt = timed_median(min / 2, 10, || {
            clip.embed_ids(&ids).unwrap();
        });
        text_ms.push((t, dt * 1000.0));
    }
    // Per-stage time of the vision encoder at batch 1 and 16, and of text queries.
    let mut stages = Vec::new();
    for (b, reps) in [(1, 40), (16, 6)] {
        let batch = pixels(size, b);
        let flops = clip.clip_model().vision_model.encoder_flops(b).unwrap_or([0.0; 6]);
        let (st, other) = profiled(reps, b, flops, || drop(clip.embed_pixels(&batch).unwrap()));
        stages.push((b, st, other));
    }
    let mut text_stages = Vec::new();
    for t in [8usize, 77] {
        let ids = vec![std::iter::once(49406).chain(std::iter::repeat_n(320, t - 2)).chain(std::iter::once(49407)).collect::<Vec<u32>>()];
        let flops = clip.clip_model().text_model.encoder_flops(1, t).unwrap_or([0.0; 6]);
        let (st, other) = profiled(40, 1, flops, || drop(clip.embed_ids(&ids).unwrap()));
        text_stages.push((t, st, other));
    }
    Run { precision: clip.precision(), img_rate, text_ms, stages, text_stages }
}

/// `run` (one forward of `items` images or queries) `reps` times with the encoder's stage
/// clocks on, after one warm-up call: per stage (name, ms per item, GFLOP/s from `flops`
/// per forward), and the ms per item outside the encoder layers.
fn profiled(reps: usize, items: usize, flops: [f64; 6], mut run: impl FnMut()) -> (Vec<(&'static str, f64, f64)>, f64) {
    run();
    profile::enable(true);
    profile::take();
    let t = Instant::now();
    for _ in 0..reps {
        run();
    }
    let total = t.elapsed().as_secs_f64();
    profile::enable(false);
    let secs = profile::take();
    let per_item = |s: f64| s / (reps * items) as f64 * 1000.0;
    let st = (0..6)
        .map(|i| (profile::STAGES[i], per_item(secs[i]), flops[i] * reps as f64 / secs[i] / 1e9))
        .collect();
    (st, per_item(total - secs.iter().sum::<f64>()))
}

/// GFLOP/s of register-only loops on `threads` threads: f32 FMA, and BF16 dot products
/// where the CPU has them (the ceilings the kernels are measured against).
fn peaks(threads: usize) -> (f64, Option<f64>) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        // 16 independent chains in named registers (an array was kept in memory).
        macro_rules! chains {
            ($iters:expr, $op:expr, $zero:expr) => {{
                let (mut a0, mut a1, mut a2, mut a3, mut a4, mut a5, mut a6, mut a7) = ($zero, $zero, $zero, $zero, $zero, $zero, $zero, $zero);
                let (mut b0, mut b1, mut b2, mut b3, mut b4, mut b5, mut b6, mut b7) = ($zero, $zero, $zero, $zero, $zero, $zero, $zero, $zero);
                for _ in 0..$iters {
                    a0 = $op(a0); a1 = $op(a1); a2 = $op(a2); a3 = $op(a3);
                    a4 = $op(a4); a5 = $op(a5); a6 = $op(a6); a7 = $op(a7);
                    b0 = $op(b0); b1 = $op(b1); b2 = $op(b2); b3 = $op(b3);
                    b4 = $op(b4); b5 = $op(b5); b6 = $op(b6); b7 = $op(b7);
                }
                [a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7].iter().map(|a| _mm512_reduce_add_ps(*a)).sum::<f32>()
            }};
        }
        #[target_feature(enable = "avx512f")]
        fn fma_loop(iters: usize) -> f32 {
            let (x, y) = (_mm512_set1_ps(0.999), _mm512_set1_ps(1e-3));
            chains!(iters, |a| _mm512_fmadd_ps(a, x, y), _mm512_set1_ps(0.0))
        }
        #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
        fn dp_loop(iters: usize) -> f32 {
            // SAFETY: plain bits reinterpreted.
            let x: __m512bh = unsafe { std::mem::transmute(_mm512_set1_epi16(0x3f80)) };
            chains!(iters, |a| _mm512_dpbf16_ps(a, x, x), _mm512_set1_ps(0.0))
        }
        let run = |flops_per_iter: f64, f: &(dyn Fn(usize) -> f32 + Sync)| {
            let iters = 200_000_000;
            let t = Instant::now();
            std::thread::scope(|s| {
                for _ in 0..threads {
                    s.spawn(|| std::hint::black_box(f(iters)));
                }
            });
            flops_per_iter * iters as f64 * threads as f64 / t.elapsed().as_secs_f64() / 1e9
        };
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the features were just detected.
            let f32_peak = run(16.0 * 32.0, &|n| unsafe { fma_loop(n) });
            let bf16 = magpie_models::bf16_gemm::available().then(|| run(16.0 * 64.0, &|n| unsafe { dp_loop(n) }));
            return (f32_peak, bf16);
        }
    }
    (0.0, None)
}

/// The lowest cosine between corresponding rows.
fn worst_cosine(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    let cos = |x: &[f32], y: &[f32]| {
        let d: f64 = x.iter().zip(y).map(|(p, q)| *p as f64 * *q as f64).sum();
        let n = |v: &[f32]| v.iter().map(|p| (*p as f64).powi(2)).sum::<f64>().sqrt();
        (d / (n(x) * n(y))) as f32
    };
    a.iter().zip(b).map(|(x, y)| cos(x, y)).fold(1.0f32, f32::min)
}

fn main() {
    let model_dir = PathBuf::from(std::env::var("MAGPIE_BENCH_MODEL").unwrap_or_else(|_| "bench-data/clip-vit-base-patch32".into()));
    ensure_model(&model_dir);
    let threads = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    let min = Duration::from_secs(3);
    let mut precisions = vec![ClipPrecision::F32];
    if magpie_models::bf16_gemm::available() {
        precisions.push(ClipPrecision::Bf16);
    }
    let mut runs = Vec::new();
    let mut models = Vec::new();
    for &precision in &precisions {
        let clip = Clip::load_with(model_dir.to_str().unwrap(), magpie_core::Device::Cpu, precision).expect("load model");
        runs.push(measure(&clip, min));
        models.push(clip);
    }
    // How far bf16 embeddings are from f32 ones on real photos.
    let photos: Vec<Pixels> = std::fs::read_dir("tests/fixtures/photos")
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| magpie_media::decode_file(&p, &Default::default()).ok())
        .map(|d| magpie_core::ImageEmbedder::preprocess(&models[0], &d.image).unwrap())
        .collect();
    let photo_embeds: Vec<Vec<Vec<f32>>> = models.iter().map(|m| m.embed_pixels(&photos).unwrap()).collect();
    let worst_cos = (models.len() == 2).then(|| worst_cosine(&photo_embeds[0], &photo_embeds[1]));
    // The same photos and some texts for the peer's reference embeddings (full-size
    // parity with transformers): one plain, one long enough to be cut at the context.
    let texts = [
        "a puppy playing in the snow",
        "x",
        "Ünïcödé — café “quotes” 😀",
        "a photo of a red car parked on a wet street at night, with neon signs reflected in the puddles",
        &"the quick brown fox jumps over the lazy dog ".repeat(12),
    ];
    let ids = models[0].tokenize(&texts).unwrap();
    let text_embeds: Vec<Vec<Vec<f32>>> = models.iter().map(|m| ids.iter().map(|i| m.embed_ids(std::slice::from_ref(i)).unwrap().remove(0)).collect()).collect();
    let names: Vec<&str> = models.iter().map(|m| m.precision()).collect();
    let parity_dir = tempfile::tempdir().unwrap();
    {
        let raw: Vec<u8> = photos.iter().flat_map(|p| p.data.iter().flat_map(|v| v.to_le_bytes())).collect();
        std::fs::write(parity_dir.path().join("pixels.f32"), raw).unwrap();
        let (c, h, w) = (photos[0].channels, photos[0].height, photos[0].width);
        let spec = serde_json::json!({ "pixel_shape": [photos.len(), c, h, w], "input_ids": ids });
        std::fs::write(parity_dir.path().join("input.json"), spec.to_string()).unwrap();
    }
    drop(models);
    let clip = Arc::new(Clip::load_with(model_dir.to_str().unwrap(), magpie_core::Device::Cpu, ClipPrecision::Auto).expect("load model"));
    let q = "a puppy playing in the snow";
    let dt = timed_median(min / 2, 10, || {
        magpie_core::TextEmbedder::embed_texts(clip.as_ref(), &[q]).unwrap();
    });
    let q_tokens = clip.tokenize(&[q]).unwrap()[0].len();

    // Indexing 12 MP JPEGs end to end (walk, read, hash, decode, preprocess, embed, commit).
    let n_jpegs = std::env::var("MAGPIE_BENCH_JPEGS").ok().and_then(|v| v.parse().ok()).unwrap_or(48);
    // One folder per count, so that a smaller run does not index a larger one's files.
    let jpeg_dir = PathBuf::from(format!("bench-data/jpeg-12mp-{n_jpegs}"));
    if n_jpegs == 48 && !jpeg_dir.exists() && Path::new("bench-data/jpeg-12mp").is_dir() {
        // Earlier versions made the 48 files here.
        std::fs::rename("bench-data/jpeg-12mp", &jpeg_dir).unwrap();
    }
    let jpegs = ensure_jpegs(&jpeg_dir, n_jpegs);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let data = tempfile::tempdir().unwrap();
    let index_rate = rt.block_on(async {
        let lib = Library::open(data.path(), clip.info(), LibraryConfig::default()).await.unwrap();
        let emb: Arc<dyn ImageEmbedder> = clip.clone();
        let r = lib.index(&[jpeg_dir.clone()], emb, &IndexOptions::default(), &|_| {}).await.unwrap();
        assert_eq!(r.added as usize, n_jpegs, "{:?}", r.failed);
        r.rate()
    });
    // What one image costs a core before embedding (read, hash, decode at reduced scale,
    // resize, normalise), timed on this thread alone; and what embedding costs (all
    // threads busy for 1/rate seconds). With both stages overlapped on `threads` cores,
    // no pipeline can beat threads / (decode + embed) images per second.
    let decode_opts = magpie_media::DecodeOptions { min_side: Some(magpie_core::ImageEmbedder::input_side(clip.as_ref())), ..Default::default() };
    let t = Instant::now();
    for p in &jpegs {
        let bytes = std::fs::read(p).unwrap();
        std::hint::black_box(blake3::hash(&bytes));
        let d = magpie_media::decode_bytes(&bytes, &decode_opts, p).unwrap();
        std::hint::black_box(magpie_core::ImageEmbedder::preprocess(clip.as_ref(), &d.image).unwrap());
    }
    let decode_core_s = t.elapsed().as_secs_f64() / jpegs.len() as f64;

    let peer: Option<serde_json::Value> = if python() == "none" {
        None
    } else {
        let out = Command::new(python())
            .args(["scripts/bench/peer_clip.py", model_dir.to_str().unwrap(), "--threads", &threads.to_string()])
            .arg("--parity")
            .arg(parity_dir.path())
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

    let (f32_peak, dot_peak) = peaks(threads);
    // On AMX the BF16 GEMM runs on tiles: their peak is the ceiling.
    #[cfg(target_arch = "x86_64")]
    let amx_peak = magpie_models::bf16_gemm::amx::peak_gflops(threads, 10_000_000);
    #[cfg(not(target_arch = "x86_64"))]
    let amx_peak: Option<f64> = None;
    let bf16_peak = amx_peak.or(dot_peak);
    println!("\nCLIP {} ({}), {threads} threads", model_dir.display(), clip.info().id);
    println!("{:<28} {:>10} {:>10} {:>10} {:>12} {:>12}", "", "magpie", "PyTorch", "ONNX RT", "vs PyTorch", "vs ONNX RT");
    for run in &runs {
        for (b, r) in &run.img_rate {
            let (pt, ort) = (peer_num("pytorch", *b), peer_num("onnxruntime", *b));
            println!(
                "{:<28} {:>10.1} {:>10} {:>10} {:>12} {:>12}",
                format!("{} image/s, batch {b}", run.precision),
                r,
                pt.map(|v| format!("{v:.1}")).unwrap_or("-".into()),
                ort.map(|v| format!("{v:.1}")).unwrap_or("-".into()),
                pt.map(|v| format!("{:.2}x", r / v)).unwrap_or("-".into()),
                ort.map(|v| format!("{:.2}x", r / v)).unwrap_or("-".into()),
            );
        }
        for (t, ms) in &run.text_ms {
            let pt = peer_num("text_ms", *t);
            println!(
                "{:<28} {:>10.2} {:>10} {:>10} {:>12}",
                format!("{} text ms, {t} tok (p50)", run.precision),
                ms,
                pt.map(|v| format!("{v:.2}")).unwrap_or("-".into()),
                "-",
                pt.map(|v| format!("{:.2}x faster", v / ms)).unwrap_or("-".into()),
            );
        }
    }
    if let Some(c) = worst_cos {
        println!("bf16 vs f32 image embeddings: worst cosine {c:.6} over {} photos", photos.len());
    }
    // Full-size parity: magpie's embeddings of the photos and texts against transformers'
    // f32 (the peer's) of the very same pixels and token ids.
    let rows = |v: &serde_json::Value| -> Option<Vec<Vec<f32>>> {
        v.as_array()?.iter().map(|r| r.as_array().map(|r| r.iter().map(|x| x.as_f64().unwrap_or(f64::NAN) as f32).collect())).collect()
    };
    if let Some(p) = peer.as_ref().map(|p| &p["parity"]) {
        if let (Some(img), Some(txt)) = (rows(&p["image_embeds"]), rows(&p["text_embeds"])) {
            for (i, name) in names.iter().enumerate() {
                println!(
                    "{name} vs transformers f32: worst cosine {:.7} over {} photos, {:.7} over {} texts",
                    worst_cosine(&photo_embeds[i], &img),
                    img.len(),
                    worst_cosine(&text_embeds[i], &txt),
                    txt.len()
                );
            }
        }
    }
    println!(
        "\nvision encoder per stage (ms per image; GFLOP/s; share of the measured peak: f32 FMA {f32_peak:.0}, BF16 dot {}{} GFLOP/s)",
        dot_peak.map(|p| format!("{p:.0}")).unwrap_or("-".into()),
        amx_peak.map(|p| format!(", AMX tiles {p:.0}")).unwrap_or_default()
    );
    if amx_peak.is_some() {
        println!("  (on AMX the bf16 run's QKV is three bf16 terms: 3x the GFLOP shown)");
    }
    for run in &runs {
        let peak = if run.precision == "bf16" { bf16_peak.unwrap_or(f32_peak) } else { f32_peak };
        let tables = run.stages.iter().map(|(b, s, o)| (format!("batch {b}"), "image", s, o));
        let text = run.text_stages.iter().map(|(t, s, o)| (format!("text, {t} tokens"), "query", s, o));
        for (what, per, stages, other_ms) in tables.chain(text) {
        let total: f64 = stages.iter().map(|s| s.1).sum::<f64>() + other_ms;
        println!("  {} {what} ({total:.2} ms per {per})", run.precision);
        for (name, ms, gf) in stages {
            // Attention runs on the f32 kernels in both precisions.
            let pk = if *name == "attention" { f32_peak } else { peak };
            let rate = if *gf > 0.0 { format!("{gf:>7.0} GFLOP/s {:>4.0}%", gf / pk * 100.0) } else { String::new() };
            println!("    {name:<22} {ms:>7.2} ms {:>5.1}%  {rate}", ms / total * 100.0);
        }
        println!("    {:<22} {:>7.2} ms {:>5.1}%", "outside the layers", other_ms, other_ms / total * 100.0);
        }
    }
    println!("{:<28} {:>10.2}   (tokenize + embed \"{q}\", {q_tokens} tokens)", "text query ms p50, e2e", dt * 1000.0);
    let pure = runs
        .iter()
        .find(|r| r.precision == clip.precision())
        .and_then(|r| r.img_rate.iter().find(|(b, _)| *b == 16))
        .map(|(_, r)| *r)
        .unwrap();
    let embed_core_s = threads as f64 / pure;
    let bound = threads as f64 / (decode_core_s + embed_core_s);
    println!(
        "{:<28} {:>10.1}   ({n_jpegs} JPEGs of 4000x3000; {:.2}x of pure {} embedding at batch 16)",
        "indexing 12 MP JPEGs/s",
        index_rate,
        index_rate / pure,
        clip.precision()
    );
    println!(
        "{:<28} {:>10.1}   (decode+preprocess {:.1} core-ms + embed {:.1} core-ms per image on {threads} cores; indexing reaches {:.2}x of it)",
        "  bound with full overlap",
        bound,
        decode_core_s * 1e3,
        embed_core_s * 1e3,
        index_rate / bound
    );
    if let Some(p) = &peer {
        println!("peers: torch {}, onnxruntime {}", p["torch"], p["onnxruntime_version"]);
    }
}
