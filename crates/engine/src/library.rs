use crate::{Error, Result, DB_FILE, VECTOR_INDEX};
use magpie_core::ModelInfo;
use magpie_index::{IndexKind, IndexParams, IndexSpec, Loaded, VectorIndex};
use magpie_store::{Counts, Store};
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

/// One library: the SQLite store (the truth) and the vector index derived from it.
pub struct Library {
    pub(crate) dir: PathBuf,
    pub(crate) store: Store,
    pub(crate) model: ModelInfo,
    pub(crate) config: LibraryConfig,
    pub(crate) index: Arc<RwLock<VectorIndex>>,
    index_state: IndexState,
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
        Ok(Self {
            dir: dir.to_path_buf(),
            store,
            model: model.clone(),
            config,
            index: Arc::new(RwLock::new(index)),
            index_state,
        })
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

    /// Number of live vectors in the index.
    pub fn indexed_vectors(&self) -> usize {
        self.index.read().expect("index lock").len()
    }

    /// Rebuilds the vector index from SQLite (`magpie reindex`), purging tombstones.
    pub async fn rebuild_index(&self) -> Result<usize> {
        self.store.purge_deleted().await?;
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
        }))
    }
}

async fn build_index(store: &Store, spec: &IndexSpec, generation: u64) -> Result<VectorIndex> {
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
