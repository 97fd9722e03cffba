//! Serving indexed images: metadata, originals and cached thumbnails.

use crate::{Error, Library, Result};
use magpie_core::ImageId;
use magpie_media::DecodeOptions;
use magpie_store::FileRecord;
use std::path::PathBuf;

/// Thumbnail sides allowed (the longer side, in pixels).
pub const THUMBNAIL_SIDES: std::ops::RangeInclusive<u32> = 64..=1024;

impl Library {
    /// The record of an indexed image (an [`Error::UnknownId`] for any other id).
    pub async fn image(&self, id: ImageId) -> Result<FileRecord> {
        self.indexed_file(id).await
    }

    /// A JPEG thumbnail of indexed image `id`, longer side `side` (clamped to
    /// [`THUMBNAIL_SIDES`]), EXIF orientation applied. Made once and kept under
    /// `thumbs/` in the library, keyed by the file's content hash, so a changed file
    /// gets a new one.
    pub async fn thumbnail(&self, id: ImageId, side: u32) -> Result<Vec<u8>> {
        let side = side.clamp(*THUMBNAIL_SIDES.start(), *THUMBNAIL_SIDES.end());
        let f = self.indexed_file(id).await?;
        let hash = f.content_hash.clone().unwrap_or_else(|| format!("m{}-{}", f.mtime_ns, f.size));
        let dir = self.dir.join("thumbs").join(&hash[..2.min(hash.len())]);
        let cached: PathBuf = dir.join(format!("{}-{side}.jpg", &hash));
        if let Ok(bytes) = tokio::fs::read(&cached).await {
            return Ok(bytes);
        }
        let path = f.path.clone();
        let bytes = tokio::task::spawn_blocking(move || -> Result<Vec<u8>> {
            let opts = DecodeOptions { min_side: Some(side), ..DecodeOptions::default() };
            let decoded = magpie_media::decode_file(&path, &opts)?;
            Ok(magpie_media::thumbnail(&decoded.image, side).map_err(|e| Error::path(&path, e))?)
        })
        .await
        .map_err(|e| Error::Task(e.to_string()))??;
        // Written to a temporary name and renamed, so that a reader never sees half a file.
        if tokio::fs::create_dir_all(&dir).await.is_ok() {
            let tmp = dir.join(format!(".{}-{side}.{}.tmp", &hash, std::process::id()));
            if tokio::fs::write(&tmp, &bytes).await.is_ok() && tokio::fs::rename(&tmp, &cached).await.is_err() {
                let _ = tokio::fs::remove_file(&tmp).await;
            }
        }
        Ok(bytes)
    }

    /// The bytes and path of indexed image `id`'s file.
    pub async fn original(&self, id: ImageId) -> Result<(PathBuf, Vec<u8>)> {
        let f = self.indexed_file(id).await?;
        let bytes = tokio::fs::read(&f.path).await.map_err(|e| Error::path(&f.path, e))?;
        Ok((f.path, bytes))
    }
}
