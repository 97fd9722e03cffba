use crate::exact::ExactIndex;
use crate::hnsw::HnswIndex;
use crate::types::{prepare_batch, Filter, Hit, IndexKind, IndexMeta, IndexSpec};
use crate::Result;
use magpie_core::ImageId;
use std::collections::HashSet;

/// The engine's vector index: exact below `params.exact_threshold` vectors, an HNSW
/// graph from there on (the switch happens inside [`insert`](Self::insert), once; a
/// [`compact`](Self::compact) that leaves fewer vectors switches back).
///
/// `search` takes `&self` and the mutators `&mut self`, so an `RwLock<VectorIndex>` lets
/// queries run concurrently; the type is `Send + Sync`.
#[derive(Debug)]
pub struct VectorIndex {
    pub(crate) spec: IndexSpec,
    pub(crate) generation: u64,
    pub(crate) inner: Inner,
}

#[derive(Debug)]
pub(crate) enum Inner {
    Exact(ExactIndex),
    Hnsw(HnswIndex),
}

impl VectorIndex {
    /// An empty index (generation 0) for `spec`; fails on invalid parameters.
    pub fn new(spec: IndexSpec) -> Result<Self> {
        spec.validate()?;
        let inner = if spec.params.exact_threshold == 0 {
            Inner::Hnsw(HnswIndex::new(spec.dim, spec.params)?)
        } else {
            Inner::Exact(ExactIndex::new(spec.dim))
        };
        Ok(Self { spec, generation: 0, inner })
    }

    pub fn spec(&self) -> &IndexSpec {
        &self.spec
    }

    pub fn dim(&self) -> usize {
        self.spec.dim
    }

    pub fn kind(&self) -> IndexKind {
        match self.inner {
            Inner::Exact(_) => IndexKind::Exact,
            Inner::Hnsw(_) => IndexKind::Hnsw,
        }
    }

    pub fn meta(&self) -> IndexMeta {
        IndexMeta {
            model_id: self.spec.model_id.clone(),
            dim: self.spec.dim,
            params: self.spec.params,
            generation: self.generation,
            kind: self.kind(),
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Stamp the library generation this index now reflects (saved with it).
    pub fn set_generation(&mut self, generation: u64) {
        self.generation = generation;
    }

    /// Default `ef` for later searches (query-time only; the graph is unchanged).
    pub fn set_ef_search(&mut self, ef: usize) {
        self.spec.params.ef_search = ef.max(1);
        if let Inner::Hnsw(h) = &mut self.inner {
            h.set_ef_search(self.spec.params.ef_search);
        }
    }

    /// Live images.
    pub fn len(&self) -> usize {
        match &self.inner {
            Inner::Exact(e) => e.len(),
            Inner::Hnsw(h) => h.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Dead points still in the HNSW graph (always 0 for the exact index). Worth a
    /// [`compact`](Self::compact) once they are a sizeable share of [`len`](Self::len).
    pub fn tombstones(&self) -> usize {
        match &self.inner {
            Inner::Exact(_) => 0,
            Inner::Hnsw(h) => h.tombstones(),
        }
    }

    pub fn contains(&self, id: ImageId) -> bool {
        match &self.inner {
            Inner::Exact(e) => e.contains(id),
            Inner::Hnsw(h) => h.contains(id),
        }
    }

    /// Adds or supersedes vectors (any length-`dim`, finite, non-zero vector; normalised
    /// here). All-or-nothing: an error names the first bad image and changes nothing.
    pub fn insert(&mut self, items: &[(ImageId, &[f32])]) -> Result<()> {
        let batch = prepare_batch(self.spec.dim, items)?;
        match &mut self.inner {
            Inner::Hnsw(h) => h.insert_unit(batch),
            Inner::Exact(e) => {
                let added = batch.iter().filter(|(id, _)| !e.contains(*id)).count();
                if e.len() + added < self.spec.params.exact_threshold {
                    e.insert_unit(batch);
                } else {
                    // Build the graph once from everything, in parallel.
                    let replaced: HashSet<ImageId> = batch.iter().map(|(id, _)| *id).collect();
                    let mut all: Vec<(ImageId, Vec<f32>)> = e
                        .iter()
                        .filter(|(id, _)| !replaced.contains(id))
                        .map(|(id, v)| (id, v.to_vec()))
                        .collect();
                    all.extend(batch);
                    let mut h = HnswIndex::with_capacity(self.spec.dim, self.spec.params, all.len())?;
                    h.insert_unit(all);
                    self.inner = Inner::Hnsw(h);
                }
            }
        }
        Ok(())
    }

    /// Removes `id` (a tombstone in the graph); returns whether it was live.
    pub fn remove(&mut self, id: ImageId) -> bool {
        match &mut self.inner {
            Inner::Exact(e) => e.remove(id),
            Inner::Hnsw(h) => h.remove(id),
        }
    }

    /// The `k` most similar live images passing `filter`, best first, scored by cosine
    /// similarity. `ef` overrides `params.ef_search` for this query (ignored when exact).
    /// Fewer than `k` hits means fewer than `k` live images pass the filter.
    pub fn search(&self, query: &[f32], k: usize, ef: Option<usize>, filter: Option<Filter<'_>>) -> Result<Vec<Hit>> {
        match &self.inner {
            Inner::Exact(e) => e.search(query, k, filter),
            Inner::Hnsw(h) => h.search(query, k, ef, filter),
        }
    }

    /// Drops tombstones by rebuilding the graph from its own live vectors (no SQLite
    /// needed); below the exact threshold the result is an exact index.
    pub fn compact(&mut self) -> Result<()> {
        if let Inner::Hnsw(h) = &mut self.inner {
            if h.len() < self.spec.params.exact_threshold {
                let mut e = ExactIndex::new(self.spec.dim);
                e.insert_unit(h.live_vectors());
                self.inner = Inner::Exact(e);
            } else {
                h.compact();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::IndexParams;

    fn spec(threshold: usize) -> IndexSpec {
        IndexSpec::new("m", 2, IndexParams { exact_threshold: threshold, ..Default::default() })
    }

    #[test]
    fn switches_to_hnsw_at_the_threshold_and_back_on_compaction() {
        let mut ix = VectorIndex::new(spec(4)).unwrap();
        assert_eq!(ix.kind(), IndexKind::Exact);
        ix.insert(&[(1, &[1.0, 0.0]), (2, &[0.0, 1.0]), (3, &[1.0, 1.0])]).unwrap();
        // Superseding does not grow the library.
        ix.insert(&[(3, &[-1.0, 1.0])]).unwrap();
        assert_eq!(ix.kind(), IndexKind::Exact);
        ix.insert(&[(4, &[-1.0, 0.0]), (1, &[1.0, 0.1])]).unwrap();
        assert_eq!(ix.kind(), IndexKind::Hnsw);
        assert_eq!(ix.len(), 4);
        let hits = ix.search(&[-1.0, 1.0], 1, None, None).unwrap();
        assert_eq!(hits[0].id, 3);
        assert!(ix.remove(4));
        ix.compact().unwrap();
        assert_eq!(ix.kind(), IndexKind::Exact);
        assert_eq!(ix.len(), 3);
        let hits = ix.search(&[1.0, 0.1], 3, None, None).unwrap();
        assert_eq!(hits.iter().map(|h| h.id).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert!((hits[0].score - 1.0).abs() < 1e-6);
    }

    #[test]
    fn can_be_shared_behind_an_rwlock() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<std::sync::RwLock<VectorIndex>>();
    }

    #[test]
    fn threshold_zero_is_always_hnsw() {
        let ix = VectorIndex::new(spec(0)).unwrap();
        assert_eq!(ix.kind(), IndexKind::Hnsw);
        assert!(ix.search(&[1.0, 0.0], 3, None, None).unwrap().is_empty());
    }
}
