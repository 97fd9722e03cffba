//! Embeddings under a model other than the library's: `magpie reindex --model` writes
//! them beside the current ones, then switches with [`Store::replace_model`].

use super::{now_sql, to_i64, Store};
use crate::{paths, Result};
use magpie_core::{ImageId, ModelInfo};
use std::path::PathBuf;

impl Store {
    /// Up to `limit` `indexed` files with id > `after` that have no embedding by
    /// `model`, by ascending id, with their paths.
    pub async fn files_without_embedding(&self, model: &ModelInfo, after: ImageId, limit: u32) -> Result<Vec<(ImageId, PathBuf)>> {
        let rows: Vec<(ImageId, Vec<u8>)> = sqlx::query_as(
            "SELECT f.id, f.path_bytes FROM files f WHERE f.status = 'indexed' AND f.id > ? \
             AND NOT EXISTS (SELECT 1 FROM embeddings e WHERE e.file_id = f.id AND e.model_id = ? AND e.dim = ?) \
             ORDER BY f.id LIMIT ?",
        )
        .bind(after)
        .bind(&model.id)
        .bind(to_i64(model.dim as u64))
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(self.err())?;
        Ok(rows.into_iter().map(|(id, p)| (id, paths::from_bytes(p))).collect())
    }

    /// How many `indexed` files have no embedding by `model`.
    pub async fn count_without_embedding(&self, model: &ModelInfo) -> Result<u64> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM files f WHERE f.status = 'indexed' \
             AND NOT EXISTS (SELECT 1 FROM embeddings e WHERE e.file_id = f.id AND e.model_id = ? AND e.dim = ?)",
        )
        .bind(&model.id)
        .bind(to_i64(model.dim as u64))
        .fetch_one(&self.pool)
        .await
        .map_err(self.err())?;
        Ok(n.max(0) as u64)
    }

    /// Writes embeddings by `model` (which need not be the library's), replacing any by
    /// the same model, in one transaction. The generation is not bumped: these vectors
    /// are in no index until the library switches to `model`.
    pub async fn put_embeddings(&self, model: &ModelInfo, rows: &[(ImageId, Vec<f32>)]) -> Result<()> {
        let mut tx = self.begin_write().await?;
        for (id, v) in rows {
            if v.len() != model.dim {
                return Err(crate::Error::Embedding {
                    path: self.path().to_path_buf(),
                    source: magpie_core::Error::Dimension { model: model.id.clone(), expected: model.dim, got: v.len() },
                });
            }
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            let sql = format!(
                "INSERT INTO embeddings (file_id, model_id, dim, vector, created_at) SELECT id, ?, ?, ?, {} \
                 FROM files WHERE id = ? ON CONFLICT (file_id, model_id) DO UPDATE SET \
                 dim = excluded.dim, vector = excluded.vector, created_at = excluded.created_at",
                now_sql()
            );
            sqlx::query(&sql)
                .bind(&model.id)
                .bind(to_i64(model.dim as u64))
                .bind(bytes)
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(self.err())?;
        }
        tx.commit().await.map_err(self.err())?;
        Ok(())
    }
}
