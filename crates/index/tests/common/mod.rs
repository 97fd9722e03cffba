//! Seeded synthetic embeddings shared by the integration tests and `examples/index_bench`.
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

/// Clustered unit vectors shaped like image embeddings, whose intrinsic dimension is far
/// below their width: a mixture of `clusters` Gaussians (centres N(0, 1), each point its
/// centre plus N(0, spread²) noise) in `latent` dimensions, mapped to `dim` by a fixed
/// random matrix, plus isotropic noise of 10% of the norm, renormalised. With
/// `latent == dim` there is no projection: centre plus isotropic noise, the hard case
/// for a graph index (within a cluster the points are as good as random).
pub struct Clustered {
    pub dim: usize,
    latent: usize,
    projection: Option<Vec<Vec<f32>>>,
    centres: Vec<Vec<f32>>,
    spread: f32,
    rng: StdRng,
}

impl Clustered {
    pub fn new(seed: u64, dim: usize, latent: usize, clusters: usize, spread: f32) -> Self {
        assert!(latent <= dim);
        let mut rng = StdRng::seed_from_u64(seed);
        let projection =
            (latent < dim).then(|| (0..dim).map(|_| (0..latent).map(|_| gaussian(&mut rng)).collect()).collect());
        let centres = (0..clusters).map(|_| (0..latent).map(|_| gaussian(&mut rng)).collect()).collect();
        Self { dim, latent, projection, centres, spread, rng }
    }

    /// The defaults of the tests: 16 latent dimensions, spread 1.
    pub fn embeddings(seed: u64, dim: usize, clusters: usize) -> Self {
        Self::new(seed, dim, 16.min(dim), clusters, 1.0)
    }

    pub fn point(&mut self) -> Vec<f32> {
        let c = self.rng.gen_range(0..self.centres.len());
        let z: Vec<f32> = (0..self.latent).map(|i| self.centres[c][i] + self.spread * gaussian(&mut self.rng)).collect();
        let Some(projection) = &self.projection else { return unit(z) };
        let v: Vec<f32> = projection.iter().map(|row| row.iter().zip(&z).map(|(a, b)| a * b).sum()).collect();
        let noise = 0.1 * v.iter().map(|x| x * x).sum::<f32>().sqrt() / (self.dim as f32).sqrt();
        unit(v.iter().map(|x| x + noise * gaussian(&mut self.rng)).collect())
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
