//! magpie-models: the neural networks of magpie, on candle.
//!
//! It owns CLIP (config-driven, any Hugging Face CLIP checkpoint), BLIP-2 with an OPT
//! language model (captions and visual question answering, greedy or beam search, equal to
//! transformers' `Blip2ForConditionalGeneration.generate`), image preprocessing equal to
//! `CLIPImageProcessor` / `BlipImageProcessor`, the tokenizers, strict weight loading (every
//! tensor in the files used, every expected one found; sharded checkpoints too) from a
//! local directory or the Hugging Face hub cache, and the device choice. Model structs do
//! no I/O: files are read in [`loader`], pixels prepared in [`preprocess`].
//!
//! ```no_run
//! use magpie_core::{Device, TextEmbedder};
//! let clip = magpie_models::Clip::load("openai/clip-vit-base-patch32", Device::Auto)?;
//! let v = clip.embed_texts(&["a puppy in the snow"])?;
//! assert_eq!(v[0].len(), clip.info().dim);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ```no_run
//! use magpie_models::blip2::{Blip2, GenerateOptions};
//! let blip = Blip2::load("Salesforce/blip2-opt-2.7b", magpie_core::Device::Auto)?;
//! let image = image::open("cat.jpg")?;
//! let caption = blip.caption(&image, &GenerateOptions::default())?;
//! let opts = GenerateOptions { num_beams: 1, max_new_tokens: 30, ..Default::default() };
//! let answer = blip.answer(&image, "Question: what colour is the cat? Answer:", &opts, &mut |_id, piece| {
//!     print!("{piece}") // streamed as it is generated
//! })?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod bf16_gemm;
pub mod int8_gemm;
pub mod blip2;
pub mod clip;
pub mod cpu;
mod device;
mod error;
pub mod loader;
mod nn;
pub mod preprocess;

pub use blip2::Blip2;
pub use clip::{Clip, ClipPrecision};
pub use device::{cuda_compiled, select_device};
pub use error::{Error, Result};
