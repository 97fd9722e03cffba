//! How a BLIP-2 checkpoint is held in memory and computed: one float dtype throughout, or
//! the language model's linear layers quantized to a ggml block format (the formats of
//! llama.cpp: `q8_0` on magpie's CPU kernels with f32 activations, the others and any GPU
//! through candle's `QMatMul`) with the rest kept in floats.

use candle_core::quantized::GgmlDType;
use candle_core::DType;
use std::fmt;
use std::str::FromStr;

/// The precision of a loaded BLIP-2.
///
/// | value  | vision encoder | language model (OPT) | memory, OPT-2.7b |
/// |--------|----------------|----------------------|------------------|
/// | `f32`  | f32            | f32                  | 15.5 GB          |
/// | `f16`  | f16            | f16                  | 7.8 GB           |
/// | `bf16` | bf16           | bf16                 | 7.8 GB           |
/// | `q8_0` | f32 weights, int8 kernel | 8.5-bit blocks | ≈ 5.5 GB measured |
/// | `q6_k` | as `q8_0`      | 6.6-bit blocks       | ≈ 6.9 GB         |
/// | `q4_k` | as `q8_0`      | 4.5-bit (head 6.6)   | ≈ 6.3 GB         |
///
/// The Q-Former and its queries are always f32, as in transformers. In the quantized
/// modes the decoder's activations, embeddings and LayerNorms are f32 and only the
/// weights of its linear layers (and of the LM head) are quantized; layers whose input
/// width is not a multiple of the block size (32, or 256 for the k-quants) stay f32. On a
/// CPU with AVX-512 VNNI the vision encoder's attention output projection and MLP run on
/// int8 dot products (weights per output channel, activations per row:
/// [`crate::cpu::Precision::Int8`]), its QKV projection on BF16; on CPUs without VNNI
/// all four on BF16 where the CPU has it, else f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    F32,
    F16,
    BF16,
    Q8_0,
    Q6K,
    Q5K,
    Q4K,
}

impl Precision {
    pub const ALL: [Precision; 7] =
        [Self::F32, Self::F16, Self::BF16, Self::Q8_0, Self::Q6K, Self::Q5K, Self::Q4K];

    /// magpie's default for a device: on a CPU the 8-bit language model (about twice
    /// the speed of f16 per token, with greedy captions that rarely differ from f32),
    /// on a GPU f16.
    pub fn default_for(device: &candle_core::Device) -> Self {
        if device.is_cpu() {
            Self::Q8_0
        } else {
            Self::F16
        }
    }

    /// The dtype of the vision encoder and the language projection.
    pub fn vision_dtype(self) -> DType {
        match self {
            Self::F16 => DType::F16,
            Self::BF16 => DType::BF16,
            _ => DType::F32,
        }
    }

    /// The dtype of the language model's activations, embeddings and (unless quantized)
    /// weights.
    pub fn language_dtype(self) -> DType {
        match self {
            Self::F16 => DType::F16,
            Self::BF16 => DType::BF16,
            _ => DType::F32,
        }
    }

    /// The ggml format of the language model's linear weights, if quantized.
    pub fn quantization(self) -> Option<GgmlDType> {
        match self {
            Self::Q8_0 => Some(GgmlDType::Q8_0),
            Self::Q6K => Some(GgmlDType::Q6K),
            Self::Q5K => Some(GgmlDType::Q5K),
            Self::Q4K => Some(GgmlDType::Q4K),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::BF16 => "bf16",
            Self::Q8_0 => "q8_0",
            Self::Q6K => "q6_k",
            Self::Q5K => "q5_k",
            Self::Q4K => "q4_k",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let norm = s.trim().to_ascii_lowercase().replace('-', "_");
        let norm = match norm.as_str() {
            "float32" | "fp32" => "f32",
            "float16" | "fp16" | "half" => "f16",
            "bfloat16" => "bf16",
            "q8" => "q8_0",
            "q6k" => "q6_k",
            "q5k" => "q5_k",
            "q4k" => "q4_k",
            n => n,
        }
        .to_string();
        Self::ALL.into_iter().find(|p| p.name() == norm).ok_or_else(|| {
            let names: Vec<_> = Self::ALL.iter().map(|p| p.name()).collect();
            format!("unknown precision `{s}` (one of: {})", names.join(", "))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_aliases_parse() {
        for p in Precision::ALL {
            assert_eq!(p.name().parse::<Precision>().unwrap(), p);
            assert_eq!(p.to_string(), p.name());
        }
        assert_eq!("Q4K".parse::<Precision>().unwrap(), Precision::Q4K);
        assert_eq!("fp16".parse::<Precision>().unwrap(), Precision::F16);
        let e = "q3".parse::<Precision>().unwrap_err();
        assert!(e.contains("q3") && e.contains("q8_0"), "{e}");
    }

    #[test]
    fn only_quantized_modes_quantize() {
        assert_eq!(Precision::F16.quantization(), None);
        assert_eq!(Precision::Q8_0.quantization(), Some(GgmlDType::Q8_0));
        assert_eq!(Precision::Q4K.language_dtype(), DType::F32);
        assert_eq!(Precision::BF16.vision_dtype(), DType::BF16);
    }
}
