//! Layers shared by the models: a linear layer with a pre-transposed weight, a LayerNorm
//! that normalises in f32 whatever the weights' dtype, and scaled-dot-product attention
//! with an f32 softmax.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

/// A linear layer whose weight is kept transposed (`in × out`, contiguous), which is what
/// gemm is fastest with for small batches.
#[derive(Debug, Clone)]
pub struct Linear {
    wt: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub(crate) fn new(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        let w = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias { Some(vb.get(out_dim, "bias")?) } else { None };
        Self::from_weight(&w, bias)
    }

    /// From a PyTorch-layout (`out × in`) weight.
    pub(crate) fn from_weight(w: &Tensor, bias: Option<Tensor>) -> Result<Self> {
        Ok(Self { wt: w.t()?.contiguous()?, bias })
    }

    /// Several linears with the same input fused into one (outputs concatenated).
    pub(crate) fn fused(parts: Vec<Linear>) -> Result<Self> {
        let wt = Tensor::cat(&parts.iter().map(|l| &l.wt).collect::<Vec<_>>(), 1)?;
        let bias = match parts.iter().map(|l| l.bias.as_ref()).collect::<Option<Vec<_>>>() {
            Some(bs) => Some(Tensor::cat(&bs, 0)?),
            None => None,
        };
        Ok(Self { wt, bias })
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let (rows, k) = (dims[..dims.len() - 1].iter().product::<usize>(), dims[dims.len() - 1]);
        let y = x.reshape((rows, k))?.matmul(&self.wt)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out = dims.to_vec();
        *out.last_mut().expect("non-empty") = self.wt.dim(1)?;
        y.reshape(out)
    }
}

/// `nn.LayerNorm`, computed in f32 (as PyTorch accumulates half-precision layer norms in
/// float) and returned in the input's dtype. Without `elementwise_affine` it has no weights.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    pub(crate) fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?.to_dtype(DType::F32)?,
            bias: vb.get(dim, "bias")?.to_dtype(DType::F32)?,
            eps: eps as f32,
        })
    }

    /// Without learnable parameters (`elementwise_affine=False`).
    pub(crate) fn plain(dim: usize, eps: f64, device: &candle_core::Device) -> Result<Self> {
        Ok(Self {
            weight: Tensor::ones(dim, DType::F32, device)?,
            bias: Tensor::zeros(dim, DType::F32, device)?,
            eps: eps as f32,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x = if dtype == DType::F32 { x.contiguous()? } else { x.to_dtype(DType::F32)? };
        let y = candle_nn::ops::layer_norm(&x, &self.weight, &self.bias, self.eps)?;
        y.to_dtype(dtype)
    }
}

/// softmax(q·kᵀ + mask)·v for (batch, heads, seq, head_dim) inputs, with `q` already
/// scaled. The softmax runs in f32 (the mask, if any, is f32 and broadcastable to the
/// scores); the products in the inputs' dtype.
pub(crate) fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let dtype = q.dtype();
    let w = q.matmul(&k.t()?)?;
    let w = if dtype == DType::F32 { w } else { w.to_dtype(DType::F32)? };
    let w = match mask {
        Some(m) => w.broadcast_add(m)?,
        None => w,
    };
    let w = candle_nn::ops::softmax_last_dim(&w)?;
    let w = if dtype == DType::F32 { w } else { w.to_dtype(dtype)? };
    w.matmul(v)
}

/// log_softmax over the last dimension of an f32 row, as torch computes it
/// (x - max - log Σ exp(x - max)).
pub(crate) fn log_softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = row.iter().map(|x| (x - max).exp()).sum();
    let lse = sum.ln();
    row.iter().map(|x| x - max - lse).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn f16_layer_norm_matches_f32() {
        let x = Tensor::arange(0f32, 64.0, &Device::Cpu).unwrap().reshape((2, 32)).unwrap();
        let x = ((x * 37.0).unwrap().sin().unwrap() * 100.0).unwrap();
        let ln = LayerNorm::plain(32, 1e-5, &Device::Cpu).unwrap();
        let a = ln.forward(&x).unwrap().to_vec2::<f32>().unwrap();
        let b = ln.forward(&x.to_dtype(DType::F16).unwrap()).unwrap();
        assert_eq!(b.dtype(), DType::F16);
        let b = b.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap();
        for (ra, rb) in a.iter().zip(&b) {
            for (p, q) in ra.iter().zip(rb) {
                assert!((p - q).abs() < 2e-2, "{p} vs {q}");
            }
        }
    }

    #[test]
    fn log_softmax_sums_to_one() {
        let l = log_softmax(&[1.0, 2.0, 3.0, -1e9]);
        let s: f32 = l.iter().map(|x| x.exp()).sum();
        assert!((s - 1.0).abs() < 1e-6);
        assert!(l[2] > l[1] && l[1] > l[0]);
    }
}
