//! Build/search timing and recall of the HNSW index against exact search on seeded
//! clustered unit vectors. Not a criterion bench: a quick side-by-side for tuning.
//!
//! `cargo run --release -p magpie-index --example index_bench -- [n] [dim] [clusters] [spread] [ef]`

use magpie_index::{ExactIndex, HnswIndex, IndexParams};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::time::Instant;

fn gaussian(rng: &mut StdRng) -> f32 {
    let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
    let u2: f64 = rng.gen();
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, d: f64| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (n, dim, clusters, spread, ef, latent) = (
        arg(0, 20_000.0) as usize,
        arg(1, 512.0) as usize,
        arg(2, 200.0) as usize,
        arg(3, 1.0) as f32,
        arg(4, 64.0) as usize,
        arg(5, 0.0) as usize,
    );
    let mut rng = StdRng::seed_from_u64(42);
    // latent == 0: centre + isotropic noise in `dim`; else a Gaussian mixture in `latent`
    // dimensions, projected by a fixed random matrix, plus 10% isotropic noise.
    let l = if latent == 0 { dim } else { latent };
    let proj: Vec<Vec<f32>> = (0..dim).map(|_| (0..l).map(|_| gaussian(&mut rng)).collect()).collect();
    let centres: Vec<Vec<f32>> = (0..clusters).map(|_| (0..l).map(|_| gaussian(&mut rng)).collect()).collect();
    let mut point = |rng: &mut StdRng| -> Vec<f32> {
        let c = &centres[rng.gen_range(0..clusters)];
        let z: Vec<f32> = c.iter().map(|x| x + spread * gaussian(rng)).collect();
        if latent == 0 {
            return z;
        }
        let v: Vec<f32> = proj.iter().map(|row| row.iter().zip(&z).map(|(a, b)| a * b).sum::<f32>()).collect();
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt() / (dim as f32).sqrt();
        v.iter().map(|x| x + 0.1 * norm * gaussian(rng)).collect()
    };
    let data: Vec<Vec<f32>> = (0..n).map(|_| point(&mut rng)).collect();
    let queries: Vec<Vec<f32>> = (0..200).map(|_| point(&mut rng)).collect();
    let items: Vec<(i64, &[f32])> = data.iter().enumerate().map(|(i, v)| (i as i64, v.as_slice())).collect();

    let t = Instant::now();
    let mut hnsw = HnswIndex::new(dim, IndexParams::default()).unwrap();
    hnsw.insert(&items).unwrap();
    let build = t.elapsed();
    let mut exact = ExactIndex::new(dim);
    exact.insert(&items).unwrap();

    let t = Instant::now();
    let approx: Vec<_> = queries.iter().map(|q| hnsw.search(q, 10, Some(ef), None).unwrap()).collect();
    let hnsw_q = t.elapsed() / queries.len() as u32;
    let t = Instant::now();
    let truth: Vec<_> = queries.iter().map(|q| exact.search(q, 10, None).unwrap()).collect();
    let exact_q = t.elapsed() / queries.len() as u32;
    let recall = approx
        .iter()
        .zip(&truth)
        .map(|(a, t)| t.iter().filter(|h| a.iter().any(|g| g.id == h.id)).count() as f64 / t.len() as f64)
        .sum::<f64>()
        / queries.len() as f64;
    let mean_top = truth.iter().map(|t| t[0].score as f64).sum::<f64>() / truth.len() as f64;
    println!(
        "n={n} dim={dim} latent={latent} clusters={clusters} spread={spread} ef={ef} threads={}: build {build:.2?} ({:.0} inserts/s), \
         hnsw {hnsw_q:.2?}/query, exact {exact_q:.2?}/query, recall@10 {recall:.4}, mean top-1 cosine {mean_top:.3}",
        rayon::current_num_threads(),
        n as f64 / build.as_secs_f64()
    );
}
