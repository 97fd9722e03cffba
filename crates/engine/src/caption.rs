//! Captioning: one sentence per indexed image from a [`Captioner`] (BLIP-2), committed to
//! SQLite, then put into the caption index. Resumable: a run captions only the indexed
//! files that have no caption by this captioner, so a stopped run picks up where it
//! ended and a finished one has nothing left to do.

use crate::{Error, Library, Result};
use magpie_core::{Captioner, GenerationOptions, ImageId};
use magpie_media::DecodeOptions;
use magpie_store::Caption;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Files fetched from SQLite at a time.
const PAGE: u32 = 64;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct CaptionOptions {
    pub generation: GenerationOptions,
    /// Images declaring more pixels than this are refused (decompression bombs).
    pub max_pixels: u64,
    /// How often the captions written so far are committed to the caption index (they
    /// are in SQLite at once; a crash before a commit only makes the index rebuild).
    pub commit_every: Duration,
}

impl Default for CaptionOptions {
    fn default() -> Self {
        Self {
            generation: GenerationOptions::default(),
            max_pixels: DecodeOptions::default().max_pixels,
            commit_every: Duration::from_secs(10),
        }
    }
}

/// A snapshot of a running caption job.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CaptionProgress {
    /// Files without a caption by this model when the job started.
    pub total: u64,
    /// Of those, finished (captioned or failed).
    pub done: u64,
    pub failed: u64,
    pub elapsed: Duration,
}

/// What a caption run did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CaptionReport {
    pub captioned: u64,
    /// Files that could not be captioned, with the reason (they are offered again on
    /// the next run).
    pub failed: Vec<(PathBuf, String)>,
    /// Indexed files still without a caption by this model (failed, or not reached
    /// because the run was cancelled).
    pub remaining: u64,
    pub cancelled: bool,
    pub elapsed: Duration,
}

/// Decodes an image file and captions it; nothing is stored.
pub fn caption_file(path: &Path, captioner: &dyn Captioner, opts: &CaptionOptions) -> Result<String> {
    caption_files(&[path.to_path_buf()], captioner, opts).pop().expect("one result per file")
}

/// [`caption_file`] on the blocking pool.
async fn caption_blocking(path: PathBuf, captioner: Arc<dyn Captioner>, opts: CaptionOptions) -> Result<String> {
    tokio::task::spawn_blocking(move || caption_file(&path, captioner.as_ref(), &opts))
        .await
        .map_err(|e| Error::Task(e.to_string()))?
}

/// Captions of several files, one result each: the files are decoded (one that cannot be
/// is its own error), then the decoded ones captioned as one batch. Should the batch fail,
/// its images are captioned one at a time, so that one bad image costs only its own
/// caption.
fn caption_files(paths: &[PathBuf], captioner: &dyn Captioner, opts: &CaptionOptions) -> Vec<Result<String>> {
    let decode = DecodeOptions { max_pixels: opts.max_pixels, min_side: Some(captioner.input_side()) };
    let decoded: Vec<Result<magpie_media::image::DynamicImage>> =
        paths.iter().map(|p| Ok(magpie_media::decode_file(p, &decode)?.image)).collect();
    let images: Vec<&magpie_media::image::DynamicImage> = decoded.iter().filter_map(|d| d.as_ref().ok()).collect();
    let mut captions = match captioner.caption_batch(&images, &opts.generation) {
        Ok(c) if c.len() == images.len() => c.into_iter().map(Ok).collect::<Vec<Result<String>>>(),
        _ => images.iter().map(|im| Ok(captioner.caption(im, &opts.generation)?)).collect(),
    }
    .into_iter();
    decoded
        .into_iter()
        .map(|d| match d {
            Ok(_) => captions.next().expect("one caption per decoded image").map(|t| t.trim().to_string()),
            Err(e) => Err(e),
        })
        .collect()
}

/// [`caption_files`] on the blocking pool.
async fn caption_batch_blocking(paths: Vec<PathBuf>, captioner: Arc<dyn Captioner>, opts: CaptionOptions) -> Result<Vec<Result<String>>> {
    tokio::task::spawn_blocking(move || caption_files(&paths, captioner.as_ref(), &opts))
        .await
        .map_err(|e| Error::Task(e.to_string()))
}

impl Library {
    /// Captions every indexed file that has no caption by `captioner`'s model, in id
    /// order, [`Captioner::batch_size`] at a time: each caption is committed to SQLite, then put into the
    /// caption index (committed every [`CaptionOptions::commit_every`] and at the end).
    /// A file that fails is reported and skipped. Stops early, keeping what is done,
    /// when `cancel` becomes true.
    pub async fn caption_all(
        &self,
        captioner: Arc<dyn Captioner>,
        opts: &CaptionOptions,
        progress: &(dyn Fn(&CaptionProgress) + Sync),
        cancel: Arc<AtomicBool>,
    ) -> Result<CaptionReport> {
        let start = Instant::now();
        let model = captioner.model().id.clone();
        let mut report = CaptionReport::default();
        let mut prog = CaptionProgress { total: self.store.count_needing_caption(&model).await?, ..Default::default() };
        progress(&prog);
        let mut after = ImageId::MIN;
        let mut last_commit = Instant::now();
        let mut touched = false;
        let result: Result<()> = async {
            'pages: loop {
                let page = self.store.files_needing_caption(&model, after, PAGE).await?;
                if page.is_empty() {
                    break;
                }
                for chunk in page.chunks(captioner.batch_size().max(1)) {
                    if cancel.load(Ordering::SeqCst) {
                        report.cancelled = true;
                        break 'pages;
                    }
                    after = chunk.last().map_or(after, |(id, _)| *id);
                    let paths: Vec<PathBuf> = chunk.iter().map(|(_, p)| p.clone()).collect();
                    let results = caption_batch_blocking(paths, captioner.clone(), opts.clone()).await?;
                    for ((id, path), result) in chunk.iter().zip(results) {
                        match result {
                            Ok(text) => {
                                self.store_caption(*id, &model, &text).await?;
                                touched = true;
                                report.captioned += 1;
                            }
                            Err(e) => {
                                let why = e.to_string();
                                let prefix = format!("{}: ", path.display());
                                let why = why.strip_prefix(&prefix).map(str::to_string).unwrap_or(why);
                                tracing::warn!("{}: cannot caption: {why}", path.display());
                                report.failed.push((path.clone(), why));
                                prog.failed += 1;
                            }
                        }
                        prog.done += 1;
                        prog.elapsed = start.elapsed();
                        progress(&prog);
                    }
                    if touched && last_commit.elapsed() >= opts.commit_every {
                        let _guard = self.text_write.lock().await;
                        self.commit_text().await?;
                        last_commit = Instant::now();
                    }
                }
            }
            Ok(())
        }
        .await;
        // Commit what was written even when the run failed part-way.
        if touched {
            self.finish_text().await?;
        }
        result?;
        report.remaining = self.store.count_needing_caption(&model).await?;
        report.elapsed = start.elapsed();
        Ok(report)
    }

    /// Captions the indexed file `id` now (replacing any caption it has), stores it and
    /// updates the caption index. Returns the caption.
    pub async fn caption_one(&self, id: ImageId, captioner: Arc<dyn Captioner>, opts: &CaptionOptions) -> Result<String> {
        let file = self.indexed_file(id).await?;
        let model = captioner.model().id.clone();
        let text = caption_blocking(file.path, captioner, opts.clone()).await?;
        self.store_caption(id, &model, &text).await?;
        self.finish_text().await?;
        Ok(text)
    }

    /// The stored caption of a file, if it has one.
    pub async fn caption(&self, id: ImageId) -> Result<Option<Caption>> {
        Ok(self.store.caption(id).await?)
    }

    /// Writes a caption to SQLite, then (not yet committed) to the caption index.
    async fn store_caption(&self, id: ImageId, model: &str, text: &str) -> Result<()> {
        let _guard = self.text_write.lock().await;
        self.store.set_caption(id, model, text).await?;
        self.refresh_text(&[id]).await
    }
}
