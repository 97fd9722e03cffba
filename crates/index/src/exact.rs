//! Brute-force search: the reference the HNSW graph is tested against, and the index of
//! small libraries, where a scan is as fast as a graph walk and exact.

use crate::types::{prepare_batch, similarity, unit_query, Filter, Hit, TopK};
use crate::Result;
use magpie_core::ImageId;
use rayon::prelude::*;
use std::collections::HashMap;

/// Scans at or above this many stored floats (about 8k vectors of 512-d) use all cores.
const PARALLEL_FLOATS: usize = 1 << 22;
/// Rows per parallel work item.
const CHUNK_ROWS: usize = 2048;

/// Unit vectors in one contiguous row-major buffer. Removal is physical (the last row
/// moves into the hole), so there are never tombstones here.
#[derive(Debug, Clone)]
pub struct ExactIndex {
    dim: usize,
    ids: Vec<ImageId>,
    vectors: Vec<f32>,
    rows: HashMap<ImageId, usize>,
}

impl ExactIndex {
    pub fn new(dim: usize) -> Self {
        Self { dim, ids: Vec::new(), vectors: Vec::new(), rows: HashMap::new() }
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn contains(&self, id: ImageId) -> bool {
        self.rows.contains_key(&id)
    }

    /// Adds or replaces vectors (normalised here). All-or-nothing: a wrong dimension or
    /// a zero/non-finite vector anywhere in the batch is an error and changes nothing.
    pub fn insert(&mut self, items: &[(ImageId, &[f32])]) -> Result<()> {
        let batch = prepare_batch(self.dim, items)?;
        self.insert_unit(batch);
        Ok(())
    }

    pub(crate) fn insert_unit(&mut self, batch: Vec<(ImageId, Vec<f32>)>) {
        self.vectors.reserve(batch.len() * self.dim);
        for (id, v) in batch {
            match self.rows.get(&id) {
                Some(&row) => self.vectors[row * self.dim..(row + 1) * self.dim].copy_from_slice(&v),
                None => {
                    self.rows.insert(id, self.ids.len());
                    self.ids.push(id);
                    self.vectors.extend_from_slice(&v);
                }
            }
        }
    }

    /// Removes `id`; returns whether it was present.
    pub fn remove(&mut self, id: ImageId) -> bool {
        let Some(row) = self.rows.remove(&id) else { return false };
        let last = self.ids.len() - 1;
        if row != last {
            let moved = self.ids[last];
            self.vectors.copy_within(last * self.dim..(last + 1) * self.dim, row * self.dim);
            self.ids[row] = moved;
            self.rows.insert(moved, row);
        }
        self.ids.pop();
        self.vectors.truncate(last * self.dim);
        true
    }

    /// The `k` most similar vectors passing `filter`, best first. Exact.
    pub fn search(&self, query: &[f32], k: usize, filter: Option<Filter<'_>>) -> Result<Vec<Hit>> {
        let q = unit_query(self.dim, query)?;
        if k == 0 || self.is_empty() {
            return Ok(Vec::new());
        }
        let scan = |first_row: usize, block: &[f32]| {
            let mut top = TopK::new(k);
            for (i, v) in block.chunks_exact(self.dim).enumerate() {
                let id = self.ids[first_row + i];
                if filter.is_none_or(|f| f(id)) {
                    top.push(Hit { id, score: similarity(&q, v) });
                }
            }
            top
        };
        let top = if self.vectors.len() >= PARALLEL_FLOATS {
            self.vectors
                .par_chunks(CHUNK_ROWS * self.dim)
                .enumerate()
                .map(|(c, block)| scan(c * CHUNK_ROWS, block))
                .reduce(|| TopK::new(k), TopK::merge)
        } else {
            scan(0, &self.vectors)
        };
        Ok(top.into_sorted())
    }

    /// Stored (unit) vectors in storage order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (ImageId, &[f32])> + '_ {
        self.ids.iter().copied().zip(self.vectors.chunks_exact(self.dim))
    }

    pub(crate) fn from_parts(dim: usize, ids: Vec<ImageId>, vectors: Vec<f32>) -> Self {
        debug_assert_eq!(ids.len() * dim, vectors.len());
        let rows = ids.iter().enumerate().map(|(row, &id)| (id, row)).collect();
        Self { dim, ids, vectors, rows }
    }

    pub(crate) fn parts(&self) -> (&[ImageId], &[f32]) {
        (&self.ids, &self.vectors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remove_moves_last_row_and_keeps_lookups_right() {
        let mut ix = ExactIndex::new(2);
        ix.insert(&[(10, &[1.0, 0.0]), (20, &[0.0, 1.0]), (30, &[-1.0, 0.0])]).unwrap();
        assert!(ix.remove(10));
        assert!(!ix.remove(10));
        assert_eq!(ix.len(), 2);
        // 30 moved into row 0; searching for it must still name it.
        let hits = ix.search(&[-1.0, 0.0], 1, None).unwrap();
        assert_eq!(hits[0].id, 30);
        assert!((hits[0].score - 1.0).abs() < 1e-6);
        let hits = ix.search(&[0.0, 1.0], 1, None).unwrap();
        assert_eq!(hits[0].id, 20);
    }

    #[test]
    fn parallel_and_serial_scans_agree() {
        // 5000 x 1024 floats crosses PARALLEL_FLOATS; compare against a plain scan.
        let dim = 1024;
        let mut state = 1u64;
        let mut next = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        let vecs: Vec<Vec<f32>> = (0..5000).map(|_| (0..dim).map(|_| next()).collect()).collect();
        let items: Vec<(ImageId, &[f32])> = vecs.iter().enumerate().map(|(i, v)| (i as i64, v.as_slice())).collect();
        let mut ix = ExactIndex::new(dim);
        ix.insert(&items).unwrap();
        assert!(ix.vectors.len() >= PARALLEL_FLOATS);
        let q = unit_query(dim, &vecs[17]).unwrap();
        let hits = ix.search(&q, 5, Some(&|id| id % 2 == 1)).unwrap();
        let mut all: Vec<Hit> = ix
            .iter()
            .filter(|(id, _)| id % 2 == 1)
            .map(|(id, v)| Hit { id, score: similarity(&q, v) })
            .collect();
        all.sort_by(crate::types::best_first);
        all.truncate(5);
        assert_eq!(hits, all);
        assert!(hits.iter().all(|h| h.id % 2 == 1));
    }
}
