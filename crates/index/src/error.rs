use magpie_core::ImageId;
use std::path::PathBuf;

/// Everything that can go wrong in this crate. A saved index that is merely out of date
/// is not an error: [`crate::VectorIndex::load`] reports it as [`crate::Loaded::Stale`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("vector for image {id} has dimension {got}, the index expects {expected}")]
    Dimension { id: ImageId, expected: usize, got: usize },
    #[error("query vector has dimension {got}, the index expects {expected}")]
    QueryDimension { expected: usize, got: usize },
    #[error("vector for image {id} is zero or contains a non-finite value")]
    InvalidVector { id: ImageId },
    #[error("query vector is zero or contains a non-finite value")]
    InvalidQuery,
    #[error("invalid index parameters: {0}")]
    Params(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not an index meta file: {message}", path.display())]
    BadMeta { path: PathBuf, message: String },
    /// hnsw_rs failed (or panicked) while dumping or reading its files.
    #[error("{}: {message}", path.display())]
    Hnsw { path: PathBuf, message: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}
