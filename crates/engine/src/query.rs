//! Filtered, sorted, paginated search: what the HTTP API and the web page ask for.
//!
//! A query is ranked (CLIP vector, caption BM25, or both fused), the ranking is read
//! deep enough that the filters still leave a full page, and the page is cut at an
//! offset. Filters apply to what SQLite knows of each file (folder, date taken, camera,
//! format, labels) and to the score.

use crate::search::{reciprocal_rank_fusion, SearchHit, RRF_K};
use crate::{Library, Result, SearchMode};
use magpie_core::{ImageId, TextEmbedder};
use magpie_store::{FileRecord, FileStatus};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};

/// How deep a ranking is read at first, and at most. Sorting by date reorders the
/// `MAX_DEPTH` most relevant matches.
const FIRST_DEPTH: usize = 100;
pub const MAX_DEPTH: usize = 5_000;
/// Weight of a negative text: the query vector is normalize(q − w·n).
pub const NEGATIVE_WEIGHT: f32 = 0.5;

/// Restrictions on what a search may return. Empty fields restrict nothing.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct SearchFilter {
    /// Path prefix (a folder); matched on whole path components.
    pub folder: Option<String>,
    /// Date taken, inclusive bounds, compared as ISO-8601 text (`2019-06-01` or
    /// `2019-06-01T12:00:00`); an image without a date fails a date filter.
    pub from: Option<String>,
    pub to: Option<String>,
    /// Case-insensitive substring of "make model".
    pub camera: Option<String>,
    /// Image format (`jpeg`, `png`, …), case-insensitive; `jpg` means `jpeg`.
    #[serde(rename = "type")]
    pub format: Option<String>,
    /// `(set, label)`: only images carrying that label in that set.
    pub label: Option<(String, String)>,
    pub min_score: Option<f32>,
}

impl SearchFilter {
    pub fn is_empty(&self) -> bool {
        self.folder.is_none()
            && self.from.is_none()
            && self.to.is_none()
            && self.camera.is_none()
            && self.format.is_none()
            && self.label.is_none()
            && self.min_score.is_none()
    }

    fn matches_file(&self, f: &FileRecord, labelled: Option<&HashSet<ImageId>>) -> bool {
        if let Some(folder) = &self.folder {
            let prefix = std::path::Path::new(folder.trim_end_matches('/'));
            if !prefix.as_os_str().is_empty() && !f.path.starts_with(prefix) {
                return false;
            }
        }
        let meta = f.meta.as_ref();
        let taken = meta.and_then(|m| m.exif.taken_at.as_deref());
        if let Some(from) = &self.from {
            match taken {
                Some(t) if t >= from.as_str() => {}
                _ => return false,
            }
        }
        if let Some(to) = &self.to {
            // A bare date includes that whole day.
            let to = if to.len() == 10 { format!("{to}T99") } else { to.clone() };
            match taken {
                Some(t) if t <= to.as_str() => {}
                _ => return false,
            }
        }
        if let Some(camera) = &self.camera {
            let want = camera.to_lowercase();
            let have = meta
                .map(|m| {
                    format!(
                        "{} {}",
                        m.exif.camera_make.as_deref().unwrap_or(""),
                        m.exif.camera_model.as_deref().unwrap_or("")
                    )
                    .to_lowercase()
                })
                .unwrap_or_default();
            if !have.contains(&want) {
                return false;
            }
        }
        if let Some(format) = &self.format {
            let want = match format.to_lowercase().as_str() {
                "jpg" => "jpeg".to_string(),
                "tif" => "tiff".to_string(),
                other => other.to_string(),
            };
            if meta.map(|m| m.format.to_lowercase()) != Some(want) {
                return false;
            }
        }
        if let Some(ids) = labelled {
            if !ids.contains(&f.id) {
                return false;
            }
        }
        true
    }
}

/// Order of results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SortOrder {
    #[default]
    Relevance,
    /// Newest first by date taken; images without a date last, by relevance.
    Date,
}

impl std::str::FromStr for SortOrder {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "relevance" | "score" => Ok(SortOrder::Relevance),
            "date" | "taken" => Ok(SortOrder::Date),
            other => Err(format!("unknown sort `{other}` (relevance or date)")),
        }
    }
}

/// What to rank by.
pub enum Query<'a> {
    /// A text, matched in `mode`; `negative` pushes the CLIP ranking away from a text.
    Text { text: &'a str, negative: Option<&'a str>, mode: SearchMode, embedder: &'a dyn TextEmbedder },
    /// A vector of the library's model (an image's), excluding one id (the image itself).
    Vector { vector: Vec<f32>, exclude: Option<ImageId> },
}

/// One page of results: `hits`, and whether more follow.
#[derive(Debug, Clone, Serialize)]
pub struct Page {
    pub hits: Vec<SearchHit>,
    pub more: bool,
}

impl Library {
    /// Ranks `query`, keeps what passes `filter`, orders by `sort`, and returns
    /// `limit` hits from `offset`.
    pub async fn search_page(
        &self,
        query: Query<'_>,
        filter: &SearchFilter,
        sort: SortOrder,
        offset: usize,
        limit: usize,
    ) -> Result<Page> {
        // The query's vector, once.
        let (vector, exclude, text, mode) = match query {
            Query::Text { text, negative, mode, embedder } => {
                let v = if mode == SearchMode::Text {
                    None
                } else {
                    self.check_model(embedder.model())?;
                    let mut texts = vec![text];
                    if let Some(n) = negative.filter(|n| !n.trim().is_empty()) {
                        texts.push(n);
                    }
                    let vs = embedder.embed_texts(&texts)?;
                    let mut v = vs[0].clone();
                    if let Some(n) = vs.get(1) {
                        for (a, b) in v.iter_mut().zip(n) {
                            *a -= NEGATIVE_WEIGHT * b;
                        }
                        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
                        v.iter_mut().for_each(|x| *x /= norm);
                    }
                    Some(v)
                };
                (v, None, Some(text), mode)
            }
            Query::Vector { vector, exclude } => (Some(vector), exclude, None, SearchMode::Vector),
        };
        let labelled = match &filter.label {
            Some((set, label)) => Some(self.store.ids_with_label(set, label).await?),
            None => None,
        };
        let need = offset.saturating_add(limit).saturating_add(1);
        let mut depth = FIRST_DEPTH.max(2 * need).min(MAX_DEPTH);
        let matches = loop {
            let (ranked, exhausted) = self.rank(vector.as_deref(), exclude, text, mode, depth)?;
            let matches = self.filter_ranked(&ranked, filter, labelled.as_ref()).await?;
            let enough = sort == SortOrder::Relevance && matches.len() >= need;
            if enough || exhausted || depth >= MAX_DEPTH {
                break matches;
            }
            depth = (depth * 4).min(MAX_DEPTH);
        };
        let mut matches = matches;
        if sort == SortOrder::Date {
            // Stable: equal dates (and undated images) keep their relevance order.
            matches.sort_by(|a, b| {
                let ta = a.0.meta.as_ref().and_then(|m| m.exif.taken_at.clone());
                let tb = b.0.meta.as_ref().and_then(|m| m.exif.taken_at.clone());
                match (ta, tb) {
                    (Some(x), Some(y)) => y.cmp(&x),
                    (Some(_), None) => std::cmp::Ordering::Less,
                    (None, Some(_)) => std::cmp::Ordering::Greater,
                    (None, None) => std::cmp::Ordering::Equal,
                }
            });
        }
        // `need` asked for one more than the page: a next page exists if it was found.
        let more = matches.len() > offset + limit;
        let page: Vec<(FileRecord, f32)> = matches.into_iter().skip(offset).take(limit).collect();
        let ids: Vec<ImageId> = page.iter().map(|(f, _)| f.id).collect();
        let mut captions = self.store.captions_for(&ids).await?;
        let mut labels = self.store.labels_for(&ids).await?;
        let hits = page
            .into_iter()
            .map(|(f, score)| {
                let id = f.id;
                let mut h = SearchHit::from_record(f, score, captions.remove(&id));
                h.labels = labels.remove(&id).unwrap_or_default();
                h
            })
            .collect();
        Ok(Page { hits, more })
    }

    /// The first `depth` of the raw ranking (tombstones included), and whether it holds
    /// everything the index could return.
    fn rank(
        &self,
        vector: Option<&[f32]>,
        exclude: Option<ImageId>,
        text: Option<&str>,
        mode: SearchMode,
        depth: usize,
    ) -> Result<(Vec<(ImageId, f32)>, bool)> {
        let by_vector = |depth: usize| -> Result<Vec<(ImageId, f32)>> {
            let Some(v) = vector else { return Ok(vec![]) };
            let ix = self.index.read().expect("index lock");
            let filter = |id: ImageId| Some(id) != exclude;
            Ok(ix.search(v, depth, None, Some(&filter))?.into_iter().map(|h| (h.id, h.score)).collect())
        };
        let by_text = |depth: usize| -> Result<Vec<(ImageId, f32)>> {
            let Some(t) = text else { return Ok(vec![]) };
            Ok(self.text().search(t, depth)?.into_iter().map(|h| (h.id, h.score)).collect())
        };
        Ok(match mode {
            SearchMode::Vector => {
                let r = by_vector(depth)?;
                let done = r.len() < depth;
                (r, done)
            }
            SearchMode::Text => {
                let r = by_text(depth)?;
                let done = r.len() < depth;
                (r, done)
            }
            SearchMode::Hybrid => {
                let (a, b) = (by_vector(depth)?, by_text(depth)?);
                let done = a.len() < depth && b.len() < depth;
                let ia: Vec<ImageId> = a.iter().map(|x| x.0).collect();
                let ib: Vec<ImageId> = b.iter().map(|x| x.0).collect();
                (reciprocal_rank_fusion(&[&ia, &ib], RRF_K), done)
            }
        })
    }

    /// The indexed files of `ranked` that pass `filter`, in order, with their scores.
    async fn filter_ranked(
        &self,
        ranked: &[(ImageId, f32)],
        filter: &SearchFilter,
        labelled: Option<&HashSet<ImageId>>,
    ) -> Result<Vec<(FileRecord, f32)>> {
        let ranked: Vec<(ImageId, f32)> = match filter.min_score {
            Some(min) => ranked.iter().copied().filter(|(_, s)| *s >= min).collect(),
            None => ranked.to_vec(),
        };
        let ids: Vec<ImageId> = ranked.iter().map(|(id, _)| *id).collect();
        let mut by_id: HashMap<ImageId, FileRecord> = self
            .store
            .get_files(&ids)
            .await?
            .into_iter()
            .filter(|f| f.status == FileStatus::Indexed && filter.matches_file(f, labelled))
            .map(|f| (f.id, f))
            .collect();
        Ok(ranked.into_iter().filter_map(|(id, s)| by_id.remove(&id).map(|f| (f, s))).collect())
    }
}
