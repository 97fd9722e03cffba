//! Vector index speed and recall on real data, side by side with hnswlib in one run:
//!
//!     MAGPIE_BENCH_PYTHON=/path/to/python cargo bench --bench index
//!
//! Fashion-MNIST: the 60,000 training images are the index, the test images the queries,
//! each image 784 pixels as an f32 vector, L2-normalised (cosine similarity). Both sides
//! build with M=16, ef_construction=200 on the same threads, then answer the queries one
//! at a time on one thread for each `ef`; recall@10 is against exact search (computed
//! once, cached under `bench-data/`). The table compares queries/s at equal recall:
//! hnswlib's rate interpolated at magpie's recall on hnswlib's own recall/rate curve.
//!
//! Environment: `MAGPIE_FMNIST_DIR` (IDX files, gzipped or not; default
//! `/usr/share/datasets/fashion-mnist`, from `apt-get install dataset-fashion-mnist`),
//! `MAGPIE_BENCH_PYTHON` (a Python with hnswlib and numpy; default `python3`; `none` skips
//! the peer), `MAGPIE_BENCH_QUERIES` (default 10000), `MAGPIE_BENCH_EFS` (default
//! `16,32,64,128,256`), `RAYON_NUM_THREADS` (build threads for both, default all cores).

mod common;
use common::python;
use magpie_index::{ExactIndex, HnswIndex, IndexParams};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const K: usize = 10;
const M: usize = 16;
const EF_CONSTRUCTION: usize = 200;
/// Each `ef` is timed over whole passes of the query set, at least this long in all and
/// at least `MIN_PASSES` times; the best pass counts (least disturbed by other load).
/// Passes are timed in CPU time of the querying thread on both sides (`thread_time()` in
/// Python), which on an idle machine equals wall time and on a shared one leaves out the
/// time spent waiting for a core.
const MIN_TIME: Duration = Duration::from_secs(2);
const MIN_PASSES: usize = 2;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// CPU seconds used by the calling thread (wall-clock seconds where unavailable).
fn thread_time() -> f64 {
    #[cfg(unix)]
    {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
        if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } == 0 {
            return ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9;
        }
    }
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs_f64()
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// An IDX image file (`name` or `name.gz`) as unit f32 vectors, one per image.
fn read_images(dir: &Path, name: &str) -> (PathBuf, Vec<Vec<f32>>) {
    let plain = dir.join(name);
    let gz = dir.join(format!("{name}.gz"));
    let path = if plain.is_file() { plain } else { gz };
    let raw = std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read {}: {e}\nFashion-MNIST is needed: `apt-get install dataset-fashion-mnist` \
             (or set MAGPIE_FMNIST_DIR to a folder with {name}[.gz])",
            path.display()
        )
    });
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..]).read_to_end(&mut out).expect("gunzip");
        out
    } else {
        raw
    };
    let be = |i: usize| u32::from_be_bytes(bytes[i..i + 4].try_into().unwrap()) as usize;
    assert_eq!(be(0), 0x0803, "{}: not an IDX file of u8 images", path.display());
    let (n, dim) = (be(4), be(8) * be(12));
    assert_eq!(bytes.len(), 16 + n * dim, "{}: truncated", path.display());
    let vectors = bytes[16..]
        .chunks_exact(dim)
        .map(|px| {
            let v: Vec<f32> = px.iter().map(|&p| p as f32).collect();
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!(norm > 0.0, "{}: a blank image", path.display());
            v.iter().map(|x| x / norm).collect()
        })
        .collect();
    (path, vectors)
}

/// Exact top-`K` ids of each query, cached in `bench-data/` (keyed by the data sizes).
fn ground_truth(train: &[Vec<f32>], queries: &[Vec<f32>]) -> (PathBuf, Vec<Vec<u32>>) {
    let path = PathBuf::from(format!("bench-data/fmnist-knn{K}-{}x{}.u32", train.len(), queries.len()));
    if let Ok(bytes) = std::fs::read(&path) {
        if bytes.len() == queries.len() * K * 4 {
            let ids: Vec<u32> = bytes.chunks_exact(4).map(|b| u32::from_le_bytes(b.try_into().unwrap())).collect();
            return (path, ids.chunks_exact(K).map(<[u32]>::to_vec).collect());
        }
    }
    eprintln!("computing exact top-{K} of {} queries (once; cached in {})…", queries.len(), path.display());
    let t = Instant::now();
    let mut exact = ExactIndex::new(train[0].len());
    let items: Vec<(i64, &[f32])> = train.iter().enumerate().map(|(i, v)| (i as i64, v.as_slice())).collect();
    exact.insert(&items).unwrap();
    let truth: Vec<Vec<u32>> =
        queries.iter().map(|q| exact.search(q, K, None).unwrap().iter().map(|h| h.id as u32).collect()).collect();
    eprintln!("  {:.1?}", t.elapsed());
    std::fs::create_dir_all("bench-data").unwrap();
    let bytes: Vec<u8> = truth.iter().flatten().flat_map(|id| id.to_le_bytes()).collect();
    std::fs::write(&path, bytes).unwrap();
    (path, truth)
}

fn recall(found: &[Vec<u32>], truth: &[Vec<u32>]) -> f64 {
    let hits: usize = found.iter().zip(truth).map(|(f, t)| f.iter().filter(|id| t.contains(id)).count()).sum();
    hits as f64 / (truth.len() * K) as f64
}

struct Point {
    ef: usize,
    recall: f64,
    qps: f64,
}

/// q/s of `curve` at `recall`, interpolating log(q/s) linearly in recall between the two
/// neighbouring points; `None` outside the curve's recall range.
fn qps_at(curve: &[(f64, f64)], recall: f64) -> Option<f64> {
    let mut pts = curve.to_vec();
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    for w in pts.windows(2) {
        let ((r0, q0), (r1, q1)) = (w[0], w[1]);
        if (r0..=r1).contains(&recall) {
            if r1 - r0 < 1e-12 {
                return Some(q0.max(q1));
            }
            let t = (recall - r0) / (r1 - r0);
            return Some((q0.ln() + t * (q1.ln() - q0.ln())).exp());
        }
    }
    None
}

fn main() {
    let dir = PathBuf::from(
        std::env::var("MAGPIE_FMNIST_DIR").unwrap_or_else(|_| "/usr/share/datasets/fashion-mnist".into()),
    );
    let n_queries: usize = env_or("MAGPIE_BENCH_QUERIES", 10_000);
    let efs: Vec<usize> = std::env::var("MAGPIE_BENCH_EFS")
        .unwrap_or_else(|_| "16,32,64,128,256".into())
        .split(',')
        .map(|s| s.trim().parse().expect("MAGPIE_BENCH_EFS: comma-separated numbers"))
        .collect();
    let threads: usize =
        env_or("RAYON_NUM_THREADS", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    let load_before = loadavg();

    let (train_path, train) = read_images(&dir, "train-images-idx3-ubyte");
    let (test_path, mut queries) = read_images(&dir, "t10k-images-idx3-ubyte");
    queries.truncate(n_queries);
    let dim = train[0].len();
    let (truth_path, truth) = ground_truth(&train, &queries);

    // magpie: parallel build, then one query at a time on this thread.
    let params = IndexParams { m: M, ef_construction: EF_CONSTRUCTION, ..Default::default() };
    let items: Vec<(i64, &[f32])> = train.iter().enumerate().map(|(i, v)| (i as i64, v.as_slice())).collect();
    let t = Instant::now();
    let mut hnsw = HnswIndex::with_capacity(dim, params, train.len()).unwrap();
    hnsw.insert(&items).unwrap();
    let build_s = t.elapsed().as_secs_f64();
    let magpie_build = train.len() as f64 / build_s;
    eprintln!("magpie build: {build_s:.1} s ({magpie_build:.0} vectors/s, {threads} threads)");

    let run = |ef: usize, filter: Option<magpie_index::Filter<'_>>| {
        let mut found = Vec::new();
        let (mut best, mut passes, start) = (f64::INFINITY, 0, Instant::now());
        while passes < MIN_PASSES || start.elapsed() < MIN_TIME {
            let t = thread_time();
            found = queries
                .iter()
                .map(|q| hnsw.search(q, K, Some(ef), filter).unwrap().iter().map(|h| h.id as u32).collect())
                .collect();
            best = best.min(thread_time() - t);
            passes += 1;
        }
        Point { ef, recall: recall(&found, &truth), qps: queries.len() as f64 / best }
    };
    let mut magpie = Vec::new();
    for &ef in &efs {
        let p = run(ef, None);
        eprintln!("magpie ef={ef}: recall@{K} {:.4}, {:.0} q/s", p.recall, p.qps);
        magpie.push(p);
    }
    // The engine always searches with a filter (it leaves out the query image itself).
    let engine_ef = IndexParams::default().ef_search;
    let filtered = run(engine_ef, Some(&|id| id != -1));
    drop(hnsw);

    // hnswlib on the same files, truth, threads and ef list.
    let peer: Option<serde_json::Value> = if python() == "none" {
        None
    } else {
        let efs_arg = efs.iter().map(|e| e.to_string()).collect::<Vec<_>>().join(",");
        let out = Command::new(python())
            .arg("scripts/bench/peer_hnswlib.py")
            .args(["--train", train_path.to_str().unwrap(), "--test", test_path.to_str().unwrap()])
            .args(["--truth", truth_path.to_str().unwrap(), "--queries", &queries.len().to_string()])
            .args(["--threads", &threads.to_string(), "--efs", &efs_arg, "--k", &K.to_string()])
            .args(["--m", &M.to_string(), "--ef-construction", &EF_CONSTRUCTION.to_string()])
            .args(["--min-time", &MIN_TIME.as_secs_f64().to_string(), "--min-passes", &MIN_PASSES.to_string()])
            .env("OMP_NUM_THREADS", "1")
            .output();
        match out {
            Ok(o) if o.status.success() => serde_json::from_slice(&o.stdout).ok(),
            Ok(o) => {
                eprintln!("peer script failed: {}", String::from_utf8_lossy(&o.stderr));
                None
            }
            Err(e) => {
                eprintln!("peer script not run ({e}); set MAGPIE_BENCH_PYTHON to a Python with hnswlib, or `none`");
                None
            }
        }
    };
    let peer_point = |ef: usize| {
        let p = &peer.as_ref()?["efs"][ef.to_string()];
        Some((p["recall"].as_f64()?, p["qps"].as_f64()?))
    };
    let curve: Vec<(f64, f64)> = efs.iter().filter_map(|&ef| peer_point(ef)).collect();

    println!(
        "\nFashion-MNIST: {} x {dim} index, {} queries, recall@{K}, M={M}, ef_construction={EF_CONSTRUCTION}; \
         build on {threads} threads, queries one at a time on 1 thread (q/s in thread CPU time)",
        train.len(),
        queries.len()
    );
    println!("load average before {load_before}, after {}", loadavg());
    let peer_build = peer.as_ref().and_then(|p| p["build_rate"].as_f64());
    println!(
        "build vectors/s: magpie {magpie_build:.0}, hnswlib {} ({})",
        peer_build.map(|v| format!("{v:.0}")).unwrap_or("-".into()),
        peer_build.map(|v| format!("{:.2}x", magpie_build / v)).unwrap_or("-".into())
    );
    println!(
        "{:>5} {:>14} {:>12} {:>15} {:>13} {:>22}",
        "ef", "magpie recall", "magpie q/s", "hnswlib recall", "hnswlib q/s", "q/s ratio, equal recall"
    );
    let mut worst: Option<f64> = None;
    for p in &magpie {
        let h = peer_point(p.ef);
        let at = qps_at(&curve, p.recall);
        if let Some(q) = at {
            worst = Some(worst.map_or(p.qps / q, |w: f64| w.min(p.qps / q)));
        }
        println!(
            "{:>5} {:>14.4} {:>12.0} {:>15} {:>13} {:>22}",
            p.ef,
            p.recall,
            p.qps,
            h.map(|h| format!("{:.4}", h.0)).unwrap_or("-".into()),
            h.map(|h| format!("{:.0}", h.1)).unwrap_or("-".into()),
            at.map(|q| format!("{:.2}x (of {q:.0})", p.qps / q)).unwrap_or("- (out of range)".into()),
        );
    }
    if let Some(p) = magpie.iter().find(|p| p.ef == engine_ef) {
        println!(
            "magpie with a filter (the engine's path), ef={engine_ef}: recall {:.4}, {:.0} q/s ({:.2}x unfiltered)",
            filtered.recall,
            filtered.qps,
            filtered.qps / p.qps
        );
    }
    if let Some(w) = worst {
        println!("lowest q/s ratio at equal recall: {w:.2}x (target >= 0.80x)");
    }
    if let Some(p) = &peer {
        println!("peer: hnswlib {}, numpy {}", p["hnswlib"], p["numpy"]);
    }
}
