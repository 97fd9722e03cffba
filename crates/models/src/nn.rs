//! Layers shared by the models: a linear layer with a pre-transposed weight, a LayerNorm
//! that normalises in f32 whatever the weights' dtype, and scaled-dot-product attention
//! with an f32 softmax.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;
use crate::cpu::{Epilogue, Isa, Packed, PackedWeight};

/// A tensor `name` under `vb`, of `shape`, as f32 values in storage order (weights read
/// for the CPU kernels): read in `vb`'s dtype (so an f16 model's values are those
/// rounded to f16, as the reference casts them), then widened exactly.
pub(crate) fn read_f32(vb: &VarBuilder, shape: &[usize], name: &str) -> Result<Vec<f32>> {
    vb.get(shape, name)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
}

/// A LayerNorm's `(weight, bias)` of `dim` values under `vb`.
pub(crate) fn read_layer_norm(vb: &VarBuilder, dim: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    Ok((read_f32(vb, &[dim], "weight")?, read_f32(vb, &[dim], "bias")?))
}

/// A linear layer. Dense weights are kept transposed (`in × out`, contiguous), which is
/// what gemm is fastest with for small batches; a quantized weight (ggml blocks, candle's
/// `QMatMul`) keeps PyTorch's `out × in` rows and takes f32 activations.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
    out_dim: usize,
}

#[derive(Debug, Clone)]
enum Weight {
    /// `in × out`, contiguous: what candle's matmul is fastest with (GPUs).
    Dense(Tensor),
    /// `out × in` as stored, on the CPU until it is packed (no transposed copy is made).
    Torch(Tensor),
    Quantized(QMatMul),
    /// Packed for magpie's CPU kernels, with the bias (if any) in f32, added in the
    /// kernel's store.
    Packed(std::sync::Arc<(PackedWeight, Option<Vec<f32>>)>),
}

thread_local! {
    /// Set while a model loads with BF16 kernels: the CPU encoders then pack for them.
    static BF16_LINEARS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// While alive, encoders built on the CPU use the BF16 kernel ([`crate::cpu::Precision`];
/// on this thread: models are built synchronously by their loader).
pub(crate) struct Bf16Scope(bool);

impl Bf16Scope {
    pub(crate) fn enter(enabled: bool) -> Self {
        Self(BF16_LINEARS.with(|c| c.replace(enabled && crate::bf16_gemm::available())))
    }
}

impl Drop for Bf16Scope {
    fn drop(&mut self) {
        BF16_LINEARS.with(|c| c.set(self.0));
    }
}

thread_local! {
    /// Set while a model loads for candle's ops only (the GPU path) on a CPU.
    static CANDLE_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// While alive, models built on this thread use candle's ops everywhere, as on a GPU,
/// instead of magpie's CPU kernels: for checking the GPU path's arithmetic on a CPU.
pub(crate) struct CandleOnlyScope(bool);

impl CandleOnlyScope {
    pub(crate) fn enter(enabled: bool) -> Self {
        Self(CANDLE_ONLY.with(|c| c.replace(enabled)))
    }
}

impl Drop for CandleOnlyScope {
    fn drop(&mut self) {
        CANDLE_ONLY.with(|c| c.set(self.0));
    }
}

/// Whether magpie's CPU kernels may be used for a model built now on `device`.
pub(crate) fn cpu_kernels(device: &candle_core::Device) -> bool {
    device.is_cpu() && !CANDLE_ONLY.with(|c| c.get())
}

/// Whether a [`Bf16Scope`] asks for BF16 kernels on this thread.
pub(crate) fn bf16_enabled() -> bool {
    BF16_LINEARS.with(|c| c.get())
}

impl Linear {
    pub(crate) fn new(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        let w = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias { Some(vb.get(out_dim, "bias")?) } else { None };
        Self::from_weight(&w, bias)
    }

    /// From a PyTorch-layout (`out × in`) weight: transposed for candle's matmul, or kept
    /// as it is on the CPU, where [`packed_for_cpu`](Self::packed_for_cpu) or
    /// [`quantized`](Self::quantized) reads it directly.
    pub(crate) fn from_weight(w: &Tensor, bias: Option<Tensor>) -> Result<Self> {
        let out_dim = w.dim(0)?;
        let weight = if cpu_kernels(w.device()) { Weight::Torch(w.clone()) } else { Weight::Dense(w.t()?.contiguous()?) };
        Ok(Self { weight, bias, out_dim })
    }

    /// Several linears with the same input fused into one (outputs concatenated). None may
    /// be quantized or packed yet (fuse first, quantize or pack after).
    pub(crate) fn fused(parts: Vec<Linear>) -> Result<Self> {
        let bias = match parts.iter().map(|l| l.bias.as_ref()).collect::<Option<Vec<_>>>() {
            Some(bs) => Some(Tensor::cat(&bs, 0)?),
            None => None,
        };
        let (mut dense, mut torch) = (Vec::new(), Vec::new());
        for p in &parts {
            match &p.weight {
                Weight::Dense(wt) => dense.push(wt),
                Weight::Torch(w) => torch.push(w),
                Weight::Quantized(_) | Weight::Packed(_) => candle_core::bail!("cannot fuse quantized or packed linear layers"),
            }
        }
        let weight = match (dense.is_empty(), torch.is_empty()) {
            (false, true) => Weight::Dense(Tensor::cat(&dense, 1)?),
            (true, false) => Weight::Torch(Tensor::cat(&torch, 0)?),
            _ => candle_core::bail!("cannot fuse linear layers held in different layouts"),
        };
        let out_dim = parts.iter().map(|p| p.out_dim).sum();
        Ok(Self { weight, bias, out_dim })
    }

    /// The same layer with its weight quantized to `dtype` (see `from_weight_quantized`).
    pub(crate) fn quantized(self, dtype: GgmlDType) -> Result<Self> {
        match &self.weight {
            Weight::Dense(wt) => Self::from_weight_quantized(&wt.t()?, self.bias.clone(), dtype),
            Weight::Torch(w) => Self::from_weight_quantized(w, self.bias.clone(), dtype),
            Weight::Quantized(_) | Weight::Packed(_) => Ok(self),
        }
    }

    /// The same layer on magpie's CPU kernels ([`crate::cpu::gemm`]) when its weight is an
    /// f32, f16 or bf16 one kept as stored on the CPU (see `from_weight`): packed in its
    /// own dtype (a half-precision weight is widened to f32 as the kernel loads it, so it
    /// reads half the memory), the bias fused into the store. Otherwise (a GPU, a
    /// quantized weight) unchanged. The layer then takes and returns any float dtype,
    /// computing in f32.
    pub(crate) fn packed_for_cpu(self) -> Result<Self> {
        // The values are read in place from the loaded tensor, out × in as stored (no copy).
        let Weight::Torch(w) = &self.weight else { return Ok(self) };
        if !cpu_kernels(w.device()) {
            return Ok(self);
        }
        let (n, k) = w.dims2()?;
        let packed = match w.dtype() {
            DType::F32 => PackedWeight::F32(with_cpu_slice(w, |v: &[f32]| Packed::pack_nk(v, n, k))?),
            DType::F16 => PackedWeight::F16(with_cpu_slice(w, |v: &[half::f16]| Packed::pack_nk(v, n, k))?),
            DType::BF16 => PackedWeight::Bf16Widened(with_cpu_slice(w, |v: &[half::bf16]| Packed::pack_nk(v, n, k))?),
            _ => return Ok(self),
        };
        let bias = self.bias.as_ref().map(|b| b.to_dtype(DType::F32)?.to_vec1::<f32>()).transpose()?;
        Ok(Self { weight: Weight::Packed(std::sync::Arc::new((packed, bias))), bias: None, out_dim: self.out_dim })
    }

    /// From a PyTorch-layout (`out × in`) weight, quantized to `dtype`; the bias is kept in
    /// f32. A layer whose input width is not a multiple of the format's block size (32 for
    /// `q8_0`, 256 for the k-quants) stays dense, in f32.
    pub(crate) fn from_weight_quantized(w: &Tensor, bias: Option<Tensor>, dtype: GgmlDType) -> Result<Self> {
        let out_dim = w.dim(0)?;
        let bias = bias.map(|b| b.to_dtype(DType::F32)).transpose()?;
        let weight = if w.dim(1)? % dtype.block_size() != 0 {
            if cpu_kernels(w.device()) {
                Weight::Torch(w.to_dtype(DType::F32)?)
            } else {
                Weight::Dense(w.t()?.to_dtype(DType::F32)?.contiguous()?)
            }
        } else if dtype == GgmlDType::Q8_0 && cpu_kernels(w.device()) {
            // The same blocks on magpie's kernels, with f32 activations.
            let (n, k) = w.dims2()?;
            let q = with_cpu_slice(&w.to_dtype(DType::F32)?, |v| crate::cpu::PackedQ8::quantize_transposed(v, n, k))?;
            let bias = bias.map(|b| b.to_vec1()).transpose()?;
            return Ok(Self { weight: Weight::Packed(std::sync::Arc::new((PackedWeight::Q8(q), bias))), bias: None, out_dim });
        } else {
            let w = w.to_dtype(DType::F32)?.contiguous()?;
            Weight::Quantized(QMatMul::from_qtensor(QTensor::quantize(&w, dtype)?)?)
        };
        Ok(Self { weight, bias, out_dim })
    }

}

/// `f` on the values of a CPU tensor, read in place when it is contiguous.
fn with_cpu_slice<T: candle_core::WithDType, R>(t: &Tensor, f: impl FnOnce(&[T]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else { candle_core::bail!("with_cpu_slice: not a CPU tensor") };
    let Some((start, end)) = layout.contiguous_offsets() else { candle_core::bail!("with_cpu_slice: not contiguous") };
    Ok(f(&cpu.as_slice::<T>()?[start..end]))
}

impl Linear {
    pub(crate) fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// `c = act(a · W + bias)` or `c += a · W + bias` (`ep`) for `rows` rows of f32 on the
    /// CPU: a packed weight runs the kernel with the epilogue fused; any other (quantized)
    /// goes through [`Module::forward`] and the epilogue is applied after.
    pub(crate) fn forward_f32(&self, isa: Isa, a: &[f32], rows: usize, c: &mut [f32], ep: Epilogue) -> Result<()> {
        if let Weight::Packed(p) = &self.weight {
            let (w, bias) = &**p;
            crate::cpu::gemm(isa, a, rows, w, bias.as_deref(), c, ep);
            return Ok(());
        }
        let k = a.len() / rows.max(1);
        let x = Tensor::from_slice(a, (rows, k), &candle_core::Device::Cpu)?;
        let y: Vec<f32> = self.forward(&x)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        if y.len() != c.len() {
            candle_core::bail!("Linear::forward_f32: {} outputs for a buffer of {}", y.len(), c.len());
        }
        if ep.accumulate {
            c.iter_mut().zip(&y).for_each(|(c, y)| *c += y);
        } else {
            c.copy_from_slice(&y);
            crate::cpu::math::activate(isa, ep.act, c);
        }
        Ok(())
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let (rows, k) = (dims[..dims.len() - 1].iter().product::<usize>(), dims[dims.len() - 1]);
        let x2 = x.reshape((rows, k))?;
        let y = match &self.weight {
            Weight::Dense(wt) => x2.matmul(wt)?,
            Weight::Torch(w) => x2.matmul(&w.t()?)?,
            Weight::Quantized(q) => q.forward(&x2.to_dtype(DType::F32)?.contiguous()?)?,
            Weight::Packed(p) => {
                let (w, bias) = &**p;
                let a: Vec<f32> = x2.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                let mut c = vec![0f32; rows * self.out_dim];
                crate::cpu::gemm(Isa::detect(), &a, rows, w, bias.as_deref(), &mut c, Epilogue::STORE);
                Tensor::from_vec(c, (rows, self.out_dim), x.device())?
            }
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let y = if y.dtype() == x.dtype() { y } else { y.to_dtype(x.dtype())? };
        let mut out = dims.to_vec();
        *out.last_mut().expect("non-empty") = self.out_dim;
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

    /// `(weight, bias, eps)` as f32 values, for the CPU kernels.
    pub(crate) fn to_f32(&self) -> Result<(Vec<f32>, Vec<f32>, f32)> {
        Ok((self.weight.to_vec1()?, self.bias.to_vec1()?, self.eps))
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

    fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
        d / b.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt()
    }

    #[test]
    fn quantized_linear_matches_dense() {
        let dev = Device::Cpu;
        // Deterministic, varied weights (out × in) and inputs (3 rows).
        let wave = |n: usize, f: f32| {
            Tensor::arange(0f32, n as f32, &dev).unwrap().affine(f as f64, 0.3).unwrap().sin().unwrap()
        };
        // Error of each output relative to ‖x_i‖·‖w_j‖, the scale of a dot product
        // (outputs near zero by cancellation make ‖yq − y‖/‖y‖ meaningless).
        for (k, q, tol) in [(512, GgmlDType::Q8_0, 2e-3), (512, GgmlDType::Q6K, 5e-3), (512, GgmlDType::Q4K, 2e-2)] {
            let w = wave(96 * k, 0.731).reshape((96, k)).unwrap();
            let x = wave(3 * k, 0.173).reshape((3, k)).unwrap();
            let dense = Linear::from_weight(&w, None).unwrap();
            let quant = dense.clone().quantized(q).unwrap();
            match q {
                // On a CPU q8_0 runs on magpie's kernels: the same blocks as ggml's.
                GgmlDType::Q8_0 => {
                    assert!(matches!(&quant.weight, Weight::Packed(p) if matches!(p.0, PackedWeight::Q8(_))), "{q:?}");
                    let ggml = QTensor::quantize(&w, q).unwrap().dequantize(&dev).unwrap();
                    let want = x.matmul(&ggml.t().unwrap()).unwrap();
                    let e = rel_err(&quant.forward(&x).unwrap(), &want);
                    assert!(e < 1e-6, "q8_0 on magpie's kernels vs ggml's blocks dequantized: {e}");
                }
                _ => assert!(matches!(quant.weight, Weight::Quantized(_)), "{q:?}"),
            }
            let (yd, yq) = (dense.forward(&x).unwrap(), quant.forward(&x).unwrap());
            assert_eq!(yq.dims(), &[3, 96]);
            let xn = x.sqr().unwrap().sum(1).unwrap().sqrt().unwrap().unsqueeze(1).unwrap();
            let wn = w.sqr().unwrap().sum(1).unwrap().sqrt().unwrap().unsqueeze(0).unwrap();
            let scale = xn.broadcast_mul(&wn).unwrap();
            let e = ((&yq - &yd).unwrap().abs().unwrap() / scale).unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(e > 0.0 && e < tol, "{q:?}: error {e}");
            // The bias is added after the product.
            let b = wave(96, 1.7);
            let with_bias = Linear::from_weight(&w, Some(b.clone())).unwrap().quantized(q).unwrap();
            let yb = with_bias.forward(&x).unwrap();
            assert!(rel_err(&yb.broadcast_sub(&b.unsqueeze(0).unwrap()).unwrap(), &yq) < 1e-6);
        }
        // An input width that is not a multiple of the block stays dense and exact.
        let w = wave(8 * 48, 0.9).reshape((8, 48)).unwrap();
        let x = wave(2 * 48, 0.2).reshape((2, 48)).unwrap();
        let dense = Linear::from_weight(&w, None).unwrap();
        let kept = dense.clone().quantized(GgmlDType::Q8_0).unwrap();
        assert!(matches!(kept.weight, Weight::Dense(_) | Weight::Torch(_)));
        assert_eq!(rel_err(&kept.forward(&x).unwrap(), &dense.forward(&x).unwrap()), 0.0);
        // Quantized layers cannot be fused (fusing comes first).
        let w = wave(8 * 64, 0.9).reshape((8, 64)).unwrap();
        let q = Linear::from_weight(&w, None).unwrap().quantized(GgmlDType::Q8_0).unwrap();
        assert!(Linear::fused(vec![q.clone(), q]).is_err());
    }

    #[test]
    fn log_softmax_sums_to_one() {
        let l = log_softmax(&[1.0, 2.0, 3.0, -1e9]);
        let s: f32 = l.iter().map(|x| x.exp()).sum();
        assert!((s - 1.0).abs() < 1e-6);
        assert!(l[2] > l[1] && l[1] > l[0]);
    }
}
