//! Transformer inference on the CPU without candle's per-op overheads: weights packed once
//! at load time for our own GEMM micro-kernels, bias, activation and residual fused into
//! the GEMM's store, attention per (image, head) on the thread pool, and buffers reused
//! from layer to layer.
//!
//! The kernels are chosen at run time by what the CPU has ([`Isa::detect`]): AMX BF16 tiles
//! or AVX-512 BF16 dot products ([`crate::bf16_gemm`]), AVX-512 F, AVX2 + FMA + F16C, or
//! portable scalar code.
//! Every path can be forced (tests run each one; `MAGPIE_CPU_ISA=avx2` caps a whole
//! process), and a path the CPU lacks is never taken: asking for one falls back to the
//! best the CPU has below it.
//!
//! Used on the CPU by CLIP's two towers and BLIP-2's vision encoder ([`encoder`]), and by
//! every linear layer of BLIP-2's Q-Former and OPT decoder (`blip2::opt_native`), whose
//! weights may be f32, f16 or bf16 (widened as the kernels load them) or ggml `q8_0`
//! blocks ([`gemm::PackedQ8`]); GPUs keep candle's ops.

pub mod encoder;
pub mod gemm;
pub mod math;

pub use encoder::{EncoderLayer, LayerWeights, Precision, Stack};
pub use gemm::{gemm, Elem, Epilogue, Packed, PackedF32, PackedQ8, PackedWeight};
pub use math::Act;

/// Runs `f` on a thread of rayon's pool (directly when already on one) and waits for it.
///
/// A forward pass is a chain of many short parallel operations (a GEMM, a LayerNorm, the
/// attention heads). Started from a thread outside the pool, each of them hands its job
/// to the pool and puts the caller to sleep until a worker has run it: two thread
/// wake-ups per operation, and a worker idles while the caller is woken. From a pool
/// thread the caller takes part instead. On a 2-core Zen 4 this took a text query's
/// few-row GEMMs (8 × 512 × 2048 in bf16, weights from memory) from 105 µs to 60 µs a
/// call, the rate of a plain read of memory (`bench_gflops` in `bf16_gemm`). On the CPU, model entry
/// points (CLIP's towers, BLIP-2's vision, prefill and decoding steps) run under it.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        f()
    } else {
        rayon::scope(|_| f())
    }
}

/// [`on_pool`] where the model runs on the CPU (`cpu`); elsewhere `f` on this thread (a
/// GPU's work is not rayon's, and its context stays with the caller's thread).
pub fn on_pool_if<R: Send>(cpu: bool, f: impl FnOnce() -> R + Send) -> R {
    if cpu {
        on_pool(f)
    } else {
        f()
    }
}

/// An instruction-set level for the CPU kernels, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Plain Rust, any CPU.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C: 8-wide f32 (F16C widens f16 weights).
    Avx2,
    /// x86-64 AVX-512 F: 16-wide f32.
    Avx512,
    /// AVX-512 F + BW + BF16: BF16 dot products (the f32 kernels run as `Avx512`).
    Avx512Bf16,
    /// `Avx512Bf16` plus AMX BF16 tiles, granted by the operating system: the BF16 GEMM on
    /// tiles ([`crate::bf16_gemm::amx`]); everything else as `Avx512Bf16`.
    Amx,
}

impl Isa {
    /// Every level, lowest first.
    pub const ALL: [Isa; 5] = [Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Avx512Bf16, Isa::Amx];

    /// The best level this CPU has, capped by `MAGPIE_CPU_ISA` when that is set (read once).
    pub fn detect() -> Isa {
        static DETECTED: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(|| {
            let hw = Self::hardware();
            match std::env::var("MAGPIE_CPU_ISA") {
                Ok(v) => match v.parse::<Isa>() {
                    Ok(cap) => hw.min(cap),
                    Err(e) => {
                        tracing::warn!("MAGPIE_CPU_ISA: {e}; using {}", hw.name());
                        hw
                    }
                },
                Err(_) => hw,
            }
        })
    }

    /// The best level the hardware has, ignoring `MAGPIE_CPU_ISA`.
    pub fn hardware() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            let f = is_x86_feature_detected!("avx512f");
            if f && is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512bf16") {
                return if crate::bf16_gemm::amx_available() { Isa::Amx } else { Isa::Avx512Bf16 };
            }
            if f {
                return Isa::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
                return Isa::Avx2;
            }
        }
        Isa::Scalar
    }

    /// `self`, or the best level below it that the hardware has.
    pub fn supported(self) -> Isa {
        self.min(Self::hardware())
    }

    /// The level the f32 kernels run at (BF16 hardware runs f32 as AVX-512).
    pub(crate) fn f32_level(self) -> Isa {
        self.supported().min(Isa::Avx512)
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Avx512Bf16 => "avx512bf16",
            Isa::Amx => "amx",
        }
    }
}

impl std::str::FromStr for Isa {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Isa::ALL
            .into_iter()
            .find(|i| i.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| format!("unknown CPU level `{s}` (scalar, avx2, avx512, avx512bf16 or amx)"))
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_pool_runs_on_a_pool_thread() {
        assert!(rayon::current_thread_index().is_none(), "the test harness's threads are not rayon's");
        let (inside, value) = on_pool(|| (rayon::current_thread_index(), 7));
        assert!(inside.is_some());
        assert_eq!(value, 7);
        // Nested: runs in place on the same worker.
        let same = on_pool(|| {
            let outer = rayon::current_thread_index();
            on_pool(|| rayon::current_thread_index() == outer)
        });
        assert!(same);
        assert!(on_pool_if(true, rayon::current_thread_index).is_some());
        assert!(on_pool_if(false, rayon::current_thread_index).is_none());
    }

    #[test]
    fn levels_fall_back_to_the_hardware() {
        let hw = Isa::hardware();
        for isa in Isa::ALL {
            assert!(isa.supported() <= hw);
            assert!(isa.supported() <= isa);
            assert!(isa.f32_level() <= Isa::Avx512);
            assert_eq!(isa.name().parse::<Isa>().unwrap(), isa);
        }
        assert!(Isa::detect() <= hw);
        assert!("sse9".parse::<Isa>().unwrap_err().contains("sse9"));
    }
}
