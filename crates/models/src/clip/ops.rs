//! Element-wise kernels candle lacks in a fast form on the CPU. candle-nn's sigmoid runs
//! single-threaded scalar code; quick_gelu here runs in parallel chunks and lets the
//! compiler vectorise the exp.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

struct QuickGelu;

#[inline]
fn quick_gelu_f32(x: f32) -> f32 {
    x / (1.0 + (-1.702 * x).exp())
}

impl CustomOp1 for QuickGelu {
    fn name(&self) -> &'static str {
        "quick-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = s else {
            candle_core::bail!("quick-gelu: only f32 on the CPU path");
        };
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("quick-gelu: input must be contiguous");
        };
        let src = &data[start..end];
        let mut out = vec![0f32; src.len()];
        out.par_chunks_mut(16 * 1024).zip(src.par_chunks(16 * 1024)).for_each(|(o, i)| {
            for (o, &x) in o.iter_mut().zip(i) {
                *o = quick_gelu_f32(x);
            }
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

/// x · sigmoid(1.702 x), as OpenAI's CLIP defines it.
pub fn quick_gelu(xs: &Tensor) -> Result<Tensor> {
    if xs.device().is_cpu() && xs.dtype() == candle_core::DType::F32 && xs.is_contiguous() {
        xs.apply_op1_no_bwd(&QuickGelu)
    } else {
        xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn fast_quick_gelu_matches_the_formula() {
        let x = Tensor::arange(-600i64, 600, &candle_core::Device::Cpu).unwrap().to_dtype(candle_core::DType::F32).unwrap();
        let x = (x * 0.01).unwrap();
        let fast = quick_gelu(&x).unwrap().to_vec1::<f32>().unwrap();
        let slow = (&x * candle_nn::ops::sigmoid(&(&x * 1.702).unwrap()).unwrap()).unwrap().to_vec1::<f32>().unwrap();
        for (a, b) in fast.iter().zip(&slow) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        assert!(fast[0] < 0.0 && fast[0] > -0.1 && (fast[1199] - 5.99).abs() < 0.01);
    }
}
