//! CLIP: "Learning Transferable Visual Models From Natural Language Supervision"
//! (Radford et al., 2021), mirroring transformers' `models/clip/modeling_clip.py` and
//! candle-transformers' `models/clip/{text,vision}_model.rs`, which it extends with the
//! `gelu` activations of newer checkpoints, EOS pooling by `eos_token_id`, a fused QKV
//! projection and pre-transposed weights (one contiguous `in × out` matrix per linear,
//! which is what gemm is fastest with for small batches).

use super::config::{Activation, ClipConfig, TextConfig, VisionConfig};
use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

pub use crate::nn::Linear;
use crate::nn::LayerNorm;

impl Module for Activation {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Activation::QuickGelu => crate::clip::ops::quick_gelu(xs),
            Activation::Gelu => xs.gelu_erf(),
            Activation::GeluTanh => xs.gelu(),
            Activation::Relu => xs.relu(),
        }
    }
}

/// The sizes an encoder layer needs, shared by both towers.
#[derive(Debug, Clone, Copy)]
struct EncoderDims {
    hidden: usize,
    intermediate: usize,
    heads: usize,
    act: Activation,
    eps: f64,
}

#[derive(Debug, Clone)]
struct Attention {
    qkv: Linear,
    out_proj: Linear,
    heads: usize,
    head_dim: usize,
    scale: f64,
}

impl Attention {
    fn new(d: EncoderDims, vb: VarBuilder) -> Result<Self> {
        let lin = |n: &str| Linear::new(d.hidden, d.hidden, true, vb.pp(n));
        let qkv = Linear::fused(vec![lin("q_proj")?, lin("k_proj")?, lin("v_proj")?])?;
        let head_dim = d.hidden / d.heads;
        Ok(Self {
            qkv,
            out_proj: lin("out_proj")?,
            heads: d.heads,
            head_dim,
            scale: (head_dim as f64).powf(-0.5),
        })
    }

    fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, s, hidden) = xs.dims3()?;
        let qkv = self.qkv.forward(xs)?.reshape((b, s, 3, self.heads, self.head_dim))?.permute((2, 0, 3, 1, 4))?;
        let q = (qkv.get(0)?.contiguous()? * self.scale)?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        // Softmax in f32 whatever the weights' dtype (f16 on GPUs).
        let o = crate::nn::attention(&q, &k, &v, mask)?.transpose(1, 2)?.reshape((b, s, hidden))?;
        self.out_proj.forward(&o)
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl Mlp {
    fn new(d: EncoderDims, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            fc1: Linear::new(d.hidden, d.intermediate, true, vb.pp("fc1"))?,
            fc2: Linear::new(d.intermediate, d.hidden, true, vb.pp("fc2"))?,
            act: d.act,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.act.forward(&self.fc1.forward(xs)?)?)
    }
}

#[derive(Debug, Clone)]
struct EncoderLayer {
    self_attn: Attention,
    layer_norm1: LayerNorm,
    mlp: Mlp,
    layer_norm2: LayerNorm,
}

impl EncoderLayer {
    fn new(d: EncoderDims, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            self_attn: Attention::new(d, vb.pp("self_attn"))?,
            layer_norm1: LayerNorm::new(d.hidden, d.eps, vb.pp("layer_norm1"))?,
            mlp: Mlp::new(d, vb.pp("mlp"))?,
            layer_norm2: LayerNorm::new(d.hidden, d.eps, vb.pp("layer_norm2"))?,
        })
    }

    fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let h = (self.self_attn.forward(&self.layer_norm1.forward(xs)?, mask)? + xs)?;
        self.mlp.forward(&self.layer_norm2.forward(&h)?)? + h
    }
}

/// The layers of a tower: on the CPU in f32, packed for [`crate::cpu`]'s kernels (in
/// f32 or BF16); elsewhere candle's ops.
#[derive(Debug, Clone)]
enum Encoder {
    Candle(Vec<EncoderLayer>),
    Cpu(crate::cpu::Stack),
}

impl Encoder {
    /// `bf16` is the precision used when the loader asks for BF16 kernels.
    fn new(d: EncoderDims, n: usize, vb: VarBuilder, bf16: crate::cpu::Precision) -> Result<Self> {
        let vb = vb.pp("layers");
        if !(vb.device().is_cpu() && vb.dtype() == DType::F32) {
            return Ok(Encoder::Candle((0..n).map(|i| EncoderLayer::new(d, vb.pp(i))).collect::<Result<_>>()?));
        }
        let precision = if crate::nn::bf16_enabled() { bf16 } else { crate::cpu::Precision::F32 };
        let isa = crate::cpu::Isa::detect();
        let layers = (0..n)
            .map(|i| Ok(crate::cpu::EncoderLayer::new(&layer_weights(d, vb.pp(i))?, isa, precision)))
            .collect::<Result<_>>()?;
        Ok(Encoder::Cpu(crate::cpu::Stack::new(layers)))
    }

    fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        match self {
            Encoder::Candle(layers) => layers.iter().try_fold(xs.clone(), |xs, l| l.forward(&xs, mask)),
            Encoder::Cpu(stack) => stack.forward(xs, mask),
        }
    }

    /// The layers on `xs` (batch, seq, hidden), keeping row `rows[b]` of each sequence:
    /// (batch, hidden). On the CPU kernels the last layer computes those rows alone.
    fn forward_rows(&self, xs: &Tensor, mask: Option<&Tensor>, rows: &[usize]) -> Result<Tensor> {
        match self {
            Encoder::Candle(_) => {
                let (b, s, h) = xs.dims3()?;
                let idx: Vec<u32> = rows.iter().enumerate().map(|(i, &r)| (i * s + r) as u32).collect();
                let idx = Tensor::from_vec(idx, b, xs.device())?;
                self.forward(xs, mask)?.reshape((b * s, h))?.index_select(&idx, 0)
            }
            Encoder::Cpu(stack) => stack.forward_rows(xs, mask, rows),
        }
    }

    /// Per-stage floating-point operations of one [`forward_rows`](Self::forward_rows)
    /// (see [`crate::cpu::EncoderLayer::flops`]), when the layers run on the CPU kernels.
    fn cpu_flops(&self, batch: usize, seq: usize) -> Option<[f64; 6]> {
        match self {
            Encoder::Cpu(stack) => Some(stack.flops_rows(batch, seq)),
            Encoder::Candle(_) => None,
        }
    }
}

impl From<Activation> for crate::cpu::Act {
    fn from(a: Activation) -> Self {
        match a {
            Activation::QuickGelu => crate::cpu::Act::QuickGelu,
            Activation::Gelu => crate::cpu::Act::Gelu,
            Activation::GeluTanh => crate::cpu::Act::GeluTanh,
            Activation::Relu => crate::cpu::Act::Relu,
        }
    }
}

/// One encoder layer's weights, read for the CPU kernels (Q, K and V stacked).
fn layer_weights(d: EncoderDims, vb: VarBuilder) -> Result<crate::cpu::LayerWeights> {
    let (h, i) = (d.hidden, d.intermediate);
    let get = |vb: VarBuilder, shape: &[usize], name: &str| crate::nn::read_f32(&vb, shape, name);
    let a = vb.pp("self_attn");
    let mut qkv_w = Vec::with_capacity(3 * h * h);
    let mut qkv_b = Vec::with_capacity(3 * h);
    for p in ["q_proj", "k_proj", "v_proj"] {
        qkv_w.extend(get(a.pp(p), &[h, h], "weight")?);
        qkv_b.extend(get(a.pp(p), &[h], "bias")?);
    }
    let ln = |n: &str| crate::nn::read_layer_norm(&vb.pp(n), h);
    Ok(crate::cpu::LayerWeights {
        hidden: h,
        intermediate: i,
        heads: d.heads,
        eps: d.eps as f32,
        act: d.act.into(),
        ln1: ln("layer_norm1")?,
        qkv_w,
        qkv_b,
        out_w: get(a.pp("out_proj"), &[h, h], "weight")?,
        out_b: get(a.pp("out_proj"), &[h], "bias")?,
        ln2: ln("layer_norm2")?,
        fc1_w: get(vb.pp("mlp").pp("fc1"), &[i, h], "weight")?,
        fc1_b: get(vb.pp("mlp").pp("fc1"), &[i], "bias")?,
        fc2_w: get(vb.pp("mlp").pp("fc2"), &[h, i], "weight")?,
        fc2_b: get(vb.pp("mlp").pp("fc2"), &[h], "bias")?,
    })
}

/// `CLIPTextTransformer`: token + position embeddings, causal encoder, final LayerNorm,
/// pooled at the end-of-text token.
#[derive(Debug, Clone)]
pub struct TextTransformer {
    token_embedding: Tensor,
    position_embedding: Tensor,
    encoder: Encoder,
    final_layer_norm: LayerNorm,
    cfg: TextConfig,
}

impl TextTransformer {
    fn new(c: &TextConfig, vb: VarBuilder) -> Result<Self> {
        let e = vb.pp("embeddings");
        let d = EncoderDims {
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            heads: c.num_attention_heads,
            act: c.hidden_act,
            eps: c.layer_norm_eps,
        };
        Ok(Self {
            token_embedding: e.pp("token_embedding").get((c.vocab_size, c.hidden_size), "weight")?,
            position_embedding: e.pp("position_embedding").get((c.max_position_embeddings, c.hidden_size), "weight")?,
            // Text embeddings keep cosine ≥ 0.9998 with the QKV projection in bf16 too (the
            // image tower does not), and a short query is bound by reading the weights.
            encoder: Encoder::new(d, c.num_hidden_layers, vb.pp("encoder"), crate::cpu::Precision::Bf16WithQkv)?,
            final_layer_norm: LayerNorm::new(c.hidden_size, c.layer_norm_eps, vb.pp("final_layer_norm"))?,
            cfg: c.clone(),
        })
    }

    /// Floating-point operations per encoder stage (as `cpu::encoder::profile::STAGES`) of
    /// one forward of `batch` sequences of `seq` tokens, where the layers run on the CPU
    /// kernels.
    pub fn encoder_flops(&self, batch: usize, seq: usize) -> Option<[f64; 6]> {
        self.encoder.cpu_flops(batch, seq)
    }

    /// Where transformers pools: with the legacy `eos_token_id == 2` the highest id (the
    /// EOS of the original vocabulary), otherwise the first `eos_token_id`.
    pub fn pool_index(&self, ids: &[u32]) -> usize {
        if self.cfg.eos_token_id == 2 {
            // torch.argmax returns the first maximum.
            let max = ids.iter().copied().max().unwrap_or(0);
            ids.iter().position(|&x| x == max).unwrap_or(0)
        } else {
            ids.iter().position(|&x| x == self.cfg.eos_token_id).unwrap_or(0)
        }
    }

    /// Pooled (pre-projection) features for a batch of token id sequences of any lengths
    /// (each at most `max_position_embeddings`). Sequences are right-padded; the causal
    /// mask keeps padding from reaching the pooled position, so no attention mask is needed.
    pub fn forward(&self, batch: &[Vec<u32>]) -> Result<Tensor> {
        let device = self.token_embedding.device();
        let s = batch.iter().map(Vec::len).max().unwrap_or(0).max(1);
        if s > self.cfg.max_position_embeddings {
            candle_core::bail!("sequence of {s} tokens exceeds max_position_embeddings {}", self.cfg.max_position_embeddings);
        }
        let b = batch.len();
        let mut flat = Vec::with_capacity(b * s);
        let mut pool = Vec::with_capacity(b);
        for (i, ids) in batch.iter().enumerate() {
            if let Some(bad) = ids.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
                candle_core::bail!("token id {bad} is outside the vocabulary of {}", self.cfg.vocab_size);
            }
            flat.extend_from_slice(ids);
            flat.resize((i + 1) * s, self.cfg.pad_token_id.min(self.cfg.vocab_size as u32 - 1));
            pool.push(self.pool_index(ids));
        }
        let ids = Tensor::from_vec(flat, b * s, device)?;
        let x = self.token_embedding.index_select(&ids, 0)?.reshape((b, s, self.cfg.hidden_size))?;
        let x = x.broadcast_add(&self.position_embedding.narrow(0, 0, s)?)?;
        // f32: the attention adds it to f32 scores whatever the weights' dtype.
        let mask = causal_mask(s, DType::F32, device)?;
        let x = self.encoder.forward_rows(&x, Some(&mask), &pool)?;
        self.final_layer_norm.forward(&x)
    }
}

fn causal_mask(s: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let m: Vec<f32> = (0..s).flat_map(|i| (0..s).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
    Tensor::from_vec(m, (s, s), device)?.to_dtype(dtype)
}

/// `CLIPVisionTransformer`: patch embedding (a stride-`p` convolution, done as one
/// matmul over unfolded patches), class token, positions, pre-LayerNorm, encoder,
/// post-LayerNorm of the class token.
#[derive(Debug, Clone)]
pub struct VisionTransformer {
    patch_wt: Tensor,
    /// The same weight packed for the CPU kernels, when the encoder runs on them.
    patch_packed: Option<crate::cpu::PackedWeight>,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    encoder: Encoder,
    post_layernorm: LayerNorm,
    cfg: VisionConfig,
}

impl VisionTransformer {
    fn new(c: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let e = vb.pp("embeddings");
        let p = c.patch_size;
        let patch = e.pp("patch_embedding").get((c.hidden_size, c.num_channels, p, p), "weight")?;
        let d = EncoderDims {
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            heads: c.num_attention_heads,
            act: c.hidden_act,
            eps: c.layer_norm_eps,
        };
        let patch_wt = patch.reshape((c.hidden_size, c.num_channels * p * p))?.t()?.contiguous()?;
        let encoder = Encoder::new(d, c.num_hidden_layers, vb.pp("encoder"), crate::cpu::Precision::Bf16)?;
        let patch_packed = match &encoder {
            // Where the layers' MLPs run on the BF16 kernel, so does the patch embedding
            // (a 3072 × 768 GEMM per patch row for B/32: 4% of a bf16 forward in f32).
            Encoder::Cpu(stack) => {
                let (k, n) = patch_wt.dims2()?;
                let w: Vec<f32> = patch_wt.flatten_all()?.to_vec1()?;
                Some(if stack.is_bf16() {
                    crate::cpu::PackedWeight::Bf16(std::sync::Arc::new(crate::bf16_gemm::PackedB::pack(&w, k, n)))
                } else {
                    crate::cpu::PackedWeight::F32(crate::cpu::PackedF32::pack(&w, k, n))
                })
            }
            Encoder::Candle(_) => None,
        };
        Ok(Self {
            patch_wt,
            patch_packed,
            class_embedding: e.get(c.hidden_size, "class_embedding")?,
            position_embedding: e.pp("position_embedding").get((c.num_patches() + 1, c.hidden_size), "weight")?,
            pre_layrnorm: LayerNorm::new(c.hidden_size, c.layer_norm_eps, vb.pp("pre_layrnorm"))?,
            encoder,
            post_layernorm: LayerNorm::new(c.hidden_size, c.layer_norm_eps, vb.pp("post_layernorm"))?,
            cfg: c.clone(),
        })
    }

    /// Whether the patch embedding runs on the BF16 kernel (it does where the layers do).
    pub fn patch_embedding_is_bf16(&self) -> bool {
        self.patch_packed.as_ref().is_some_and(|w| w.is_bf16())
    }

    /// Per-stage floating-point operations of the encoder for `batch` images, when it runs
    /// on the CPU kernels (for benchmarks).
    pub fn encoder_flops(&self, batch: usize) -> Option<[f64; 6]> {
        self.encoder.cpu_flops(batch, self.cfg.num_patches() + 1)
    }

    /// Pooled features for pixel values of shape (batch, channels, image_size, image_size).
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = pixels.dims4()?;
        let (size, p) = (self.cfg.image_size, self.cfg.patch_size);
        if (c, h, w) != (self.cfg.num_channels, size, size) {
            candle_core::bail!("pixel values have shape {:?}, the model takes ({}, {size}, {size})", (c, h, w), self.cfg.num_channels);
        }
        let g = size / p;
        // (b, c, g, p, g, p) -> (b, g, g, c, p, p): one row per patch, conv weight order.
        let pixels = if g * p != size { pixels.narrow(2, 0, g * p)?.narrow(3, 0, g * p)? } else { pixels.clone() };
        let patches = pixels
            .reshape((b, c, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b * g * g, c * p * p))?;
        let hidden = self.cfg.hidden_size;
        let x = match &self.patch_packed {
            Some(w) => {
                let rows = b * g * g;
                let mut y = vec![0f32; rows * hidden];
                let a: Vec<f32> = patches.flatten_all()?.to_vec1()?;
                crate::cpu::gemm::gemm(crate::cpu::Isa::detect(), &a, rows, w, None, &mut y, crate::cpu::Epilogue::STORE);
                Tensor::from_vec(y, (b, g * g, hidden), patches.device())?
            }
            None => patches.matmul(&self.patch_wt)?.reshape((b, g * g, hidden))?,
        };
        let cls = self.class_embedding.reshape((1, 1, hidden))?.broadcast_as((b, 1, hidden))?;
        let x = Tensor::cat(&[&cls, &x], 1)?.broadcast_add(&self.position_embedding)?;
        let x = self.pre_layrnorm.forward(&x)?;
        // Pooled at the class token (row 0).
        let x = self.encoder.forward_rows(&x, None, &vec![0; b])?;
        self.post_layernorm.forward(&x)
    }
}

/// `CLIPModel` without the contrastive loss: both towers and their projections.
#[derive(Debug, Clone)]
pub struct ClipModel {
    pub text_model: TextTransformer,
    pub vision_model: VisionTransformer,
    visual_projection: Linear,
    text_projection: Linear,
    /// exp(logit_scale), the softmax temperature for zero-shot classification.
    pub logit_scale: f32,
}

impl ClipModel {
    pub fn new(c: &ClipConfig, vb: VarBuilder) -> Result<Self> {
        let logit_scale = vb.get((), "logit_scale")?.to_dtype(DType::F32)?.to_scalar::<f32>()?.exp();
        Ok(Self {
            text_model: TextTransformer::new(&c.text_config, vb.pp("text_model"))?,
            vision_model: VisionTransformer::new(&c.vision_config, vb.pp("vision_model"))?,
            visual_projection: Linear::new(c.vision_config.hidden_size, c.projection_dim, false, vb.pp("visual_projection"))?.packed_for_cpu()?,
            text_projection: Linear::new(c.text_config.hidden_size, c.projection_dim, false, vb.pp("text_projection"))?.packed_for_cpu()?,
            logit_scale,
        })
    }

    /// Unnormalised image features (`get_image_features`).
    pub fn image_features(&self, pixels: &Tensor) -> Result<Tensor> {
        self.visual_projection.forward(&self.vision_model.forward(pixels)?)
    }

    /// Unnormalised text features (`get_text_features`).
    pub fn text_features(&self, ids: &[Vec<u32>]) -> Result<Tensor> {
        self.text_projection.forward(&self.text_model.forward(ids)?)
    }
}

/// Rows divided by their L2 norm.
pub fn l2_normalize_rows(x: &Tensor) -> Result<Tensor> {
    x.broadcast_div(&x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)
}
