//! BLIP-2 (OPT) for magpie: loading a Hugging Face `Blip2ForConditionalGeneration`
//! checkpoint directory, preprocessing like `BlipImageProcessor`, assembling prompts like
//! `Blip2Processor`, and captioning / answering questions with greedy or beam search.
//!
//! Prompts are built as transformers 5.24 builds them: `num_query_tokens` copies of the
//! `<image>` placeholder id, then the tokenizer's encoding of the prompt (which starts
//! with BOS); a caption without prompt is `<image>`×N + BOS, as
//! `Blip2ForConditionalGeneration.generate` builds it. The placeholders' embeddings are
//! replaced by the projected Q-Former outputs; every id, placeholders included, counts as
//! "already seen" for the repetition penalty. Returned texts are the new tokens only,
//! decoded without special tokens and trimmed.

pub mod config;
pub mod generation;
pub mod model;
pub mod opt;
mod opt_native;
pub mod precision;
pub mod qformer;
pub mod vision;

pub use config::Blip2Config;
pub use generation::{EarlyStopping, GenerateOptions};
pub use model::Blip2ForConditionalGeneration;
pub use precision::Precision;

use crate::loader::{self, parse_json, read_json, CheckedWeights, ModelDir};
use crate::preprocess::ProcessorConfig;
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use generation::Decoder;
use magpie_core::Pixels;
use opt::KvCache;
use tokenizers::Tokenizer;

/// Files a BLIP-2 checkpoint directory must have (`model.safetensors` may be sharded with
/// `model.safetensors.index.json`).
pub const REQUIRED_FILES: [&str; 4] =
    ["config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"];

/// `BlipImageProcessor`'s defaults, for keys a `preprocessor_config.json` leaves out: an
/// exact bicubic resize to 384×384, no crop, CLIP's mean and std.
fn blip_processor_defaults() -> serde_json::Value {
    serde_json::json!({
        "do_resize": true,
        "size": {"height": 384, "width": 384},
        "resample": 3,
        "do_center_crop": false,
        "do_rescale": true,
        "rescale_factor": 1.0 / 255.0,
        "do_normalize": true,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_convert_rgb": true,
    })
}

/// A loaded BLIP-2 checkpoint: model, tokenizer and image processor.
pub struct Blip2 {
    model: Blip2ForConditionalGeneration,
    config: Blip2Config,
    tokenizer: Tokenizer,
    processor: ProcessorConfig,
    device: candle_core::Device,
    id: String,
    info: magpie_core::ModelInfo,
    precision: Precision,
}

impl Blip2 {
    /// Loads `model` (a local directory or a hub id such as `Salesforce/blip2-opt-2.7b`)
    /// onto `device` in f32.
    pub fn load(model: &str, device: magpie_core::Device) -> Result<Self> {
        Self::load_with(model, device, Some(Precision::F32))
    }

    /// Loads `model` onto `device` in `precision` (`None`: [`Precision::default_for`] the
    /// device).
    pub fn load_with(model: &str, device: magpie_core::Device, precision: Option<Precision>) -> Result<Self> {
        let dir = loader::resolve(model, &REQUIRED_FILES, &["generation_config.json"])?;
        let precision = match precision {
            Some(p) => p,
            None => Precision::default_for(&crate::select_device(device)?),
        };
        Self::from_dir_with(&dir, device, precision)
    }

    /// Loads a checkpoint directory with the vision encoder, projection and language model
    /// in `dtype` (f32, f16 or bf16); the Q-Former and its queries stay in f32, as in
    /// transformers. Every tensor of the files must be used and every expected one found.
    pub fn from_dir(dir: &ModelDir, device: magpie_core::Device, dtype: DType) -> Result<Self> {
        let precision = match dtype {
            DType::F32 => Precision::F32,
            DType::F16 => Precision::F16,
            DType::BF16 => Precision::BF16,
            _ => {
                return Err(Error::Config {
                    path: dir.file("config.json"),
                    message: format!("dtype {dtype:?} is not supported (f32, f16, bf16)"),
                })
            }
        };
        Self::from_dir_with(dir, device, precision)
    }

    /// [`from_dir_with`](Self::from_dir_with) with candle's ops everywhere, as on a GPU,
    /// even on a CPU: for checking the GPU path's arithmetic where there is no GPU.
    #[doc(hidden)]
    pub fn from_dir_candle_only(dir: &ModelDir, device: magpie_core::Device, precision: Precision) -> Result<Self> {
        let _scope = crate::nn::CandleOnlyScope::enter(true);
        Self::from_dir_with(dir, device, precision)
    }

    /// Loads a checkpoint directory in `precision` (see [`Precision`]).
    pub fn from_dir_with(dir: &ModelDir, device: magpie_core::Device, precision: Precision) -> Result<Self> {
        let device = crate::select_device(device)?;
        let config_path = dir.file("config.json");
        let config: Blip2Config = parse_json(&config_path, read_json(&config_path)?)?;
        let config = config.finish().map_err(|message| Error::Config { path: config_path.clone(), message })?;
        let pp_path = dir.file("preprocessor_config.json");
        let processor = ProcessorConfig::from_file_with_defaults(&pp_path, &blip_processor_defaults())?;
        let size = config.vision_config.image_size;
        if processor.output_size(size as u32, size as u32) != (size as u32, size as u32) || !processor.do_resize {
            return Err(Error::Config {
                path: pp_path,
                message: format!("the processor must resize to vision_config.image_size {size}×{size}"),
            });
        }
        let tok_path = dir.file("tokenizer.json");
        let mut tokenizer = Tokenizer::from_file(&tok_path)
            .map_err(|e| Error::Tokenizer { path: tok_path.clone(), message: e.to_string() })?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| Error::Tokenizer { path: tok_path.clone(), message: e.to_string() })?;
        // transformers 5.24 takes the BOS from tokenizer.json's post-processor too: the
        // `add_bos_token` of a tokenizer_config.json does not rebuild it.
        let image_token_index = match config.image_token_index.or_else(|| tokenizer.token_to_id("<image>")) {
            Some(id) => id,
            None => {
                return Err(Error::Config {
                    path: config_path,
                    message: "no image_token_index, and the tokenizer has no `<image>` token".into(),
                })
            }
        };
        let weights = CheckedWeights::open(&dir.weight_files()?)?;
        let model = Blip2ForConditionalGeneration::new_mixed(
            &config,
            image_token_index,
            weights.var_builder(precision.vision_dtype(), &device),
            weights.var_builder(precision.language_dtype(), &device),
            weights.var_builder(DType::F32, &device),
            precision.quantization(),
        )
        .map_err(|e| weights.wrap(e))?;
        weights.ensure_all_used(&|n| n.ends_with("position_ids"))?;
        let info = magpie_core::ModelInfo { id: loader::model_id(dir), dim: 0 };
        Ok(Self { model, config, tokenizer, processor, device, id: dir.id.clone(), info, precision })
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The model id as given (hub id or directory).
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn config(&self) -> &Blip2Config {
        &self.config
    }

    pub fn model(&self) -> &Blip2ForConditionalGeneration {
        &self.model
    }


    pub fn processor(&self) -> &ProcessorConfig {
        &self.processor
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn device(&self) -> &candle_core::Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.model.dtype()
    }

    /// `BlipImageProcessor`: RGB, exact bicubic resize, rescale, normalise.
    pub fn preprocess(&self, image: &image::DynamicImage) -> Result<Pixels> {
        self.processor.preprocess(image)
    }

    /// One preprocessed image as a (1, 3, H, W) f32 tensor on the model's device.
    pub fn pixel_tensor(&self, p: &Pixels) -> Result<Tensor> {
        Ok(Tensor::from_slice(&p.data, (1, p.channels, p.height, p.width), &self.device)?)
    }

    /// Vision encoder output (batch, 1 + patches, hidden) in the model dtype.
    pub fn vision_forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        Ok(self.model.vision_forward(pixel_values)?)
    }

    /// Q-Former output (batch, queries, hidden) in f32.
    pub fn qformer_forward(&self, image_embeds: &Tensor) -> Result<Tensor> {
        Ok(self.model.qformer_forward(image_embeds)?)
    }

    /// `language_projection` of the Q-Former output, in the model dtype.
    pub fn project(&self, query_output: &Tensor) -> Result<Tensor> {
        Ok(self.model.project(query_output)?)
    }

    /// The language model's `input_ids` for a prompt: `<image>`×N, then the tokenizer's
    /// encoding with its special tokens (BOS first); without a prompt, `<image>`×N + BOS.
    pub fn prompt_ids(&self, prompt: Option<&str>) -> Result<Vec<u32>> {
        let mut ids = vec![self.model.image_token_index(); self.model.num_query_tokens()];
        match prompt {
            None => ids.push(self.config.text_config.bos_token_id.unwrap_or(2)),
            Some(p) => {
                let enc = self.tokenizer.encode(p, true).map_err(|e| Error::Tokenize(e.to_string()))?;
                ids.extend_from_slice(enc.get_ids());
            }
        }
        Ok(ids)
    }

    /// The language model's logits (len, vocab), f32, for prompt `ids` (with the image
    /// tokens) and the image `pixel_values` (1, 3, H, W): the first generation step.
    pub fn first_step_logits(&self, pixel_values: &Tensor, ids: &[u32]) -> Result<Tensor> {
        let features = self.single_image_features(pixel_values)?;
        let mut cache = KvCache::new();
        let logits = self.model.prefill(ids, &features, &mut cache, false)?;
        Ok(logits.squeeze(0)?.to_dtype(DType::F32)?)
    }

    /// Generates after prompt `ids` (from [`prompt_ids`](Self::prompt_ids)) for one image;
    /// returns the new token ids, EOS included when it ended them. With greedy search
    /// each token goes to `on_token` as it is chosen; with beam search all of them at the
    /// end, once the best hypothesis is known.
    pub fn generate_ids(
        &self,
        pixel_values: &Tensor,
        ids: &[u32],
        opts: &GenerateOptions,
        on_token: &mut dyn FnMut(u32),
    ) -> Result<Vec<u32>> {
        self.generate_inner(pixel_values, ids, opts, &mut |t, _| on_token(t))
    }

    /// [`generate_ids`](Self::generate_ids), telling `on_token` which token is the last.
    fn generate_inner(
        &self,
        pixel_values: &Tensor,
        ids: &[u32],
        opts: &GenerateOptions,
        on_token: &mut dyn FnMut(u32, bool),
    ) -> Result<Vec<u32>> {
        opts.validate().map_err(Error::Generate)?;
        let features = self.single_image_features(pixel_values)?;
        // Positions run 0..len+new-1 and the table has max_position_embeddings of them;
        // the last token is never fed back.
        let max_pos = self.config.text_config.max_position_embeddings;
        if ids.len() > max_pos {
            return Err(Error::Generate(format!("the prompt has {} tokens, the model at most {max_pos}", ids.len())));
        }
        let mut opts = opts.clone();
        opts.max_new_tokens = opts.max_new_tokens.min(max_pos + 1 - ids.len());
        if opts.max_new_tokens == 0 {
            return Ok(vec![]);
        }
        let mut cache = KvCache::new();
        let first = self.model.prefill(ids, &features, &mut cache, true)?;
        let first: Vec<f32> = first.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
        let mut decoder = CachedDecoder { model: &self.model, cache };
        let eos = &self.config.text_config.eos_token_id;
        if opts.num_beams == 1 {
            Ok(generation::greedy(&mut decoder, ids, first, &opts, eos, on_token)?)
        } else {
            let out = generation::beam_search(&mut decoder, ids, first, &opts, eos)?;
            for (i, &t) in out.iter().enumerate() {
                on_token(t, i + 1 == out.len());
            }
            Ok(out)
        }
    }

    /// Token ids to text, special tokens skipped, trimmed (`batch_decode(...,
    /// skip_special_tokens=True)[0].strip()`).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let text = self.tokenizer.decode(ids, true).map_err(|e| Error::Tokenize(e.to_string()))?;
        Ok(text.trim().to_string())
    }

    /// Generates text for a preprocessed image tensor (1, 3, H, W) after `prompt` (none:
    /// a plain caption). `on_text` receives each new token id and the text it adds as it is
    /// produced (greedy search; with beams, at the end). A token that ends inside a UTF-8
    /// character adds nothing until the character completes; the last token's piece holds
    /// whatever remains, so the pieces add up to the whole text (before trimming its end).
    pub fn generate_text(
        &self,
        pixel_values: &Tensor,
        prompt: Option<&str>,
        opts: &GenerateOptions,
        on_text: &mut dyn FnMut(u32, &str),
    ) -> Result<String> {
        let mut ids = self.prompt_ids(prompt)?;
        // A long chat history must not end the conversation: keep the image tokens and
        // BOS, drop the oldest text so that the prompt and some answer fit the positions.
        let max_pos = self.config.text_config.max_position_embeddings;
        let fixed = self.model.num_query_tokens() + 1;
        let room = opts.max_new_tokens.clamp(1, (max_pos / 4).max(1));
        if ids.len() + room > max_pos + 1 && ids.len() > fixed {
            let keep = (max_pos + 1).saturating_sub(room + fixed).min(ids.len() - fixed);
            tracing::debug!("prompt of {} tokens cut to its last {keep} text tokens", ids.len());
            ids.drain(fixed..ids.len() - keep);
        }
        let mut stream = TextStream::new(&self.tokenizer);
        let mut err = None;
        let out = self.generate_inner(pixel_values, &ids, opts, &mut |t, last| match stream.push(t, last) {
            Ok(piece) => on_text(t, &piece),
            Err(e) => {
                err.get_or_insert(e);
            }
        })?;
        if let Some(e) = err {
            return Err(e);
        }
        self.decode(&out)
    }

    /// A caption for a decoded image.
    pub fn caption(&self, image: &image::DynamicImage, opts: &GenerateOptions) -> Result<String> {
        let pixels = self.pixel_tensor(&self.preprocess(image)?)?;
        self.generate_text(&pixels, None, opts, &mut |_, _| {})
    }

    /// Captions for several decoded images at once. With greedy search the vision
    /// encoder, the Q-Former and the prompt run as one batch, then the language model
    /// steps all rows together, reading its weights once per step for all of them (the
    /// step is bound by memory on a CPU, so a batch of 8 costs little more than one row).
    /// Each caption is the one [`caption`](Self::caption) gives. With beam search, one
    /// image at a time.
    pub fn caption_batch(&self, images: &[&image::DynamicImage], opts: &GenerateOptions) -> Result<Vec<String>> {
        opts.validate().map_err(Error::Generate)?;
        if images.len() <= 1 || opts.num_beams > 1 {
            return images.iter().map(|im| self.caption(im, opts)).collect();
        }
        let mut data = Vec::new();
        let mut shape = (0, 0, 0);
        for im in images {
            let p = self.preprocess(im)?;
            shape = (p.channels, p.height, p.width);
            data.extend_from_slice(&p.data);
        }
        let pixels = Tensor::from_vec(data, (images.len(), shape.0, shape.1, shape.2), &self.device)?;
        let features = self.model.image_features(&pixels)?;
        let ids = self.prompt_ids(None)?;
        let max_pos = self.config.text_config.max_position_embeddings;
        let mut opts = opts.clone();
        opts.max_new_tokens = opts.max_new_tokens.min((max_pos + 1).saturating_sub(ids.len()));
        if opts.max_new_tokens == 0 {
            return Ok(vec![String::new(); images.len()]);
        }
        let mut cache = KvCache::new();
        let first: Vec<Vec<f32>> = self.model.prefill_batch(&ids, &features, &mut cache)?.squeeze(1)?.to_dtype(DType::F32)?.to_vec2()?;
        let mut decoder = CachedDecoder { model: &self.model, cache };
        let outs = generation::greedy_batch(&mut decoder, &ids, first, &opts, &self.config.text_config.eos_token_id)?;
        outs.iter().map(|o| self.decode(o)).collect()
    }

    /// The answer to `prompt` about a decoded image (BLIP-2 OPT is prompted as
    /// `"Question: … Answer:"`), streamed through `on_token` (id, text piece).
    pub fn answer(
        &self,
        image: &image::DynamicImage,
        prompt: &str,
        opts: &GenerateOptions,
        on_token: &mut dyn FnMut(u32, &str),
    ) -> Result<String> {
        let pixels = self.pixel_tensor(&self.preprocess(image)?)?;
        self.generate_text(&pixels, Some(prompt), opts, on_token)
    }

    /// Image features (queries, width) of a one-image batch.
    fn single_image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let b = pixel_values.dim(0)?;
        if b != 1 {
            return Err(Error::Generate(format!("generation takes one image at a time, not {b}")));
        }
        Ok(self.model.image_features(&pixel_values.to_device(&self.device)?)?.squeeze(0)?)
    }
}

/// The language model and its cache, as the search sees them.
struct CachedDecoder<'a> {
    model: &'a Blip2ForConditionalGeneration,
    cache: KvCache,
}

impl Decoder for CachedDecoder<'_> {
    fn step(&mut self, tokens: &[u32]) -> candle_core::Result<Vec<Vec<f32>>> {
        self.model.decode_step(tokens, &mut self.cache)?.to_dtype(DType::F32)?.to_vec2()
    }

    fn reorder(&mut self, idx: &[usize]) -> candle_core::Result<()> {
        self.cache.reorder(idx)
    }
}

/// Incremental detokenisation: the text a new token adds is the difference between the
/// decodings of all tokens so far with and without it, held back while it ends in an
/// incomplete UTF-8 sequence (unless it is the last token); leading whitespace of the
/// whole text is dropped (the final text is trimmed).
struct TextStream<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    emitted: usize,
}

impl<'a> TextStream<'a> {
    fn new(tokenizer: &'a Tokenizer) -> Self {
        Self { tokenizer, ids: vec![], emitted: 0 }
    }

    fn push(&mut self, id: u32, last: bool) -> Result<String> {
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids, true).map_err(|e| Error::Tokenize(e.to_string()))?;
        let text = text.trim_start();
        if (text.ends_with('\u{FFFD}') && !last) || text.len() <= self.emitted || !text.is_char_boundary(self.emitted) {
            return Ok(String::new());
        }
        let piece = text[self.emitted..].to_string();
        self.emitted = text.len();
        Ok(piece)
    }
}

impl Blip2 {
    fn options(opts: &magpie_core::GenerationOptions) -> GenerateOptions {
        GenerateOptions {
            max_new_tokens: opts.max_new_tokens,
            num_beams: opts.num_beams.max(1),
            repetition_penalty: opts.repetition_penalty,
            ..Default::default()
        }
    }
}

impl magpie_core::Captioner for Blip2 {
    fn model(&self) -> &magpie_core::ModelInfo {
        &self.info
    }

    fn input_side(&self) -> u32 {
        self.processor.resize_side()
    }

    fn caption(&self, image: &image::DynamicImage, opts: &magpie_core::GenerationOptions) -> magpie_core::Result<String> {
        Ok(Blip2::caption(self, image, &Self::options(opts))?)
    }

    fn caption_batch(&self, images: &[&image::DynamicImage], opts: &magpie_core::GenerationOptions) -> magpie_core::Result<Vec<String>> {
        Ok(Blip2::caption_batch(self, images, &Self::options(opts))?)
    }

    fn batch_size(&self) -> usize {
        // On a CPU a step reads the language model's weights once for all rows: 8 rows
        // make decoding ~6× cheaper per image while the batch's prefill stays small. A GPU
        // takes more.
        if self.device.is_cpu() {
            8
        } else {
            32
        }
    }
}

impl magpie_core::VisualChat for Blip2 {
    fn model(&self) -> &magpie_core::ModelInfo {
        &self.info
    }

    fn input_side(&self) -> u32 {
        self.processor.resize_side()
    }

    fn answer(
        &self,
        image: &image::DynamicImage,
        prompt: &str,
        opts: &magpie_core::GenerationOptions,
        on_text: &mut dyn FnMut(&str),
    ) -> magpie_core::Result<String> {
        Ok(Blip2::answer(self, image, prompt, &Self::options(opts), &mut |_, piece| on_text(piece))?)
    }
}
