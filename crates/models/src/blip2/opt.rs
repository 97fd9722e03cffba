//! OPT, the frozen language model of BLIP-2: "OPT: Open Pre-trained Transformer Language
//! Models" (Zhang et al., 2022). Mirrors `OPTForCausalLM` in transformers'
//! `models/opt/modeling_opt.py` (`OPTLearnedPositionalEmbedding`, `OPTAttention`,
//! `OPTDecoderLayer`, `OPTDecoder`), with a key/value cache for generation.

use super::config::OptConfig;
use super::opt_native::{LayerRef, NativeKv};
use crate::clip::config::Activation;
use crate::nn::{attention, LayerNorm, Linear};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

/// Keys and values of every layer for the positions seen so far, plus the attention mask
/// over those positions.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    mask: Vec<Vec<u8>>,
}

/// One layer's keys and values.
#[derive(Debug, Clone, Default)]
enum LayerKv {
    #[default]
    Empty,
    /// Candle's layers: (batch, heads, positions, head_dim) each.
    Tensors(Tensor, Tensor),
    /// The CPU layers' buffers.
    Native(NativeKv),
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Positions cached so far.
    pub fn seq_len(&self) -> usize {
        self.mask.first().map_or(0, Vec::len)
    }

    pub fn batch(&self) -> usize {
        self.mask.len()
    }

    /// Each row's attention mask over the cached positions.
    pub fn mask(&self) -> &[Vec<u8>] {
        &self.mask
    }

    /// Keeps rows `idx` in that order (repeats allowed): beam search's `reorder_cache`, and
    /// the expansion of one prompt to several beams.
    pub fn reorder(&mut self, idx: &[usize]) -> Result<()> {
        if let Some(&bad) = idx.iter().find(|&&i| i >= self.mask.len()) {
            candle_core::bail!("cache row {bad} out of {}", self.mask.len());
        }
        for layer in self.layers.iter_mut() {
            match layer {
                LayerKv::Empty => {}
                LayerKv::Tensors(k, v) => {
                    let ids = Tensor::from_vec(idx.iter().map(|&i| i as u32).collect::<Vec<_>>(), idx.len(), k.device())?;
                    *k = k.index_select(&ids, 0)?;
                    *v = v.index_select(&ids, 0)?;
                }
                LayerKv::Native(kv) => kv.reorder(idx)?,
            }
        }
        self.mask = idx.iter().map(|&i| self.mask[i].clone()).collect();
        Ok(())
    }
}

/// `OPTLearnedPositionalEmbedding`: positions count the attended tokens
/// (`cumsum(mask) * mask - 1`, so left padding does not shift them), offset by 2.
#[derive(Debug, Clone)]
struct LearnedPositionalEmbedding {
    weight: Tensor,
}

impl LearnedPositionalEmbedding {
    const OFFSET: usize = 2;

    fn new(c: &OptConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self { weight: vb.get((c.max_position_embeddings + Self::OFFSET, c.hidden_size), "weight")? })
    }

    /// Embeddings of the positions `past..` of each row of `mask`: (batch, new, hidden).
    fn forward(&self, mask: &[Vec<u8>], past: usize) -> Result<Tensor> {
        let rows = self.weight.dim(0)?;
        let mut ids = Vec::new();
        for row in mask {
            let mut count: i64 = 0;
            for (j, &m) in row.iter().enumerate() {
                count += m as i64;
                if j >= past {
                    let pos = (count * m as i64 - 1 + Self::OFFSET as i64) as usize;
                    if pos >= rows {
                        candle_core::bail!(
                            "position {} exceeds max_position_embeddings {}",
                            pos - Self::OFFSET,
                            rows - Self::OFFSET
                        );
                    }
                    ids.push(pos as u32);
                }
            }
        }
        let (b, n) = (mask.len(), mask[0].len() - past);
        let ids = Tensor::from_vec(ids, b * n, self.weight.device())?;
        self.weight.index_select(&ids, 0)?.reshape((b, n, ()))
    }
}

/// `OPTAttention`: causal self-attention, the query scaled before the product.
#[derive(Debug, Clone)]
struct Attention {
    qkv: Linear,
    out_proj: Linear,
    heads: usize,
    head_dim: usize,
    scaling: f64,
}

impl Attention {
    fn new(c: &OptConfig, vb: VarBuilder, quant: Option<GgmlDType>) -> Result<Self> {
        let h = c.hidden_size;
        let lin = |n: &str| Linear::new(h, h, c.enable_bias, vb.pp(n));
        let head_dim = h / c.num_attention_heads;
        Ok(Self {
            qkv: maybe_quantize(Linear::fused(vec![lin("q_proj")?, lin("k_proj")?, lin("v_proj")?])?, quant)?,
            out_proj: maybe_quantize(lin("out_proj")?, quant)?,
            heads: c.num_attention_heads,
            head_dim,
            scaling: (head_dim as f64).powf(-0.5),
        })
    }

    fn forward(&self, xs: &Tensor, mask: Option<&Tensor>, cache: &mut Option<(Tensor, Tensor)>) -> Result<Tensor> {
        let (b, s, hidden) = xs.dims3()?;
        let qkv = self.qkv.forward(xs)?.reshape((b, s, 3, self.heads, self.head_dim))?.permute((2, 0, 3, 1, 4))?;
        let q = (qkv.get(0)?.contiguous()? * self.scaling)?;
        let mut k = qkv.get(1)?.contiguous()?;
        let mut v = qkv.get(2)?.contiguous()?;
        if let Some((pk, pv)) = cache.as_ref() {
            k = Tensor::cat(&[pk, &k], 2)?;
            v = Tensor::cat(&[pv, &v], 2)?;
        }
        *cache = Some((k.clone(), v.clone()));
        let o = attention(&q, &k, &v, mask)?.transpose(1, 2)?.reshape((b, s, hidden))?;
        self.out_proj.forward(&o)
    }
}

/// A LayerNorm's weight, bias and epsilon as f32 values.
type NormF32 = (Vec<f32>, Vec<f32>, f32);

/// `OPTDecoderLayer`: attention and a ReLU feed-forward, each with a residual, the
/// LayerNorms before (`do_layer_norm_before`, all BLIP-2 OPTs) or after them.
#[derive(Debug, Clone)]
struct DecoderLayer {
    self_attn: Attention,
    self_attn_layer_norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    final_layer_norm: LayerNorm,
    act: Activation,
    do_layer_norm_before: bool,
    /// The LayerNorms as f32 values for the CPU path (on a CPU only).
    ln_f32: Option<Box<[NormF32; 2]>>,
    heads: usize,
}

impl DecoderLayer {
    fn new(c: &OptConfig, vb: VarBuilder, quant: Option<GgmlDType>) -> Result<Self> {
        let h = c.hidden_size;
        let self_attn_layer_norm = layer_norm(c, vb.pp("self_attn_layer_norm"))?;
        let final_layer_norm = layer_norm(c, vb.pp("final_layer_norm"))?;
        let ln_f32 = if crate::nn::cpu_kernels(vb.device()) {
            Some(Box::new([self_attn_layer_norm.to_f32()?, final_layer_norm.to_f32()?]))
        } else {
            None
        };
        Ok(Self {
            self_attn: Attention::new(c, vb.pp("self_attn"), quant)?,
            self_attn_layer_norm,
            fc1: maybe_quantize(Linear::new(h, c.ffn_dim, c.enable_bias, vb.pp("fc1"))?, quant)?,
            fc2: maybe_quantize(Linear::new(c.ffn_dim, h, c.enable_bias, vb.pp("fc2"))?, quant)?,
            final_layer_norm,
            act: c.activation_function,
            do_layer_norm_before: c.do_layer_norm_before,
            ln_f32,
            heads: c.num_attention_heads,
        })
    }

    /// The layer's parts for the CPU path (None off the CPU).
    fn native(&self) -> Option<LayerRef<'_>> {
        let ln = self.ln_f32.as_ref()?;
        Some(LayerRef {
            qkv: &self.self_attn.qkv,
            out_proj: &self.self_attn.out_proj,
            fc1: &self.fc1,
            fc2: &self.fc2,
            ln1: &ln[0],
            ln2: &ln[1],
            act: self.act.into(),
            pre_norm: self.do_layer_norm_before,
            heads: self.heads,
            scaling: self.self_attn.scaling as f32,
        })
    }

    fn forward(&self, xs: &Tensor, mask: Option<&Tensor>, cache: &mut Option<(Tensor, Tensor)>) -> Result<Tensor> {
        let pre = self.do_layer_norm_before;
        let h = if pre { self.self_attn_layer_norm.forward(xs)? } else { xs.clone() };
        let h = (self.self_attn.forward(&h, mask, cache)? + xs)?;
        let h = if pre { h } else { self.self_attn_layer_norm.forward(&h)? };
        let f = if pre { self.final_layer_norm.forward(&h)? } else { h.clone() };
        let h = (self.fc2.forward(&self.act.forward(&self.fc1.forward(&f)?)?)? + h)?;
        if pre {
            Ok(h)
        } else {
            self.final_layer_norm.forward(&h)
        }
    }
}

/// Quantizes a layer right after loading, so that only one layer's dense weights are in
/// memory at a time; or, unquantized on a CPU, packs it for magpie's kernels (decoding a
/// token reads every weight once: the packed half-precision GEMM reads them at the
/// memory's rate, candle's matmul at about half of it).
fn maybe_quantize(l: Linear, quant: Option<GgmlDType>) -> Result<Linear> {
    match quant {
        // (Layers too narrow for the format's blocks stay dense: packed then.)
        Some(q) => l.quantized(q)?.packed_for_cpu(),
        None => l.packed_for_cpu(),
    }
}

fn layer_norm(c: &OptConfig, vb: VarBuilder) -> Result<LayerNorm> {
    if c.layer_norm_elementwise_affine {
        LayerNorm::new(c.hidden_size, OptConfig::LAYER_NORM_EPS, vb)
    } else {
        LayerNorm::plain(c.hidden_size, OptConfig::LAYER_NORM_EPS, vb.device())
    }
}

/// `OPTForCausalLM`: `OPTDecoder` (token embeddings in, optional `project_in`, learned
/// positions, layers, final LayerNorm, optional `project_out`) and the LM head, tied to
/// the token embeddings unless the config unties them.
#[derive(Debug, Clone)]
pub struct OptForCausalLM {
    embed_tokens: Tensor,
    embed_positions: LearnedPositionalEmbedding,
    project_in: Option<Linear>,
    project_out: Option<Linear>,
    layers: Vec<DecoderLayer>,
    final_layer_norm: Option<LayerNorm>,
    /// `lm_head.weight` when untied; the head is `embed_tokens` otherwise.
    lm_head: Option<Tensor>,
    /// The head as a linear layer: quantized when the decoder is, or packed for the CPU
    /// kernels (a copy of the tied embeddings: the head is the largest single read of a
    /// decoding step).
    head: Option<Linear>,
    quantized: bool,
    vocab_size: usize,
    /// Whether the layers run on the CPU path ([`super::opt_native`]): on a CPU, unless
    /// loaded for candle's ops only.
    native: bool,
}

impl OptForCausalLM {
    /// With `quant`, every linear layer of the decoder and the LM head are quantized to
    /// that ggml format as they load (their activations are then computed in f32, so `vb`
    /// should be f32 too); the embeddings and LayerNorms stay in `vb`'s dtype.
    pub fn new(c: &OptConfig, vb: VarBuilder, quant: Option<GgmlDType>) -> Result<Self> {
        let d = vb.pp("model").pp("decoder");
        let (h, e) = (c.hidden_size, c.word_embed_proj_dim());
        let (project_in, project_out) = if e != h {
            (
                Some(maybe_quantize(Linear::new(e, h, false, d.pp("project_in"))?, quant)?),
                Some(maybe_quantize(Linear::new(h, e, false, d.pp("project_out"))?, quant)?),
            )
        } else {
            (None, None)
        };
        let final_layer_norm = if c.do_layer_norm_before && !c.remove_final_layer_norm {
            Some(layer_norm(c, d.pp("final_layer_norm"))?)
        } else {
            None
        };
        let embed_tokens = d.pp("embed_tokens").get((c.vocab_size, e), "weight")?;
        let head = vb.pp("lm_head");
        let lm_head = if !c.tie_word_embeddings {
            Some(head.get((c.vocab_size, e), "weight")?)
        } else {
            // transformers ties the head to the embeddings after loading, whatever a saved
            // `lm_head.weight` holds; read it so that strict loading counts it as used.
            if head.contains_tensor("weight") {
                head.get((c.vocab_size, e), "weight")?;
            }
            None
        };
        let quantized_head = match quant {
            // As llama.cpp's `_M` mixes do, the head keeps 6 bits when the layers get 4 or 5:
            // its errors go straight into the logits.
            Some(q) => {
                let q = if matches!(q, GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q4_0 | GgmlDType::Q4_1) { GgmlDType::Q6K } else { q };
                Some(Linear::from_weight_quantized(lm_head.as_ref().unwrap_or(&embed_tokens), None, q)?)
            }
            None => None,
        };
        let head = match quantized_head {
            Some(q) => Some(q),
            None if crate::nn::cpu_kernels(embed_tokens.device()) => {
                Some(Linear::from_weight(lm_head.as_ref().unwrap_or(&embed_tokens), None)?.packed_for_cpu()?)
            }
            None => None,
        };
        let lm_head = if head.is_some() { None } else { lm_head };
        let lv = d.pp("layers");
        Ok(Self {
            embed_tokens,
            embed_positions: LearnedPositionalEmbedding::new(c, d.pp("embed_positions"))?,
            project_in,
            project_out,
            layers: (0..c.num_hidden_layers).map(|i| DecoderLayer::new(c, lv.pp(i), quant)).collect::<Result<_>>()?,
            final_layer_norm,
            lm_head,
            head,
            quantized: quant.is_some(),
            native: crate::nn::cpu_kernels(vb.device()),
            vocab_size: c.vocab_size,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn dtype(&self) -> DType {
        self.embed_tokens.dtype()
    }

    /// `embed_tokens(ids)`: (len, word_embed_proj_dim).
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= self.vocab_size) {
            candle_core::bail!("token id {bad} is outside the vocabulary of {}", self.vocab_size);
        }
        let ids = Tensor::from_vec(ids.to_vec(), ids.len(), self.embed_tokens.device())?;
        self.embed_tokens.index_select(&ids, 0)
    }

    /// Runs `inputs_embeds` (batch, new, word_embed_proj_dim) after the cached positions.
    /// `mask` is each row's attention mask over cached + new positions (1 = attend, 0 =
    /// padding). Returns the logits (batch, new, vocab), or only the last position's
    /// (batch, 1, vocab) with `last_only`.
    pub fn forward(
        &self,
        inputs_embeds: &Tensor,
        mask: &[Vec<u8>],
        cache: &mut KvCache,
        last_only: bool,
    ) -> Result<Tensor> {
        let (b, s, _) = inputs_embeds.dims3()?;
        let past = cache.seq_len();
        if mask.len() != b || mask.iter().any(|m| m.len() != past + s) {
            candle_core::bail!("attention mask must be {b} rows of {} (cached {past} + new {s})", past + s);
        }
        if cache.batch() != 0 && cache.batch() != b {
            candle_core::bail!("cache holds {} rows, the input {b}", cache.batch());
        }
        cache.layers.resize(self.layers.len(), LayerKv::Empty);
        let pos_embeds = self.embed_positions.forward(mask, past)?;
        let xs = match &self.project_in {
            Some(p) => p.forward(inputs_embeds)?,
            None => inputs_embeds.clone(),
        };
        let pos_embeds = pos_embeds.to_dtype(xs.dtype())?;
        let mut xs = (xs + pos_embeds)?;
        if self.native {
            let isa = crate::cpu::Isa::detect();
            let dtype = xs.dtype();
            let mut x: Vec<f32> = xs.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            for (layer, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
                let Some(native) = layer.native() else { candle_core::bail!("OPT's CPU path needs the model on the CPU") };
                if let LayerKv::Empty = kv {
                    *kv = LayerKv::Native(NativeKv::default());
                }
                let LayerKv::Native(kv) = kv else { candle_core::bail!("this cache was filled by the other OPT path") };
                native.forward(isa, &mut x, b, s, mask, kv)?;
            }
            xs = Tensor::from_vec(x, xs.dims(), xs.device())?.to_dtype(dtype)?;
        } else {
            let attn_mask = causal_mask(mask, past, s, xs.device())?;
            for (layer, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
                let mut tensors = match std::mem::take(kv) {
                    LayerKv::Tensors(k, v) => Some((k, v)),
                    LayerKv::Empty => None,
                    LayerKv::Native(_) => candle_core::bail!("this cache was filled by the other OPT path"),
                };
                xs = layer.forward(&xs, attn_mask.as_ref(), &mut tensors)?;
                *kv = tensors.map_or(LayerKv::Empty, |(k, v)| LayerKv::Tensors(k, v));
            }
        }
        cache.mask = mask.to_vec();
        if last_only {
            xs = xs.narrow(1, s - 1, 1)?;
        }
        if let Some(ln) = &self.final_layer_norm {
            xs = ln.forward(&xs)?;
        }
        if let Some(p) = &self.project_out {
            xs = p.forward(&xs)?;
        }
        self.lm_head(&xs)
    }

    /// Whether the decoder's linear layers are quantized.
    pub fn is_quantized(&self) -> bool {
        self.quantized
    }

    fn lm_head(&self, xs: &Tensor) -> Result<Tensor> {
        if let Some(head) = &self.head {
            return if self.quantized { head.forward(&xs.to_dtype(DType::F32)?) } else { head.forward(xs) };
        }
        let (b, s, e) = xs.dims3()?;
        let w = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        // The transposed view is read in place: no copy of a (vocab × width) matrix.
        xs.reshape((b * s, e))?.matmul(&w.t()?)?.reshape((b, s, self.vocab_size))
    }
}

/// The additive mask (batch, 1, new, cached + new) in f32: a query at absolute position
/// `past + i` sees keys `j <= past + i` whose mask is 1. `None` when nothing is masked.
fn causal_mask(mask: &[Vec<u8>], past: usize, s: usize, device: &Device) -> Result<Option<Tensor>> {
    let total = past + s;
    let padded = mask.iter().any(|m| m.contains(&0));
    if s == 1 && !padded {
        return Ok(None);
    }
    // A large finite value rather than -inf, so that a fully masked row (a padding query)
    // gives a harmless uniform softmax instead of NaN.
    const MASKED: f32 = -1e30;
    let mut m = Vec::with_capacity(mask.len() * s * total);
    for row in mask {
        for i in 0..s {
            m.extend((0..total).map(|j| if j <= past + i && row[j] == 1 { 0.0 } else { MASKED }));
        }
    }
    Ok(Some(Tensor::from_vec(m, (mask.len(), 1, s, total), device)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Shape;
    use candle_nn::var_builder::SimpleBackend;

    /// Weights made up from each tensor's name (the same in every build): linear weights
    /// of scale 1/√in, LayerNorm weights around 1, small biases.
    struct Made;

    impl SimpleBackend for Made {
        fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> Result<Tensor> {
            let mut h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3));
            let mut next = || {
                h ^= h << 13;
                h ^= h >> 7;
                h ^= h << 17;
                (h >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
            };
            let fan_in = *s.dims().last().unwrap_or(&1) as f32;
            let norm = name.contains("layer_norm");
            let v: Vec<f32> = (0..s.elem_count())
                .map(|_| match (norm, name.ends_with("bias")) {
                    (true, false) => 1.0 + 0.3 * next(),
                    (_, true) => 0.2 * next(),
                    _ => 2.0 * next() / fan_in.sqrt(),
                })
                .collect();
            Tensor::from_vec(v, s, dev)?.to_dtype(dtype)
        }
        fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
            candle_core::bail!("{name}: no shape")
        }
        fn contains_tensor(&self, _: &str) -> bool {
            false
        }
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
        let a: Vec<f32> = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
        a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
    }

    /// magpie's CPU layers and candle's ops give the same logits for every layout OPT
    /// configs allow (pre- or post-LayerNorm, with or without biases and affine
    /// LayerNorms, projections in and out, untied head, each activation), through a
    /// left-padded prompt, cached steps and a beam reorder.
    #[test]
    fn cpu_layers_match_candle_in_every_layout() {
        let variants = [
            (true, true, true, None, Activation::Relu, true, false),
            (false, false, false, Some(16), Activation::Gelu, false, false),
            (true, true, true, Some(24), Activation::GeluTanh, true, true),
            (true, false, true, None, Activation::QuickGelu, false, false),
        ];
        for (pre, bias, affine, proj, act, tie, remove_final) in variants {
            let c = OptConfig {
                vocab_size: 61,
                hidden_size: 32,
                num_hidden_layers: 2,
                ffn_dim: 72,
                max_position_embeddings: 40,
                do_layer_norm_before: pre,
                remove_final_layer_norm: remove_final,
                word_embed_proj_dim: proj,
                num_attention_heads: 4,
                activation_function: act,
                enable_bias: bias,
                layer_norm_elementwise_affine: affine,
                tie_word_embeddings: tie,
                ..Default::default()
            };
            let what = format!("pre {pre} bias {bias} affine {affine} proj {proj:?} {act:?} tie {tie}");
            let build = |candle_only: bool| {
                let _scope = crate::nn::CandleOnlyScope::enter(candle_only);
                OptForCausalLM::new(&c, VarBuilder::from_backend(Box::new(Made), DType::F32, Device::Cpu), None).unwrap()
            };
            let (native, candle) = (build(false), build(true));
            assert!(native.native && !candle.native, "{what}");
            let prompt = |m: &OptForCausalLM| {
                let rows = [m.embed(&[5, 9, 13, 2, 40]).unwrap(), m.embed(&[1, 1, 7, 30, 3]).unwrap()];
                Tensor::stack(&rows, 0).unwrap()
            };
            let mut mask = vec![vec![1u8; 5], vec![0, 0, 1, 1, 1]];
            let (mut kn, mut kc) = (KvCache::new(), KvCache::new());
            let (a, b) = (
                native.forward(&prompt(&native), &mask, &mut kn, false).unwrap(),
                candle.forward(&prompt(&candle), &mask, &mut kc, false).unwrap(),
            );
            // The padded row's first two positions see nothing: both average every value.
            let e = max_rel(&a, &b);
            assert!(e < 1e-4, "{what}: prompt logits differ by {e}");
            for (step, tokens) in [[11u32, 12], [20, 21], [33, 34]].iter().enumerate() {
                if step == 1 {
                    for cache in [&mut kn, &mut kc] {
                        cache.reorder(&[1, 0, 1]).unwrap();
                    }
                    mask = vec![mask[1].clone(), mask[0].clone(), mask[1].clone()];
                }
                let rows = mask.len();
                mask.iter_mut().for_each(|m| m.push(1));
                let ids: Vec<u32> = (0..rows).map(|r| tokens[r % 2]).collect();
                let step_in = |m: &OptForCausalLM| m.embed(&ids).unwrap().reshape((rows, 1, ())).unwrap();
                let (a, b) = (
                    native.forward(&step_in(&native), &mask, &mut kn, true).unwrap(),
                    candle.forward(&step_in(&candle), &mask, &mut kc, true).unwrap(),
                );
                assert_eq!(a.dims(), &[rows, 1, 61]);
                let e = max_rel(&a, &b);
                assert!(e < 1e-4, "{what}: step {step} logits differ by {e}");
            }
            assert_eq!(kn.seq_len(), 8);
        }
    }
}
