//! Zero-shot classification: each image's CLIP embedding against the embeddings of
//! "a photo of a {label}" for each label, softmax over `logit_scale · cosine` (as
//! `CLIPModel`'s `logits_per_image`), and optionally the top label stored as a label set.

use crate::{Error, Library, Result};
use magpie_core::{ImageId, TextEmbedder};
use magpie_store::LabelSet;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

/// The default prompt template (CLIP's paper uses it for ImageNet).
pub const DEFAULT_TEMPLATE: &str = "a photo of a {}";
pub const MAX_LABELS: usize = 100;

/// Labels and the template that turns each into a text.
#[derive(Debug, Clone)]
pub struct Classes {
    pub labels: Vec<String>,
    pub template: String,
}

impl Classes {
    /// Checks the labels (2..=100, non-empty, distinct) and the template (holds `{}`).
    pub fn new(labels: Vec<String>, template: Option<String>) -> Result<Self, String> {
        let labels: Vec<String> = labels.into_iter().map(|l| l.trim().to_string()).collect();
        if labels.len() < 2 || labels.len() > MAX_LABELS {
            return Err(format!("labels: give between 2 and {MAX_LABELS} labels, not {}", labels.len()));
        }
        if labels.iter().any(|l| l.is_empty()) {
            return Err("labels: a label is empty".into());
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(d) = labels.iter().find(|l| !seen.insert(l.to_lowercase())) {
            return Err(format!("labels: `{d}` is given twice"));
        }
        let template = template.unwrap_or_else(|| DEFAULT_TEMPLATE.to_string());
        if !template.contains("{}") {
            return Err(format!("template: `{template}` has no `{{}}` where the label goes"));
        }
        Ok(Self { labels, template })
    }

    pub fn texts(&self) -> Vec<String> {
        self.labels.iter().map(|l| self.template.replacen("{}", l, 1)).collect()
    }
}

/// One image's classification: the top label and every label's probability.
#[derive(Debug, Clone, Serialize)]
pub struct Classification {
    pub id: ImageId,
    pub label: String,
    pub probs: BTreeMap<String, f32>,
}

/// What classifying the whole library did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClassifyReport {
    pub images: u64,
    pub counts: BTreeMap<String, u64>,
    pub stored_as: Option<String>,
    pub cancelled: bool,
}

/// Probabilities of each class for one image: softmax(scale · (image · text_j)).
fn probabilities(image: &[f32], texts: &[Vec<f32>], scale: f32) -> Vec<f32> {
    let logits: Vec<f32> = texts.iter().map(|t| scale * image.iter().zip(t).map(|(a, b)| a * b).sum::<f32>()).collect();
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

fn classification(id: ImageId, classes: &Classes, probs: Vec<f32>) -> Classification {
    let best = probs.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i);
    Classification {
        id,
        label: classes.labels[best].clone(),
        probs: classes.labels.iter().cloned().zip(probs).collect(),
    }
}

impl Library {
    fn class_vectors(&self, embedder: &dyn TextEmbedder, classes: &Classes) -> Result<Vec<Vec<f32>>> {
        self.check_model(embedder.model())?;
        let texts = classes.texts();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        Ok(embedder.embed_texts(&refs)?)
    }

    /// Classifies the indexed images `ids` (in that order; an id that is not an indexed
    /// image is an [`Error::UnknownId`]); with `store_as`, stores each top label in that
    /// label set.
    pub async fn classify(
        &self,
        embedder: &dyn TextEmbedder,
        classes: &Classes,
        ids: &[ImageId],
        store_as: Option<&str>,
    ) -> Result<Vec<Classification>> {
        let texts = self.class_vectors(embedder, classes)?;
        let scale = embedder.logit_scale();
        let mut out = Vec::with_capacity(ids.len());
        let indexed: std::collections::HashSet<ImageId> = self
            .store
            .get_files(ids)
            .await?
            .into_iter()
            .filter(|f| f.status == magpie_store::FileStatus::Indexed)
            .map(|f| f.id)
            .collect();
        for &id in ids {
            if !indexed.contains(&id) {
                return Err(Error::UnknownId(id));
            }
            let e = self.store.embedding(id, &self.model.id).await?.ok_or(Error::UnknownId(id))?;
            out.push(classification(id, classes, probabilities(e.vector(), &texts, scale)));
        }
        if let Some(name) = store_as {
            let rows: Vec<(ImageId, String, f32)> =
                out.iter().map(|c| (c.id, c.label.clone(), c.probs[&c.label])).collect();
            self.store.set_labels(name, &self.model.id, &rows).await?;
        }
        Ok(out)
    }

    /// Classifies every indexed image and stores the top labels as set `store_as`,
    /// a page of embeddings at a time; `progress(done, total)` after each page. Stops
    /// between pages when `cancel` is set (what was stored stays).
    pub async fn classify_all(
        &self,
        embedder: &dyn TextEmbedder,
        classes: &Classes,
        store_as: &str,
        cancel: &AtomicBool,
        progress: &(dyn Fn(u64, u64) + Send + Sync),
    ) -> Result<ClassifyReport> {
        let texts = self.class_vectors(embedder, classes)?;
        let scale = embedder.logit_scale();
        let total = self.store.counts().await?.indexed;
        let mut report = ClassifyReport { stored_as: Some(store_as.to_string()), ..Default::default() };
        let mut after = 0;
        loop {
            if cancel.load(Ordering::Relaxed) {
                report.cancelled = true;
                break;
            }
            let page = self.store.embeddings_page(&self.model.id, after, 1024).await?;
            let Some(last) = page.last() else { break };
            after = last.0;
            let mut rows = Vec::with_capacity(page.len());
            for (id, v) in &page {
                let c = classification(*id, classes, probabilities(v, &texts, scale));
                *report.counts.entry(c.label.clone()).or_default() += 1;
                rows.push((c.id, c.label.clone(), c.probs[&c.label]));
            }
            self.store.set_labels(store_as, &self.model.id, &rows).await?;
            report.images += rows.len() as u64;
            progress(report.images, total);
        }
        Ok(report)
    }

    /// Every label set with its counts.
    pub async fn label_sets(&self) -> Result<Vec<LabelSet>> {
        Ok(self.store.label_sets().await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_are_checked() {
        assert!(Classes::new(vec!["cat".into()], None).unwrap_err().contains("between 2"));
        assert!(Classes::new(vec!["cat".into(), " ".into()], None).unwrap_err().contains("empty"));
        assert!(Classes::new(vec!["cat".into(), "Cat".into()], None).unwrap_err().contains("twice"));
        assert!(Classes::new(vec!["a".into(), "b".into()], Some("photo".into())).unwrap_err().contains("{}"));
        let c = Classes::new(vec!["cat".into(), "dog".into()], None).unwrap();
        assert_eq!(c.texts(), ["a photo of a cat", "a photo of a dog"]);
    }

    #[test]
    fn probabilities_are_a_softmax_of_scaled_cosines() {
        let p = probabilities(&[1.0, 0.0], &[vec![1.0, 0.0], vec![0.0, 1.0]], 100.0);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(p[0] > 0.999 && p[1] < 1e-3);
        let q = probabilities(&[1.0, 0.0], &[vec![1.0, 0.0], vec![0.0, 1.0]], 1.0);
        assert!((q[0] - 1.0 / (1.0 + (-1.0f32).exp())).abs() < 1e-6);
    }
}
