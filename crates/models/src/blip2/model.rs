//! BLIP-2 with an OPT decoder: "BLIP-2: Bootstrapping Language-Image Pre-training with
//! Frozen Image Encoders and Large Language Models" (Li et al., 2023). Mirrors
//! `Blip2ForConditionalGeneration` in transformers' `models/blip_2/modeling_blip_2.py`:
//! image → vision encoder → Q-Former over learned queries → `language_projection` → the
//! projected queries replace the `<image>` placeholder embeddings of the prompt → OPT.

use super::config::Blip2Config;
use super::opt::{KvCache, OptForCausalLM};
use super::qformer::QFormerModel;
use super::vision::VisionModel;
use crate::nn::Linear;
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

#[derive(Debug, Clone)]
pub struct Blip2ForConditionalGeneration {
    pub vision_model: VisionModel,
    /// (1, num_query_tokens, qformer hidden), f32.
    query_tokens: Tensor,
    pub qformer: QFormerModel,
    language_projection: Linear,
    pub language_model: OptForCausalLM,
    image_token_index: u32,
    num_query_tokens: usize,
    vision_dtype: DType,
    language_dtype: DType,
}

impl Blip2ForConditionalGeneration {
    /// `vb` in the model's dtype; `vb_f32` over the same weights in f32, for the query tokens
    /// and the Q-Former, which transformers keeps in f32 (`_keep_in_fp32_modules`).
    pub fn new(c: &Blip2Config, image_token_index: u32, vb: VarBuilder, vb_f32: VarBuilder) -> Result<Self> {
        Self::new_mixed(c, image_token_index, vb.clone(), vb, vb_f32, None)
    }

    /// The vision encoder from `vb_vision` (on a CPU its linear layers on int8 kernels
    /// when `quant` is given), the projection and language model from `vb_language`
    /// (quantized to `quant` if given; then `vb_language` should be f32),
    /// the queries and Q-Former from `vb_f32` — three views of the same weights.
    pub fn new_mixed(
        c: &Blip2Config,
        image_token_index: u32,
        vb_vision: VarBuilder,
        vb_language: VarBuilder,
        vb_f32: VarBuilder,
        quant: Option<GgmlDType>,
    ) -> Result<Self> {
        let q = &c.qformer_config;
        let vb = vb_language;
        Ok(Self {
            vision_model: VisionModel::new(&c.vision_config, vb_vision.pp("vision_model"), quant.is_some())?,
            query_tokens: vb_f32.get((1, c.num_query_tokens, q.hidden_size), "query_tokens")?,
            qformer: QFormerModel::new(q, vb_f32.pp("qformer"))?,
            language_projection: Linear::new(
                q.hidden_size,
                c.text_config.hidden_size,
                true,
                vb.pp("language_projection"),
            )?
            .packed_for_cpu()?,
            language_model: OptForCausalLM::new(&c.text_config, vb.pp("language_model"), quant)?,
            image_token_index,
            num_query_tokens: c.num_query_tokens,
            vision_dtype: vb_vision.dtype(),
            language_dtype: vb.dtype(),
        })
    }

    /// The language model's dtype (its activations when quantized).
    pub fn dtype(&self) -> DType {
        self.language_dtype
    }

    pub fn vision_dtype(&self) -> DType {
        self.vision_dtype
    }

    pub fn image_token_index(&self) -> u32 {
        self.image_token_index
    }

    pub fn num_query_tokens(&self) -> usize {
        self.num_query_tokens
    }

    /// The vision encoder's `last_hidden_state` (batch, 1 + patches, hidden) in the vision dtype.
    pub fn vision_forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.vision_model.forward(&pixel_values.to_dtype(self.vision_dtype)?)
    }

    /// The Q-Former's `last_hidden_state` (batch, queries, hidden) in f32.
    pub fn qformer_forward(&self, image_embeds: &Tensor) -> Result<Tensor> {
        let b = image_embeds.dim(0)?;
        let queries = self.query_tokens.repeat((b, 1, 1))?;
        self.qformer.forward(&queries, &image_embeds.to_dtype(DType::F32)?)
    }

    /// `language_projection` of the query outputs, in the model dtype: the inputs the
    /// language model sees in place of the image tokens.
    pub fn project(&self, query_output: &Tensor) -> Result<Tensor> {
        self.language_projection.forward(&query_output.to_dtype(self.language_dtype)?)
    }

    /// Image features for the language model (batch, queries, text hidden).
    pub fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        crate::cpu::on_pool_if(self.query_tokens.device().is_cpu(), || self.project(&self.qformer_forward(&self.vision_forward(pixel_values)?)?))
    }

    /// `inputs_embeds` (1, len, width) for one prompt: token embeddings, with the positions
    /// holding `image_token_index` replaced, in order, by the rows of `image_features`
    /// (queries, width) — `masked_scatter` in transformers.
    pub fn input_embeds(&self, ids: &[u32], image_features: &Tensor) -> Result<Tensor> {
        let n_image = ids.iter().filter(|&&t| t == self.image_token_index).count();
        let n_features = image_features.dim(0)?;
        if n_image != n_features {
            candle_core::bail!("the prompt holds {n_image} image tokens, the image gives {n_features} query outputs");
        }
        let mut parts = Vec::new();
        let (mut start, mut used) = (0, 0);
        while start < ids.len() {
            let is_image = ids[start] == self.image_token_index;
            let end = ids[start..]
                .iter()
                .position(|&t| (t == self.image_token_index) != is_image)
                .map_or(ids.len(), |n| start + n);
            if is_image {
                parts.push(image_features.narrow(0, used, end - start)?);
                used += end - start;
            } else {
                parts.push(self.language_model.embed(&ids[start..end])?);
            }
            start = end;
        }
        Tensor::cat(&parts, 0)?.to_dtype(self.language_dtype)?.unsqueeze(0)
    }

    /// Runs the prompt (`input_ids` with the image tokens, and the image features of one
    /// image) into a fresh cache; returns the logits (1, len, vocab), or the last
    /// position's (1, 1, vocab) with `last_only`.
    pub fn prefill(
        &self,
        ids: &[u32],
        image_features: &Tensor,
        cache: &mut KvCache,
        last_only: bool,
    ) -> Result<Tensor> {
        crate::cpu::on_pool_if(self.query_tokens.device().is_cpu(), || {
            let embeds = self.input_embeds(ids, image_features)?;
            self.language_model.forward(&embeds, &[vec![1; ids.len()]], cache, last_only)
        })
    }

    /// [`prefill`](Self::prefill) for a batch of images that share one prompt:
    /// `image_features` is (batch, queries, width); returns each row's last logits
    /// (batch, 1, vocab).
    pub fn prefill_batch(&self, ids: &[u32], image_features: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        crate::cpu::on_pool_if(self.query_tokens.device().is_cpu(), || {
            let b = image_features.dim(0)?;
            let embeds = (0..b).map(|i| self.input_embeds(ids, &image_features.get(i)?)).collect::<Result<Vec<_>>>()?;
            self.language_model.forward(&Tensor::cat(&embeds, 0)?, &vec![vec![1; ids.len()]; b], cache, true)
        })
    }

    /// Appends one token to each cached row; returns each row's next-token logits (rows, vocab).
    pub fn decode_step(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        if cache.batch() != tokens.len() {
            candle_core::bail!("{} tokens for a cache of {} rows", tokens.len(), cache.batch());
        }
        crate::cpu::on_pool_if(self.query_tokens.device().is_cpu(), || {
            let embeds = self.language_model.embed(tokens)?.unsqueeze(1)?;
            let mask: Vec<Vec<u8>> = cache.mask().iter().map(|m| m.iter().copied().chain([1]).collect()).collect();
            self.language_model.forward(&embeds, &mask, cache, true)?.squeeze(1)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Shape};
    use candle_nn::var_builder::SimpleBackend;

    /// Deterministic pseudo-random weights for any name: N(0, 0.3²)-ish, LayerNorm weights
    /// around 1.
    struct RandomWeights;

    impl SimpleBackend for RandomWeights {
        fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> Result<Tensor> {
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for b in name.bytes() {
                h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
            }
            let norm = name.to_lowercase().contains("norm") && name.ends_with("weight");
            let v: Vec<f32> = (0..s.elem_count())
                .map(|_| {
                    h ^= h << 13;
                    h ^= h >> 7;
                    h ^= h << 17;
                    let u = (h >> 11) as f32 / (1u64 << 53) as f32 - 0.5;
                    if norm {
                        1.0 + 0.2 * u
                    } else {
                        0.6 * u
                    }
                })
                .collect();
            Tensor::from_vec(v, s, dev)?.to_dtype(dtype)
        }

        fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
            candle_core::bail!("no shape for {name}")
        }

        fn contains_tensor(&self, _: &str) -> bool {
            false
        }
    }

    fn tiny() -> (Blip2Config, Blip2ForConditionalGeneration) {
        let cfg: Blip2Config = serde_json::from_value(serde_json::json!({
            "num_query_tokens": 3,
            "vision_config": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 12, "patch_size": 4},
            "qformer_config": {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 3, "num_attention_heads": 2},
            "text_config": {"vocab_size": 50, "hidden_size": 12, "ffn_dim": 24, "num_hidden_layers": 2, "num_attention_heads": 3, "max_position_embeddings": 40}
        }))
        .unwrap();
        let cfg = cfg.finish().unwrap();
        let vb = || candle_nn::VarBuilder::from_backend(Box::new(RandomWeights), DType::F32, Device::Cpu);
        let m = Blip2ForConditionalGeneration::new(&cfg, 49, vb(), vb()).unwrap();
        (cfg, m)
    }

    fn pixels() -> Tensor {
        let v: Vec<f32> = (0..3 * 12 * 12).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
        Tensor::from_vec(v, (1, 3, 12, 12), &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn shapes_follow_the_config() {
        let (_, m) = tiny();
        let v = m.vision_forward(&pixels()).unwrap();
        assert_eq!(v.dims(), &[1, 10, 16]);
        let q = m.qformer_forward(&v).unwrap();
        assert_eq!(q.dims(), &[1, 3, 8]);
        let p = m.project(&q).unwrap();
        assert_eq!(p.dims(), &[1, 3, 12]);
        let feats = m.image_features(&pixels()).unwrap().squeeze(0).unwrap();
        let mut cache = KvCache::new();
        let logits = m.prefill(&[49, 49, 49, 2, 7], &feats, &mut cache, false).unwrap();
        assert_eq!(logits.dims(), &[1, 5, 50]);
        assert_eq!(cache.seq_len(), 5);
        assert!(m.input_embeds(&[49, 2], &feats).is_err(), "one placeholder for three queries");
    }

    #[test]
    fn placeholders_take_the_queries_in_order() {
        let (_, m) = tiny();
        let feats = Tensor::arange(0f32, 36.0, &Device::Cpu).unwrap().reshape((3, 12)).unwrap();
        let e = m.input_embeds(&[5, 49, 49, 6, 49], &feats).unwrap().squeeze(0).unwrap();
        assert_eq!(max_diff(&e.get(1).unwrap(), &feats.get(0).unwrap()), 0.0);
        assert_eq!(max_diff(&e.get(2).unwrap(), &feats.get(1).unwrap()), 0.0);
        assert_eq!(max_diff(&e.get(4).unwrap(), &feats.get(2).unwrap()), 0.0);
        let six = m.language_model.embed(&[6]).unwrap().squeeze(0).unwrap();
        assert_eq!(max_diff(&e.get(3).unwrap(), &six), 0.0);
    }

    #[test]
    fn kv_cache_equals_recomputation() {
        let (_, m) = tiny();
        let feats = m.image_features(&pixels()).unwrap().squeeze(0).unwrap();
        let prompt = [49, 49, 49, 2, 7, 11];
        let extra = [3u32, 17, 17, 40];
        let full_ids: Vec<u32> = prompt.iter().chain(&extra).copied().collect();
        let full = m.prefill(&full_ids, &feats, &mut KvCache::new(), false).unwrap().squeeze(0).unwrap();
        let mut cache = KvCache::new();
        let mut rows = vec![m.prefill(&prompt, &feats, &mut cache, true).unwrap().squeeze(0).unwrap()];
        for t in extra {
            rows.push(m.decode_step(&[t], &mut cache).unwrap());
        }
        let stepped = Tensor::cat(&rows, 0).unwrap();
        let want = full.narrow(0, prompt.len() - 1, extra.len() + 1).unwrap();
        assert!(max_diff(&stepped, &want) < 1e-4, "{}", max_diff(&stepped, &want));

        // Beam rows: expand, feed different tokens, reorder; each row as if alone.
        let mut cache = KvCache::new();
        m.prefill(&prompt, &feats, &mut cache, true).unwrap();
        cache.reorder(&[0, 0]).unwrap();
        m.decode_step(&[3, 17], &mut cache).unwrap();
        cache.reorder(&[1, 1]).unwrap(); // both rows now hold prompt + 17
        let two = m.decode_step(&[40, 5], &mut cache).unwrap();
        let mut alone = KvCache::new();
        m.prefill(&prompt, &feats, &mut alone, true).unwrap();
        m.decode_step(&[17], &mut alone).unwrap();
        let mut alone2 = alone.clone();
        let a = m.decode_step(&[40], &mut alone).unwrap();
        let b = m.decode_step(&[5], &mut alone2).unwrap();
        assert!(max_diff(&two.get(0).unwrap(), &a.squeeze(0).unwrap()) < 1e-5);
        assert!(max_diff(&two.get(1).unwrap(), &b.squeeze(0).unwrap()) < 1e-5);
    }

    #[test]
    fn left_padding_changes_nothing() {
        // OPT counts positions over attended tokens only, so a left-padded row gives the
        // logits of the unpadded one. An OPT-350m-like decoder: embeddings 10 wide through
        // project_in / project_out, LayerNorm after each block.
        let (cfg, _) = tiny();
        let mut c = cfg.text_config.clone();
        c.word_embed_proj_dim = Some(10);
        c.do_layer_norm_before = false;
        let lm = &OptForCausalLM::new(
            &c,
            candle_nn::VarBuilder::from_backend(Box::new(RandomWeights), DType::F32, Device::Cpu),
            None,
        )
        .unwrap();
        let step = |t: u32, cache: &mut KvCache| {
            let mask: Vec<Vec<u8>> = cache.mask().iter().map(|m| m.iter().copied().chain([1]).collect()).collect();
            lm.forward(&lm.embed(&[t]).unwrap().unsqueeze(0).unwrap(), &mask, cache, true).unwrap()
        };
        let ids = [2u32, 9, 13, 21];
        let plain = lm
            .forward(&lm.embed(&ids).unwrap().unsqueeze(0).unwrap(), &[vec![1; 4]], &mut KvCache::new(), true)
            .unwrap();
        let padded_ids = [1u32, 1, 2, 9, 13, 21];
        let mut cache = KvCache::new();
        let padded = lm
            .forward(&lm.embed(&padded_ids).unwrap().unsqueeze(0).unwrap(), &[vec![0, 0, 1, 1, 1, 1]], &mut cache, true)
            .unwrap();
        assert!(max_diff(&plain, &padded) < 1e-5, "{}", max_diff(&plain, &padded));
        // And so do the next steps, through the cache.
        let next_plain = {
            let mut c = KvCache::new();
            lm.forward(&lm.embed(&ids).unwrap().unsqueeze(0).unwrap(), &[vec![1; 4]], &mut c, true).unwrap();
            step(30, &mut c)
        };
        let next_padded = step(30, &mut cache);
        assert_eq!(cache.mask()[0], vec![0, 0, 1, 1, 1, 1, 1]);
        assert!(max_diff(&next_plain, &next_padded) < 1e-5);
    }
}
