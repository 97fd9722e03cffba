use crate::{Error, Result, DB_FILE, TEXT_INDEX, VECTOR_INDEX};
use magpie_core::{ImageId, ModelInfo};
use magpie_index::{IndexKind, IndexParams, IndexSpec, Loaded, TextDoc, TextError, TextIndex, TextLoaded, TextStamp, VectorIndex};
use magpie_store::{Counts, FileStatus, Store, TextSource};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// Per-library settings (serde, so they can come from a config file).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct LibraryConfig {
    pub index: IndexParams,
}

/// How the vector index was obtained when the library was opened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "reason")]
pub enum IndexState {
    /// Loaded from disk, up to date with SQLite.
    Loaded,
    /// Rebuilt from SQLite because it was missing or stale (the reason).
    Rebuilt(String),
}

/// One library: the SQLite store (the truth) and the indexes derived from it, vectors
/// (HNSW or exact) and captions (tantivy).
pub struct Library {
    pub(crate) dir: PathBuf,
    pub(crate) store: Store,
    pub(crate) model: ModelInfo,
    pub(crate) config: LibraryConfig,
    pub(crate) index: Arc<RwLock<VectorIndex>>,
    index_state: IndexState,
    /// Replaced whole by a rebuild; otherwise written through its own interior locks.
    text: RwLock<Arc<TextIndex>>,
    text_state: IndexState,
    /// Held from a SQLite write that changes what the caption index holds until that
    /// change is in the caption index, and around its commits: a commit's stamp then
    /// always describes exactly what was added before it.
    pub(crate) text_write: tokio::sync::Mutex<()>,
}

/// What `magpie status` shows.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub data_dir: PathBuf,
    pub model: Option<ModelInfo>,
    pub counts: Counts,
    pub roots: Vec<PathBuf>,
    pub generation: u64,
    /// `None` when no index has been saved yet.
    pub index: Option<IndexStatus>,
    pub failures: u64,
    /// Indexed images with a caption.
    pub captions: u64,
    /// `None` when no caption index has been saved yet.
    pub text_index: Option<TextIndexStatus>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TextIndexStatus {
    pub documents: u64,
    pub generation: u64,
    pub text_generation: u64,
    pub up_to_date: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct IndexStatus {
    pub kind: IndexKind,
    pub vectors: u64,
    pub generation: u64,
    pub up_to_date: bool,
}

impl Library {
    /// Opens (creating if needed) the library in `dir` for `model`. Fails if the library
    /// was built with another model. Loads the vector index, or rebuilds it from SQLite
    /// when it is missing or stale.
    pub async fn open(dir: &Path, model: &ModelInfo, config: LibraryConfig) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::path(dir, e))?;
        let store = Store::open(dir.join(DB_FILE)).await?;
        store.ensure_model(model).await?;
        let spec = IndexSpec::for_model(model, config.index);
        let generation = store.generation().await?;
        let (index, index_state) = match VectorIndex::load(dir, VECTOR_INDEX, &spec, generation)? {
            Loaded::Ready(ix) => (ix, IndexState::Loaded),
            other => {
                let reason = match other {
                    Loaded::Stale(r) => r.to_string(),
                    _ => "no saved index".to_string(),
                };
                tracing::info!("rebuilding the vector index from SQLite: {reason}");
                let ix = build_index(&store, &spec, generation).await?;
                ix.save(dir, VECTOR_INDEX)?;
                (ix, IndexState::Rebuilt(reason))
            }
        };
        // A save killed half-way leaves its temporary files; the next save would remove
        // them too, but a library that is only read may not save for a long time.
        if let Err(e) = VectorIndex::remove_stale_temp_files(dir, VECTOR_INDEX) {
            tracing::warn!("could not remove the temporary files of an interrupted index save: {e}");
        }
        let (text, text_state) = open_text_index(&store, dir).await?;
        Ok(Self {
            dir: dir.to_path_buf(),
            store,
            model: model.clone(),
            config,
            index: Arc::new(RwLock::new(index)),
            index_state,
            text: RwLock::new(Arc::new(text)),
            text_state,
            text_write: tokio::sync::Mutex::new(()),
        })
    }

    /// Opens the existing library in `dir` with the embedding model it records, for work
    /// that needs no embedding model (captions, chat, text search). Fails with
    /// [`Error::Empty`] if there is no library there or it has no model yet.
    pub async fn open_recorded(dir: &Path, config: LibraryConfig) -> Result<Self> {
        if !dir.join(DB_FILE).is_file() {
            return Err(Error::Empty(dir.to_path_buf()));
        }
        let model = {
            let store = Store::open(dir.join(DB_FILE)).await?;
            let model = store.model().await?;
            store.close().await;
            model
        };
        match model {
            Some(m) => Self::open(dir, &m, config).await,
            None => Err(Error::Empty(dir.to_path_buf())),
        }
    }

    pub fn model(&self) -> &ModelInfo {
        &self.model
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn index_state(&self) -> &IndexState {
        &self.index_state
    }

    /// How the caption index was obtained when the library was opened.
    pub fn text_index_state(&self) -> &IndexState {
        &self.text_state
    }

    /// Documents (indexed images) in the caption index.
    pub fn text_documents(&self) -> u64 {
        self.text().len()
    }

    pub(crate) fn text(&self) -> Arc<TextIndex> {
        self.text.read().expect("text index lock").clone()
    }

    /// Number of live vectors in the index.
    pub fn indexed_vectors(&self) -> usize {
        self.index.read().expect("index lock").len()
    }

    /// Rebuilds the vector index and the caption index from SQLite (`magpie reindex`),
    /// purging tombstones. Returns the number of vectors.
    pub async fn rebuild_index(&self) -> Result<usize> {
        self.store.purge_deleted().await?;
        self.rebuild_text_index().await?;
        let generation = self.store.generation().await?;
        let spec = IndexSpec::for_model(&self.model, self.config.index);
        let ix = build_index(&self.store, &spec, generation).await?;
        let n = ix.len();
        let dir = self.dir.clone();
        let ix = tokio::task::spawn_blocking(move || ix.save(&dir, VECTOR_INDEX).map(|_| ix))
            .await
            .map_err(|e| Error::Task(e.to_string()))??;
        *self.index.write().expect("index lock") = ix;
        Ok(n)
    }

    /// Rebuilds the caption index from SQLite; returns its number of documents.
    pub async fn rebuild_text_index(&self) -> Result<u64> {
        let _guard = self.text_write.lock().await;
        // Our own writer holds the folder's lock: let it go first.
        self.text().release_writer()?;
        let stamp = text_stamp(&self.store).await?;
        let docs = text_docs(self.store.all_text_sources().await?);
        let path = self.dir.join(TEXT_INDEX);
        let ix = tokio::task::spawn_blocking(move || TextIndex::rebuild(&path, &docs, stamp))
            .await
            .map_err(|e| Error::Task(e.to_string()))??;
        let n = ix.len();
        *self.text.write().expect("text index lock") = Arc::new(ix);
        Ok(n)
    }

    /// Puts the current path words and captions of `ids` into the caption index (those
    /// no longer indexed are removed). Call with `text_write` held, right after the
    /// SQLite write; visible after [`commit_text`](Self::commit_text).
    pub(crate) async fn refresh_text(&self, ids: &[ImageId]) -> Result<()> {
        let sources = self.store.text_sources(ids).await?;
        let text = self.text();
        let gone: Vec<ImageId> = ids.iter().copied().filter(|id| sources.binary_search_by_key(id, |s| s.id).is_err()).collect();
        text.remove(&gone)?;
        text.upsert(&text_docs(sources))?;
        Ok(())
    }

    /// Commits the caption index at SQLite's current stamp. Call with `text_write` held.
    pub(crate) async fn commit_text(&self) -> Result<()> {
        let stamp = text_stamp(&self.store).await?;
        self.text().commit(stamp)?;
        Ok(())
    }

    /// Commits the caption index and closes its writer, so that another process can
    /// write it (end of an index or caption job).
    pub(crate) async fn finish_text(&self) -> Result<()> {
        let _guard = self.text_write.lock().await;
        self.commit_text().await?;
        self.text().release_writer()?;
        Ok(())
    }

    /// The indexed file at `path` (as given; it is canonicalised), for commands that take
    /// PATH|ID. Fails with [`Error::NotIndexed`] if the library does not hold it.
    pub async fn resolve_file(&self, path: &Path) -> Result<ImageId> {
        let canonical = std::fs::canonicalize(path).map_err(|e| Error::path(path, e))?;
        match self.store.file_by_path(&canonical).await? {
            Some(f) if f.status == FileStatus::Indexed => Ok(f.id),
            _ => Err(Error::NotIndexed(path.to_path_buf())),
        }
    }

    /// The indexed file `id`, or [`Error::UnknownId`].
    pub(crate) async fn indexed_file(&self, id: ImageId) -> Result<magpie_store::FileRecord> {
        match self.store.get_file(id).await? {
            Some(f) if f.status == FileStatus::Indexed => Ok(f),
            _ => Err(Error::UnknownId(id)),
        }
    }

    /// Writes the vector index to disk (atomically).
    pub(crate) async fn save_index(&self) -> Result<()> {
        let index = self.index.clone();
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || index.read().expect("index lock").save(&dir, VECTOR_INDEX))
            .await
            .map_err(|e| Error::Task(e.to_string()))??;
        Ok(())
    }

    /// Status of the library in `dir` without loading any model. `Ok(None)` if there is
    /// no library there yet.
    pub async fn status(dir: &Path, params: IndexParams) -> Result<Option<Status>> {
        if !dir.join(DB_FILE).is_file() {
            return Ok(None);
        }
        let store = Store::open(dir.join(DB_FILE)).await?;
        let info = store.library().await?;
        let counts = store.counts().await?;
        let roots = store.roots().await?.into_iter().map(|r| r.path).collect();
        let failures = counts.failed;
        let captions = store.caption_count().await?;
        let text_index = TextIndex::saved(&dir.join(TEXT_INDEX))?.map(|saved| TextIndexStatus {
            documents: saved.docs,
            generation: saved.stamp.generation,
            text_generation: saved.stamp.text_generation,
            up_to_date: saved.stamp.generation == info.generation && saved.stamp.text_generation == info.text_generation,
        });
        // Only the meta file is read: status must stay instant on a big library.
        let index = match (&info.model, VectorIndex::saved_meta(dir, VECTOR_INDEX)?) {
            (Some(m), Some(saved)) => Some(IndexStatus {
                kind: saved.meta.kind,
                vectors: saved.live as u64,
                generation: saved.meta.generation,
                up_to_date: saved.meta.generation == info.generation
                    && saved.meta.model_id == m.id
                    && saved.meta.dim == m.dim
                    && saved.meta.params.m == params.m
                    && saved.meta.params.ef_construction == params.ef_construction,
            }),
            _ => None,
        };
        store.close().await;
        Ok(Some(Status {
            data_dir: dir.to_path_buf(),
            model: info.model,
            counts,
            roots,
            generation: info.generation,
            index,
            failures,
            captions,
            text_index,
        }))
    }
}

pub(crate) async fn build_index(store: &Store, spec: &IndexSpec, generation: u64) -> Result<VectorIndex> {
    let vectors = store.all_embeddings(&spec.model_id).await?;
    let spec = spec.clone();
    tokio::task::spawn_blocking(move || -> Result<VectorIndex> {
        let mut ix = VectorIndex::new(spec)?;
        let items: Vec<(i64, &[f32])> = vectors.iter().map(|(id, v)| (*id, v.as_slice())).collect();
        ix.insert(&items)?;
        ix.set_generation(generation);
        Ok(ix)
    })
    .await
    .map_err(|e| Error::Task(e.to_string()))?
}

/// SQLite's state as the caption index records it.
pub(crate) async fn text_stamp(store: &Store) -> Result<TextStamp> {
    let info = store.library().await?;
    Ok(TextStamp { generation: info.generation, text_generation: info.text_generation })
}

pub(crate) fn text_docs(sources: Vec<TextSource>) -> Vec<TextDoc> {
    sources.into_iter().map(|s| TextDoc::new(s.id, &s.path, &s.root, s.caption)).collect()
}

/// Loads the saved caption index, or rebuilds it from SQLite when it is missing or
/// stale. If another process holds its lock (it is writing), serves a rebuilt copy from
/// memory and leaves the folder to that process; the next open rebuilds it if needed.
async fn open_text_index(store: &Store, dir: &Path) -> Result<(TextIndex, IndexState)> {
    // The stamp before the documents: a concurrent writer can then only make the
    // documents newer than the stamp, which the next open sees as stale, never older.
    let stamp = text_stamp(store).await?;
    let path = dir.join(TEXT_INDEX);
    let reason = match TextIndex::load(&path, stamp)? {
        TextLoaded::Ready(ix) => return Ok((ix, IndexState::Loaded)),
        TextLoaded::Missing => "no saved caption index".to_string(),
        TextLoaded::Stale(why) => why,
    };
    tracing::info!("rebuilding the caption index from SQLite: {reason}");
    let docs = text_docs(store.all_text_sources().await?);
    let built = tokio::task::spawn_blocking(move || match TextIndex::rebuild(&path, &docs, stamp) {
        Err(TextError::Locked { .. }) => TextIndex::in_memory(&docs, stamp).map(|ix| (ix, true)),
        other => other.map(|ix| (ix, false)),
    })
    .await
    .map_err(|e| Error::Task(e.to_string()))??;
    let (ix, in_memory) = built;
    let reason = if in_memory { format!("{reason}; kept in memory while another process writes it") } else { reason };
    Ok((ix, IndexState::Rebuilt(reason)))
}
