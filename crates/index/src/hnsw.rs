//! Approximate search over an hnsw_rs graph with dot-product distance on unit vectors.
//!
//! hnsw_rs cannot delete, so the graph is append-only: every insert gets a fresh internal
//! data id, `ids` maps it back to the image, and removed or superseded entries are
//! tombstones that still route searches but are filtered from results. [`HnswIndex::compact`]
//! rebuilds the graph from its own live vectors when tombstones pile up.
//!
//! hnsw_rs builds and persists the graph; searches walk a [`FlatGraph`] view of it,
//! made on the first search after the graph changed (see `flat.rs` for why).

use crate::dot::UnitDot;
use crate::flat::FlatGraph;
use crate::types::{prepare_batch, unit_query, Filter, Hit, IndexParams, TopK};
use crate::{Error, Result};
use hnsw_rs::prelude::{Hnsw, HnswIo};
use magpie_core::ImageId;
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;

/// hnsw_rs' `Description` dump refuses any other layer count.
const MAX_LAYERS: usize = 16;
/// Below this many vectors a batch is inserted on the calling thread.
const PARALLEL_INSERT: usize = 256;

/// A hit's score from a view distance, as the exact index scores it (`1 - UnitDot`).
fn score(dist: f32) -> f32 {
    1.0 - dist.max(0.0)
}

type Graph<'io> = Hnsw<'io, f32, UnitDot>;

self_cell::self_cell!(
    /// The graph together with the `HnswIo` it was reloaded from. `HnswIo::load_hnsw*`
    /// returns an `Hnsw<'io>` borrowing its loader (the loader may own an mmap of the
    /// data), so the loader must outlive the graph. We keep both in one self-referential
    /// cell (boxed owner, dropped after the graph) instead of transmuting the lifetime
    /// away, which would be sound only as long as hnsw_rs never maps memory for us, or
    /// leaking the loader. A fresh graph gets an empty `HnswIo::default()` as owner.
    struct GraphCell {
        owner: HnswIo,
        #[not_covariant]
        dependent: Graph,
    }
);

pub struct HnswIndex {
    dim: usize,
    params: IndexParams,
    graph: GraphCell,
    /// internal data id -> image id
    ids: Vec<ImageId>,
    /// internal data id -> still the current vector of its image
    live: Vec<bool>,
    /// image id -> its current internal data id
    current: HashMap<ImageId, usize>,
    /// The search view of `graph`, made on demand; reset whenever `graph` changes. It
    /// points into `graph`'s points, so it must never outlive it or be moved to another
    /// graph (it is declared after `graph` only for clarity: it reads nothing on drop).
    flat: OnceLock<Box<FlatGraph>>,
}

impl std::fmt::Debug for HnswIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HnswIndex")
            .field("dim", &self.dim)
            .field("params", &self.params)
            .field("live", &self.len())
            .field("points", &self.points())
            .finish()
    }
}

fn new_graph(params: &IndexParams, capacity: usize) -> GraphCell {
    GraphCell::new(HnswIo::default(), |_| {
        Hnsw::new(params.m, capacity.max(1024), MAX_LAYERS, params.ef_construction, UnitDot)
    })
}

impl HnswIndex {
    pub fn new(dim: usize, params: IndexParams) -> Result<Self> {
        Self::with_capacity(dim, params, 0)
    }

    /// `capacity` only pre-sizes hnsw_rs' layer tables.
    pub fn with_capacity(dim: usize, params: IndexParams, capacity: usize) -> Result<Self> {
        params.validate()?;
        if dim == 0 {
            return Err(Error::Params("dimension must be at least 1".into()));
        }
        Ok(Self {
            dim,
            params,
            graph: new_graph(&params, capacity),
            ids: Vec::new(),
            live: Vec::new(),
            current: HashMap::new(),
            flat: OnceLock::new(),
        })
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn params(&self) -> &IndexParams {
        &self.params
    }

    pub(crate) fn set_ef_search(&mut self, ef: usize) {
        self.params.ef_search = ef;
    }

    /// Live images.
    pub fn len(&self) -> usize {
        self.current.len()
    }

    pub fn is_empty(&self) -> bool {
        self.current.is_empty()
    }

    /// Points in the graph, live or not.
    pub fn points(&self) -> usize {
        self.ids.len()
    }

    /// Removed or superseded points still in the graph.
    pub fn tombstones(&self) -> usize {
        self.points() - self.len()
    }

    pub fn contains(&self, id: ImageId) -> bool {
        self.current.contains_key(&id)
    }

    /// Adds vectors (normalised here), in parallel for large batches. An id already present
    /// is superseded: its old point becomes a tombstone. All-or-nothing on bad input.
    pub fn insert(&mut self, items: &[(ImageId, &[f32])]) -> Result<()> {
        let batch = prepare_batch(self.dim, items)?;
        self.insert_unit(batch);
        Ok(())
    }

    pub(crate) fn insert_unit(&mut self, batch: Vec<(ImageId, Vec<f32>)>) {
        // The graph's links are about to change.
        self.flat = OnceLock::new();
        let first = self.ids.len();
        for (i, (id, _)) in batch.iter().enumerate() {
            if let Some(old) = self.current.insert(*id, first + i) {
                self.live[old] = false;
            }
            self.ids.push(*id);
            self.live.push(true);
        }
        let data: Vec<(&[f32], usize)> =
            batch.iter().enumerate().map(|(i, (_, v))| (v.as_slice(), first + i)).collect();
        self.graph.with_dependent(|_, g| {
            if data.len() >= PARALLEL_INSERT {
                g.parallel_insert_slice(&data);
            } else {
                data.iter().for_each(|&d| g.insert_slice(d));
            }
        });
    }

    /// Tombstones `id`; returns whether it was live.
    pub fn remove(&mut self, id: ImageId) -> bool {
        match self.current.remove(&id) {
            Some(internal) => {
                self.live[internal] = false;
                true
            }
            None => false,
        }
    }

    /// The search view of the graph, made now if the graph changed since the last one.
    fn flat(&self) -> &FlatGraph {
        self.flat.get_or_init(|| {
            self.graph
                .with_dependent(|_, g| FlatGraph::new(g, self.points(), self.dim))
                .map(Box::new)
                .expect("a graph built here holds each data id once")
        })
    }

    /// The `k` most similar live vectors passing `filter`, best first. `ef` (default
    /// `params.ef_search`, at least `k`) widens the graph search.
    ///
    /// Tombstones and the filter are applied inside the graph walk, where they still
    /// route it. The filtered walk only stops early once it holds `ef` passing points,
    /// so when it comes back with fewer than `k` it has walked everything it could
    /// reach; the rest (a graph region cut off by tombstones) is covered by an exact
    /// scan. A filter that very few images pass therefore costs about one pass over the
    /// graph: for "these 20 ids" queries, score the ids directly instead.
    pub fn search(&self, query: &[f32], k: usize, ef: Option<usize>, filter: Option<Filter<'_>>) -> Result<Vec<Hit>> {
        let q = unit_query(self.dim, query)?;
        let k = k.min(self.len());
        if k == 0 {
            return Ok(Vec::new());
        }
        let ef = ef.unwrap_or(self.params.ef_search).max(k);
        let flat = self.flat();
        let keep = |d: u32| self.live[d as usize] && filter.is_none_or(|f| f(self.ids[d as usize]));
        let plain = filter.is_none() && self.tombstones() == 0;
        let mut widths = vec![ef];
        let wider = ef.saturating_mul(8).min(self.points());
        if plain && wider > ef {
            // Only a graph cut in pieces leaves an unfiltered walk short of `k`.
            widths.push(wider);
        }
        for width in widths {
            let found = flat.search(&q, k, width, if plain { None } else { Some(&keep) });
            if found.len() >= k {
                let mut hits: Vec<Hit> =
                    found.iter().map(|&(d, dist)| Hit { id: self.ids[d as usize], score: score(dist) }).collect();
                hits.sort_by(crate::types::best_first);
                return Ok(hits);
            }
        }
        Ok(self.scan(flat, &q, k, &keep))
    }

    /// Exact scan over the graph's points.
    fn scan(&self, flat: &FlatGraph, q: &[f32], k: usize, keep: &(dyn Fn(u32) -> bool + Sync)) -> Vec<Hit> {
        (0..flat.len() as u32)
            .into_par_iter()
            .with_min_len(4096)
            .fold(
                || TopK::new(k),
                |mut top, d| {
                    if keep(d) {
                        top.push(Hit { id: self.ids[d as usize], score: crate::types::similarity(q, flat.vector(d)) });
                    }
                    top
                },
            )
            .reduce(|| TopK::new(k), TopK::merge)
            .into_sorted()
    }

    /// The live (unit) vectors, in no particular order.
    pub fn live_vectors(&self) -> Vec<(ImageId, Vec<f32>)> {
        if self.is_empty() {
            return Vec::new();
        }
        self.graph.with_dependent(|_, g| {
            g.get_point_indexation()
                .into_iter()
                .filter(|p| self.live[p.get_origin_id()])
                .map(|p| (self.ids[p.get_origin_id()], p.get_v().to_vec()))
                .collect()
        })
    }

    /// Rebuilds the graph from the live vectors, dropping every tombstone. Costs a full
    /// (parallel) build; worth it once tombstones are a sizeable share of the points.
    pub fn compact(&mut self) {
        let live = self.live_vectors();
        let mut fresh = Self::with_capacity(self.dim, self.params, live.len()).expect("params already valid");
        fresh.insert_unit(live);
        *self = fresh;
    }

    // ---- persistence (file layout in `persist.rs`) ----

    pub(crate) fn id_table(&self) -> (&[ImageId], &[bool]) {
        (&self.ids, &self.live)
    }

    /// Dumps the graph with hnsw_rs as `<base>.hnsw.graph` and `<base>.hnsw.data` in `dir`.
    /// Returns false when there is no point to dump (hnsw_rs cannot dump an empty graph).
    pub(crate) fn dump(&self, dir: &Path, base: &str) -> Result<bool> {
        if self.points() == 0 {
            return Ok(false);
        }
        let fail = |message: String| Error::Hnsw { path: dir.join(format!("{base}.hnsw.graph")), message };
        let dumped = self.graph.with_dependent(|_, g| {
            use hnsw_rs::api::AnnT;
            // hnsw_rs panics instead of failing when it cannot create a file.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| g.file_dump(dir, base)))
        });
        match dumped {
            Ok(Ok(name)) if name == base => Ok(true),
            Ok(Ok(name)) => Err(fail(format!("hnsw_rs dumped under another name `{name}`"))),
            Ok(Err(e)) => Err(fail(format!("{e:#}"))),
            Err(_) => Err(fail("hnsw_rs panicked while dumping".into())),
        }
    }

    /// Rebuilds an index from a dump of `points` points (none: a fresh graph) and its id
    /// table. The caller has verified the files' checksums, so hnsw_rs (which asserts and
    /// even exits on malformed input) only ever reads files we wrote.
    pub(crate) fn restore(
        dir: &Path,
        base: &str,
        dim: usize,
        params: IndexParams,
        ids: Vec<ImageId>,
        live: Vec<bool>,
    ) -> Result<Self> {
        let path = dir.join(format!("{base}.hnsw.graph"));
        let fail = |message: String| Error::Hnsw { path: path.clone(), message };
        let graph = if ids.is_empty() {
            new_graph(&params, 0)
        } else {
            // Without mmap (the default options) every vector is copied into the graph.
            let io = HnswIo::new(dir, base);
            let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                GraphCell::try_new(io, |io| io.load_hnsw_with_dist::<f32, UnitDot>(UnitDot))
            }));
            match loaded {
                Ok(Ok(g)) => g,
                Ok(Err(e)) => return Err(fail(format!("{e:#}"))),
                Err(_) => return Err(fail("hnsw_rs panicked while loading".into())),
            }
        };
        let (points, graph_dim, max_origin) = graph.with_dependent(|_, g| {
            let pi = g.get_point_indexation();
            let max_origin = if ids.is_empty() { None } else { pi.into_iter().map(|p| p.get_origin_id()).max() };
            (g.get_nb_point(), pi.get_data_dimension(), max_origin)
        });
        if points != ids.len() || max_origin.is_some_and(|m| m >= ids.len()) {
            return Err(fail(format!("graph has {points} points, id table {}", ids.len())));
        }
        if points > 0 && graph_dim != dim {
            return Err(fail(format!("graph vectors have dimension {graph_dim}, expected {dim}")));
        }
        // Made now rather than on the first search: it also checks that every data id is
        // in the graph once.
        let flat = OnceLock::new();
        if points > 0 {
            let view = graph.with_dependent(|_, g| FlatGraph::new(g, points, dim)).map_err(fail)?;
            let _ = flat.set(Box::new(view));
        }
        let current = ids.iter().zip(&live).enumerate().filter(|(_, (_, l))| **l).map(|(d, (id, _))| (*id, d)).collect();
        Ok(Self { dim, params, graph, ids, live, current, flat })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn index_can_live_behind_a_rwlock_shared_across_threads() {
        assert_send_sync::<HnswIndex>();
    }

    #[test]
    fn supersede_and_remove_on_a_tiny_graph() {
        let mut ix = HnswIndex::new(3, IndexParams::default()).unwrap();
        ix.insert(&[(1, &[1.0, 0.0, 0.0]), (2, &[0.0, 1.0, 0.0]), (3, &[0.0, 0.0, 1.0])]).unwrap();
        ix.insert(&[(1, &[0.0, 0.0, -1.0])]).unwrap();
        assert_eq!((ix.len(), ix.points(), ix.tombstones()), (3, 4, 1));
        let hits = ix.search(&[1.0, 0.0, 0.0], 3, None, None).unwrap();
        assert!(hits.iter().all(|h| h.score < 0.5), "old vector of 1 must not match: {hits:?}");
        assert!(ix.remove(2));
        assert!(!ix.contains(2));
        let hits = ix.search(&[0.0, 1.0, 0.0], 5, None, None).unwrap();
        assert_eq!(hits.iter().map(|h| h.id).collect::<Vec<_>>().len(), 2);
        assert!(hits.iter().all(|h| h.id != 2));
        ix.compact();
        assert_eq!((ix.len(), ix.points(), ix.tombstones()), (2, 2, 0));
        let hits = ix.search(&[0.0, 0.0, -1.0], 1, None, None).unwrap();
        assert_eq!(hits[0].id, 1);
    }
}
