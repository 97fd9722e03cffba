//! `config.json` of a Hugging Face `Blip2ForConditionalGeneration` with an OPT language
//! model: field names as transformers writes them, defaults as `Blip2VisionConfig`,
//! `Blip2QFormerConfig`, `OPTConfig` and `Blip2Config` (transformers 5.24) define them.

use crate::clip::config::Activation;
use serde::{Deserialize, Deserializer};

/// `Blip2VisionConfig`: the EVA ViT-g image encoder.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(deserialize_with = "square")]
    pub image_size: usize,
    #[serde(deserialize_with = "square")]
    pub patch_size: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
    pub qkv_bias: bool,
}

impl Default for VisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 1408,
            intermediate_size: 6144,
            num_hidden_layers: 39,
            num_attention_heads: 16,
            image_size: 224,
            patch_size: 14,
            hidden_act: Activation::Gelu,
            layer_norm_eps: 1e-6,
            qkv_bias: true,
        }
    }
}

impl VisionConfig {
    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Positions: one per patch plus the class token.
    pub fn num_positions(&self) -> usize {
        self.grid().pow(2) + 1
    }
}

/// `Blip2QFormerConfig`: the querying transformer (a BERT whose layers cross-attend to the
/// image every `cross_attention_frequency` layers).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct QFormerConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub hidden_act: Activation,
    pub max_position_embeddings: usize,
    pub layer_norm_eps: f64,
    pub cross_attention_frequency: usize,
    /// Overwritten by `vision_config.hidden_size`, as `Blip2Config.__post_init__` does.
    pub encoder_hidden_size: usize,
    /// Layers also carry the text feed-forward (`intermediate`, `output`).
    pub use_qformer_text_input: bool,
}

impl Default for QFormerConfig {
    fn default() -> Self {
        Self {
            vocab_size: 30522,
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: Activation::Gelu,
            max_position_embeddings: 512,
            layer_norm_eps: 1e-12,
            cross_attention_frequency: 2,
            encoder_hidden_size: 1408,
            use_qformer_text_input: false,
        }
    }
}

/// `OPTConfig`: the decoder-only language model.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct OptConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub ffn_dim: usize,
    pub max_position_embeddings: usize,
    pub do_layer_norm_before: bool,
    #[serde(rename = "_remove_final_layer_norm")]
    pub remove_final_layer_norm: bool,
    /// Width of the token embeddings; `hidden_size` when absent.
    pub word_embed_proj_dim: Option<usize>,
    pub num_attention_heads: usize,
    pub activation_function: Activation,
    pub pad_token_id: Option<u32>,
    pub bos_token_id: Option<u32>,
    #[serde(deserialize_with = "one_or_many")]
    pub eos_token_id: Vec<u32>,
    pub enable_bias: bool,
    pub layer_norm_elementwise_affine: bool,
    pub tie_word_embeddings: bool,
}

impl Default for OptConfig {
    fn default() -> Self {
        Self {
            model_type: "opt".into(),
            vocab_size: 50272,
            hidden_size: 768,
            num_hidden_layers: 12,
            ffn_dim: 3072,
            max_position_embeddings: 2048,
            do_layer_norm_before: true,
            remove_final_layer_norm: false,
            word_embed_proj_dim: None,
            num_attention_heads: 12,
            activation_function: Activation::Relu,
            pad_token_id: Some(1),
            bos_token_id: Some(2),
            eos_token_id: vec![2],
            enable_bias: true,
            layer_norm_elementwise_affine: true,
            tie_word_embeddings: true,
        }
    }
}

impl OptConfig {
    pub fn word_embed_proj_dim(&self) -> usize {
        self.word_embed_proj_dim.unwrap_or(self.hidden_size)
    }

    /// nn.LayerNorm's default, which OPT does not override.
    pub const LAYER_NORM_EPS: f64 = 1e-5;
}

/// `Blip2Config`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Blip2Config {
    pub vision_config: VisionConfig,
    pub qformer_config: QFormerConfig,
    pub text_config: OptConfig,
    pub num_query_tokens: usize,
    pub image_text_hidden_size: usize,
    /// The `<image>` placeholder id the processor repeats `num_query_tokens` times before
    /// the prompt (`image_token_id` is transformers' alias for it).
    #[serde(alias = "image_token_id")]
    pub image_token_index: Option<u32>,
}

impl Default for Blip2Config {
    fn default() -> Self {
        Self {
            vision_config: VisionConfig::default(),
            qformer_config: QFormerConfig::default(),
            text_config: OptConfig::default(),
            num_query_tokens: 32,
            image_text_hidden_size: 256,
            image_token_index: None,
        }
    }
}

impl Blip2Config {
    /// Applies what `Blip2Config.__post_init__` derives, then checks the invariants the
    /// model code relies on; returns the offending field.
    pub fn finish(mut self) -> Result<Self, String> {
        self.qformer_config.encoder_hidden_size = self.vision_config.hidden_size;
        let v = &self.vision_config;
        let q = &self.qformer_config;
        let t = &self.text_config;
        let checks = [
            (t.model_type != "opt", "text_config.model_type: only OPT language models are supported"),
            (v.num_attention_heads == 0 || v.hidden_size % v.num_attention_heads != 0, "vision_config.hidden_size must be divisible by vision_config.num_attention_heads"),
            (v.patch_size == 0 || v.image_size < v.patch_size, "vision_config.patch_size must be in 1..=image_size"),
            (q.num_attention_heads == 0 || q.hidden_size % q.num_attention_heads != 0, "qformer_config.hidden_size must be divisible by qformer_config.num_attention_heads"),
            (q.cross_attention_frequency == 0, "qformer_config.cross_attention_frequency must be positive"),
            (t.num_attention_heads == 0 || t.hidden_size % t.num_attention_heads != 0, "text_config.hidden_size must be divisible by text_config.num_attention_heads"),
            (t.vocab_size == 0, "text_config.vocab_size must be positive"),
            (t.max_position_embeddings == 0, "text_config.max_position_embeddings must be positive"),
            // The projected queries go where token embeddings go. transformers does not check
            // this and scatters misaligned values; no released BLIP-2 OPT has unequal widths.
            (t.word_embed_proj_dim() != t.hidden_size, "text_config.word_embed_proj_dim must equal text_config.hidden_size (BLIP-2 puts hidden_size-wide projected queries among the token embeddings)"),
            (self.num_query_tokens == 0, "num_query_tokens must be positive"),
        ];
        match checks.iter().find(|(bad, _)| *bad) {
            Some((_, msg)) => Err(msg.to_string()),
            None => Ok(self),
        }
    }
}

/// An int, or a `[h, w]` pair with h == w (what newer configs may write).
fn square<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        One(usize),
        Pair([usize; 2]),
    }
    match Size::deserialize(d)? {
        Size::One(n) => Ok(n),
        Size::Pair([h, w]) if h == w => Ok(h),
        Size::Pair([h, w]) => Err(serde::de::Error::custom(format!("non-square size [{h}, {w}] is not supported"))),
    }
}

/// `eos_token_id` may be one id or a list.
fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u32>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Ids {
        One(u32),
        Many(Vec<u32>),
    }
    Ok(match Ids::deserialize(d)? {
        Ids::One(n) => vec![n],
        Ids::Many(v) => v,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_blip2_opt_2_7b_like() {
        let c: Blip2Config = serde_json::from_str("{}").unwrap();
        let c = c.finish().unwrap();
        assert_eq!(c.num_query_tokens, 32);
        assert_eq!(c.vision_config.num_positions(), 257);
        assert_eq!(c.qformer_config.encoder_hidden_size, 1408);
        assert_eq!(c.text_config.eos_token_id, vec![2]);
        assert_eq!(c.text_config.word_embed_proj_dim(), 768);
        assert_eq!(c.qformer_config.layer_norm_eps, 1e-12);
    }

    #[test]
    fn hf_keys_parse() {
        let c: Blip2Config = serde_json::from_str(
            r#"{"image_token_id": 50265, "num_query_tokens": 4,
                "vision_config": {"hidden_size": 32, "num_attention_heads": 4, "image_size": [30, 30], "patch_size": 10},
                "qformer_config": {"encoder_hidden_size": 99},
                "text_config": {"eos_token_id": [2, 7], "_remove_final_layer_norm": true}}"#,
        )
        .unwrap();
        let c = c.finish().unwrap();
        assert_eq!(c.image_token_index, Some(50265));
        assert_eq!(c.vision_config.image_size, 30);
        assert_eq!(c.qformer_config.encoder_hidden_size, 32);
        assert_eq!(c.text_config.eos_token_id, vec![2, 7]);
        assert!(c.text_config.remove_final_layer_norm);
        let t5: Blip2Config = serde_json::from_str(r#"{"text_config": {"model_type": "t5"}}"#).unwrap();
        assert!(t5.finish().unwrap_err().contains("OPT"));
        let narrow: Blip2Config = serde_json::from_str(r#"{"text_config": {"word_embed_proj_dim": 512}}"#).unwrap();
        assert!(narrow.finish().unwrap_err().contains("word_embed_proj_dim"));
    }
}
