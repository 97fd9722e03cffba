//! What people added to an image (its caption, labels and conversations) follows the
//! image when the file moves: a new file whose content matches a retired one takes them
//! over.

use super::{bump_text, Store};
use crate::Result;
use magpie_core::ImageId;

/// What [`Store::adopt_annotations`] moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Adopted {
    pub captions: u64,
    pub labels: u64,
    pub conversations: u64,
}

impl Adopted {
    pub fn any(&self) -> bool {
        self.captions + self.labels + self.conversations > 0
    }
}

impl Store {
    /// Moves the caption, labels and conversations of the `deleted` file `from` with the
    /// same content hash as `to` onto `to`, in one transaction, unless `to` already has
    /// its own (a caption or a label in the same set is not overwritten). Does nothing
    /// when `from` is not a tombstone or the hashes differ. Bumps the text generation
    /// when a caption moves (the caption index must follow).
    pub async fn adopt_annotations(&self, from: ImageId, to: ImageId) -> Result<Adopted> {
        let mut tx = self.begin_write().await?;
        let ok: Option<i64> = sqlx::query_scalar(
            "SELECT 1 FROM files a JOIN files b ON a.content_hash = b.content_hash \
             WHERE a.id = ? AND b.id = ? AND a.status = 'deleted' AND a.content_hash IS NOT NULL",
        )
        .bind(from)
        .bind(to)
        .fetch_optional(&mut *tx)
        .await
        .map_err(self.err())?;
        if ok.is_none() {
            return Ok(Adopted::default());
        }
        let captions = sqlx::query(
            "UPDATE captions SET file_id = ? WHERE file_id = ? AND NOT EXISTS (SELECT 1 FROM captions WHERE file_id = ?)",
        )
        .bind(to)
        .bind(from)
        .bind(to)
        .execute(&mut *tx)
        .await
        .map_err(self.err())?
        .rows_affected();
        let labels = sqlx::query(
            "UPDATE labels SET file_id = ? WHERE file_id = ? \
             AND name NOT IN (SELECT name FROM labels WHERE file_id = ?)",
        )
        .bind(to)
        .bind(from)
        .bind(to)
        .execute(&mut *tx)
        .await
        .map_err(self.err())?
        .rows_affected();
        let conversations = sqlx::query("UPDATE conversations SET file_id = ? WHERE file_id = ?")
            .bind(to)
            .bind(from)
            .execute(&mut *tx)
            .await
            .map_err(self.err())?
            .rows_affected();
        if captions > 0 {
            bump_text(&mut tx).await.map_err(self.err())?;
        }
        tx.commit().await.map_err(self.err())?;
        Ok(Adopted { captions, labels, conversations })
    }

    /// The most recently retired file with this content, if any.
    pub async fn tombstone_by_hash(&self, content_hash: &str) -> Result<Option<ImageId>> {
        let id: Option<ImageId> = sqlx::query_scalar(
            "SELECT id FROM files WHERE content_hash = ? AND status = 'deleted' ORDER BY updated_at DESC, id DESC LIMIT 1",
        )
        .bind(content_hash)
        .fetch_optional(&self.pool)
        .await
        .map_err(self.err())?;
        Ok(id)
    }
}
