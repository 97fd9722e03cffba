//! HNSW against exact search on seeded clustered data (CONVENTIONS rule 5).

mod common;

use common::{exact_of, items, recall, Clustered};
use magpie_index::{HnswIndex, IndexParams};
use std::time::Instant;

/// 20,000 clustered 512-d unit vectors (the width of CLIP ViT-B/32 embeddings), default
/// parameters (m 16, ef_construction 200, ef_search 64): mean recall@10 over 200 held-out
/// queries must be at least 0.95.
#[test]
fn hnsw_recall_at_10_on_20k_clustered_512d_vectors() {
    let (n, dim, k) = (20_000, 512, 10);
    let mut gen = Clustered::embeddings(42, dim, 100);
    let data = gen.points(n);
    let queries = gen.points(200);

    let t = Instant::now();
    let mut hnsw = HnswIndex::new(dim, IndexParams::default()).unwrap();
    hnsw.insert(&items(&data)).unwrap();
    let build = t.elapsed();
    let exact = exact_of(dim, &data);

    let t = Instant::now();
    let approx: Vec<_> = queries.iter().map(|q| hnsw.search(q, k, None, None).unwrap()).collect();
    let search = t.elapsed();
    let mean = queries
        .iter()
        .zip(&approx)
        .map(|(q, got)| {
            assert_eq!(got.len(), k);
            common::assert_sorted_best_first(got);
            recall(got, &exact.search(q, k, None).unwrap())
        })
        .sum::<f64>()
        / queries.len() as f64;
    eprintln!(
        "recall@{k} = {mean:.4} over {} queries; build {build:.2?} for {n} x {dim}; {:.2?} per query",
        queries.len(),
        search / queries.len() as u32
    );
    assert!(mean >= 0.95, "recall@{k} = {mean:.4} < 0.95");

    // Querying with a stored vector (the "similar to this image" case) finds the image
    // itself first, with a score of 1 (the dot product of a unit vector with itself may
    // round above 1; the distance clamps it).
    for id in (0..n).step_by(97) {
        let hits = hnsw.search(&data[id], 1, None, None).unwrap();
        assert_eq!(hits[0].id, id as i64);
        assert!((hits[0].score - 1.0).abs() < 1e-5, "{hits:?}");
    }
}
