//! Seeded synthetic embeddings shared by the integration tests.
#![allow(dead_code)]

use magpie_index::{ExactIndex, Hit};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub fn gaussian(rng: &mut StdRng) -> f32 {
    // Box-Muller; rand 0.8 without rand_distr has no normal distribution.
    let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
    let u2: f64 = rng.gen();
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

fn unit(mut v: Vec<f32>) -> Vec<f32> {
    assert!(magpie_core::l2_normalize(&mut v));
    v
}

/// `clusters` random unit centres in `dim` dimensions; each point is its centre plus
/// isotropic noise of expected norm `spread`, renormalised. With spread 1.0 a point's
/// cosine to its centre is about 0.7 and to a cluster mate about 0.5.
pub struct Clustered {
    pub dim: usize,
    centres: Vec<Vec<f32>>,
    spread: f32,
    rng: StdRng,
}

impl Clustered {
    pub fn new(seed: u64, dim: usize, clusters: usize, spread: f32) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let centres = (0..clusters).map(|_| unit((0..dim).map(|_| gaussian(&mut rng)).collect())).collect();
        Self { dim, centres, spread, rng }
    }

    pub fn point(&mut self) -> Vec<f32> {
        let c = self.rng.gen_range(0..self.centres.len());
        let scale = self.spread / (self.dim as f32).sqrt();
        let v = (0..self.dim).map(|i| self.centres[c][i] + scale * gaussian(&mut self.rng)).collect();
        unit(v)
    }

    pub fn points(&mut self, n: usize) -> Vec<Vec<f32>> {
        (0..n).map(|_| self.point()).collect()
    }
}

/// Ids 0..n for `vectors`, as the index API wants them.
pub fn items(vectors: &[Vec<f32>]) -> Vec<(i64, &[f32])> {
    vectors.iter().enumerate().map(|(i, v)| (i as i64, v.as_slice())).collect()
}

pub fn exact_of(dim: usize, vectors: &[Vec<f32>]) -> ExactIndex {
    let mut e = ExactIndex::new(dim);
    e.insert(&items(vectors)).unwrap();
    e
}

pub fn ids(hits: &[Hit]) -> Vec<i64> {
    hits.iter().map(|h| h.id).collect()
}

/// Share of `truth` ids found in `got`.
pub fn recall(got: &[Hit], truth: &[Hit]) -> f64 {
    if truth.is_empty() {
        return 1.0;
    }
    let found = truth.iter().filter(|t| got.iter().any(|g| g.id == t.id)).count();
    found as f64 / truth.len() as f64
}

pub fn assert_sorted_best_first(hits: &[Hit]) {
    for w in hits.windows(2) {
        assert!(w[0].score >= w[1].score, "not sorted by descending score: {hits:?}");
    }
}
