use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] magpie_store::Error),
    #[error(transparent)]
    Index(#[from] magpie_index::Error),
    #[error(transparent)]
    Text(#[from] magpie_index::TextError),
    #[error(transparent)]
    Media(#[from] magpie_media::Error),
    #[error("model: {0}")]
    Model(#[from] magpie_core::Error),
    #[error("{}: {message}", path.display())]
    Path { path: PathBuf, message: String },
    #[error("no indexed image with id {0}")]
    UnknownId(i64),
    #[error("{}: not in the library; index its folder first, or pass an image file", .0.display())]
    NotIndexed(PathBuf),
    #[error("the library at {} is empty: run `magpie index DIR` first", .0.display())]
    Empty(PathBuf),
    #[error("no conversation with id {0}")]
    UnknownConversation(i64),
    #[error("the question is empty")]
    EmptyQuestion,
    #[error("background task failed: {0}")]
    Task(String),
    #[error("the library was switched to model {now} (by `magpie reindex --model` in another process) after this program opened it with {opened}: open it again (restart `magpie serve`) to index with {now}")]
    Switched { now: String, opened: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn path(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        Error::Path { path: path.into(), message: message.to_string() }
    }
}
