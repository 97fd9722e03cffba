//! magpie-index: the vector index, a cache derived from SQLite.
//!
//! It owns nearest-neighbour search over image embeddings: [`ExactIndex`] (brute force,
//! the reference in tests and the index of small libraries), [`HnswIndex`] (an hnsw_rs
//! graph with dot-product distance on unit vectors, searched through a flat copy of its
//! links, tombstones for removals since hnsw_rs cannot delete) and [`VectorIndex`], which
//! the engine holds: exact below [`IndexParams::exact_threshold`] vectors, HNSW above.
//! Scores are cosine similarities.
//!
//! An index is saved next to the database with its [`IndexMeta`] (model id, dimension,
//! parameters, generation) and reloaded only if all of them still match; otherwise
//! [`VectorIndex::load`] says [`Loaded::Stale`] or [`Loaded::Missing`] and the engine
//! rebuilds it from SQLite. It never reads SQLite itself.
//!
//! ```
//! use magpie_index::{IndexParams, IndexSpec, Loaded, VectorIndex};
//!
//! let spec = IndexSpec::new("openai/clip-vit-base-patch32", 3, IndexParams::default());
//! let mut index = VectorIndex::new(spec.clone())?;
//! index.insert(&[(1, &[1.0, 0.0, 0.0]), (2, &[0.6, 0.8, 0.0]), (3, &[0.0, 0.0, 1.0])])?;
//! index.remove(3);
//!
//! let hits = index.search(&[1.0, 0.1, 0.0], 2, None, None)?;
//! assert_eq!(hits.iter().map(|h| h.id).collect::<Vec<_>>(), [1, 2]);
//! let odd_only = |id: i64| id % 2 == 1;
//! assert_eq!(index.search(&[0.0, 1.0, 0.0], 5, None, Some(&odd_only))?.len(), 1);
//!
//! let dir = tempfile::tempdir()?;
//! index.set_generation(7);
//! index.save(dir.path(), "vectors")?;
//! let Loaded::Ready(back) = VectorIndex::load(dir.path(), "vectors", &spec, 7)? else { panic!() };
//! assert_eq!(back.search(&[1.0, 0.1, 0.0], 2, None, None)?, hits);
//! // Another generation in SQLite: the saved index is stale.
//! assert!(matches!(VectorIndex::load(dir.path(), "vectors", &spec, 8)?, Loaded::Stale(_)));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod dot;
mod error;
mod exact;
mod flat;
mod hnsw;
mod persist;
mod text;
mod types;
mod vector;

pub use error::{Error, Result};
pub use exact::ExactIndex;
pub use hnsw::HnswIndex;
pub use persist::{Loaded, SavedIndex, StaleReason};
pub use types::{Filter, Hit, IndexKind, IndexMeta, IndexParams, IndexSpec};
pub use text::{path_words, TextDoc, TextError, TextHit, TextIndex, TextLoaded, TextSaved, TextStamp};
pub use vector::VectorIndex;
