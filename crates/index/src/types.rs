use crate::{Error, Result};
use crate::dot::UnitDot;
use hnsw_rs::prelude::Distance;
use magpie_core::{ImageId, ModelInfo};
use serde::{Deserialize, Serialize};
use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap};

/// A query-time predicate over image ids: `true` keeps the image. `Sync` because the
/// exact index scans large libraries on several threads.
pub type Filter<'a> = &'a (dyn Fn(ImageId) -> bool + Sync);

/// Tuning of the vector index, stored with it (rule 9). `m` and `ef_construction` shape
/// the HNSW graph, so a saved graph built with others is stale; `ef_search` and
/// `exact_threshold` only steer queries and growth and are taken from the caller on load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct IndexParams {
    /// Links per node per layer (layer 0 keeps twice as many). 2..=255.
    pub m: usize,
    /// Candidate list size while building; higher is slower to build, better recall.
    pub ef_construction: usize,
    /// Default candidate list size while searching (raised to `k` when smaller).
    pub ef_search: usize,
    /// Below this many vectors the library is searched exactly; at or above it an
    /// HNSW graph is built. 0 means always HNSW, `usize::MAX` always exact. At 512-d an
    /// exact scan of 10,000 vectors takes under a millisecond, about what a graph search
    /// costs, and spares the graph build (seconds per ten thousand vectors).
    pub exact_threshold: usize,
}

impl Default for IndexParams {
    fn default() -> Self {
        Self { m: 16, ef_construction: 200, ef_search: 64, exact_threshold: 10_000 }
    }
}

impl IndexParams {
    pub fn validate(&self) -> Result<()> {
        // hnsw_rs exits the process above 256 and stores m in a u8.
        if !(2..=255).contains(&self.m) {
            return Err(Error::Params(format!("m must be in 2..=255, got {}", self.m)));
        }
        if self.ef_construction == 0 || self.ef_search == 0 {
            return Err(Error::Params("ef_construction and ef_search must be at least 1".into()));
        }
        Ok(())
    }

    /// Whether a graph built with `self` is the graph `other` would build.
    pub(crate) fn same_graph(&self, other: &IndexParams) -> bool {
        self.m == other.m && self.ef_construction == other.ef_construction
    }
}

/// What an index is for: the model whose vectors it holds and how it is built.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexSpec {
    pub model_id: String,
    pub dim: usize,
    pub params: IndexParams,
}

impl IndexSpec {
    pub fn new(model_id: impl Into<String>, dim: usize, params: IndexParams) -> Self {
        Self { model_id: model_id.into(), dim, params }
    }

    pub fn for_model(model: &ModelInfo, params: IndexParams) -> Self {
        Self::new(model.id.clone(), model.dim, params)
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.dim == 0 {
            return Err(Error::Params("dimension must be at least 1".into()));
        }
        self.params.validate()
    }
}

/// Which structure currently holds the vectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IndexKind {
    Exact,
    Hnsw,
}

/// Identity of an index as stored beside its data (`<basename>.meta.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexMeta {
    pub model_id: String,
    pub dim: usize,
    pub params: IndexParams,
    /// The library generation this index reflects; the engine keeps the same counter in
    /// SQLite and rebuilds when they differ.
    pub generation: u64,
    pub kind: IndexKind,
}

/// One search result: cosine similarity (the dot product of unit vectors), in [-1, 1].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Hit {
    pub id: ImageId,
    pub score: f32,
}

/// Orders hits best first: higher score, then lower id so that ties are deterministic.
pub(crate) fn best_first(a: &Hit, b: &Hit) -> Ordering {
    b.score.total_cmp(&a.score).then(a.id.cmp(&b.id))
}

/// A hit ordered so that `Ord::max` is the better one.
#[derive(PartialEq)]
struct Ranked(Hit);
impl Eq for Ranked {}
impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Ranked {
    fn cmp(&self, other: &Self) -> Ordering {
        best_first(&other.0, &self.0)
    }
}

/// Keeps the `k` best hits seen.
pub(crate) struct TopK {
    k: usize,
    heap: BinaryHeap<Reverse<Ranked>>,
}

impl TopK {
    pub fn new(k: usize) -> Self {
        Self { k, heap: BinaryHeap::with_capacity(k.saturating_add(1).min(4096)) }
    }

    pub fn push(&mut self, hit: Hit) {
        if self.k == 0 {
            return;
        }
        if self.heap.len() == self.k {
            let worst = &self.heap.peek().expect("k > 0").0 .0;
            if best_first(&hit, worst) != Ordering::Less {
                return;
            }
            self.heap.pop();
        }
        self.heap.push(Reverse(Ranked(hit)));
    }

    pub fn merge(mut self, other: TopK) -> TopK {
        for Reverse(Ranked(h)) in other.heap {
            self.push(h);
        }
        self
    }

    pub fn into_sorted(self) -> Vec<Hit> {
        let mut hits: Vec<Hit> = self.heap.into_iter().map(|Reverse(Ranked(h))| h).collect();
        hits.sort_by(best_first);
        hits
    }
}

/// Cosine similarity of two unit vectors: `1 - UnitDot` (the dot product, at most 1). Both
/// index kinds score with it, so an image gets the same score whichever kind holds it;
/// the exact index stays an independent reference for the graph search.
#[inline]
pub(crate) fn similarity(a: &[f32], b: &[f32]) -> f32 {
    1.0 - UnitDot.eval(a, b)
}

/// A unit-length copy of `v`, or `None` for a zero or non-finite vector. Everything that
/// reaches the graph goes through here: its distance assumes unit vectors.
pub(crate) fn unit(v: &[f32]) -> Option<Vec<f32>> {
    let mut v = v.to_vec();
    magpie_core::l2_normalize(&mut v).then_some(v)
}

pub(crate) fn unit_query(dim: usize, query: &[f32]) -> Result<Vec<f32>> {
    if query.len() != dim {
        return Err(Error::QueryDimension { expected: dim, got: query.len() });
    }
    unit(query).ok_or(Error::InvalidQuery)
}

/// Checks and normalises a batch before anything is changed, so a bad vector leaves the
/// index as it was. When an id occurs more than once the last vector wins.
pub(crate) fn prepare_batch(dim: usize, items: &[(ImageId, &[f32])]) -> Result<Vec<(ImageId, Vec<f32>)>> {
    let mut out: Vec<(ImageId, Vec<f32>)> = Vec::with_capacity(items.len());
    let mut seen: HashMap<ImageId, usize> = HashMap::with_capacity(items.len());
    for &(id, v) in items {
        if v.len() != dim {
            return Err(Error::Dimension { id, expected: dim, got: v.len() });
        }
        let v = unit(v).ok_or(Error::InvalidVector { id })?;
        match seen.get(&id) {
            Some(&i) => out[i].1 = v,
            None => {
                seen.insert(id, out.len());
                out.push((id, v));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_keeps_best_in_order_with_deterministic_ties() {
        let mut t = TopK::new(3);
        for (id, score) in [(5, 0.1), (1, 0.9), (4, 0.5), (2, 0.5), (3, 0.7), (6, 0.5)] {
            t.push(Hit { id, score });
        }
        let ids: Vec<_> = t.into_sorted().iter().map(|h| h.id).collect();
        assert_eq!(ids, vec![1, 3, 2]);
    }

    #[test]
    fn batch_checks_dimension_finiteness_and_dedups() {
        let a = [3.0f32, 4.0];
        let b = [0.0f32, 2.0];
        let out = prepare_batch(2, &[(1, &a), (2, &b), (1, &b)]).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0], (1, vec![0.0, 1.0]));
        assert!(matches!(prepare_batch(3, &[(7, &a)]), Err(Error::Dimension { id: 7, expected: 3, got: 2 })));
        assert!(matches!(prepare_batch(2, &[(8, &[0.0, 0.0])]), Err(Error::InvalidVector { id: 8 })));
        assert!(matches!(prepare_batch(2, &[(9, &[f32::NAN, 1.0])]), Err(Error::InvalidVector { id: 9 })));
    }

    #[test]
    fn params_are_validated() {
        assert!(IndexParams::default().validate().is_ok());
        assert!(IndexParams { m: 256, ..Default::default() }.validate().is_err());
        assert!(IndexParams { m: 1, ..Default::default() }.validate().is_err());
        assert!(IndexParams { ef_search: 0, ..Default::default() }.validate().is_err());
        let p: IndexParams = serde_json::from_str(r#"{"m": 32}"#).unwrap();
        assert_eq!(p, IndexParams { m: 32, ..Default::default() });
    }
}
