use crate::{Error, Result};
use std::str::FromStr;

/// Identity of an embedding model: its id (hub id or directory name) and output dimension.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ModelInfo {
    pub id: String,
    pub dim: usize,
}

/// A preprocessed image: normalised CHW f32 values, ready for a vision encoder.
#[derive(Debug, Clone, PartialEq)]
pub struct Pixels {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub data: Vec<f32>,
}

/// Turns decoded images into embeddings. Implementations are thread-safe so that the
/// engine can preprocess on several threads while one batch runs the model.
pub trait ImageEmbedder: Send + Sync {
    fn model(&self) -> &ModelInfo;
    /// Shortest side, in pixels, the preprocessor resizes to; a decoder may downscale a
    /// large image to anything at least this big (twice, for quality) before `preprocess`.
    fn input_side(&self) -> u32;
    /// Resize, crop and normalise one decoded (already EXIF-oriented) image.
    fn preprocess(&self, image: &image::DynamicImage) -> Result<Pixels>;
    /// Embed a batch of preprocessed images; one L2-normalised vector per input.
    fn embed_pixels(&self, batch: &[Pixels]) -> Result<Vec<Vec<f32>>>;
}

/// Turns text queries into embeddings in the same space as the image embedder.
pub trait TextEmbedder: Send + Sync {
    fn model(&self) -> &ModelInfo;
    /// One L2-normalised vector per text.
    fn embed_texts(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>>;
    /// The model's learned temperature, exp(logit_scale), for zero-shot softmax.
    fn logit_scale(&self) -> f32;
}

/// Where models run. Parsed from `auto`, `cpu`, `cuda` or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl FromStr for Device {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| Error::BadDevice(s.to_string())),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Auto => write!(f, "auto"),
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn parse_device() {
        assert_eq!("CPU".parse::<Device>().unwrap(), Device::Cpu);
        assert_eq!("cuda".parse::<Device>().unwrap(), Device::Cuda(0));
        assert_eq!("cuda:2".parse::<Device>().unwrap(), Device::Cuda(2));
        assert!("cuda:x".parse::<Device>().is_err());
        assert!("tpu".parse::<Device>().is_err());
    }
}

/// How a captioning or chat model generates text.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct GenerationOptions {
    pub max_new_tokens: usize,
    /// 1: greedy decoding; more: beam search.
    pub num_beams: usize,
    /// 1.0: off; > 1 discourages repeating tokens (transformers' semantics).
    pub repetition_penalty: f32,
}

impl Default for GenerationOptions {
    fn default() -> Self {
        Self { max_new_tokens: 30, num_beams: 1, repetition_penalty: 1.0 }
    }
}

/// Describes an image in a sentence (BLIP-2 and the like).
pub trait Captioner: Send + Sync {
    fn model(&self) -> &ModelInfo;
    /// Shortest side the model's preprocessing needs (decoders may downscale to it).
    fn input_side(&self) -> u32;
    fn caption(&self, image: &image::DynamicImage, opts: &GenerationOptions) -> Result<String>;
    /// Captions for several images, in order; each the one [`caption`](Self::caption)
    /// gives. Models that can share work across images override this.
    fn caption_batch(&self, images: &[&image::DynamicImage], opts: &GenerationOptions) -> Result<Vec<String>> {
        images.iter().map(|im| self.caption(im, opts)).collect()
    }
    /// How many images [`caption_batch`](Self::caption_batch) is best given at once.
    fn batch_size(&self) -> usize {
        1
    }
}

/// Answers a prompt about an image, streaming text pieces to `on_text` as they are
/// produced. The prompt is the full text prompt (the engine assembles chat history).
pub trait VisualChat: Send + Sync {
    fn model(&self) -> &ModelInfo;
    fn input_side(&self) -> u32;
    fn answer(
        &self,
        image: &image::DynamicImage,
        prompt: &str,
        opts: &GenerationOptions,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<String>;
}
