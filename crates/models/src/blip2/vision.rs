//! The BLIP-2 image encoder, an EVA ViT-g: "BLIP-2: Bootstrapping Language-Image
//! Pre-training with Frozen Image Encoders and Large Language Models" (Li et al., 2023),
//! section 3.1. Mirrors `Blip2VisionModel` in transformers' `models/blip_2/modeling_blip_2.py`
//! (`Blip2VisionEmbeddings`, `Blip2Attention`, `Blip2MLP`, `Blip2EncoderLayer`,
//! `Blip2Encoder`).

use super::config::VisionConfig;
use crate::clip::config::Activation;
use crate::nn::{attention, LayerNorm, Linear};
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

/// `Blip2VisionEmbeddings`: a stride-`p` convolution (done as one matmul over unfolded
/// patches), a class token, learned positions.
#[derive(Debug, Clone)]
struct VisionEmbeddings {
    patch_embedding: Linear,
    class_embedding: Tensor,
    position_embedding: Tensor,
    patch_size: usize,
    image_size: usize,
    hidden: usize,
}

impl VisionEmbeddings {
    fn new(c: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let (h, p) = (c.hidden_size, c.patch_size);
        let pe = vb.pp("patch_embedding");
        let w = pe.get((h, 3, p, p), "weight")?.reshape((h, 3 * p * p))?;
        Ok(Self {
            patch_embedding: Linear::from_weight(&w, Some(pe.get(h, "bias")?))?.packed_for_cpu()?,
            class_embedding: vb.get((1, 1, h), "class_embedding")?,
            position_embedding: vb.get((1, c.num_positions(), h), "position_embedding")?,
            patch_size: p,
            image_size: c.image_size,
            hidden: h,
        })
    }

    fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = pixels.dims4()?;
        let (size, p) = (self.image_size, self.patch_size);
        if (c, h, w) != (3, size, size) {
            candle_core::bail!("pixel values have shape {:?}, the model takes (3, {size}, {size})", (c, h, w));
        }
        let g = size / p;
        // A stride-p convolution drops the pixels past the last whole patch.
        let pixels = if g * p != size { pixels.narrow(2, 0, g * p)?.narrow(3, 0, g * p)? } else { pixels.clone() };
        // (b, c, g, p, g, p) -> (b, g, g, c, p, p): one row per patch, in conv weight order.
        let patches = pixels.reshape((b, c, g, p, g, p))?.permute((0, 2, 4, 1, 3, 5))?.contiguous()?.reshape((
            b,
            g * g,
            c * p * p,
        ))?;
        let patch_embeds = self.patch_embedding.forward(&patches)?;
        let class_embeds = self.class_embedding.broadcast_as((b, 1, self.hidden))?;
        Tensor::cat(&[&class_embeds, &patch_embeds], 1)?.broadcast_add(&self.position_embedding)
    }
}

/// `Blip2Attention`: one fused `qkv` projection without bias of its own; the bias is
/// `cat(q_bias, 0, v_bias)` (stored fused as `qkv.bias` by transformers, or as separate
/// `q_bias`/`v_bias` by older checkpoints).
#[derive(Debug, Clone)]
struct Attention {
    qkv: Linear,
    projection: Linear,
    heads: usize,
    head_dim: usize,
    scale: f64,
}

impl Attention {
    fn new(c: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let h = c.hidden_size;
        let w = vb.pp("qkv").get((3 * h, h), "weight")?;
        let bias = if !c.qkv_bias {
            None
        } else if vb.contains_tensor("q_bias") && !vb.pp("qkv").contains_tensor("bias") {
            let q = vb.get(h, "q_bias")?;
            let v = vb.get(h, "v_bias")?;
            Some(Tensor::cat(&[&q, &q.zeros_like()?, &v], 0)?)
        } else {
            Some(vb.pp("qkv").get(3 * h, "bias")?)
        };
        let head_dim = h / c.num_attention_heads;
        Ok(Self {
            qkv: Linear::from_weight(&w, bias)?,
            projection: Linear::new(h, h, true, vb.pp("projection"))?,
            heads: c.num_attention_heads,
            head_dim,
            scale: (head_dim as f64).powf(-0.5),
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, s, hidden) = xs.dims3()?;
        let qkv = self.qkv.forward(xs)?.reshape((b, s, 3, self.heads, self.head_dim))?.permute((2, 0, 3, 1, 4))?;
        let q = (qkv.get(0)?.contiguous()? * self.scale)?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        let o = attention(&q, &k, &v, None)?.transpose(1, 2)?.reshape((b, s, hidden))?;
        self.projection.forward(&o)
    }
}

/// `Blip2MLP`.
#[derive(Debug, Clone)]
struct Mlp {
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl Mlp {
    fn new(c: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            fc1: Linear::new(c.hidden_size, c.intermediate_size, true, vb.pp("fc1"))?,
            fc2: Linear::new(c.intermediate_size, c.hidden_size, true, vb.pp("fc2"))?,
            act: c.hidden_act,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.act.forward(&self.fc1.forward(xs)?)?)
    }
}

/// `Blip2EncoderLayer`: pre-LayerNorm attention and MLP, each with a residual.
#[derive(Debug, Clone)]
struct EncoderLayer {
    self_attn: Attention,
    layer_norm1: LayerNorm,
    mlp: Mlp,
    layer_norm2: LayerNorm,
}

impl EncoderLayer {
    fn new(c: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            self_attn: Attention::new(c, vb.pp("self_attn"))?,
            layer_norm1: LayerNorm::new(c.hidden_size, c.layer_norm_eps, vb.pp("layer_norm1"))?,
            mlp: Mlp::new(c, vb.pp("mlp"))?,
            layer_norm2: LayerNorm::new(c.hidden_size, c.layer_norm_eps, vb.pp("layer_norm2"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = (self.self_attn.forward(&self.layer_norm1.forward(xs)?)? + xs)?;
        self.mlp.forward(&self.layer_norm2.forward(&h)?)? + h
    }
}

/// The encoder layers: on the CPU in f32, packed for [`crate::cpu`]'s kernels (BF16 ones
/// in the quantized modes); elsewhere candle's ops.
#[derive(Debug, Clone)]
enum Layers {
    Candle(Vec<EncoderLayer>),
    Cpu(crate::cpu::Stack),
}

/// One layer's weights for the CPU kernels: the fused `qkv` weight as stored, its bias
/// `cat(q_bias, 0, v_bias)`.
fn layer_weights(c: &VisionConfig, vb: VarBuilder) -> Result<crate::cpu::LayerWeights> {
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let get = crate::nn::read_f32;
    let a = vb.pp("self_attn");
    let qkv_b = if !c.qkv_bias {
        vec![0.0; 3 * h]
    } else if a.contains_tensor("q_bias") && !a.pp("qkv").contains_tensor("bias") {
        let mut b = get(&a, &[h], "q_bias")?;
        b.extend(std::iter::repeat_n(0.0, h));
        b.extend(get(&a, &[h], "v_bias")?);
        b
    } else {
        get(&a.pp("qkv"), &[3 * h], "bias")?
    };
    let ln = |n: &str| crate::nn::read_layer_norm(&vb.pp(n), h);
    let (fc1, fc2) = (vb.pp("mlp").pp("fc1"), vb.pp("mlp").pp("fc2"));
    Ok(crate::cpu::LayerWeights {
        hidden: h,
        intermediate: i,
        heads: c.num_attention_heads,
        eps: c.layer_norm_eps as f32,
        act: c.hidden_act.into(),
        ln1: ln("layer_norm1")?,
        qkv_w: get(&a.pp("qkv"), &[3 * h, h], "weight")?,
        qkv_b,
        out_w: get(&a.pp("projection"), &[h, h], "weight")?,
        out_b: get(&a.pp("projection"), &[h], "bias")?,
        ln2: ln("layer_norm2")?,
        fc1_w: get(&fc1, &[i, h], "weight")?,
        fc1_b: get(&fc1, &[i], "bias")?,
        fc2_w: get(&fc2, &[h, i], "weight")?,
        fc2_b: get(&fc2, &[h], "bias")?,
    })
}

/// `Blip2VisionModel`: embeddings, encoder, `post_layernorm` over every position.
#[derive(Debug, Clone)]
pub struct VisionModel {
    embeddings: VisionEmbeddings,
    layers: Layers,
    post_layernorm: LayerNorm,
    seq: usize,
}

impl VisionModel {
    /// The model from `vb`; `quantized`: BLIP-2's quantized modes, where on a CPU the
    /// layers run on int8 dot products ([`crate::cpu::Precision::Int8`]).
    pub fn new(c: &VisionConfig, vb: VarBuilder, quantized: bool) -> Result<Self> {
        let lv = vb.pp("encoder").pp("layers");
        use crate::cpu::Precision as P;
        use candle_core::DType;
        // On a CPU the layers run on magpie's kernels in every precision: f32 (int8 in the
        // quantized modes, or BF16 on CPUs without VNNI), an f16 checkpoint's weights kept
        // in f16 with f32 arithmetic, bf16 on the BF16 dot-product kernel (transformers'
        // bf16 arithmetic; f32 on CPUs without it).
        let cpu_precision = match vb.dtype() {
            _ if !crate::nn::cpu_kernels(vb.device()) => None,
            DType::F32 if quantized => Some(P::Int8),
            DType::F32 => Some(P::F32),
            DType::F16 => Some(P::F16Weights),
            DType::BF16 => Some(P::Bf16WithQkv),
            _ => None,
        };
        let layers = if let Some(precision) = cpu_precision {
            let isa = crate::cpu::Isa::detect();
            Layers::Cpu(crate::cpu::Stack::new(
                (0..c.num_hidden_layers)
                    .map(|i| Ok(crate::cpu::EncoderLayer::new(&layer_weights(c, lv.pp(i))?, isa, precision)))
                    .collect::<Result<_>>()?,
            ))
        } else {
            Layers::Candle((0..c.num_hidden_layers).map(|i| EncoderLayer::new(c, lv.pp(i))).collect::<Result<_>>()?)
        };
        Ok(Self {
            embeddings: VisionEmbeddings::new(c, vb.pp("embeddings"))?,
            layers,
            post_layernorm: LayerNorm::new(c.hidden_size, c.layer_norm_eps, vb.pp("post_layernorm"))?,
            seq: c.num_positions(),
        })
    }

    /// `last_hidden_state` (batch, 1 + patches, hidden) for pixel values (batch, 3, size, size).
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let xs = self.embeddings.forward(pixels)?;
        let xs = match &self.layers {
            Layers::Candle(layers) => layers.iter().try_fold(xs, |xs, l| l.forward(&xs))?,
            Layers::Cpu(stack) => stack.forward(&xs, None)?,
        };
        self.post_layernorm.forward(&xs)
    }

    /// Per-stage floating-point operations of the encoder for `batch` images, when it runs
    /// on the CPU kernels (for benchmarks).
    pub fn encoder_flops(&self, batch: usize) -> Option<[f64; 6]> {
        match &self.layers {
            Layers::Cpu(stack) => Some(stack.flops(batch, self.seq)),
            Layers::Candle(_) => None,
        }
    }
}
