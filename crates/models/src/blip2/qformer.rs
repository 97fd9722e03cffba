//! The Querying Transformer (Q-Former) of BLIP-2 (Li et al., 2023, section 3.1): learned
//! query embeddings pass through BERT layers that self-attend among the queries,
//! cross-attend to the frozen image features every `cross_attention_frequency` layers, and
//! use a feed-forward of their own (`intermediate_query`/`output_query`). Mirrors
//! `Blip2QFormerModel` in transformers' `models/blip_2/modeling_blip_2.py`
//! (`Blip2QFormerMultiHeadAttention`, `Blip2QFormerSelfOutput`, `Blip2QFormerAttention`,
//! `Blip2QFormerIntermediate`, `Blip2QFormerOutput`, `Blip2QFormerLayer`,
//! `Blip2QFormerEncoder`). transformers keeps this module in f32 whatever the model's
//! dtype, and so does magpie.

use super::config::QFormerConfig;
use crate::clip::config::Activation;
use crate::nn::{attention, LayerNorm, Linear};
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

/// `Blip2QFormerMultiHeadAttention`: keys and values from the hidden states, or from the
/// image features when it is the cross-attention.
#[derive(Debug, Clone)]
struct MultiHeadAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    heads: usize,
    head_dim: usize,
    scale: f64,
}

impl MultiHeadAttention {
    fn new(c: &QFormerConfig, is_cross_attention: bool, vb: VarBuilder) -> Result<Self> {
        let h = c.hidden_size;
        let kv_in = if is_cross_attention { c.encoder_hidden_size } else { h };
        let head_dim = h / c.num_attention_heads;
        Ok(Self {
            query: Linear::new(h, h, true, vb.pp("query"))?.packed_for_cpu()?,
            key: Linear::new(kv_in, h, true, vb.pp("key"))?.packed_for_cpu()?,
            value: Linear::new(kv_in, h, true, vb.pp("value"))?.packed_for_cpu()?,
            heads: c.num_attention_heads,
            head_dim,
            scale: (head_dim as f64).powf(-0.5),
        })
    }

    fn forward(&self, xs: &Tensor, encoder_hidden_states: Option<&Tensor>) -> Result<Tensor> {
        let (b, s, hidden) = xs.dims3()?;
        let kv = encoder_hidden_states.unwrap_or(xs);
        let split = |t: Tensor| -> Result<Tensor> {
            let n = t.dim(1)?;
            t.reshape((b, n, self.heads, self.head_dim))?.transpose(1, 2)?.contiguous()
        };
        // transformers scales the scores, not the query; in f32 either way is exact to rounding.
        let q = (split(self.query.forward(xs)?)? * self.scale)?;
        let k = split(self.key.forward(kv)?)?;
        let v = split(self.value.forward(kv)?)?;
        attention(&q, &k, &v, None)?.transpose(1, 2)?.reshape((b, s, hidden))
    }
}

/// `Blip2QFormerSelfOutput` and `Blip2QFormerOutput`: dense, then LayerNorm of the sum
/// with the residual (post-LN, as in BERT).
#[derive(Debug, Clone)]
struct DenseResidualNorm {
    dense: Linear,
    layer_norm: LayerNorm,
}

impl DenseResidualNorm {
    fn new(in_dim: usize, c: &QFormerConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            dense: Linear::new(in_dim, c.hidden_size, true, vb.pp("dense"))?.packed_for_cpu()?,
            layer_norm: LayerNorm::new(c.hidden_size, c.layer_norm_eps, vb.pp("LayerNorm"))?,
        })
    }

    fn forward(&self, xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
        self.layer_norm.forward(&(self.dense.forward(xs)? + residual)?)
    }
}

/// `Blip2QFormerAttention`: attention followed by its output block.
#[derive(Debug, Clone)]
struct QFormerAttention {
    attention: MultiHeadAttention,
    output: DenseResidualNorm,
}

impl QFormerAttention {
    fn new(c: &QFormerConfig, is_cross_attention: bool, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            attention: MultiHeadAttention::new(c, is_cross_attention, vb.pp("attention"))?,
            output: DenseResidualNorm::new(c.hidden_size, c, vb.pp("output"))?,
        })
    }

    fn forward(&self, xs: &Tensor, encoder_hidden_states: Option<&Tensor>) -> Result<Tensor> {
        self.output.forward(&self.attention.forward(xs, encoder_hidden_states)?, xs)
    }
}

/// `Blip2QFormerIntermediate` + `Blip2QFormerOutput`: the feed-forward block.
#[derive(Debug, Clone)]
struct FeedForward {
    intermediate: Linear,
    act: Activation,
    output: DenseResidualNorm,
}

impl FeedForward {
    fn new(c: &QFormerConfig, intermediate: VarBuilder, output: VarBuilder) -> Result<Self> {
        Ok(Self {
            intermediate: Linear::new(c.hidden_size, c.intermediate_size, true, intermediate.pp("dense"))?.packed_for_cpu()?,
            act: c.hidden_act,
            output: DenseResidualNorm::new(c.intermediate_size, c, output)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.output.forward(&self.act.forward(&self.intermediate.forward(xs)?)?, xs)
    }
}

/// `Blip2QFormerLayer`.
#[derive(Debug, Clone)]
struct Layer {
    attention: QFormerAttention,
    crossattention: Option<QFormerAttention>,
    /// The text feed-forward (`intermediate`, `output`), present with `use_qformer_text_input`.
    text_ffn: Option<FeedForward>,
    query_ffn: FeedForward,
}

impl Layer {
    fn new(c: &QFormerConfig, layer_idx: usize, vb: VarBuilder) -> Result<Self> {
        let crossattention = if layer_idx % c.cross_attention_frequency == 0 {
            Some(QFormerAttention::new(c, true, vb.pp("crossattention"))?)
        } else {
            None
        };
        let text_ffn = if c.use_qformer_text_input {
            Some(FeedForward::new(c, vb.pp("intermediate"), vb.pp("output"))?)
        } else {
            None
        };
        Ok(Self {
            attention: QFormerAttention::new(c, false, vb.pp("attention"))?,
            crossattention,
            text_ffn,
            query_ffn: FeedForward::new(c, vb.pp("intermediate_query"), vb.pp("output_query"))?,
        })
    }

    /// The first `query_length` positions are queries; any after them are text tokens,
    /// which skip the cross-attention and use the text feed-forward.
    fn forward(&self, xs: &Tensor, image_embeds: &Tensor, query_length: usize) -> Result<Tensor> {
        let attention_output = self.attention.forward(xs, None)?;
        let seq = attention_output.dim(1)?;
        let queries = attention_output.narrow(1, 0, query_length.min(seq))?;
        let queries = match &self.crossattention {
            Some(cross) => cross.forward(&queries, Some(image_embeds))?,
            None => queries,
        };
        let out = self.query_ffn.forward(&queries)?;
        if seq <= query_length {
            return Ok(out);
        }
        let text = attention_output.narrow(1, query_length, seq - query_length)?;
        let ffn = self.text_ffn.as_ref().ok_or_else(|| {
            candle_core::Error::Msg("text input to the Q-Former needs qformer_config.use_qformer_text_input".into())
        })?;
        Tensor::cat(&[&out, &ffn.forward(&text)?], 1)
    }
}

/// `Blip2QFormerModel`: LayerNorm of the query embeddings, then the layers.
#[derive(Debug, Clone)]
pub struct QFormerModel {
    layernorm: LayerNorm,
    layers: Vec<Layer>,
}

impl QFormerModel {
    pub fn new(c: &QFormerConfig, vb: VarBuilder) -> Result<Self> {
        let lv = vb.pp("encoder").pp("layer");
        Ok(Self {
            layernorm: LayerNorm::new(c.hidden_size, c.layer_norm_eps, vb.pp("layernorm"))?,
            layers: (0..c.num_hidden_layers).map(|i| Layer::new(c, i, lv.pp(i))).collect::<Result<_>>()?,
        })
    }

    /// `last_hidden_state` (batch, queries, hidden) for query embeddings (batch, queries,
    /// hidden) attending to `image_embeds` (batch, positions, encoder_hidden_size), all f32.
    pub fn forward(&self, query_embeds: &Tensor, image_embeds: &Tensor) -> Result<Tensor> {
        let query_length = query_embeds.dim(1)?;
        let xs = self.layernorm.forward(query_embeds)?;
        self.layers.iter().try_fold(xs, |xs, l| l.forward(&xs, image_embeds, query_length))
    }
}
