//! magpie-core: the vocabulary every other magpie crate shares.
//!
//! It owns ids, the [`Embedding`] type (dimension- and model-checked), the model traits
//! ([`ImageEmbedder`], [`TextEmbedder`]) that the engine talks to without knowing candle,
//! and the [`Device`] choice. It depends on nothing of ours.
//!
//! ```
//! use magpie_core::Embedding;
//! let e = Embedding::normalized("tiny", vec![3.0, 4.0]).unwrap();
//! assert!((e.vector()[0] - 0.6).abs() < 1e-6);
//! let back = Embedding::from_le_bytes("tiny", &e.to_le_bytes(), 2).unwrap();
//! assert_eq!(back, e);
//! ```

mod embedding;
mod error;
mod model;

pub use embedding::{dot, l2_normalize, Embedding};
pub use error::{Error, Result};
pub use model::{Captioner, Device, GenerationOptions, ImageEmbedder, ModelInfo, Pixels, TextEmbedder, VisualChat};

/// Primary key of an image (file) row in the library.
pub type ImageId = i64;
