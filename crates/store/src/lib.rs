//! magpie-store: the library's source of truth, in SQLite through sqlx.
//!
//! It owns the schema (timestamped SQL files in the workspace's `migrations/`, embedded
//! with `sqlx::migrate!` and run by [`Store::open`]) and typed repository functions over
//! it: the library's model and generation counter, roots, file rows with their
//! metadata and status, embeddings (little-endian f32 BLOBs), the failure log, captions
//! (one per file) and chat conversations with their messages.
//! Derived indexes (HNSW, tantivy) are rebuilt from here; see [`Store::generation`].
//!
//! A batch of processed files is committed in one transaction
//! ([`Store::commit_batch`]), so a crash loses at most that batch and a rerun upserts
//! by path instead of duplicating. Paths are stored as raw OS bytes as well as text,
//! so non-UTF-8 names round-trip on Unix.
//!
//! ```no_run
//! use magpie_core::{Embedding, ModelInfo};
//! use magpie_store::{ImageMeta, NewFile, Store};
//! use std::path::Path;
//!
//! # async fn demo() -> Result<(), magpie_store::Error> {
//! let store = Store::open("/var/lib/magpie/magpie.db").await?;
//! let model = ModelInfo { id: "openai/clip-vit-base-patch32".into(), dim: 512 };
//! store.ensure_model(&model).await?; // fails with a re-embed hint under another model
//! let root = store.add_root(Path::new("/photos")).await?;
//! let file = NewFile {
//!     root_id: root.id,
//!     path: "/photos/cat.jpg".into(),
//!     size: 123_456,
//!     mtime_ns: 1_700_000_000_000_000_000,
//!     content_hash: "af13…".into(),
//!     meta: ImageMeta { width: 640, height: 480, format: "jpeg".into(), exif: Default::default() },
//!     embedding: Embedding::normalized(&model.id, vec![0.1; 512]).unwrap(),
//! };
//! let committed = store.commit_batch(&[file]).await?;
//! let vectors = store.all_embeddings(&model.id).await?; // to rebuild the vector index
//! assert_eq!(vectors[0].0, committed.ids[0]);
//! # Ok(()) }
//! ```

mod error;
mod paths;
mod store;
mod types;

pub use error::{Error, Result};
pub use store::annotations::Adopted;
pub use store::labels::{LabelRecord, LabelSet};
pub use store::Store;
pub use types::{
    Caption, Committed, Conversation, ConversationId, Counts, Exif, FailureRecord, FileRecord,
    FileState, FileStatus, ImageMeta, LibraryInfo, Message, NewFile, Role, Root, RootId,
    TextSource,
};
