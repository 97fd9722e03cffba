//! BLIP-2 OPT-2.7b speed and memory, side by side with transformers on the same weights
//! and thread count, in one run:
//!
//!     cargo bench --bench blip2
//!
//! The full model is 3.9 B parameters (15.5 GB in f32): this machine cannot hold it
//! twice, so the benchmark uses checkpoints with the real layer shapes and 2 and 8
//! layers in both the vision encoder and the language model (made on first use by
//! `scripts/bench/make_blip2_opt27b.py`), measures both depths, and extrapolates per
//! layer to ViT-g's 39 and OPT-2.7b's 32. Every (side, checkpoint, precision) runs in its
//! own process, so that its peak memory is its own.
//!
//! Environment: `MAGPIE_BENCH_REPEATS` (runs per measurement, median taken; default 3),
//! `MAGPIE_BENCH_PYTHON` (a Python with torch and transformers; default
//! `python3`; `none` skips the peer), `RAYON_NUM_THREADS` (threads for both sides,
//! default all cores), `MAGPIE_BENCH_PRECISIONS` (magpie's, default
//! `f32,f16,q8_0,q4_k`), `MAGPIE_BENCH_PEER_DTYPES` (transformers', default
//! `f32,f16,bf16`).

mod common;
use common::{python, timed};
use magpie_models::blip2::{Blip2, GenerateOptions, Precision};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SHALLOW: usize = 2;
const DEEP: usize = 8;
const VISION_LAYERS: usize = 39;
const TEXT_LAYERS: usize = 32;
const PHOTO: &str = "tests/fixtures/photos/chelsea.png";

fn model_dir(layers: usize) -> PathBuf {
    let dir = PathBuf::from(format!("bench-data/blip2-opt-2.7b-L{layers}"));
    if !dir.join("config.json").is_file() {
        eprintln!("generating {} (real shapes, random weights)…", dir.display());
        let ok = Command::new(python())
            .args(["scripts/bench/make_blip2_opt27b.py", dir.to_str().unwrap(), "--layers", &layers.to_string()])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "could not generate the benchmark model; set MAGPIE_BENCH_PYTHON to a Python with torch and transformers");
    }
    dir
}

/// A `/proc/self/status` figure in MB: `VmHWM` (peak resident set) or `VmRSS` (now).
fn status_mb(key: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// One measurement, in this process: the child mode of the benchmark.
fn measure(dir: &Path, precision: Precision) -> Value {
    let min = Duration::from_secs(2);
    let t = Instant::now();
    let blip = Blip2::load_with(dir.to_str().unwrap(), magpie_core::Device::Cpu, Some(precision)).expect("load");
    let load_s = t.elapsed().as_secs_f64();
    let image = magpie_media::decode_file(Path::new(PHOTO), &Default::default()).expect("photo").image;
    let px = blip.pixel_tensor(&blip.preprocess(&image).unwrap()).unwrap();
    let vision_s = timed(min, 2, || {
        blip.vision_forward(&px).unwrap();
    });
    let ids = blip.prompt_ids(None).unwrap();
    let gen = |n: usize| {
        let opts = GenerateOptions { max_new_tokens: n, min_new_tokens: n, ..Default::default() };
        let out = blip.generate_ids(&px, &ids, &opts, &mut |_| {}).unwrap();
        assert_eq!(out.len(), n);
    };
    let gen1_s = timed(min, 2, || gen(1));
    let gen21_s = timed(min, 2, || gen(21));
    let opts = GenerateOptions { max_new_tokens: 20, min_new_tokens: 20, ..Default::default() };
    let caption_s = timed(min, 2, || {
        let pixels = blip.pixel_tensor(&blip.preprocess(&image).unwrap()).unwrap();
        let out = blip.generate_ids(&pixels, &ids, &opts, &mut |_| {}).unwrap();
        assert_eq!(out.len(), 20);
    });
    // Captioning a folder: 8 images per call (`magpie caption --all` on a CPU), per image.
    let batch: Vec<&magpie_media::image::DynamicImage> = std::iter::repeat_n(&image, 8).collect();
    let caption8_s = timed(min, 1, || {
        let out = blip.caption_batch(&batch, &opts).unwrap();
        assert_eq!(out.len(), 8);
    }) / 8.0;
    json!({
        "caption8_s": caption8_s,
        "dtype": precision.name(),
        "load_s": load_s,
        "vision_s": vision_s,
        "gen1_s": gen1_s,
        "token_ms": (gen21_s - gen1_s) / 20.0 * 1000.0,
        "caption_s": caption_s,
        "peak_rss_mb": status_mb("VmHWM:"),
        "rss_mb": status_mb("VmRSS:"),
    })
}

fn run_child(cmd: &mut Command, what: &str) -> Option<Value> {
    match cmd.output() {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout);
            text.lines().rev().find_map(|l| serde_json::from_str(l).ok())
        }
        Ok(o) => {
            eprintln!("{what} failed: {}", String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or(""));
            None
        }
        Err(e) => {
            eprintln!("{what} not run: {e}");
            None
        }
    }
}

/// The full model's figures from the 2- and 4-layer runs: the vision time grows with
/// ViT-g's layers, the token time with OPT's; the caption grows with both (its OPT part
/// is what remains of its per-layer slope after the vision part); resident memory after
/// the run grows per layer pair, split in proportion to the layers' parameter counts
/// (24.7 M vision, 78.7 M OPT). (Peak memory does not extrapolate: at small depths it is
/// the load's transient copies of the 50,272 × 2,560 embedding table.)
fn extrapolate(shallow: &Value, deep: &Value) -> Value {
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let per = |k: &str| (f(deep, k) - f(shallow, k)) / (DEEP - SHALLOW) as f64;
    let (v_extra, t_extra) = ((VISION_LAYERS - SHALLOW) as f64, (TEXT_LAYERS - SHALLOW) as f64);
    let vision_slope = per("vision_s");
    let caption_text_slope = per("caption_s") - vision_slope;
    let mem_slope = per("rss_mb");
    let (pv, pt) = (24.7, 78.7);
    json!({
        "vision_s": f(shallow, "vision_s") + vision_slope * v_extra,
        "token_ms": f(shallow, "token_ms") + per("token_ms") * t_extra,
        "caption_s": f(shallow, "caption_s") + vision_slope * v_extra + caption_text_slope * t_extra,
        "rss_mb": f(shallow, "rss_mb") + mem_slope * (pv * v_extra + pt * t_extra) / (pv + pt),
        "caption8_s": f(shallow, "caption8_s") + vision_slope * v_extra + (per("caption8_s") - vision_slope) * t_extra,
    })
}

/// Each numeric field's median over the runs (the other fields from the first run).
fn median(runs: &[Value]) -> Value {
    let mut out = runs[0].clone();
    if let Value::Object(map) = &mut out {
        for (k, v) in map.iter_mut() {
            let mut xs: Vec<f64> = runs.iter().filter_map(|r| r[k].as_f64()).collect();
            if xs.len() == runs.len() && v.is_number() {
                xs.sort_by(f64::total_cmp);
                let m = if xs.len() % 2 == 1 { xs[xs.len() / 2] } else { (xs[xs.len() / 2 - 1] + xs[xs.len() / 2]) / 2.0 };
                *v = json!(m);
            }
        }
    }
    out
}

fn main() {
    if let Ok(spec) = std::env::var("MAGPIE_BENCH_BLIP2_CHILD") {
        let (dir, precision) = spec.split_once('|').expect("dir|precision");
        println!("{}", measure(Path::new(dir), precision.parse().unwrap()));
        return;
    }
    let threads = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    let list = |var: &str, default: &str| -> Vec<String> {
        std::env::var(var).unwrap_or_else(|_| default.into()).split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect()
    };
    let ours: Vec<Precision> = list("MAGPIE_BENCH_PRECISIONS", "f32,f16,q8_0,q4_k").iter().map(|p| p.parse().unwrap()).collect();
    let peer_dtypes = if python() == "none" { vec![] } else { list("MAGPIE_BENCH_PEER_DTYPES", "f32,f16,bf16") };
    let exe = std::env::current_exe().unwrap();
    // Each child runs `MAGPIE_BENCH_REPEATS` times (default 3), in rounds that alternate
    // the sides, and every figure is the median of its runs: a token step is bound by
    // memory bandwidth, which on a shared machine drifts between runs by ±20%, and the
    // extrapolation to 32 layers multiplies the difference of two runs.
    let repeats: usize = std::env::var("MAGPIE_BENCH_REPEATS").ok().and_then(|r| r.parse().ok()).unwrap_or(3).max(1);
    // (side, dtype) -> layers -> figures of each run
    let mut all: BTreeMap<(String, String), BTreeMap<usize, Vec<Value>>> = BTreeMap::new();
    for round in 0..repeats {
        eprintln!("round {} of {repeats}", round + 1);
        for layers in [SHALLOW, DEEP] {
            let dir = model_dir(layers);
            for p in &ours {
                let what = format!("magpie {p} L{layers}");
                eprintln!("{what}…");
                let mut cmd = Command::new(&exe);
                cmd.env("MAGPIE_BENCH_BLIP2_CHILD", format!("{}|{p}", dir.display())).env("RAYON_NUM_THREADS", threads.to_string());
                if let Some(v) = run_child(&mut cmd, &what) {
                    all.entry(("magpie".into(), p.name().into())).or_default().entry(layers).or_default().push(v);
                }
            }
            for d in &peer_dtypes {
                let what = format!("transformers {d} L{layers}");
                eprintln!("{what}…");
                let mut cmd = Command::new(python());
                cmd.args(["scripts/bench/peer_blip2.py", dir.to_str().unwrap(), "--dtype", d, "--threads", &threads.to_string(), "--image", PHOTO])
                    .env("OMP_NUM_THREADS", threads.to_string());
                if let Some(v) = run_child(&mut cmd, &what) {
                    all.entry(("transformers".into(), d.clone())).or_default().entry(layers).or_default().push(v);
                }
            }
        }
    }
    let runs: BTreeMap<(String, String), BTreeMap<usize, Value>> =
        all.into_iter().map(|(key, by_layers)| (key, by_layers.into_iter().map(|(l, vs)| (l, median(&vs))).collect())).collect();

    println!("\nBLIP-2 OPT-2.7b shapes, {threads} threads; measured at {SHALLOW} and {DEEP} layers, extrapolated to {VISION_LAYERS} vision + {TEXT_LAYERS} OPT layers");
    println!(
        "{:<24} {:>10} {:>10} {:>10} {:>13} {:>10} | {:>11} {:>10} {:>11} {:>10}",
        "", "vision s", "ms/token", "caption s", "in 8s, s/img", "RSS GB", "L2 vision", "L2 ms/tok", "L8 ms/tok", "L8 peak GB"
    );
    let mut full: BTreeMap<(String, String), Value> = BTreeMap::new();
    for ((side, dtype), by_layers) in &runs {
        let (Some(s), Some(d)) = (by_layers.get(&SHALLOW), by_layers.get(&DEEP)) else { continue };
        let x = extrapolate(s, d);
        let g = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "{:<24} {:>10.3} {:>10.1} {:>10.2} {:>13} {:>10.1} | {:>11.3} {:>10.1} {:>11.1} {:>10.2}",
            format!("{side} {dtype}"),
            g(&x, "vision_s"),
            g(&x, "token_ms"),
            g(&x, "caption_s"),
            if g(&x, "caption8_s").is_nan() { "-".to_string() } else { format!("{:.2}", g(&x, "caption8_s")) },
            g(&x, "rss_mb") / 1024.0,
            g(s, "vision_s"),
            g(s, "token_ms"),
            g(d, "token_ms"),
            g(d, "peak_rss_mb") / 1024.0,
        );
        full.insert((side.clone(), dtype.clone()), x);
    }
    let best_peer = full
        .iter()
        .filter(|((side, _), _)| side == "transformers")
        .min_by(|a, b| a.1["caption_s"].as_f64().unwrap().total_cmp(&b.1["caption_s"].as_f64().unwrap()));
    println!();
    for dtype in ["f32", "f16", "bf16"] {
        if let (Some(m), Some(t)) = (full.get(&("magpie".into(), dtype.into())), full.get(&("transformers".into(), dtype.into()))) {
            let r = |k: &str| t[k].as_f64().unwrap() / m[k].as_f64().unwrap();
            println!(
                "{dtype}: magpie vs transformers (>1 = magpie faster): vision {:.2}x, per token {:.2}x, caption {:.2}x",
                r("vision_s"),
                r("token_ms"),
                r("caption_s")
            );
        }
    }
    if let Some(((_, peer_dtype), peer)) = best_peer {
        let default = Precision::default_for(&magpie_models::select_device(magpie_core::Device::Cpu).unwrap());
        if let Some(m) = full.get(&("magpie".into(), default.name().into())) {
            let ratio = m["caption_s"].as_f64().unwrap() / peer["caption_s"].as_f64().unwrap();
            println!(
                "20-token caption: magpie's default CPU mode ({default}) {:.2} s vs transformers' best ({peer_dtype}) {:.2} s: {ratio:.2}x the time",
                m["caption_s"].as_f64().unwrap(),
                peer["caption_s"].as_f64().unwrap()
            );
        }
    }
}
