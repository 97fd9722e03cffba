//! Zero-shot labels: per label set (a name such as "category"), one label per image.

use super::{now_sql, placeholders, Store, IDS_PER_STATEMENT};
use crate::Result;
use magpie_core::ImageId;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};

/// One image's label in a set.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LabelRecord {
    pub id: ImageId,
    pub path: String,
    pub label: String,
    pub prob: f32,
}

/// A label set: how many images carry each label.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LabelSet {
    pub name: String,
    pub labels: BTreeMap<String, u64>,
    pub images: u64,
}

impl Store {
    /// Stores `(id, label, prob)` under set `name` by `model`, replacing those images'
    /// earlier labels in the set, in one transaction. Ids with no file row are skipped;
    /// returns how many were written.
    pub async fn set_labels(&self, name: &str, model: &str, labels: &[(ImageId, String, f32)]) -> Result<u64> {
        let mut tx = self.begin_write().await?;
        let mut n = 0;
        for (id, label, prob) in labels {
            let sql = format!(
                "INSERT INTO labels (name, file_id, label, prob, model_id, created_at) \
                 SELECT ?, id, ?, ?, ?, {} FROM files WHERE id = ? \
                 ON CONFLICT (name, file_id) DO UPDATE SET label = excluded.label, prob = excluded.prob, \
                     model_id = excluded.model_id, created_at = excluded.created_at",
                now_sql()
            );
            n += sqlx::query(&sql)
                .bind(name)
                .bind(label)
                .bind(prob.clamp(0.0, 1.0))
                .bind(model)
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(self.err())?
                .rows_affected();
        }
        tx.commit().await.map_err(self.err())?;
        Ok(n)
    }

    /// The labels of those of `ids` that have any: id → (set → label).
    pub async fn labels_for(&self, ids: &[ImageId]) -> Result<HashMap<ImageId, BTreeMap<String, String>>> {
        let mut out: HashMap<ImageId, BTreeMap<String, String>> = HashMap::new();
        for chunk in ids.chunks(IDS_PER_STATEMENT) {
            let sql = format!("SELECT file_id, name, label FROM labels WHERE file_id IN ({})", placeholders(chunk.len()));
            let mut query = sqlx::query_as::<_, (ImageId, String, String)>(&sql);
            for id in chunk {
                query = query.bind(id);
            }
            for (id, name, label) in query.fetch_all(&self.pool).await.map_err(self.err())? {
                out.entry(id).or_default().insert(name, label);
            }
        }
        Ok(out)
    }

    /// Every label set, with per-label counts over `indexed` images, by name.
    pub async fn label_sets(&self) -> Result<Vec<LabelSet>> {
        let rows: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT l.name, l.label, COUNT(*) FROM labels l JOIN files f ON f.id = l.file_id \
             WHERE f.status = 'indexed' GROUP BY l.name, l.label ORDER BY l.name, l.label",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(self.err())?;
        let mut sets: BTreeMap<String, LabelSet> = BTreeMap::new();
        for (name, label, count) in rows {
            let set = sets.entry(name.clone()).or_insert_with(|| LabelSet { name, labels: BTreeMap::new(), images: 0 });
            set.labels.insert(label, count.max(0) as u64);
            set.images += count.max(0) as u64;
        }
        Ok(sets.into_values().collect())
    }

    /// Every `indexed` image labelled in set `name`, by id (`None`: no such set).
    pub async fn labels_in_set(&self, name: &str) -> Result<Option<Vec<LabelRecord>>> {
        let rows: Vec<(ImageId, String, String, f64)> = sqlx::query_as(
            "SELECT l.file_id, f.path, l.label, l.prob FROM labels l JOIN files f ON f.id = l.file_id \
             WHERE l.name = ? AND f.status = 'indexed' ORDER BY l.file_id",
        )
        .bind(name)
        .fetch_all(&self.pool)
        .await
        .map_err(self.err())?;
        if rows.is_empty() {
            let any: Option<i64> = sqlx::query_scalar("SELECT 1 FROM labels WHERE name = ? LIMIT 1")
                .bind(name)
                .fetch_optional(&self.pool)
                .await
                .map_err(self.err())?;
            if any.is_none() {
                return Ok(None);
            }
        }
        Ok(Some(
            rows.into_iter().map(|(id, path, label, prob)| LabelRecord { id, path, label, prob: prob as f32 }).collect(),
        ))
    }

    /// The ids labelled `label` in set `name`.
    pub async fn ids_with_label(&self, name: &str, label: &str) -> Result<HashSet<ImageId>> {
        let ids: Vec<ImageId> = sqlx::query_scalar("SELECT file_id FROM labels WHERE name = ? AND label = ?")
            .bind(name)
            .bind(label)
            .fetch_all(&self.pool)
            .await
            .map_err(self.err())?;
        Ok(ids.into_iter().collect())
    }

    /// Deletes a label set; returns how many labels it held.
    pub async fn delete_label_set(&self, name: &str) -> Result<u64> {
        let mut tx = self.begin_write().await?;
        let n = sqlx::query("DELETE FROM labels WHERE name = ?")
            .bind(name)
            .execute(&mut *tx)
            .await
            .map_err(self.err())?
            .rows_affected();
        tx.commit().await.map_err(self.err())?;
        Ok(n)
    }
}
