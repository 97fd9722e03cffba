//! CLIP for magpie: loading a Hugging Face checkpoint directory, tokenising, and the
//! [`ImageEmbedder`]/[`TextEmbedder`] implementations the engine uses.

pub mod config;
pub mod model;
mod ops;

pub use config::ClipConfig;
pub use model::ClipModel;


use crate::loader::{self, parse_json, read_json, CheckedWeights, ModelDir};
use crate::preprocess::ProcessorConfig;
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use magpie_core::{ImageEmbedder, ModelInfo, Pixels, TextEmbedder};
use std::path::Path;
use tokenizers::Tokenizer;

/// Files a CLIP checkpoint directory must have.
pub const REQUIRED_FILES: [&str; 4] = ["config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"];

/// A loaded CLIP checkpoint: model, tokenizer and image processor.
pub struct Clip {
    info: ModelInfo,
    model: ClipModel,
    config: ClipConfig,
    tokenizer: Tokenizer,
    processor: ProcessorConfig,
    device: candle_core::Device,
    bf16: bool,
    /// Of the weights: f32 on a CPU, f16 on a GPU.
    dtype: DType,
}

/// How CLIP's transformer layers compute on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClipPrecision {
    /// BF16 where the CPU has BF16 dot products (AVX-512 BF16 or AMX) and they measure
    /// faster than f32 here, else f32.
    #[default]
    Auto,
    /// f32 throughout: the reference.
    F32,
    /// The linear layers on the BF16 dot-product kernel (activations and weights rounded
    /// to bf16, f32 accumulation), except the image tower's QKV projection, whose errors
    /// the attention would sharpen: f32, or on AMX tiles three bf16 terms as exact as f32
    /// ([`crate::cpu::encoder::Precision::Bf16`]), and the image tower's patch embedding on
    /// BF16 too; the other embeddings, LayerNorms, attention and the projections stay f32.
    /// Falls back to f32 where the CPU lacks the instructions.
    Bf16,
}

impl ClipPrecision {
    /// What the transformer layers compute in on a CPU that has `isa`: `"bf16"` or `"f32"`.
    /// `Auto` takes BF16 where the CPU has BF16 dot products and they beat f32 by at least
    /// 10% in a short race at first use ([`crate::bf16_gemm::speedup_over_f32`]); `Bf16`
    /// takes them wherever the CPU has them.
    pub fn resolve(self, isa: crate::cpu::Isa) -> &'static str {
        let has_bf16 = isa.supported() >= crate::cpu::Isa::Avx512Bf16;
        let bf16 = match self {
            ClipPrecision::F32 => false,
            ClipPrecision::Bf16 => has_bf16,
            ClipPrecision::Auto => auto_takes_bf16(isa),
        };
        if bf16 {
            "bf16"
        } else {
            "f32"
        }
    }

    /// A line for `magpie status`: what CLIP would compute in on this CPU, on which kernels,
    /// and why.
    pub fn describe_cpu(self) -> String {
        let isa = crate::cpu::Isa::detect();
        let kernels = if isa >= crate::cpu::Isa::Amx { "AMX BF16 tiles" } else { "BF16 dot products" };
        let race = || {
            crate::bf16_gemm::speedup_over_f32(isa)
                .map(|s| format!("{kernels} measured {s:.2}× the f32 GEMM here"))
                .unwrap_or_default()
        };
        match (self, self.resolve(isa)) {
            (ClipPrecision::Auto, "bf16") => format!("bf16 on the CPU ({isa} kernels: {}, f32 attention; --precision f32 forces f32)", race()),
            (_, "bf16") => format!("bf16 on the CPU ({isa} kernels: {kernels}, f32 attention; asked for by --precision bf16)"),
            (ClipPrecision::F32, _) => format!("f32 on the CPU ({isa} kernels; asked for by --precision f32)"),
            (ClipPrecision::Auto, _) if isa >= crate::cpu::Isa::Avx512Bf16 && cfg!(debug_assertions) => {
                format!("f32 on the CPU ({isa} kernels; a debug build, whose race of unoptimised kernels auto does not trust; --precision bf16 forces BF16)")
            }
            (ClipPrecision::Auto, _) if isa >= crate::cpu::Isa::Avx512Bf16 => {
                format!("f32 on the CPU ({isa} kernels; {}, less than the {AUTO_BF16_SPEEDUP}× that auto wants; --precision bf16 forces BF16)", race())
            }
            _ if crate::cpu::Isa::hardware() >= crate::cpu::Isa::Avx512Bf16 => {
                format!("f32 on the CPU ({isa} kernels; MAGPIE_CPU_ISA keeps this CPU's BF16 dot products out)")
            }
            _ => format!("f32 on the CPU ({isa} kernels; this CPU has no AVX-512 BF16 dot products)"),
        }
    }
}

/// The speed-up over f32 at which `--precision auto` takes BF16.
pub const AUTO_BF16_SPEEDUP: f64 = 1.1;

/// Whether `--precision auto` takes BF16 on a CPU with `isa`: its kernels measured at
/// least [`AUTO_BF16_SPEEDUP`] × f32's speed in the race, in an optimised build. A debug
/// build keeps f32: its race times unoptimised kernels (0.85× on a Zen 5 whose release
/// build measures 2.05×), a verdict near the bar that load can tip, and two processes of
/// one library (the crash tests' indexers) then embedded in different precisions.
pub fn auto_takes_bf16(isa: crate::cpu::Isa) -> bool {
    !cfg!(debug_assertions) && crate::bf16_gemm::speedup_over_f32(isa).is_some_and(|s| s >= AUTO_BF16_SPEEDUP)
}

impl std::str::FromStr for ClipPrecision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "f32" | "fp32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            other => Err(format!("unknown precision `{other}` (auto, f32 or bf16)")),
        }
    }
}

impl Clip {
    /// Loads `model` (a local directory or a hub id) onto `device`, in f32.
    pub fn load(model: &str, device: magpie_core::Device) -> Result<Self> {
        Self::load_with(model, device, ClipPrecision::F32)
    }

    /// Loads `model` onto `device` in `precision`.
    pub fn load_with(model: &str, device: magpie_core::Device, precision: ClipPrecision) -> Result<Self> {
        let dir = loader::resolve(model, &REQUIRED_FILES, &[])?;
        Self::from_dir_with(&dir, device, precision)
    }

    pub fn from_dir(dir: &ModelDir, device: magpie_core::Device) -> Result<Self> {
        Self::from_dir_with(dir, device, ClipPrecision::F32)
    }

    /// Loads from a checkpoint directory onto `device`: on a CPU in f32 storage (computing
    /// as `precision` says), on a GPU in f16 (LayerNorms and softmax in f32).
    pub fn from_dir_with(dir: &ModelDir, device: magpie_core::Device, precision: ClipPrecision) -> Result<Self> {
        let device = crate::select_device(device)?;
        let dtype = if device.is_cpu() { DType::F32 } else { DType::F16 };
        Self::from_dir_dtype(dir, device, precision, dtype)
    }

    /// [`Clip::from_dir_with`] with the weights' dtype given: f16 on the CPU runs candle's
    /// ops in f16, as a GPU does (tests check that path here).
    #[doc(hidden)]
    pub fn from_dir_dtype(dir: &ModelDir, device: candle_core::Device, precision: ClipPrecision, dtype: DType) -> Result<Self> {
        let bf16 = device.is_cpu() && precision.resolve(crate::cpu::Isa::detect()) == "bf16";
        let config_path = dir.file("config.json");
        let config: ClipConfig = parse_json(&config_path, read_json(&config_path)?)?;
        config.validate().map_err(|message| Error::Config { path: config_path.clone(), message })?;
        let processor = ProcessorConfig::from_file(&dir.file("preprocessor_config.json"))?;
        let v = &config.vision_config;
        let (ph, pw) = processor.output_size(v.image_size as u32, v.image_size as u32);
        if (ph as usize, pw as usize) != (v.image_size, v.image_size) {
            return Err(Error::Config {
                path: dir.file("preprocessor_config.json"),
                message: format!("crop_size {ph}×{pw} does not match vision_config.image_size {}", v.image_size),
            });
        }
        let tokenizer = load_tokenizer(&dir.file("tokenizer.json"), config.text_config.max_position_embeddings)?;
        let weights = CheckedWeights::open(&dir.weight_files()?)?;
        let model = {
            let _scope = crate::nn::Bf16Scope::enter(bf16);
            ClipModel::new(&config, weights.var_builder(dtype, &device)).map_err(|e| weights.wrap(e))?
        };
        // Buffers that old checkpoints carry and the model does not need.
        weights.ensure_all_used(&|n| n.ends_with("position_ids"))?;
        let info = ModelInfo { id: loader::model_id(dir), dim: config.projection_dim };
        Ok(Self { info, model, config, tokenizer, processor, device, bf16, dtype })
    }

    /// `"bf16"` when the transformer layers run on the BF16 kernel, `"f16"` with f16
    /// weights (GPUs), else `"f32"`.
    pub fn precision(&self) -> &'static str {
        if self.dtype == DType::F16 {
            "f16"
        } else if self.bf16 {
            "bf16"
        } else {
            "f32"
        }
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// The network itself.
    pub fn clip_model(&self) -> &ClipModel {
        &self.model
    }

    pub fn config(&self) -> &ClipConfig {
        &self.config
    }

    pub fn processor(&self) -> &ProcessorConfig {
        &self.processor
    }

    pub fn device(&self) -> &candle_core::Device {
        &self.device
    }

    /// exp(logit_scale) of the checkpoint.
    pub fn logit_scale(&self) -> f32 {
        self.model.logit_scale
    }

    /// Token ids as `CLIPTokenizer` gives them: BOS, tokens, EOS, truncated to the context
    /// length, not padded.
    pub fn tokenize(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        let enc = self.tokenizer.encode_batch(texts.to_vec(), true).map_err(|e| Error::Tokenize(e.to_string()))?;
        Ok(enc.into_iter().map(|e| e.get_ids().to_vec()).collect())
    }

    /// L2-normalised embeddings for token id sequences.
    pub fn embed_ids(&self, ids: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        if ids.is_empty() {
            return Ok(vec![]);
        }
        crate::cpu::on_pool_if(self.device.is_cpu(), || {
            let f = self.model.text_features(ids)?.to_dtype(DType::F32)?;
            Ok(model::l2_normalize_rows(&f)?.to_vec2()?)
        })
    }

    /// L2-normalised embeddings for a (batch, 3, H, W) pixel tensor.
    pub fn embed_pixel_tensor(&self, pixels: &Tensor) -> Result<Vec<Vec<f32>>> {
        crate::cpu::on_pool_if(self.device.is_cpu(), || {
            let f = self.model.image_features(&pixels.to_device(&self.device)?.to_dtype(self.dtype)?)?.to_dtype(DType::F32)?;
            Ok(model::l2_normalize_rows(&f)?.to_vec2()?)
        })
    }

    /// Stacks preprocessed images into one tensor.
    pub fn pixels_to_tensor(&self, batch: &[Pixels]) -> Result<Tensor> {
        let first = batch.first().ok_or_else(|| Error::Preprocess("empty batch".into()))?;
        let (c, h, w) = (first.channels, first.height, first.width);
        let mut data = Vec::with_capacity(batch.len() * c * h * w);
        for p in batch {
            if (p.channels, p.height, p.width) != (c, h, w) {
                return Err(Error::Preprocess("images of different sizes in one batch".into()));
            }
            data.extend_from_slice(&p.data);
        }
        Ok(Tensor::from_vec(data, (batch.len(), c, h, w), &self.device)?)
    }
}

fn load_tokenizer(path: &Path, max_len: usize) -> Result<Tokenizer> {
    let mut t = Tokenizer::from_file(path).map_err(|e| Error::Tokenizer { path: path.into(), message: e.to_string() })?;
    t.with_padding(None);
    t.with_truncation(Some(tokenizers::TruncationParams { max_length: max_len, ..Default::default() }))
        .map_err(|e| Error::Tokenizer { path: path.into(), message: e.to_string() })?;
    Ok(t)
}

impl ImageEmbedder for Clip {
    fn model(&self) -> &ModelInfo {
        &self.info
    }

    fn input_side(&self) -> u32 {
        self.processor.resize_side()
    }

    fn preprocess(&self, image: &image::DynamicImage) -> magpie_core::Result<Pixels> {
        Ok(self.processor.preprocess(image)?)
    }

    fn embed_pixels(&self, batch: &[Pixels]) -> magpie_core::Result<Vec<Vec<f32>>> {
        if batch.is_empty() {
            return Ok(vec![]);
        }
        let t = self.pixels_to_tensor(batch)?;
        Ok(self.embed_pixel_tensor(&t)?)
    }
}

impl TextEmbedder for Clip {
    fn model(&self) -> &ModelInfo {
        &self.info
    }

    fn embed_texts(&self, texts: &[&str]) -> magpie_core::Result<Vec<Vec<f32>>> {
        let ids = self.tokenize(texts)?;
        Ok(self.embed_ids(&ids)?)
    }

    fn logit_scale(&self) -> f32 {
        self.model.logit_scale
    }
}
