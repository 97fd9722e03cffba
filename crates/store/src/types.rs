use magpie_core::{Embedding, ImageId, ModelInfo};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// Primary key of a root folder.
pub type RootId = i64;

/// Where a file row stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileStatus {
    /// Decoded, embedded and committed.
    Indexed,
    /// Could not be read or decoded; `error` says why. Skipped on rerun while unchanged.
    Failed,
    /// Known but not (or no longer) embedded, e.g. after the model was replaced.
    Pending,
    /// Gone from disk: a tombstone, filtered at query time until purged.
    Deleted,
}

impl FileStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            FileStatus::Indexed => "indexed",
            FileStatus::Failed => "failed",
            FileStatus::Pending => "pending",
            FileStatus::Deleted => "deleted",
        }
    }
}

impl fmt::Display for FileStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for FileStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "indexed" => Ok(FileStatus::Indexed),
            "failed" => Ok(FileStatus::Failed),
            "pending" => Ok(FileStatus::Pending),
            "deleted" => Ok(FileStatus::Deleted),
            other => Err(format!("unknown file status `{other}`")),
        }
    }
}

/// EXIF fields kept per image. All optional: most images lack some.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Exif {
    /// DateTimeOriginal as ISO-8601 text (`2021-06-01T14:03:22`, with offset if known).
    pub taken_at: Option<String>,
    pub camera_make: Option<String>,
    pub camera_model: Option<String>,
    /// EXIF orientation, 1..=8.
    pub orientation: Option<u16>,
    pub gps_lat: Option<f64>,
    pub gps_lon: Option<f64>,
}

/// What decoding an image told us.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageMeta {
    pub width: u32,
    pub height: u32,
    /// Detected format, lowercase (`jpeg`, `png`, …).
    pub format: String,
    pub exif: Exif,
}

/// A successfully processed file, ready to commit with its embedding.
#[derive(Debug, Clone)]
pub struct NewFile {
    pub root_id: RootId,
    pub path: PathBuf,
    pub size: u64,
    pub mtime_ns: i64,
    /// blake3 of the file's bytes, lowercase hex.
    pub content_hash: String,
    pub meta: ImageMeta,
    /// Must match the library's model id and dimension.
    pub embedding: Embedding,
}

/// A full file row.
#[derive(Debug, Clone, PartialEq)]
pub struct FileRecord {
    pub id: ImageId,
    pub root_id: RootId,
    /// The exact OS path (non-UTF-8 names survive on Unix).
    pub path: PathBuf,
    pub size: u64,
    pub mtime_ns: i64,
    pub content_hash: Option<String>,
    /// `Some` for files that were decoded (indexed ones); `None` for failed ones.
    pub meta: Option<ImageMeta>,
    pub status: FileStatus,
    pub error: Option<String>,
    pub indexed_at: Option<String>,
    pub updated_at: String,
}

/// The columns change detection needs: compare size and mtime with what is on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileState {
    pub id: ImageId,
    pub path: PathBuf,
    pub size: u64,
    pub mtime_ns: i64,
    pub status: FileStatus,
}

/// A root folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Root {
    pub id: RootId,
    pub path: PathBuf,
    pub added_at: String,
}

/// One entry of the failure log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureRecord {
    pub id: i64,
    /// The file row it belongs to, if any (and not purged since).
    pub file_id: Option<ImageId>,
    pub path: PathBuf,
    pub reason: String,
    pub at: String,
}

/// The library row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibraryInfo {
    /// `None` until the first model is recorded.
    pub model: Option<ModelInfo>,
    pub generation: u64,
    /// Grows with every caption written (see [`Store::text_generation`](crate::Store::text_generation)).
    pub text_generation: u64,
    pub created_at: String,
}

/// The outcome of [`Store::commit_batch`](crate::Store::commit_batch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    /// One id per input file, in input order.
    pub ids: Vec<ImageId>,
    /// The library generation after this batch; a derived index that has absorbed the
    /// batch and been saved can record it.
    pub generation: u64,
}

/// File totals by status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub indexed: u64,
    pub failed: u64,
    pub pending: u64,
    pub deleted: u64,
}

impl Counts {
    /// Files that still exist on disk (everything but tombstones).
    pub fn live(&self) -> u64 {
        self.indexed + self.failed + self.pending
    }
}

/// The caption of one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Caption {
    pub file_id: ImageId,
    /// The captioning model that wrote it.
    pub model_id: String,
    pub text: String,
    pub created_at: String,
}

/// What the caption (text) index holds for one indexed file: its path, the root it was
/// found under (path words are taken relative to the root's parent) and its caption.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextSource {
    pub id: ImageId,
    pub path: PathBuf,
    pub root: PathBuf,
    pub caption: Option<String>,
}

/// Primary key of a conversation.
pub type ConversationId = i64;

/// A chat about one image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Conversation {
    pub id: ConversationId,
    pub file_id: ImageId,
    /// The chat model it was started with.
    pub model_id: String,
    /// The first question, once asked.
    pub title: Option<String>,
    pub created_at: String,
}

/// Who said a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "user" => Ok(Role::User),
            "assistant" => Ok(Role::Assistant),
            other => Err(format!("unknown message role `{other}`")),
        }
    }
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    pub id: i64,
    pub conversation_id: ConversationId,
    pub role: Role,
    pub text: String,
    pub at: String,
}
