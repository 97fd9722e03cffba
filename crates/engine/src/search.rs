//! Queries: nearest images to a vector, a text, a file or an indexed image.

use crate::{Error, Library, Result};
use magpie_core::{ImageEmbedder, ImageId, TextEmbedder};
use magpie_media::DecodeOptions;
use magpie_store::{FileRecord, FileStatus};
use serde::Serialize;
use std::path::Path;

/// One result: the file, its score (cosine similarity) and what we know of it.
#[derive(Debug, Clone, Serialize)]
pub struct SearchHit {
    pub id: ImageId,
    pub path: String,
    pub score: f32,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub format: Option<String>,
    pub taken_at: Option<String>,
    pub camera: Option<String>,
}

impl SearchHit {
    fn new(f: FileRecord, score: f32) -> Self {
        let meta = f.meta.as_ref();
        let camera = meta.and_then(|m| match (&m.exif.camera_make, &m.exif.camera_model) {
            (Some(a), Some(b)) if b.starts_with(a.as_str()) => Some(b.clone()),
            (Some(a), Some(b)) => Some(format!("{a} {b}")),
            (a, b) => a.clone().or(b.clone()),
        });
        Self {
            id: f.id,
            path: f.path.to_string_lossy().into_owned(),
            score,
            width: meta.map(|m| m.width),
            height: meta.map(|m| m.height),
            format: meta.map(|m| m.format.clone()),
            taken_at: meta.and_then(|m| m.exif.taken_at.clone()),
            camera,
        }
    }
}

impl Library {
    /// The `k` indexed images nearest to `query` (an L2-normalised vector of the
    /// library's model), best first; `exclude` drops one id (the query image itself).
    pub async fn search_vector(&self, query: &[f32], k: usize, exclude: Option<ImageId>) -> Result<Vec<SearchHit>> {
        if query.len() != self.model.dim {
            return Err(Error::Model(magpie_core::Error::Dimension {
                model: self.model.id.clone(),
                expected: self.model.dim,
                got: query.len(),
            }));
        }
        if k == 0 {
            return Ok(vec![]);
        }
        // Tombstones the index has not yet dropped are filtered against SQLite, so ask
        // for a few more than needed and widen if too many were filtered.
        let mut want = k + 1 + k / 4;
        loop {
            let hits = {
                let ix = self.index.read().expect("index lock");
                let filter = |id: ImageId| Some(id) != exclude;
                ix.search(query, want, None, Some(&filter))?
            };
            let exhausted = hits.len() < want;
            let ids: Vec<ImageId> = hits.iter().map(|h| h.id).collect();
            let files = self.store.get_files(&ids).await?;
            let by_id: std::collections::HashMap<ImageId, FileRecord> = files.into_iter().map(|f| (f.id, f)).collect();
            let mut out: Vec<SearchHit> = Vec::with_capacity(k);
            for h in hits {
                if let Some(f) = by_id.get(&h.id) {
                    if f.status == FileStatus::Indexed {
                        out.push(SearchHit::new(f.clone(), h.score));
                    }
                }
                if out.len() == k {
                    break;
                }
            }
            if out.len() == k || exhausted {
                return Ok(out);
            }
            want *= 2;
        }
    }

    /// Text → image search.
    pub async fn search_text(&self, embedder: &dyn TextEmbedder, text: &str, k: usize) -> Result<Vec<SearchHit>> {
        self.check_model(embedder.model())?;
        let v = embedder.embed_texts(&[text])?.pop().ok_or_else(|| Error::Task("no embedding returned".into()))?;
        self.search_vector(&v, k, None).await
    }

    /// Images like the indexed image `id` (itself excluded), from its stored vector.
    pub async fn similar_to_id(&self, id: ImageId, k: usize) -> Result<Vec<SearchHit>> {
        let e = self.store.embedding(id, &self.model.id).await?.ok_or(Error::UnknownId(id))?;
        match self.store.get_file(id).await? {
            Some(f) if f.status == FileStatus::Indexed => {}
            _ => return Err(Error::UnknownId(id)),
        }
        self.search_vector(e.vector(), k, Some(id)).await
    }

    /// Images like the file at `path`: its stored vector when the file is indexed and
    /// unchanged, otherwise decoded and embedded now.
    pub async fn similar_to_file(&self, path: &Path, embedder: &dyn ImageEmbedder, k: usize) -> Result<Vec<SearchHit>> {
        self.check_model(embedder.model())?;
        let canonical = std::fs::canonicalize(path).map_err(|e| Error::path(path, e))?;
        if let Some(f) = self.store.file_by_path(&canonical).await? {
            let md = std::fs::metadata(&canonical).map_err(|e| Error::path(path, e))?;
            // Size and mtime, as the walk decides what changed: a rewrite can keep the size.
            if f.status == FileStatus::Indexed && f.size == md.len() && f.mtime_ns == crate::ingest::mtime_ns(&md) {
                return self.similar_to_id(f.id, k).await;
            }
        }
        let v = embed_file(path, embedder)?;
        self.search_vector(&v, k, None).await
    }

    fn check_model(&self, m: &magpie_core::ModelInfo) -> Result<()> {
        if m != &self.model {
            return Err(Error::Model(magpie_core::Error::ModelMismatch { expected: self.model.id.clone(), got: m.id.clone() }));
        }
        Ok(())
    }
}

/// Decodes, preprocesses and embeds one image file.
pub fn embed_file(path: &Path, embedder: &dyn ImageEmbedder) -> Result<Vec<f32>> {
    let decoded = magpie_media::decode_file(path, &DecodeOptions::for_model(embedder.input_side()))?;
    let pixels = embedder.preprocess(&decoded.image)?;
    embedder.embed_pixels(&[pixels])?.pop().ok_or_else(|| Error::Task("no embedding returned".into()))
}
