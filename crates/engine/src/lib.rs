//! magpie-engine: ingest and search over one library (a data directory).
//!
//! It owns the pipeline walk → read → hash → decode → preprocess → embed → commit to
//! SQLite → update the vector index, and the queries on top (text, image, id). Models
//! come in only through the `magpie-core` traits, so tests run with fake embedders and
//! no weights. Progress is reported through a callback; the binary draws the bars.
//!
//! ```no_run
//! # async fn demo(embedder: std::sync::Arc<dyn magpie_core::ImageEmbedder>) -> Result<(), magpie_engine::Error> {
//! use magpie_engine::{IndexOptions, Library};
//! let lib = Library::open("/tmp/magpie-data".as_ref(), embedder.model(), Default::default()).await?;
//! let report = lib.index(&["/photos".into()], embedder.clone(), &IndexOptions::default(), &|_| {}).await?;
//! println!("{} new, {} failed", report.added, report.failed.len());
//! # Ok(()) }
//! ```

mod error;
mod ingest;
mod library;
mod search;

pub use error::{Error, Result};
pub use ingest::{IndexOptions, IndexReport, Progress};
pub use library::{IndexState, IndexStatus, Library, LibraryConfig, Status};
pub use search::{embed_file, SearchHit};

/// File name of the SQLite database inside the data directory.
pub const DB_FILE: &str = "magpie.db";
/// Base name of the vector index files inside the data directory.
pub const VECTOR_INDEX: &str = "vectors";
