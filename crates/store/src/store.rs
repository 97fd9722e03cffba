use crate::paths;
use crate::types::*;
use crate::{Error, Result};
use magpie_core::{Embedding, ImageId, ModelInfo};
use sqlx::migrate::{MigrateError, Migrator};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{FromRow, Sqlite, Transaction};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

static MIGRATOR: Migrator = sqlx::migrate!("../../migrations");

#[path = "labels.rs"]
pub(crate) mod labels;
#[path = "models.rs"]
mod models;
#[path = "annotations.rs"]
pub(crate) mod annotations;

/// How long a writer waits for another connection (or process) to finish its write.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Pool size for on-disk libraries: WAL lets readers run beside the one writer.
const MAX_CONNECTIONS: u32 = 4;
/// Bound on `?` parameters per statement for id lists (SQLite allows 32766).
pub(crate) const IDS_PER_STATEMENT: usize = 500;
/// Rows per page when reading all embeddings (4096 × 512 f32 = 8 MiB).
const EMBEDDING_PAGE: u32 = 4096;

/// The current time as ISO-8601 UTC text, evaluated by SQLite.
macro_rules! now {
    () => {
        "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"
    };
}

/// [`now!`] for SQL built at run time.
pub(crate) fn now_sql() -> &'static str {
    now!()
}

const FILE_COLUMNS: &str = "id, root_id, path_bytes, size, mtime_ns, content_hash, width, height, \
     format, taken_at, camera_make, camera_model, orientation, gps_lat, gps_lon, status, error, \
     indexed_at, updated_at";

/// A handle on one library database. Cheap to clone; clones share the connection pool.
#[derive(Debug, Clone)]
pub struct Store {
    pool: SqlitePool,
    db: Arc<PathBuf>,
}

impl Store {
    /// Opens (creating it and its parent directory if needed) the database at `path`,
    /// in WAL mode with foreign keys on, and brings its schema up to date.
    pub async fn open(path: impl AsRef<Path>) -> Result<Store> {
        let db = path.as_ref().to_path_buf();
        if let Some(parent) = db.parent().filter(|p| !p.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|source| Error::CreateDir {
                    db: db.clone(),
                    source,
                })?;
        }
        let options = SqliteConnectOptions::new()
            .filename(&db)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        let pool = SqlitePoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .connect_with(options)
            .await
            .map_err(|source| Error::Open {
                db: db.clone(),
                source,
            })?;
        Self::init(db, pool).await
    }

    /// A private in-memory library, for tests. One connection, kept open for the life
    /// of the pool: every connection to `:memory:` would otherwise see its own database.
    pub async fn open_in_memory() -> Result<Store> {
        let db = PathBuf::from(":memory:");
        let options = SqliteConnectOptions::from_str("sqlite::memory:")
            .map_err(|source| Error::Open {
                db: db.clone(),
                source,
            })?
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options)
            .await
            .map_err(|source| Error::Open {
                db: db.clone(),
                source,
            })?;
        Self::init(db, pool).await
    }

    async fn init(db: PathBuf, pool: SqlitePool) -> Result<Store> {
        MIGRATOR.run(&pool).await.map_err(|source| match source {
            MigrateError::VersionMissing(version) => Error::SchemaTooNew {
                db: db.clone(),
                version,
            },
            source => Error::Migrate {
                db: db.clone(),
                source,
            },
        })?;
        Ok(Store {
            pool,
            db: Arc::new(db),
        })
    }

    /// The database file (`:memory:` for an in-memory store).
    pub fn path(&self) -> &Path {
        &self.db
    }

    /// Closes every connection, checkpointing the WAL. Later calls fail.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    fn err(&self) -> impl Fn(sqlx::Error) -> Error + '_ {
        move |source| Error::Db {
            db: self.path().to_path_buf(),
            source,
        }
    }

    fn corrupt(&self, message: impl Into<String>) -> Error {
        Error::Corrupt {
            db: self.path().to_path_buf(),
            message: message.into(),
        }
    }

    /// Write transactions take the write lock up front, so that two writers queue on
    /// the busy timeout instead of failing when a read lock cannot be upgraded.
    async fn begin_write(&self) -> Result<Transaction<'static, Sqlite>> {
        self.pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(self.err())
    }

    // ---- library ---------------------------------------------------------------------

    /// The library row: model, generation, creation time.
    pub async fn library(&self) -> Result<LibraryInfo> {
        let row: LibraryRow = sqlx::query_as(
            "SELECT model_id, model_dim, generation, text_generation, created_at FROM library WHERE id = 1",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(self.err())?;
        Ok(LibraryInfo {
            model: row.model(),
            generation: to_u64(row.generation),
            text_generation: to_u64(row.text_generation),
            created_at: row.created_at,
        })
    }

    /// The model this library's embeddings come from, if one was recorded.
    pub async fn model(&self) -> Result<Option<ModelInfo>> {
        Ok(self.library().await?.model)
    }

    /// Records `model` as the library's model if none is recorded yet; succeeds if it is
    /// the recorded one; otherwise fails with [`Error::ModelMismatch`], whose message
    /// tells the user how to re-embed.
    pub async fn ensure_model(&self, model: &ModelInfo) -> Result<()> {
        let mut tx = self.begin_write().await?;
        match read_model(&mut tx).await.map_err(self.err())? {
            None => {
                sqlx::query("UPDATE library SET model_id = ?, model_dim = ? WHERE id = 1")
                    .bind(&model.id)
                    .bind(to_i64(model.dim as u64))
                    .execute(&mut *tx)
                    .await
                    .map_err(self.err())?;
                tx.commit().await.map_err(self.err())
            }
            Some(stored) if stored == *model => Ok(()),
            Some(stored) => Err(Error::ModelMismatch {
                db: self.path().to_path_buf(),
                stored: stored.id,
                stored_dim: stored.dim,
                requested: model.id.clone(),
                requested_dim: model.dim,
            }),
        }
    }

    /// Switches the library to `model` (for `magpie reindex --model`): deletes embeddings
    /// of any other model, sets indexed files that now lack an embedding to `pending`
    /// (so that ingest re-embeds them), and bumps the generation, which it returns.
    pub async fn replace_model(&self, model: &ModelInfo) -> Result<u64> {
        let dim = to_i64(model.dim as u64);
        let mut tx = self.begin_write().await?;
        sqlx::query("UPDATE library SET model_id = ?, model_dim = ? WHERE id = 1")
            .bind(&model.id)
            .bind(dim)
            .execute(&mut *tx)
            .await
            .map_err(self.err())?;
        sqlx::query("DELETE FROM embeddings WHERE NOT (model_id = ? AND dim = ?)")
            .bind(&model.id)
            .bind(dim)
            .execute(&mut *tx)
            .await
            .map_err(self.err())?;
        sqlx::query(concat!(
            "UPDATE files SET status = 'pending', updated_at = ",
            now!(),
            " WHERE status = 'indexed' AND id NOT IN (SELECT file_id FROM embeddings)"
        ))
        .execute(&mut *tx)
        .await
        .map_err(self.err())?;
        let generation = bump(&mut tx).await.map_err(self.err())?;
        tx.commit().await.map_err(self.err())?;
        Ok(generation)
    }

    /// The generation counter. It grows whenever the set of indexed vectors changes:
    /// vectors added or changed ([`commit_batch`](Self::commit_batch),
    /// [`replace_model`](Self::replace_model)) and indexed files removed
    /// ([`mark_deleted`](Self::mark_deleted), [`record_failure`](Self::record_failure) of
    /// an indexed file); a derived index built at another generation is stale. Removals
    /// bump it too because a process killed between the removal and its next index save
    /// would otherwise leave a saved index that still loads as current, with the removed
    /// files in it for good. [`purge_deleted`](Self::purge_deleted) does not: it drops
    /// tombstones, which no index holds any more.
    pub async fn generation(&self) -> Result<u64> {
        let g: i64 = sqlx::query_scalar("SELECT generation FROM library WHERE id = 1")
            .fetch_one(&self.pool)
            .await
            .map_err(self.err())?;
        Ok(to_u64(g))
    }

    /// Increments the generation and returns the new value.
    pub async fn bump_generation(&self) -> Result<u64> {
        let mut tx = self.begin_write().await?;
        let g = bump(&mut tx).await.map_err(self.err())?;
        tx.commit().await.map_err(self.err())?;
        Ok(g)
    }

    // ---- roots -----------------------------------------------------------------------

    /// Adds a root (idempotent: an existing root with the same path is returned as is).
    pub async fn add_root(&self, path: &Path) -> Result<Root> {
        let row: RootRow = sqlx::query_as(concat!(
            "INSERT INTO roots (path, path_bytes, added_at) VALUES (?, ?, ",
            now!(),
            ") ON CONFLICT (path_bytes) DO UPDATE SET path = excluded.path \
             RETURNING id, path_bytes, added_at"
        ))
        .bind(paths::to_text(path))
        .bind(paths::to_bytes(path))
        .fetch_one(&self.pool)
        .await
        .map_err(self.err())?;
        Ok(row.into())
    }

    /// All roots, oldest first.
    pub async fn roots(&self) -> Result<Vec<Root>> {
        let rows: Vec<RootRow> =
            sqlx::query_as("SELECT id, path_bytes, added_at FROM roots ORDER BY id")
                .fetch_all(&self.pool)
                .await
                .map_err(self.err())?;
        Ok(rows.into_iter().map(Root::from).collect())
    }

    // ---- files -----------------------------------------------------------------------

    /// The file row for exactly this path, whatever its status.
    pub async fn file_by_path(&self, path: &Path) -> Result<Option<FileRecord>> {
        let sql = format!("SELECT {FILE_COLUMNS} FROM files WHERE path_bytes = ?");
        let row: Option<FileRow> = sqlx::query_as(&sql)
            .bind(paths::to_bytes(path))
            .fetch_optional(&self.pool)
            .await
            .map_err(self.err())?;
        row.map(|r| r.into_record(self)).transpose()
    }

    /// One file row by id, whatever its status.
    pub async fn get_file(&self, id: ImageId) -> Result<Option<FileRecord>> {
        let sql = format!("SELECT {FILE_COLUMNS} FROM files WHERE id = ?");
        let row: Option<FileRow> = sqlx::query_as(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(self.err())?;
        row.map(|r| r.into_record(self)).transpose()
    }

    /// File rows for `ids`, in the order given (e.g. search rank); ids with no row
    /// (purged) are left out. Status is not filtered: callers drop non-`Indexed` hits.
    pub async fn get_files(&self, ids: &[ImageId]) -> Result<Vec<FileRecord>> {
        let mut found: HashMap<ImageId, FileRecord> = HashMap::with_capacity(ids.len());
        for chunk in ids.chunks(IDS_PER_STATEMENT) {
            let sql = format!(
                "SELECT {FILE_COLUMNS} FROM files WHERE id IN ({})",
                placeholders(chunk.len())
            );
            let mut query = sqlx::query_as::<_, FileRow>(&sql);
            for id in chunk {
                query = query.bind(id);
            }
            for row in query.fetch_all(&self.pool).await.map_err(self.err())? {
                let record = row.into_record(self)?;
                found.insert(record.id, record);
            }
        }
        // A repeated id gets its record once per occurrence.
        Ok(ids.iter().filter_map(|id| found.get(id).cloned()).collect())
    }

    /// Every file row under a root, in the light form change detection needs.
    pub async fn files_under_root(&self, root_id: RootId) -> Result<Vec<FileState>> {
        let rows: Vec<FileStateRow> = sqlx::query_as(
            "SELECT id, path_bytes, size, mtime_ns, status FROM files WHERE root_id = ? ORDER BY id",
        )
        .bind(root_id)
        .fetch_all(&self.pool)
        .await
        .map_err(self.err())?;
        rows.into_iter()
            .map(|r| {
                Ok(FileState {
                    id: r.id,
                    path: paths::from_bytes(r.path_bytes),
                    size: to_u64(r.size),
                    mtime_ns: r.mtime_ns,
                    status: parse_status(self, &r.status)?,
                })
            })
            .collect()
    }

    /// Files whose content has this blake3 hash (duplicates, moved files).
    pub async fn files_by_hash(&self, content_hash: &str) -> Result<Vec<FileRecord>> {
        let sql = format!("SELECT {FILE_COLUMNS} FROM files WHERE content_hash = ? ORDER BY id");
        let rows: Vec<FileRow> = sqlx::query_as(&sql)
            .bind(content_hash)
            .fetch_all(&self.pool)
            .await
            .map_err(self.err())?;
        rows.into_iter().map(|r| r.into_record(self)).collect()
    }

    /// Commits a batch in one transaction: for each file, inserts or updates (by path)
    /// its row as `indexed` with its error cleared, and stores its embedding (a caption
    /// made from other content than the file's new hash is deleted). Every
    /// embedding must match the library's model; if any does not, or anything else
    /// fails, nothing of the batch is committed. Bumps the generation.
    pub async fn commit_batch(&self, files: &[NewFile]) -> Result<Committed> {
        if files.is_empty() {
            return Ok(Committed {
                ids: Vec::new(),
                generation: self.generation().await?,
            });
        }
        let mut tx = self.begin_write().await?;
        let model = read_model(&mut tx)
            .await
            .map_err(self.err())?
            .ok_or_else(|| Error::NoModel {
                db: self.path().to_path_buf(),
            })?;
        let mut ids = Vec::with_capacity(files.len());
        for file in files {
            file.embedding
                .check(&model)
                .map_err(|source| Error::Embedding {
                    path: file.path.clone(),
                    source,
                })?;
            let meta = &file.meta;
            let id: ImageId = sqlx::query_scalar(concat!(
                "INSERT INTO files (root_id, path, path_bytes, size, mtime_ns, content_hash, \
                     width, height, format, taken_at, camera_make, camera_model, orientation, \
                     gps_lat, gps_lon, status, error, indexed_at, updated_at) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'indexed', NULL, ",
                now!(),
                ", ",
                now!(),
                ") ON CONFLICT (path_bytes) DO UPDATE SET \
                     root_id = excluded.root_id, path = excluded.path, size = excluded.size, \
                     mtime_ns = excluded.mtime_ns, content_hash = excluded.content_hash, \
                     width = excluded.width, height = excluded.height, format = excluded.format, \
                     taken_at = excluded.taken_at, camera_make = excluded.camera_make, \
                     camera_model = excluded.camera_model, orientation = excluded.orientation, \
                     gps_lat = excluded.gps_lat, gps_lon = excluded.gps_lon, \
                     status = 'indexed', error = NULL, indexed_at = excluded.indexed_at, \
                     updated_at = excluded.updated_at \
                 RETURNING id"
            ))
            .bind(file.root_id)
            .bind(paths::to_text(&file.path))
            .bind(paths::to_bytes(&file.path))
            .bind(to_i64(file.size))
            .bind(file.mtime_ns)
            .bind(&file.content_hash)
            .bind(i64::from(meta.width))
            .bind(i64::from(meta.height))
            .bind(&meta.format)
            .bind(&meta.exif.taken_at)
            .bind(&meta.exif.camera_make)
            .bind(&meta.exif.camera_model)
            .bind(meta.exif.orientation.map(i64::from))
            .bind(meta.exif.gps_lat)
            .bind(meta.exif.gps_lon)
            .fetch_one(&mut *tx)
            .await
            .map_err(self.err())?;
            sqlx::query(concat!(
                "INSERT INTO embeddings (file_id, model_id, dim, vector, created_at) \
                 VALUES (?, ?, ?, ?, ",
                now!(),
                ") ON CONFLICT (file_id, model_id) DO UPDATE SET \
                     dim = excluded.dim, vector = excluded.vector, created_at = excluded.created_at"
            ))
            .bind(id)
            .bind(&model.id)
            .bind(to_i64(model.dim as u64))
            .bind(file.embedding.to_le_bytes())
            .execute(&mut *tx)
            .await
            .map_err(self.err())?;
            // A caption describes the content it was made from: new content drops it
            // (and `files_needing_caption` offers the file again).
            sqlx::query("DELETE FROM captions WHERE file_id = ? AND content_hash IS NOT ?")
                .bind(id)
                .bind(&file.content_hash)
                .execute(&mut *tx)
                .await
                .map_err(self.err())?;
            ids.push(id);
        }
        let generation = bump(&mut tx).await.map_err(self.err())?;
        tx.commit().await.map_err(self.err())?;
        Ok(Committed { ids, generation })
    }

    /// Records that a file failed: upserts its row as `failed` with `reason` (and the
    /// size/mtime seen, so an unchanged file can be skipped on rerun), clears its stale
    /// metadata and embedding, and appends to the failure log. Bumps the generation if
    /// the file was indexed (it leaves the derived indexes). Returns the file id.
    pub async fn record_failure(
        &self,
        root_id: RootId,
        path: &Path,
        size: u64,
        mtime_ns: i64,
        reason: &str,
    ) -> Result<ImageId> {
        let mut tx = self.begin_write().await?;
        let was_indexed: Option<String> =
            sqlx::query_scalar("SELECT status FROM files WHERE path_bytes = ?")
                .bind(paths::to_bytes(path))
                .fetch_optional(&mut *tx)
                .await
                .map_err(self.err())?;
        let id: ImageId = sqlx::query_scalar(concat!(
            "INSERT INTO files (root_id, path, path_bytes, size, mtime_ns, status, error, updated_at) \
             VALUES (?, ?, ?, ?, ?, 'failed', ?, ",
            now!(),
            ") ON CONFLICT (path_bytes) DO UPDATE SET \
                 root_id = excluded.root_id, path = excluded.path, size = excluded.size, \
                 mtime_ns = excluded.mtime_ns, content_hash = NULL, width = NULL, height = NULL, \
                 format = NULL, taken_at = NULL, camera_make = NULL, camera_model = NULL, \
                 orientation = NULL, gps_lat = NULL, gps_lon = NULL, status = 'failed', \
                 error = excluded.error, indexed_at = NULL, updated_at = excluded.updated_at \
             RETURNING id"
        ))
        .bind(root_id)
        .bind(paths::to_text(path))
        .bind(paths::to_bytes(path))
        .bind(to_i64(size))
        .bind(mtime_ns)
        .bind(reason)
        .fetch_one(&mut *tx)
        .await
        .map_err(self.err())?;
        sqlx::query("DELETE FROM embeddings WHERE file_id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(self.err())?;
        insert_failure(&mut tx, Some(id), path, reason)
            .await
            .map_err(self.err())?;
        if was_indexed.as_deref() == Some(FileStatus::Indexed.as_str()) {
            bump(&mut tx).await.map_err(self.err())?;
        }
        tx.commit().await.map_err(self.err())?;
        Ok(id)
    }

    /// Appends to the failure log something that is not a file row (an unreadable
    /// directory, a broken link).
    pub async fn log_failure(&self, path: &Path, reason: &str) -> Result<()> {
        let mut tx = self.begin_write().await?;
        insert_failure(&mut tx, None, path, reason)
            .await
            .map_err(self.err())?;
        tx.commit().await.map_err(self.err())
    }

    /// Turns the rows into tombstones (status `deleted`), in one transaction, bumping the
    /// generation if any indexed file was among them. Returns how many rows changed
    /// (already-deleted and unknown ids do not count).
    pub async fn mark_deleted(&self, ids: &[ImageId]) -> Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        let mut tx = self.begin_write().await?;
        let mut changed = 0;
        let mut indexed = 0;
        for chunk in ids.chunks(IDS_PER_STATEMENT) {
            let sql = format!(
                "SELECT COUNT(*) FROM files WHERE status = 'indexed' AND id IN ({})",
                placeholders(chunk.len())
            );
            let mut query = sqlx::query_scalar::<_, i64>(&sql);
            for id in chunk {
                query = query.bind(id);
            }
            indexed += query.fetch_one(&mut *tx).await.map_err(self.err())?;
        }
        for chunk in ids.chunks(IDS_PER_STATEMENT) {
            let sql = format!(
                concat!(
                    "UPDATE files SET status = 'deleted', updated_at = ",
                    now!(),
                    " WHERE status != 'deleted' AND id IN ({})"
                ),
                placeholders(chunk.len())
            );
            let mut query = sqlx::query(&sql);
            for id in chunk {
                query = query.bind(id);
            }
            changed += query
                .execute(&mut *tx)
                .await
                .map_err(self.err())?
                .rows_affected();
        }
        if indexed > 0 {
            bump(&mut tx).await.map_err(self.err())?;
        }
        tx.commit().await.map_err(self.err())?;
        Ok(changed)
    }

    /// Deletes tombstoned rows and, by cascade, their embeddings. Returns how many.
    /// Their ids are never reused; rebuild derived indexes afterwards to drop them there.
    pub async fn purge_deleted(&self) -> Result<u64> {
        let mut tx = self.begin_write().await?;
        let n = sqlx::query("DELETE FROM files WHERE status = 'deleted'")
            .execute(&mut *tx)
            .await
            .map_err(self.err())?
            .rows_affected();
        tx.commit().await.map_err(self.err())?;
        Ok(n)
    }

    // ---- embeddings ------------------------------------------------------------------

    /// The stored embedding of one file under `model`, whatever the file's status.
    pub async fn embedding(&self, id: ImageId, model: &str) -> Result<Option<Embedding>> {
        let row: Option<(i64, Vec<u8>)> =
            sqlx::query_as("SELECT dim, vector FROM embeddings WHERE file_id = ? AND model_id = ?")
                .bind(id)
                .bind(model)
                .fetch_optional(&self.pool)
                .await
                .map_err(self.err())?;
        row.map(|(dim, bytes)| {
            Embedding::from_le_bytes(model, &bytes, to_u64(dim) as usize)
                .map_err(|e| self.corrupt(format!("embedding of file {id}: {e}")))
        })
        .transpose()
    }

    /// Up to `limit` embeddings of `indexed` files under `model` with id > `after`, by
    /// ascending id: page through with the last id returned.
    pub async fn embeddings_page(
        &self,
        model: &str,
        after: ImageId,
        limit: u32,
    ) -> Result<Vec<(ImageId, Vec<f32>)>> {
        let rows: Vec<(ImageId, i64, Vec<u8>)> = sqlx::query_as(
            "SELECT e.file_id, e.dim, e.vector FROM embeddings e JOIN files f ON f.id = e.file_id \
             WHERE e.model_id = ? AND f.status = 'indexed' AND e.file_id > ? \
             ORDER BY e.file_id LIMIT ?",
        )
        .bind(model)
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(self.err())?;
        rows.into_iter()
            .map(|(id, dim, bytes)| {
                decode_vector(&bytes, to_u64(dim) as usize)
                    .map(|v| (id, v))
                    .ok_or_else(|| {
                        self.corrupt(format!("embedding of file {id} is not {dim} f32 values"))
                    })
            })
            .collect()
    }

    /// Every embedding of an `indexed` file under `model`, by ascending id, for
    /// rebuilding the vector index. Read page by page; 50,000 × 512 is ~100 MB.
    pub async fn all_embeddings(&self, model: &str) -> Result<Vec<(ImageId, Vec<f32>)>> {
        let mut all = Vec::new();
        let mut after = ImageId::MIN;
        loop {
            let page = self.embeddings_page(model, after, EMBEDDING_PAGE).await?;
            let Some(&(last, _)) = page.last() else { break };
            let full = page.len() == EMBEDDING_PAGE as usize;
            all.extend(page);
            if !full {
                break;
            }
            after = last;
        }
        Ok(all)
    }

    // ---- reports ---------------------------------------------------------------------

    /// File totals by status.
    pub async fn counts(&self) -> Result<Counts> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT status, COUNT(*) FROM files GROUP BY status")
                .fetch_all(&self.pool)
                .await
                .map_err(self.err())?;
        let mut counts = Counts::default();
        for (status, n) in rows {
            let n = to_u64(n);
            match parse_status(self, &status)? {
                FileStatus::Indexed => counts.indexed = n,
                FileStatus::Failed => counts.failed = n,
                FileStatus::Pending => counts.pending = n,
                FileStatus::Deleted => counts.deleted = n,
            }
        }
        Ok(counts)
    }

    /// The failure log, oldest first. It keeps history: a file that failed and was
    /// indexed later still has its entries (see [`FileRecord::status`] for now).
    pub async fn failures(&self) -> Result<Vec<FailureRecord>> {
        let rows: Vec<FailureRow> =
            sqlx::query_as("SELECT id, file_id, path_bytes, reason, at FROM failures ORDER BY id")
                .fetch_all(&self.pool)
                .await
                .map_err(self.err())?;
        Ok(rows
            .into_iter()
            .map(|r| FailureRecord {
                id: r.id,
                file_id: r.file_id,
                path: paths::from_bytes(r.path_bytes),
                reason: r.reason,
                at: r.at,
            })
            .collect())
    }

    /// Checks the database: SQLite's own integrity and foreign-key checks, then that
    /// every indexed file has an embedding of the library's model and no other model's
    /// embeddings linger. Returns the problems found; empty means healthy.
    pub async fn integrity_check(&self) -> Result<Vec<String>> {
        let mut problems = Vec::new();
        let rows: Vec<(String,)> = sqlx::query_as("PRAGMA integrity_check")
            .fetch_all(&self.pool)
            .await
            .map_err(self.err())?;
        problems.extend(rows.into_iter().map(|(s,)| s).filter(|s| s != "ok"));

        let rows: Vec<(String, Option<i64>, String)> =
            sqlx::query_as("SELECT \"table\", rowid, parent FROM pragma_foreign_key_check")
                .fetch_all(&self.pool)
                .await
                .map_err(self.err())?;
        problems.extend(rows.into_iter().map(|(table, rowid, parent)| {
            format!(
                "{table} row {} refers to a missing {parent} row",
                rowid.unwrap_or(-1)
            )
        }));

        if let Some(model) = self.model().await? {
            let missing: Vec<(ImageId,)> = sqlx::query_as(
                "SELECT id FROM files WHERE status = 'indexed' AND id NOT IN \
                 (SELECT file_id FROM embeddings WHERE model_id = ? AND dim = ?) ORDER BY id",
            )
            .bind(&model.id)
            .bind(to_i64(model.dim as u64))
            .fetch_all(&self.pool)
            .await
            .map_err(self.err())?;
            if !missing.is_empty() {
                let ids: Vec<String> = missing
                    .iter()
                    .take(10)
                    .map(|(id,)| id.to_string())
                    .collect();
                problems.push(format!(
                    "{} indexed file(s) have no `{}` embedding (ids {}{})",
                    missing.len(),
                    model.id,
                    ids.join(", "),
                    if missing.len() > 10 { ", …" } else { "" }
                ));
            }
            let (stray,): (i64,) = sqlx::query_as(
                "SELECT COUNT(*) FROM embeddings WHERE NOT (model_id = ? AND dim = ?)",
            )
            .bind(&model.id)
            .bind(to_i64(model.dim as u64))
            .fetch_one(&self.pool)
            .await
            .map_err(self.err())?;
            if stray > 0 {
                problems.push(format!(
                    "{stray} embedding(s) are not from the library model `{}`",
                    model.id
                ));
            }
        } else {
            let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM embeddings")
                .fetch_one(&self.pool)
                .await
                .map_err(self.err())?;
            if n > 0 {
                problems.push(format!(
                    "{n} embedding(s) stored but no library model recorded"
                ));
            }
        }
        Ok(problems)
    }
}

// ---- captions ------------------------------------------------------------------------

/// Rows per page when reading what the caption index holds.
const TEXT_PAGE: u32 = 4096;

impl Store {
    /// The caption counter: it grows with every caption written. The caption index
    /// stores it beside [`generation`](Self::generation) (which also covers new and
    /// changed files) and is stale when either differs; the vector index ignores it.
    pub async fn text_generation(&self) -> Result<u64> {
        let g: i64 = sqlx::query_scalar("SELECT text_generation FROM library WHERE id = 1")
            .fetch_one(&self.pool)
            .await
            .map_err(self.err())?;
        Ok(to_u64(g))
    }

    /// Writes the caption of file `id` by `model`, replacing any other, and returns the
    /// new text generation. Fails with [`Error::NoSuchFile`] if there is no such row.
    pub async fn set_caption(&self, id: ImageId, model: &str, text: &str) -> Result<u64> {
        let mut tx = self.begin_write().await?;
        let n = sqlx::query(concat!(
            "INSERT INTO captions (file_id, model_id, text, content_hash, created_at) \
             SELECT id, ?, ?, content_hash, ",
            now!(),
            " FROM files WHERE id = ? \
             ON CONFLICT (file_id) DO UPDATE SET model_id = excluded.model_id, \
                 text = excluded.text, content_hash = excluded.content_hash, \
                 created_at = excluded.created_at"
        ))
        .bind(model)
        .bind(text)
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(self.err())?
        .rows_affected();
        if n == 0 {
            return Err(Error::NoSuchFile { db: self.path().to_path_buf(), id });
        }
        let g = bump_text(&mut tx).await.map_err(self.err())?;
        tx.commit().await.map_err(self.err())?;
        Ok(g)
    }

    /// The caption of one file, whatever the file's status.
    pub async fn caption(&self, id: ImageId) -> Result<Option<Caption>> {
        let row: Option<CaptionRow> = sqlx::query_as(
            "SELECT file_id, model_id, text, created_at FROM captions WHERE file_id = ?",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(self.err())?;
        Ok(row.map(Caption::from))
    }

    /// Caption texts of those of `ids` that have one (for search hits).
    pub async fn captions_for(&self, ids: &[ImageId]) -> Result<HashMap<ImageId, String>> {
        let mut out = HashMap::with_capacity(ids.len());
        for chunk in ids.chunks(IDS_PER_STATEMENT) {
            let sql = format!(
                "SELECT file_id, text FROM captions WHERE file_id IN ({})",
                placeholders(chunk.len())
            );
            let mut query = sqlx::query_as::<_, (ImageId, String)>(&sql);
            for id in chunk {
                query = query.bind(id);
            }
            out.extend(query.fetch_all(&self.pool).await.map_err(self.err())?);
        }
        Ok(out)
    }

    /// Every caption of an `indexed` file, by ascending file id.
    pub async fn all_captions(&self) -> Result<Vec<Caption>> {
        let rows: Vec<CaptionRow> = sqlx::query_as(
            "SELECT c.file_id, c.model_id, c.text, c.created_at FROM captions c \
             JOIN files f ON f.id = c.file_id WHERE f.status = 'indexed' ORDER BY c.file_id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(self.err())?;
        Ok(rows.into_iter().map(Caption::from).collect())
    }

    /// Up to `limit` `indexed` files with id > `after` that have no caption by `model`
    /// (none at all, or another model's), by ascending id, with their paths. A caption
    /// run pages through with the last id returned, so a file that fails is not offered
    /// again in the same run, and a rerun resumes where a stopped one ended.
    pub async fn files_needing_caption(
        &self,
        model: &str,
        after: ImageId,
        limit: u32,
    ) -> Result<Vec<(ImageId, PathBuf)>> {
        let rows: Vec<(ImageId, Vec<u8>)> = sqlx::query_as(
            "SELECT f.id, f.path_bytes FROM files f LEFT JOIN captions c ON c.file_id = f.id \
             WHERE f.status = 'indexed' AND f.id > ? AND (c.file_id IS NULL OR c.model_id != ?) \
             ORDER BY f.id LIMIT ?",
        )
        .bind(after)
        .bind(model)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(self.err())?;
        Ok(rows
            .into_iter()
            .map(|(id, p)| (id, paths::from_bytes(p)))
            .collect())
    }

    /// How many `indexed` files have no caption by `model`.
    pub async fn count_needing_caption(&self, model: &str) -> Result<u64> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM files f LEFT JOIN captions c ON c.file_id = f.id \
             WHERE f.status = 'indexed' AND (c.file_id IS NULL OR c.model_id != ?)",
        )
        .bind(model)
        .fetch_one(&self.pool)
        .await
        .map_err(self.err())?;
        Ok(to_u64(n))
    }

    /// How many `indexed` files have a caption (by any model).
    pub async fn caption_count(&self) -> Result<u64> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM captions c JOIN files f ON f.id = c.file_id \
             WHERE f.status = 'indexed'",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(self.err())?;
        Ok(to_u64(n))
    }

    /// What the caption index holds for each of `ids` that is `indexed`, by ascending id.
    pub async fn text_sources(&self, ids: &[ImageId]) -> Result<Vec<TextSource>> {
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(IDS_PER_STATEMENT) {
            let sql = format!(
                "SELECT f.id, f.path_bytes, r.path_bytes AS root_bytes, c.text FROM files f \
                 JOIN roots r ON r.id = f.root_id LEFT JOIN captions c ON c.file_id = f.id \
                 WHERE f.status = 'indexed' AND f.id IN ({}) ORDER BY f.id",
                placeholders(chunk.len())
            );
            let mut query = sqlx::query_as::<_, TextSourceRow>(&sql);
            for id in chunk {
                query = query.bind(id);
            }
            out.extend(
                query
                    .fetch_all(&self.pool)
                    .await
                    .map_err(self.err())?
                    .into_iter()
                    .map(TextSource::from),
            );
        }
        out.sort_by_key(|t| t.id);
        out.dedup_by_key(|t| t.id);
        Ok(out)
    }

    /// What the caption index holds for every `indexed` file, by ascending id, for
    /// rebuilding it. Read page by page.
    pub async fn all_text_sources(&self) -> Result<Vec<TextSource>> {
        let mut all = Vec::new();
        let mut after = ImageId::MIN;
        loop {
            let rows: Vec<TextSourceRow> = sqlx::query_as(
                "SELECT f.id, f.path_bytes, r.path_bytes AS root_bytes, c.text FROM files f \
                 JOIN roots r ON r.id = f.root_id LEFT JOIN captions c ON c.file_id = f.id \
                 WHERE f.status = 'indexed' AND f.id > ? ORDER BY f.id LIMIT ?",
            )
            .bind(after)
            .bind(i64::from(TEXT_PAGE))
            .fetch_all(&self.pool)
            .await
            .map_err(self.err())?;
            let full = rows.len() == TEXT_PAGE as usize;
            let Some(last) = rows.last().map(|r| r.id) else { break };
            all.extend(rows.into_iter().map(TextSource::from));
            if !full {
                break;
            }
            after = last;
        }
        Ok(all)
    }

    // ---- conversations -------------------------------------------------------------------

    /// Starts a conversation about file `file_id` with the chat model `model_id`.
    pub async fn create_conversation(&self, file_id: ImageId, model_id: &str) -> Result<Conversation> {
        let mut tx = self.begin_write().await?;
        let row: Option<ConversationRow> = sqlx::query_as(concat!(
            "INSERT INTO conversations (file_id, model_id, created_at) SELECT id, ?, ",
            now!(),
            " FROM files WHERE id = ? RETURNING id, file_id, model_id, title, created_at"
        ))
        .bind(model_id)
        .bind(file_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(self.err())?;
        let row = row.ok_or_else(|| Error::NoSuchFile { db: self.path().to_path_buf(), id: file_id })?;
        tx.commit().await.map_err(self.err())?;
        Ok(row.into())
    }

    /// One conversation by id.
    pub async fn conversation(&self, id: ConversationId) -> Result<Option<Conversation>> {
        let row: Option<ConversationRow> = sqlx::query_as(
            "SELECT id, file_id, model_id, title, created_at FROM conversations WHERE id = ?",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(self.err())?;
        Ok(row.map(Conversation::from))
    }

    /// Conversations, oldest first: all of them, or those about one file.
    pub async fn conversations(&self, file: Option<ImageId>) -> Result<Vec<Conversation>> {
        let rows: Vec<ConversationRow> = sqlx::query_as(
            "SELECT id, file_id, model_id, title, created_at FROM conversations \
             WHERE ?1 IS NULL OR file_id = ?1 ORDER BY id",
        )
        .bind(file)
        .fetch_all(&self.pool)
        .await
        .map_err(self.err())?;
        Ok(rows.into_iter().map(Conversation::from).collect())
    }

    /// Appends one message. Fails with [`Error::NoSuchConversation`] for an unknown id.
    pub async fn append_message(&self, conversation: ConversationId, role: Role, text: &str) -> Result<Message> {
        let mut tx = self.begin_write().await?;
        let m = insert_message(&mut tx, conversation, role, text)
            .await
            .map_err(self.err())?
            .ok_or_else(|| Error::NoSuchConversation { db: self.path().to_path_buf(), id: conversation })?;
        tx.commit().await.map_err(self.err())?;
        m.into_message(self)
    }

    /// Appends a question and its answer in one transaction (history never holds a
    /// question without its answer), and titles the conversation with its first question.
    pub async fn append_exchange(
        &self,
        conversation: ConversationId,
        question: &str,
        answer: &str,
    ) -> Result<(Message, Message)> {
        let mut tx = self.begin_write().await?;
        let missing = || Error::NoSuchConversation { db: self.path().to_path_buf(), id: conversation };
        let q = insert_message(&mut tx, conversation, Role::User, question)
            .await
            .map_err(self.err())?
            .ok_or_else(missing)?;
        let a = insert_message(&mut tx, conversation, Role::Assistant, answer)
            .await
            .map_err(self.err())?
            .ok_or_else(missing)?;
        sqlx::query("UPDATE conversations SET title = ? WHERE id = ? AND title IS NULL")
            .bind(question)
            .bind(conversation)
            .execute(&mut *tx)
            .await
            .map_err(self.err())?;
        tx.commit().await.map_err(self.err())?;
        Ok((q.into_message(self)?, a.into_message(self)?))
    }

    /// The messages of a conversation, in order.
    pub async fn messages(&self, conversation: ConversationId) -> Result<Vec<Message>> {
        let rows: Vec<MessageRow> = sqlx::query_as(
            "SELECT id, conversation_id, role, text, at FROM messages WHERE conversation_id = ? ORDER BY id",
        )
        .bind(conversation)
        .fetch_all(&self.pool)
        .await
        .map_err(self.err())?;
        rows.into_iter().map(|r| r.into_message(self)).collect()
    }

    /// Deletes a conversation and its messages; false if there was none.
    pub async fn delete_conversation(&self, id: ConversationId) -> Result<bool> {
        let n = sqlx::query("DELETE FROM conversations WHERE id = ?")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(self.err())?
            .rows_affected();
        Ok(n > 0)
    }
}

#[derive(FromRow)]
struct CaptionRow {
    file_id: ImageId,
    model_id: String,
    text: String,
    created_at: String,
}

impl From<CaptionRow> for Caption {
    fn from(r: CaptionRow) -> Caption {
        Caption { file_id: r.file_id, model_id: r.model_id, text: r.text, created_at: r.created_at }
    }
}

#[derive(FromRow)]
struct TextSourceRow {
    id: ImageId,
    path_bytes: Vec<u8>,
    root_bytes: Vec<u8>,
    text: Option<String>,
}

impl From<TextSourceRow> for TextSource {
    fn from(r: TextSourceRow) -> TextSource {
        TextSource {
            id: r.id,
            path: paths::from_bytes(r.path_bytes),
            root: paths::from_bytes(r.root_bytes),
            caption: r.text,
        }
    }
}

#[derive(FromRow)]
struct ConversationRow {
    id: ConversationId,
    file_id: ImageId,
    model_id: String,
    title: Option<String>,
    created_at: String,
}

impl From<ConversationRow> for Conversation {
    fn from(r: ConversationRow) -> Conversation {
        Conversation { id: r.id, file_id: r.file_id, model_id: r.model_id, title: r.title, created_at: r.created_at }
    }
}

#[derive(FromRow)]
struct MessageRow {
    id: i64,
    conversation_id: ConversationId,
    role: String,
    text: String,
    at: String,
}

impl MessageRow {
    fn into_message(self, store: &Store) -> Result<Message> {
        Ok(Message {
            id: self.id,
            conversation_id: self.conversation_id,
            role: self.role.parse().map_err(|e: String| store.corrupt(e))?,
            text: self.text,
            at: self.at,
        })
    }
}

/// Inserts a message; `None` if the conversation does not exist.
async fn insert_message(
    tx: &mut Transaction<'static, Sqlite>,
    conversation: ConversationId,
    role: Role,
    text: &str,
) -> sqlx::Result<Option<MessageRow>> {
    sqlx::query_as(concat!(
        "INSERT INTO messages (conversation_id, role, text, at) SELECT id, ?, ?, ",
        now!(),
        " FROM conversations WHERE id = ? RETURNING id, conversation_id, role, text, at"
    ))
    .bind(role.as_str())
    .bind(text)
    .bind(conversation)
    .fetch_optional(&mut **tx)
    .await
}

pub(crate) async fn bump_text(tx: &mut Transaction<'static, Sqlite>) -> sqlx::Result<u64> {
    let g: i64 = sqlx::query_scalar(
        "UPDATE library SET text_generation = text_generation + 1 WHERE id = 1 RETURNING text_generation",
    )
    .fetch_one(&mut **tx)
    .await?;
    Ok(to_u64(g))
}

// ---- rows and helpers ---------------------------------------------------------------

#[derive(FromRow)]
struct LibraryRow {
    model_id: Option<String>,
    model_dim: Option<i64>,
    generation: i64,
    text_generation: i64,
    created_at: String,
}

impl LibraryRow {
    fn model(&self) -> Option<ModelInfo> {
        match (&self.model_id, self.model_dim) {
            (Some(id), Some(dim)) => Some(ModelInfo {
                id: id.clone(),
                dim: to_u64(dim) as usize,
            }),
            _ => None,
        }
    }
}

#[derive(FromRow)]
struct RootRow {
    id: RootId,
    path_bytes: Vec<u8>,
    added_at: String,
}

impl From<RootRow> for Root {
    fn from(r: RootRow) -> Root {
        Root {
            id: r.id,
            path: paths::from_bytes(r.path_bytes),
            added_at: r.added_at,
        }
    }
}

#[derive(FromRow)]
struct FileStateRow {
    id: ImageId,
    path_bytes: Vec<u8>,
    size: i64,
    mtime_ns: i64,
    status: String,
}

#[derive(FromRow)]
struct FailureRow {
    id: i64,
    file_id: Option<ImageId>,
    path_bytes: Vec<u8>,
    reason: String,
    at: String,
}

#[derive(FromRow)]
struct FileRow {
    id: ImageId,
    root_id: RootId,
    path_bytes: Vec<u8>,
    size: i64,
    mtime_ns: i64,
    content_hash: Option<String>,
    width: Option<i64>,
    height: Option<i64>,
    format: Option<String>,
    taken_at: Option<String>,
    camera_make: Option<String>,
    camera_model: Option<String>,
    orientation: Option<i64>,
    gps_lat: Option<f64>,
    gps_lon: Option<f64>,
    status: String,
    error: Option<String>,
    indexed_at: Option<String>,
    updated_at: String,
}

impl FileRow {
    fn into_record(self, store: &Store) -> Result<FileRecord> {
        let meta = match (self.width, self.height, self.format) {
            (Some(w), Some(h), Some(format)) => Some(ImageMeta {
                width: u32::try_from(w).unwrap_or(0),
                height: u32::try_from(h).unwrap_or(0),
                format,
                exif: Exif {
                    taken_at: self.taken_at,
                    camera_make: self.camera_make,
                    camera_model: self.camera_model,
                    orientation: self.orientation.and_then(|o| u16::try_from(o).ok()),
                    gps_lat: self.gps_lat,
                    gps_lon: self.gps_lon,
                },
            }),
            _ => None,
        };
        Ok(FileRecord {
            id: self.id,
            root_id: self.root_id,
            path: paths::from_bytes(self.path_bytes),
            size: to_u64(self.size),
            mtime_ns: self.mtime_ns,
            content_hash: self.content_hash,
            meta,
            status: parse_status(store, &self.status)?,
            error: self.error,
            indexed_at: self.indexed_at,
            updated_at: self.updated_at,
        })
    }
}

fn parse_status(store: &Store, s: &str) -> Result<FileStatus> {
    s.parse().map_err(|e: String| store.corrupt(e))
}

async fn read_model(tx: &mut Transaction<'static, Sqlite>) -> sqlx::Result<Option<ModelInfo>> {
    let row: LibraryRow = sqlx::query_as(
        "SELECT model_id, model_dim, generation, text_generation, created_at FROM library WHERE id = 1",
    )
    .fetch_one(&mut **tx)
    .await?;
    Ok(row.model())
}

async fn bump(tx: &mut Transaction<'static, Sqlite>) -> sqlx::Result<u64> {
    let g: i64 = sqlx::query_scalar(
        "UPDATE library SET generation = generation + 1 WHERE id = 1 RETURNING generation",
    )
    .fetch_one(&mut **tx)
    .await?;
    Ok(to_u64(g))
}

async fn insert_failure(
    tx: &mut Transaction<'static, Sqlite>,
    file_id: Option<ImageId>,
    path: &Path,
    reason: &str,
) -> sqlx::Result<()> {
    sqlx::query(concat!(
        "INSERT INTO failures (file_id, path, path_bytes, reason, at) VALUES (?, ?, ?, ?, ",
        now!(),
        ")"
    ))
    .bind(file_id)
    .bind(paths::to_text(path))
    .bind(paths::to_bytes(path))
    .bind(reason)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

fn decode_vector(bytes: &[u8], dim: usize) -> Option<Vec<f32>> {
    (bytes.len() == dim * 4).then(|| {
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    })
}

pub(crate) fn placeholders(n: usize) -> String {
    let mut s = "?,".repeat(n);
    s.pop();
    s
}

// SQLite integers are i64; sizes, dimensions and counters are never negative.
pub(crate) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}
