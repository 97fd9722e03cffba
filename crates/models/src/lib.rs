//! magpie-models: the neural networks of magpie, on candle.
//!
//! It owns CLIP (config-driven, any Hugging Face CLIP checkpoint), image preprocessing
//! equal to `CLIPImageProcessor`, the CLIP tokenizer, strict weight loading (every tensor
//! in the file used, every expected one found) from a local directory or the Hugging Face
//! hub cache, and the device choice. Model structs do no I/O: files are read in
//! [`loader`], pixels prepared in [`preprocess`].
//!
//! ```no_run
//! use magpie_core::{Device, TextEmbedder};
//! let clip = magpie_models::Clip::load("openai/clip-vit-base-patch32", Device::Auto)?;
//! let v = clip.embed_texts(&["a puppy in the snow"])?;
//! assert_eq!(v[0].len(), clip.info().dim);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod clip;
mod device;
mod error;
pub mod loader;
pub mod preprocess;

pub use clip::Clip;
pub use device::{cuda_compiled, select_device};
pub use error::{Error, Result};
