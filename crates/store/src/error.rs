use std::path::PathBuf;

/// Everything that can go wrong in the store. `db` is the database file (`:memory:` for
/// an in-memory store); `path` is an image file path.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{db}: cannot create the data directory: {source}")]
    CreateDir { db: PathBuf, source: std::io::Error },

    #[error("{db}: cannot open the database: {source}")]
    Open { db: PathBuf, source: sqlx::Error },

    #[error("{db}: cannot migrate the database: {source}")]
    Migrate {
        db: PathBuf,
        source: sqlx::migrate::MigrateError,
    },

    #[error(
        "{db}: the database has schema version {version}, which this magpie does not know; \
         it was written by a newer magpie (upgrade, or use another --data-dir)"
    )]
    SchemaTooNew { db: PathBuf, version: i64 },

    #[error("{db}: {source}")]
    Db { db: PathBuf, source: sqlx::Error },

    #[error(
        "{db}: this library was embedded with model `{stored}` (dimension {stored_dim}), \
         not `{requested}` (dimension {requested_dim}); pass the library's model with --model, \
         or switch the library to the new model with `magpie reindex --model …` and the same \
         --model you gave here (it re-embeds every image while the current index keeps \
         answering, then switches), or use another --data-dir"
    )]
    ModelMismatch {
        db: PathBuf,
        stored: String,
        stored_dim: usize,
        requested: String,
        requested_dim: usize,
    },

    #[error("{db}: the library has no embedding model recorded yet (set it before committing embeddings)")]
    NoModel { db: PathBuf },

    #[error("{path}: {source}")]
    Embedding {
        path: PathBuf,
        source: magpie_core::Error,
    },

    #[error("{db}: no file with id {id}")]
    NoSuchFile { db: PathBuf, id: i64 },

    #[error("{db}: no conversation with id {id}")]
    NoSuchConversation { db: PathBuf, id: i64 },

    #[error("{db}: corrupt data: {message}")]
    Corrupt { db: PathBuf, message: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
