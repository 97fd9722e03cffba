//! magpie-engine: ingest and search over one library (a data directory).
//!
//! It owns the pipeline walk → read → hash → decode → preprocess → embed → commit to
//! SQLite → update the vector index and the caption index (path words), captioning
//! (resumable, commit to SQLite then the caption index), the queries on top (text by
//! CLIP, by BM25 over captions and path words, or both fused; image; id) and chat
//! sessions about an image kept in SQLite. Models come in only through the
//! `magpie-core` traits, so tests run with fake models and no weights. Progress is
//! reported through a callback; the binary draws the bars.
//!
//! ```no_run
//! # async fn demo(embedder: std::sync::Arc<dyn magpie_core::ImageEmbedder>) -> Result<(), magpie_engine::Error> {
//! use magpie_engine::{IndexOptions, Library};
//! let lib = Library::open("/tmp/magpie-data".as_ref(), embedder.model(), Default::default()).await?;
//! let report = lib.index(&["/photos".into()], embedder.clone(), &IndexOptions::default(), &|_| {}).await?;
//! println!("{} new, {} failed", report.added, report.failed.len());
//! # Ok(()) }
//! ```

mod caption;
mod chat;
mod classify;
mod duplicates;
mod error;
mod images;
mod ingest;
mod library;
mod model_switch;
mod query;
mod search;
mod watch;

pub use caption::{caption_file, CaptionOptions, CaptionProgress, CaptionReport};
pub use chat::{chat_prompt, ChatHistory};
pub use classify::{Classes, Classification, ClassifyReport, DEFAULT_TEMPLATE, MAX_LABELS};
pub use duplicates::{DuplicateFile, Duplicates, ExactGroup, NearGroup, DEFAULT_NEAR_THRESHOLD};
pub use images::THUMBNAIL_SIDES;
pub use model_switch::SwitchReport;
pub use watch::{WatchEvent, WatchOptions};
pub use query::{Page, Query, SearchFilter, SortOrder, MAX_DEPTH, NEGATIVE_WEIGHT};
pub use error::{Error, Result};
pub use ingest::{IndexOptions, IndexReport, Progress};
pub use library::{IndexState, IndexStatus, Library, LibraryConfig, Status, TextIndexStatus};
pub use magpie_store::{Caption, Conversation, ConversationId, FileRecord, LabelRecord, LabelSet, Message, Role};
pub use search::{camera_name, embed_bytes, embed_file, reciprocal_rank_fusion, SearchHit, SearchMode, RRF_K};

/// File name of the SQLite database inside the data directory.
pub const DB_FILE: &str = "magpie.db";
/// Base name of the vector index files inside the data directory.
pub const VECTOR_INDEX: &str = "vectors";
/// Folder of the caption (tantivy) index inside the data directory.
pub const TEXT_INDEX: &str = "captions.tantivy";
