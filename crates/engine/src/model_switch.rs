//! `magpie reindex --model`: switching a library to another CLIP model. Every indexed
//! image is re-embedded with the new model into SQLite beside the current embeddings —
//! the current index and model keep answering meanwhile, and a stopped run resumes where
//! it ended — then one transaction makes the new model the library's and the vector
//! index is rebuilt from the new embeddings.

use crate::library::build_index;
use crate::{Error, Library, Result, VECTOR_INDEX};
use magpie_core::{ImageEmbedder, ModelInfo};
use magpie_index::IndexSpec;
use magpie_media::DecodeOptions;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Images embedded per batch.
const BATCH: u32 = 32;

#[derive(Debug, Clone, Default, Serialize)]
pub struct SwitchReport {
    /// Images embedded with the new model in this run.
    pub embedded: u64,
    /// Images the new model could not embed (they become `pending`: the next
    /// `magpie index` tries them again), with the reason.
    pub failed: Vec<(PathBuf, String)>,
    /// Whether the library now uses the new model (false when cancelled).
    pub switched: bool,
    pub model: String,
    pub vectors: usize,
    pub elapsed: Duration,
}

impl Library {
    /// Re-embeds every indexed image with `embedder`'s model and switches the library to
    /// it. `progress(done, total)` after each batch. When `cancel` is set, stops after the
    /// current batch without switching (what was embedded is kept for the next run). After
    /// a switch this `Library` still describes the old model: open the library again.
    pub async fn switch_model(
        &self,
        embedder: Arc<dyn ImageEmbedder>,
        opts: &crate::IndexOptions,
        progress: &(dyn Fn(u64, u64) + Sync),
        cancel: &AtomicBool,
    ) -> Result<SwitchReport> {
        let start = Instant::now();
        let new: ModelInfo = embedder.model().clone();
        if new == self.model {
            return Err(Error::Task(format!(
                "the library already uses {}: `magpie reindex` without --model rebuilds its index",
                new.id
            )));
        }
        let mut report = SwitchReport { model: new.id.clone(), ..Default::default() };
        let total = self.store.count_without_embedding(&new).await?;
        let mut after = magpie_core::ImageId::MIN;
        let mut done = 0;
        progress(0, total);
        loop {
            if cancel.load(Ordering::SeqCst) {
                report.elapsed = start.elapsed();
                return Ok(report);
            }
            let batch = self.store.files_without_embedding(&new, after, BATCH).await?;
            let Some(last) = batch.last() else { break };
            after = last.0;
            let emb = embedder.clone();
            let max_pixels = opts.max_pixels;
            let (rows, failed) = tokio::task::spawn_blocking(move || {
                let decode = DecodeOptions { min_side: Some(emb.input_side()), max_pixels, ..DecodeOptions::default() };
                let mut pixels = Vec::new();
                let mut ids = Vec::new();
                let mut failed = Vec::new();
                for (id, path) in batch {
                    match magpie_media::decode_file(&path, &decode).map_err(Error::from).and_then(|d| Ok(emb.preprocess(&d.image)?)) {
                        Ok(p) => {
                            pixels.push(p);
                            ids.push(id);
                        }
                        Err(e) => failed.push((path, e.to_string())),
                    }
                }
                let vectors = if pixels.is_empty() { vec![] } else { emb.embed_pixels(&pixels)? };
                Ok::<_, Error>((ids.into_iter().zip(vectors).collect::<Vec<_>>(), failed))
            })
            .await
            .map_err(|e| Error::Task(e.to_string()))??;
            self.store.put_embeddings(&new, &rows).await?;
            done += (rows.len() + failed.len()) as u64;
            report.embedded += rows.len() as u64;
            report.failed.extend(failed);
            progress(done.min(total), total);
        }
        // The switch: the new model becomes the library's, the old embeddings go, files
        // the new model could not embed become pending; then the index follows. A crash
        // between the two leaves a stale index, which the next open rebuilds.
        let generation = self.store.replace_model(&new).await?;
        let spec = IndexSpec::for_model(&new, self.config.index);
        let ix = build_index(&self.store, &spec, generation).await?;
        report.vectors = ix.len();
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || ix.save(&dir, VECTOR_INDEX))
            .await
            .map_err(|e| Error::Task(e.to_string()))??;
        report.switched = true;
        report.elapsed = start.elapsed();
        Ok(report)
    }
}
