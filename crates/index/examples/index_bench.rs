//! Build and query time and recall@10 of the HNSW index against exact search, on the
//! seeded clustered embeddings of the tests. A quick side-by-side for tuning, not a
//! criterion bench. Build it optimised: hnsw_rs' generic code is compiled in this crate.
//!
//! `cargo run --release -p magpie-index --example index_bench -- [n] [dim] [latent] [clusters] [ef_search]`
//! (`latent` = `dim` gives isotropic clusters, the hard case.)

#[path = "../tests/common/mod.rs"]
mod common;

use common::{exact_of, items, recall, Clustered};
use magpie_index::{HnswIndex, IndexParams, IndexSpec, VectorIndex};
use std::time::Instant;

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().expect("numeric arguments")).collect();
    let arg = |i: usize, default: usize| args.get(i).copied().unwrap_or(default);
    let (n, dim, latent, clusters, ef) = (arg(0, 20_000), arg(1, 512), arg(2, 16), arg(3, 100), arg(4, 64));
    let mut gen = Clustered::new(42, dim, latent, clusters, 1.0);
    let data = gen.points(n);
    let queries = gen.points(200);

    let t = Instant::now();
    let mut hnsw = HnswIndex::new(dim, IndexParams::default()).unwrap();
    hnsw.insert(&items(&data)).unwrap();
    let build = t.elapsed();
    drop(hnsw);

    // The same build through the engine's type, saved and reloaded.
    let spec = IndexSpec::new("bench", dim, IndexParams { exact_threshold: 0, ..Default::default() });
    let mut index = VectorIndex::new(spec.clone()).unwrap();
    index.insert(&items(&data)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let t = Instant::now();
    index.save(dir.path(), "vectors").unwrap();
    let save = t.elapsed();
    let bytes: u64 = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
    let t = Instant::now();
    let hnsw = VectorIndex::load(dir.path(), "vectors", &spec, 0).unwrap().ready().expect("loads");
    let load = t.elapsed();
    println!("save {save:.2?}, load {load:.2?}, {:.1} MiB on disk", bytes as f64 / (1 << 20) as f64);
    let exact = exact_of(dim, &data);

    let t = Instant::now();
    let approx: Vec<_> = queries.iter().map(|q| hnsw.search(q, 10, Some(ef), None).unwrap()).collect();
    let hnsw_q = t.elapsed() / queries.len() as u32;
    let t = Instant::now();
    let truth: Vec<_> = queries.iter().map(|q| exact.search(q, 10, None).unwrap()).collect();
    let exact_q = t.elapsed() / queries.len() as u32;
    let mean = approx.iter().zip(&truth).map(|(a, t)| recall(a, t)).sum::<f64>() / queries.len() as f64;
    let top1 = truth.iter().map(|t| t[0].score as f64).sum::<f64>() / truth.len() as f64;
    println!(
        "n={n} dim={dim} latent={latent} clusters={clusters} ef_search={ef} threads={}: build {build:.2?} \
         ({:.0} inserts/s), hnsw {hnsw_q:.2?}/query, exact {exact_q:.2?}/query, recall@10 {mean:.4}, \
         mean top-1 cosine {top1:.3}",
        rayon::current_num_threads(),
        n as f64 / build.as_secs_f64()
    );
}
