//! Queries: nearest images to a vector, a text, a file or an indexed image; BM25 over
//! captions and path words; and both fused by reciprocal rank.

use crate::{Error, Library, Result};
use magpie_core::{ImageEmbedder, ImageId, TextEmbedder};
use magpie_media::DecodeOptions;
use magpie_store::{FileRecord, FileStatus};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// The `k` of reciprocal rank fusion: a result at rank r (from 1) of one ranking adds
/// 1 / (RRF_K + r). 60 is the value of Cormack et al. (SIGIR 2009) that most engines use.
pub const RRF_K: f32 = 60.0;
/// How deep each ranking is read before fusing (at least; more for a large `k`).
const FUSION_DEPTH: usize = 100;

/// How a text query is matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SearchMode {
    /// CLIP: the text's embedding against the images'. Score: cosine similarity.
    Vector,
    /// BM25 over captions and path words. Score: BM25.
    Text,
    /// Both rankings fused by reciprocal rank, so that a word found only in a caption or
    /// a folder name still surfaces the image. Score: the fused RRF score.
    #[default]
    Hybrid,
}

impl std::str::FromStr for SearchMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "vector" | "clip" => Ok(SearchMode::Vector),
            "text" | "bm25" => Ok(SearchMode::Text),
            "hybrid" => Ok(SearchMode::Hybrid),
            other => Err(format!("unknown search mode `{other}` (vector, text or hybrid)")),
        }
    }
}

impl std::fmt::Display for SearchMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SearchMode::Vector => "vector",
            SearchMode::Text => "text",
            SearchMode::Hybrid => "hybrid",
        })
    }
}

/// Fuses rankings (ids, best first; each id at most once per ranking) by reciprocal
/// rank: score(id) = Σ over rankings holding it of 1 / (`k` + rank), rank from 1. Best
/// first; ties go to the id ranked best anywhere, then the smaller id.
pub fn reciprocal_rank_fusion(rankings: &[&[ImageId]], k: f32) -> Vec<(ImageId, f32)> {
    let mut fused: HashMap<ImageId, (f32, usize)> = HashMap::new();
    for ranking in rankings {
        for (i, id) in ranking.iter().enumerate() {
            let e = fused.entry(*id).or_insert((0.0, usize::MAX));
            e.0 += 1.0 / (k + (i + 1) as f32);
            e.1 = e.1.min(i);
        }
    }
    let mut out: Vec<(ImageId, f32, usize)> = fused.into_iter().map(|(id, (s, best))| (id, s, best)).collect();
    out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.2.cmp(&b.2)).then(a.0.cmp(&b.0)));
    out.into_iter().map(|(id, s, _)| (id, s)).collect()
}

/// One result: the file, its score (see [`SearchMode`]) and what we know of it.
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
    /// The image's caption, if it has one.
    pub caption: Option<String>,
    /// Label set → this image's label in it.
    pub labels: std::collections::BTreeMap<String, String>,
}

/// "Make Model" for display, without repeating a make the model name already starts with.
pub fn camera_name(exif: &magpie_store::Exif) -> Option<String> {
    match (&exif.camera_make, &exif.camera_model) {
        (Some(a), Some(b)) if b.starts_with(a.as_str()) => Some(b.clone()),
        (Some(a), Some(b)) => Some(format!("{a} {b}")),
        (a, b) => a.clone().or(b.clone()),
    }
}

impl SearchHit {
    pub(crate) fn from_record(f: FileRecord, score: f32, caption: Option<String>) -> Self {
        let meta = f.meta.as_ref();
        let camera = meta.and_then(|m| camera_name(&m.exif));
        Self {
            id: f.id,
            path: f.path.to_string_lossy().into_owned(),
            score,
            width: meta.map(|m| m.width),
            height: meta.map(|m| m.height),
            format: meta.map(|m| m.format.clone()),
            taken_at: meta.and_then(|m| m.exif.taken_at.clone()),
            camera,
            caption,
            labels: Default::default(),
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
            let ranked: Vec<(ImageId, f32)> = hits.iter().map(|h| (h.id, h.score)).collect();
            let out = self.hits(&ranked, k).await?;
            if out.len() == k || exhausted {
                return Ok(out);
            }
            want *= 2;
        }
    }

    /// The first `k` of `ranked` (id, score) that are indexed files, as hits with their
    /// metadata and caption, in the given order.
    async fn hits(&self, ranked: &[(ImageId, f32)], k: usize) -> Result<Vec<SearchHit>> {
        let ids: Vec<ImageId> = ranked.iter().map(|(id, _)| *id).collect();
        let files = self.store.get_files(&ids).await?;
        let mut by_id: HashMap<ImageId, FileRecord> =
            files.into_iter().filter(|f| f.status == FileStatus::Indexed).map(|f| (f.id, f)).collect();
        let keep: Vec<ImageId> = ids.iter().copied().filter(|id| by_id.contains_key(id)).take(k).collect();
        let mut captions = self.store.captions_for(&keep).await?;
        let mut out = Vec::with_capacity(keep.len());
        for (id, score) in ranked {
            if out.len() == k {
                break;
            }
            if let Some(f) = by_id.remove(id) {
                out.push(SearchHit::from_record(f, *score, captions.remove(id)));
            }
        }
        Ok(out)
    }

    /// The `k` indexed images whose caption or path words best match `text` (BM25).
    /// Any text is accepted; words the index does not hold match nothing.
    pub async fn search_captions(&self, text: &str, k: usize) -> Result<Vec<SearchHit>> {
        if k == 0 {
            return Ok(vec![]);
        }
        let text_index = self.text();
        let mut want = k + 1 + k / 4;
        loop {
            let hits = text_index.search(text, want)?;
            let exhausted = hits.len() < want;
            let ranked: Vec<(ImageId, f32)> = hits.iter().map(|h| (h.id, h.score)).collect();
            let out = self.hits(&ranked, k).await?;
            if out.len() == k || exhausted {
                return Ok(out);
            }
            want *= 2;
        }
    }

    /// Text → image search in `mode`; [`SearchMode::Hybrid`] fuses the CLIP ranking and
    /// the BM25 ranking by reciprocal rank (k = [`RRF_K`]). `embedder` is not called in
    /// `Text` mode.
    pub async fn search_text_hybrid(
        &self,
        embedder: &dyn TextEmbedder,
        text: &str,
        k: usize,
        mode: SearchMode,
    ) -> Result<Vec<SearchHit>> {
        match mode {
            SearchMode::Vector => self.search_text(embedder, text, k).await,
            SearchMode::Text => self.search_captions(text, k).await,
            SearchMode::Hybrid => {
                if k == 0 {
                    return Ok(vec![]);
                }
                let depth = FUSION_DEPTH.max(2 * k);
                let by_vector = self.search_text(embedder, text, depth).await?;
                let by_text = self.search_captions(text, depth).await?;
                let a: Vec<ImageId> = by_vector.iter().map(|h| h.id).collect();
                let b: Vec<ImageId> = by_text.iter().map(|h| h.id).collect();
                let mut pool: HashMap<ImageId, SearchHit> =
                    by_vector.into_iter().chain(by_text).map(|h| (h.id, h)).collect();
                Ok(reciprocal_rank_fusion(&[&a, &b], RRF_K)
                    .into_iter()
                    .take(k)
                    .filter_map(|(id, score)| pool.remove(&id).map(|h| SearchHit { score, ..h }))
                    .collect())
            }
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

    /// Refuses an embedder of another model than the library's.
    pub(crate) fn check_model(&self, m: &magpie_core::ModelInfo) -> Result<()> {
        if m != &self.model {
            return Err(Error::Model(magpie_core::Error::ModelMismatch { expected: self.model.id.clone(), got: m.id.clone() }));
        }
        Ok(())
    }

    /// Before writing embeddings: the model SQLite records is still the one this
    /// `Library` was opened with (another process may have switched it since, and this
    /// one's embeddings would then be of the old model).
    pub(crate) async fn check_recorded_model(&self) -> Result<()> {
        match self.store.model().await? {
            Some(now) if now != self.model => Err(Error::Switched { now: now.id, opened: self.model.id.clone() }),
            _ => Ok(()),
        }
    }
}

/// Decodes, preprocesses and embeds one image file.
pub fn embed_file(path: &Path, embedder: &dyn ImageEmbedder) -> Result<Vec<f32>> {
    let decoded = magpie_media::decode_file(path, &DecodeOptions::for_model(embedder.input_side()))?;
    let pixels = embedder.preprocess(&decoded.image)?;
    embedder.embed_pixels(&[pixels])?.pop().ok_or_else(|| Error::Task("no embedding returned".into()))
}

/// Decodes, preprocesses and embeds an image held in memory (an upload); `name` is
/// what errors call it.
pub fn embed_bytes(bytes: &[u8], name: &str, embedder: &dyn ImageEmbedder) -> Result<Vec<f32>> {
    let decoded = magpie_media::decode_bytes(bytes, &DecodeOptions::for_model(embedder.input_side()), name)?;
    let pixels = embedder.preprocess(&decoded.image)?;
    embedder.embed_pixels(&[pixels])?.pop().ok_or_else(|| Error::Task("no embedding returned".into()))
}
