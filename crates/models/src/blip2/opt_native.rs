//! OPT's decoder layers on magpie's CPU kernels: the residual stream, LayerNorms,
//! attention and key/value cache in f32 buffers, the linear layers on the packed GEMM
//! (bias, ReLU and residual fused into its store; a k-quant layer through candle's
//! `QMatMul`). Decoding one token is a few hundred small operations per token through
//! candle (each a fresh tensor, a dtype conversion, a copy of the whole cache to append
//! one position); here it is the weights' reads and little else.
//!
//! The arithmetic is transformers' `OPTDecoderLayer` in f32 whatever the weights' dtype
//! (half-precision weights are widened exactly), which for f16 and bf16 checkpoints is
//! closer to the f32 reference than computing in half precision.

use crate::cpu::math::layer_norm_rows;
use crate::cpu::{Act, Epilogue, Isa};
use crate::nn::Linear;
use candle_core::Result;
use rayon::prelude::*;

/// One layer's keys and values for the positions seen so far: for each row and head,
/// `cap` positions of `head_dim` values (the first `len` in use), so that appending a
/// step writes only that step.
#[derive(Debug, Clone, Default)]
pub(crate) struct NativeKv {
    rows: usize,
    heads: usize,
    head_dim: usize,
    cap: usize,
    len: usize,
    k: Vec<f32>,
    v: Vec<f32>,
}

impl NativeKv {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    fn at(&self, r: usize, head: usize, pos: usize) -> usize {
        ((r * self.heads + head) * self.cap + pos) * self.head_dim
    }

    /// Appends the keys and values of `s` new positions of `rows` rows, read from the
    /// fused projection `qkv` ((rows·s) × 3·hidden: Q, K, V).
    fn append(&mut self, qkv: &[f32], rows: usize, s: usize, heads: usize, head_dim: usize) -> Result<()> {
        if self.len == 0 {
            *self = NativeKv { rows, heads, head_dim, ..Default::default() };
        } else if (self.rows, self.heads, self.head_dim) != (rows, heads, head_dim) {
            candle_core::bail!("the cache holds {} rows of {}×{}, the step {rows} of {heads}×{head_dim}", self.rows, self.heads, self.head_dim);
        }
        if self.len + s > self.cap {
            let cap = (self.len + s).max(2 * self.cap).max(64);
            let mut grown = NativeKv { cap, k: vec![0.0; rows * heads * cap * head_dim], v: vec![0.0; rows * heads * cap * head_dim], ..self.clone_empty() };
            for r in 0..rows {
                for h in 0..heads {
                    let (from, to, n) = (self.at(r, h, 0), grown.at(r, h, 0), self.len * head_dim);
                    grown.k[to..to + n].copy_from_slice(&self.k[from..from + n]);
                    grown.v[to..to + n].copy_from_slice(&self.v[from..from + n]);
                }
            }
            grown.len = self.len;
            *self = grown;
        }
        let hidden = heads * head_dim;
        for r in 0..rows {
            for i in 0..s {
                let row = &qkv[(r * s + i) * 3 * hidden..][..3 * hidden];
                for h in 0..heads {
                    let at = self.at(r, h, self.len + i);
                    self.k[at..at + head_dim].copy_from_slice(&row[hidden + h * head_dim..][..head_dim]);
                    self.v[at..at + head_dim].copy_from_slice(&row[2 * hidden + h * head_dim..][..head_dim]);
                }
            }
        }
        self.len += s;
        Ok(())
    }

    fn clone_empty(&self) -> Self {
        NativeKv { rows: self.rows, heads: self.heads, head_dim: self.head_dim, ..Default::default() }
    }

    /// Keeps rows `idx` in that order (repeats allowed).
    pub(crate) fn reorder(&mut self, idx: &[usize]) -> Result<()> {
        if let Some(&bad) = idx.iter().find(|&&i| i >= self.rows) {
            candle_core::bail!("cache row {bad} out of {}", self.rows);
        }
        let block = self.cap * self.head_dim * self.heads;
        let mut out = NativeKv { rows: idx.len(), cap: self.cap, len: self.len, k: Vec::with_capacity(idx.len() * block), v: Vec::with_capacity(idx.len() * block), ..self.clone_empty() };
        for &i in idx {
            out.k.extend_from_slice(&self.k[i * block..(i + 1) * block]);
            out.v.extend_from_slice(&self.v[i * block..(i + 1) * block]);
        }
        *self = out;
        Ok(())
    }
}

/// One decoder layer's parts, borrowed from the loaded model.
pub(crate) struct LayerRef<'a> {
    pub qkv: &'a Linear,
    pub out_proj: &'a Linear,
    pub fc1: &'a Linear,
    pub fc2: &'a Linear,
    pub ln1: &'a (Vec<f32>, Vec<f32>, f32),
    pub ln2: &'a (Vec<f32>, Vec<f32>, f32),
    pub act: Act,
    pub pre_norm: bool,
    pub heads: usize,
    pub scaling: f32,
}

impl LayerRef<'_> {
    /// The layer on `x` ((rows·s) × hidden, updated in place) for `s` new positions after
    /// `kv.len()` cached ones; `mask` is each row's mask over cached + new positions.
    pub(crate) fn forward(&self, isa: Isa, x: &mut [f32], rows: usize, s: usize, mask: &[Vec<u8>], kv: &mut NativeKv) -> Result<()> {
        let n = rows * s;
        let hidden = x.len() / n.max(1);
        let head_dim = hidden / self.heads;
        let past = kv.len();
        let norm = |src: &[f32], (w, b, eps): &(Vec<f32>, Vec<f32>, f32)| {
            let mut y = vec![0f32; src.len()];
            layer_norm_rows(isa, src, &mut y, w, b, *eps);
            y
        };
        // Self-attention.
        let mut qkv = vec![0f32; n * 3 * hidden];
        if self.pre_norm {
            self.qkv.forward_f32(isa, &norm(x, self.ln1), n, &mut qkv, Epilogue::STORE)?;
        } else {
            self.qkv.forward_f32(isa, x, n, &mut qkv, Epilogue::STORE)?;
        }
        kv.append(&qkv, rows, s, self.heads, head_dim)?;
        let attn = self.attend(&qkv, rows, s, past, mask, kv);
        self.out_proj.forward_f32(isa, &attn, n, x, Epilogue::ACCUMULATE)?;
        if !self.pre_norm {
            let y = norm(x, self.ln1);
            x.copy_from_slice(&y);
        }
        // Feed-forward.
        let mut f = vec![0f32; n * self.fc1.out_dim()];
        if self.pre_norm {
            self.fc1.forward_f32(isa, &norm(x, self.ln2), n, &mut f, Epilogue::act(self.act))?;
        } else {
            self.fc1.forward_f32(isa, x, n, &mut f, Epilogue::act(self.act))?;
        }
        self.fc2.forward_f32(isa, &f, n, x, Epilogue::ACCUMULATE)?;
        if !self.pre_norm {
            let y = norm(x, self.ln2);
            x.copy_from_slice(&y);
        }
        Ok(())
    }

    /// softmax(q·kᵀ·scaling + mask)·v for every row, head and new position: a query at
    /// `past + i` sees the keys `j ≤ past + i` its row's mask keeps. A query that sees
    /// none (a padding position) averages all values, as the additive mask's uniform
    /// softmax does in the reference.
    fn attend(&self, qkv: &[f32], rows: usize, s: usize, past: usize, mask: &[Vec<u8>], kv: &NativeKv) -> Vec<f32> {
        let (heads, hd) = (self.heads, kv.head_dim);
        let hidden = heads * hd;
        let total = past + s;
        let per_task: Vec<Vec<f32>> = (0..rows * heads)
            .into_par_iter()
            .map(|t| {
                let (r, h) = (t / heads, t % heads);
                let keys = &kv.k[kv.at(r, h, 0)..][..total * hd];
                let values = &kv.v[kv.at(r, h, 0)..][..total * hd];
                let mut out = vec![0f32; s * hd];
                let mut p = vec![0f32; total];
                let mut q = vec![0f32; hd];
                for i in 0..s {
                    for (q, x) in q.iter_mut().zip(&qkv[(r * s + i) * 3 * hidden + h * hd..][..hd]) {
                        *q = x * self.scaling;
                    }
                    let mut max = f32::NEG_INFINITY;
                    for (j, pj) in p.iter_mut().enumerate() {
                        if j <= past + i && mask[r][j] == 1 {
                            *pj = dot(&q, &keys[j * hd..][..hd]);
                            max = max.max(*pj);
                        } else {
                            *pj = f32::NEG_INFINITY;
                        }
                    }
                    if max == f32::NEG_INFINITY {
                        p.fill(1.0 / total as f32);
                    } else {
                        let mut sum = 0f32;
                        for pj in p.iter_mut() {
                            *pj = if *pj == f32::NEG_INFINITY { 0.0 } else { (*pj - max).exp() };
                            sum += *pj;
                        }
                        p.iter_mut().for_each(|pj| *pj /= sum);
                    }
                    let o = &mut out[i * hd..(i + 1) * hd];
                    for (j, &pj) in p.iter().enumerate() {
                        if pj != 0.0 {
                            for (o, v) in o.iter_mut().zip(&values[j * hd..][..hd]) {
                                *o += pj * v;
                            }
                        }
                    }
                }
                out
            })
            .collect();
        let mut attn = vec![0f32; rows * s * hidden];
        for (t, out) in per_task.iter().enumerate() {
            let (r, h) = (t / heads, t % heads);
            for i in 0..s {
                attn[(r * s + i) * hidden + h * hd..][..hd].copy_from_slice(&out[i * hd..(i + 1) * hd]);
            }
        }
        attn
    }
}

/// Σ a·b in 16 lanes (vectorisable).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..16 {
            lanes[l] += x[l] * y[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_grows_and_reorders_without_losing_positions() {
        let (heads, hd) = (2, 3);
        let hidden = heads * hd;
        // Row r, position p: key value 100·r + p + 0.1·lane, value its negative.
        let step = |rows: usize, s: usize, p0: usize| -> Vec<f32> {
            let mut qkv = vec![0f32; rows * s * 3 * hidden];
            for r in 0..rows {
                for i in 0..s {
                    for l in 0..hidden {
                        let x = (100 * r + p0 + i) as f32 + 0.1 * l as f32;
                        qkv[(r * s + i) * 3 * hidden + hidden + l] = x;
                        qkv[(r * s + i) * 3 * hidden + 2 * hidden + l] = -x;
                    }
                }
            }
            qkv
        };
        let mut kv = NativeKv::default();
        kv.append(&step(2, 40, 0), 2, 40, heads, hd).unwrap();
        for p in 40..70 {
            kv.append(&step(2, 1, p), 2, 1, heads, hd).unwrap();
        }
        assert_eq!(kv.len(), 70);
        assert!(kv.cap >= 70);
        kv.reorder(&[1, 1, 0]).unwrap();
        for (r, src) in [1usize, 1, 0].into_iter().enumerate() {
            for p in [0usize, 39, 40, 69] {
                for h in 0..heads {
                    let at = kv.at(r, h, p);
                    let want = (100 * src + p) as f32 + 0.1 * (h * hd + 2) as f32;
                    assert_eq!(kv.k[at + 2], want, "row {r} position {p} head {h}");
                    assert_eq!(kv.v[at + 2], -want);
                }
            }
        }
        assert!(kv.append(&step(2, 1, 70), 2, 1, heads, hd).is_err(), "3 rows cached, 2 given");
        assert!(kv.reorder(&[3]).is_err());
    }

    #[test]
    fn dot_matches_a_plain_sum() {
        let a: Vec<f32> = (0..37).map(|i| i as f32 * 0.5 - 3.0).collect();
        let b: Vec<f32> = (0..37).map(|i| 1.0 / (i as f32 + 1.0)).collect();
        let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - want).abs() < 1e-4);
    }
}
