//! Element-wise and row kernels: activations, LayerNorm, softmax.
//!
//! Each is written once as plain Rust that LLVM vectorises (no calls to libm, sums kept
//! in 16 independent lanes since floating-point addition is not reassociated), and
//! compiled three times: for AVX-512, for AVX2 + FMA and for the baseline, picked by
//! [`Isa`] at run time.

use super::Isa;

/// The activation after a GEMM (fused into its store).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    None,
    /// x · σ(1.702 x), OpenAI CLIP's.
    QuickGelu,
    /// x · Φ(x), with erf (PyTorch's `gelu`).
    Gelu,
    /// The tanh approximation of GELU (`gelu_pytorch_tanh`, `gelu_new`).
    GeluTanh,
    Relu,
}

/// Generates `pub fn $name(isa, args…)`, running `$generic` compiled for the best level
/// `isa` allows.
macro_rules! versions {
    ($(#[$m:meta])* $name:ident => $generic:ident ($($p:ident : $t:ty),*)) => {
        $(#[$m])*
        pub fn $name(isa: Isa, $($p: $t),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn v512($($p: $t),*) { $generic($($p),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v256($($p: $t),*) { $generic($($p),*) }
                match isa.f32_level() {
                    // SAFETY: f32_level() never exceeds what the hardware has, and the
                    // generic body is safe Rust.
                    Isa::Avx512 => return unsafe { v512($($p),*) },
                    // SAFETY: as above.
                    Isa::Avx2 => return unsafe { v256($($p),*) },
                    _ => {}
                }
            }
            $generic($($p),*)
        }
    };
}

const LOG2_E: f32 = std::f32::consts::LOG2_E;

/// e^x, within 2 ulp of libm's over [-87, 88] (clamped outside; NaN stays NaN).
/// e^x = 2^n · e^r with n = round(x·log₂e), |r| ≤ ln2/2 and Cephes' polynomial for e^r.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    // Adding 1.5·2^23 rounds to an integer, which then sits in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let t = x * LOG2_E + MAGIC;
    let n = t - MAGIC;
    let k = t.to_bits().wrapping_sub(MAGIC.to_bits()) as i32;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    er * f32::from_bits(((k + 127) as u32) << 23)
}

/// erf(x), absolute error below 5e-7 (Abramowitz & Stegun 7.1.26: 1.5e-7, plus the
/// rounding of its f32 evaluation).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * z);
    let poly = ((((1.061_405_4 * t - 1.453_152_1) * t + 1.421_413_7) * t - 0.284_496_72) * t + 0.254_829_6) * t;
    let y = 1.0 - poly * exp(-z * z);
    if x < 0.0 {
        -y
    } else {
        y
    }
}

#[inline(always)]
fn act_one(act: Act, x: f32) -> f32 {
    match act {
        Act::None => x,
        Act::QuickGelu => x / (1.0 + exp(-1.702 * x)),
        Act::Gelu => 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2)),
        Act::GeluTanh => {
            let y = 0.797_884_6 * (x + 0.044_715 * x * x * x);
            0.5 * x * (2.0 - 2.0 / (exp(2.0 * y) + 1.0))
        }
        Act::Relu => {
            if x > 0.0 {
                x
            } else {
                0.0
            }
        }
    }
}

#[inline(always)]
fn act_generic(act: Act, xs: &mut [f32]) {
    // One loop per activation, so that each is vectorised on its own.
    match act {
        Act::None => {}
        Act::QuickGelu => xs.iter_mut().for_each(|x| *x = act_one(Act::QuickGelu, *x)),
        Act::Gelu => xs.iter_mut().for_each(|x| *x = act_one(Act::Gelu, *x)),
        Act::GeluTanh => xs.iter_mut().for_each(|x| *x = act_one(Act::GeluTanh, *x)),
        Act::Relu => xs.iter_mut().for_each(|x| *x = act_one(Act::Relu, *x)),
    }
}

versions! {
    /// `act` applied in place.
    activate => act_generic(act: Act, xs: &mut [f32])
}

/// Σ xs in 16 lanes (vectorisable), then the lanes.
#[inline(always)]
fn sum(xs: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let mut chunks = xs.chunks_exact(16);
    for c in &mut chunks {
        for (l, x) in lanes.iter_mut().zip(c) {
            *l += x;
        }
    }
    lanes.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

#[inline(always)]
fn layer_norm_generic(x: &[f32], y: &mut [f32], weight: &[f32], bias: &[f32], eps: f32) {
    let n = weight.len();
    for (x, y) in x.chunks_exact(n).zip(y.chunks_exact_mut(n)) {
        let mean = sum(x) / n as f32;
        for (y, x) in y.iter_mut().zip(x) {
            *y = x - mean;
        }
        let mut lanes = [0f32; 16];
        let mut chunks = y.chunks_exact(16);
        for c in &mut chunks {
            for (l, d) in lanes.iter_mut().zip(c) {
                *l += d * d;
            }
        }
        let var = (lanes.iter().sum::<f32>() + chunks.remainder().iter().map(|d| d * d).sum::<f32>()) / n as f32;
        let rstd = 1.0 / (var + eps).sqrt();
        for ((y, w), b) in y.iter_mut().zip(weight).zip(bias) {
            *y = *y * rstd * w + b;
        }
    }
}

versions! {
    /// LayerNorm of each row of `x` (rows of `weight.len()` values) into `y`: PyTorch's
    /// two-pass mean and biased variance, in f32.
    layer_norm_rows => layer_norm_generic(x: &[f32], y: &mut [f32], weight: &[f32], bias: &[f32], eps: f32)
}

#[inline(always)]
fn softmax_generic(x: &mut [f32], cols: usize, scale: f32, mask: Option<&[f32]>) {
    for (i, row) in x.chunks_exact_mut(cols).enumerate() {
        match mask {
            Some(m) => {
                for (x, m) in row.iter_mut().zip(&m[i * cols..(i + 1) * cols]) {
                    *x = *x * scale + m;
                }
            }
            None => row.iter_mut().for_each(|x| *x *= scale),
        }
        let mut lanes = [f32::NEG_INFINITY; 16];
        let mut chunks = row.chunks_exact(16);
        for c in &mut chunks {
            for (l, x) in lanes.iter_mut().zip(c) {
                *l = if *x > *l { *x } else { *l };
            }
        }
        let max = chunks.remainder().iter().chain(&lanes).fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
        // A fully masked row (all -inf) gives zeros rather than NaNs.
        let max = if max == f32::NEG_INFINITY { 0.0 } else { max };
        for x in row.iter_mut() {
            *x = exp(*x - max);
        }
        // exp clamps at -87, so masked entries come out as ~1.6e-38, not 0: zero them.
        if let Some(m) = mask {
            for (x, m) in row.iter_mut().zip(&m[i * cols..(i + 1) * cols]) {
                if *m == f32::NEG_INFINITY {
                    *x = 0.0;
                }
            }
        }
        let s = sum(row);
        let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
        row.iter_mut().for_each(|x| *x *= inv);
    }
}

versions! {
    /// Row-wise softmax(scale · x + mask) in place; `x` has rows of `cols` values, `mask`
    /// (additive, −∞ for "never") the same shape.
    softmax_rows => softmax_generic(x: &mut [f32], cols: usize, scale: f32, mask: Option<&[f32]>)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn levels() -> impl Iterator<Item = Isa> {
        // Each level the hardware has (supported() maps the others onto these).
        let mut v: Vec<Isa> = Isa::ALL.iter().map(|i| i.f32_level()).collect();
        v.dedup();
        v.into_iter()
    }

    #[test]
    fn exp_and_erf_are_accurate() {
        let mut worst = 0f64;
        for i in -87_000..88_000 {
            let x = i as f32 * 1e-3 + 0.000_37;
            let (got, want) = (exp(x) as f64, (x as f64).exp());
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 3e-7, "exp: worst relative error {worst:e}");
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(-1000.0) < 1e-37 && exp(-1000.0) >= 0.0);
        for i in -6000..6000 {
            let x = i as f64 * 1e-3;
            let e = (erf(x as f32) as f64 - libm_erf(x)).abs();
            assert!(e < 5e-7, "erf({x}): error {e:e}");
        }
    }

    /// erf by its Taylor series / continued fraction, in f64 (reference only).
    fn libm_erf(x: f64) -> f64 {
        // Series: erf x = 2/√π Σ (-1)^n x^(2n+1) / (n! (2n+1)), enough terms for |x| ≤ 6
        // in f64 when summed with a compensating split at |x| > 3 via erfc's asymptotics.
        if x.abs() > 3.5 {
            let z = x.abs();
            // erfc z ≈ e^{-z²}/(z√π) (1 - 1/(2z²) + 3/(4z⁴) - 15/(8z⁶)): error < 1e-9 here.
            let z2 = z * z;
            let erfc = (-z2).exp() / (z * std::f64::consts::PI.sqrt()) * (1.0 - 0.5 / z2 + 0.75 / (z2 * z2) - 1.875 / (z2 * z2 * z2));
            return x.signum() * (1.0 - erfc);
        }
        let mut term = x;
        let mut total = x;
        for n in 1..200 {
            term *= -x * x / n as f64;
            total += term / (2 * n + 1) as f64;
        }
        total * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn activations_match_their_formulas_on_every_level() {
        let xs: Vec<f32> = (-1200..1200).map(|i| i as f32 * 0.01 + 0.003).collect();
        for isa in levels() {
            for act in [Act::QuickGelu, Act::Gelu, Act::GeluTanh, Act::Relu, Act::None] {
                let mut y = xs.clone();
                activate(isa, act, &mut y);
                for (x, y) in xs.iter().zip(&y) {
                    let x64 = *x as f64;
                    let want = match act {
                        Act::None => x64,
                        Act::QuickGelu => x64 / (1.0 + (-1.702 * x64).exp()),
                        Act::Gelu => 0.5 * x64 * (1.0 + libm_erf(x64 / 2f64.sqrt())),
                        Act::GeluTanh => 0.5 * x64 * (1.0 + (0.7978845608 * (x64 + 0.044715 * x64.powi(3))).tanh()),
                        Act::Relu => x64.max(0.0),
                    };
                    assert!((*y as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()), "{isa} {act:?}({x}) = {y}, want {want}");
                }
            }
        }
    }

    #[test]
    fn layer_norm_and_softmax_match_f64_on_every_level() {
        let n = 37;
        let x: Vec<f32> = (0..3 * n).map(|i| ((i * 7919 % 101) as f32 - 50.0) * 0.37 + 100.0).collect();
        let w: Vec<f32> = (0..n).map(|i| 0.5 + i as f32 * 0.01).collect();
        let b: Vec<f32> = (0..n).map(|i| i as f32 * -0.02).collect();
        for isa in levels() {
            let mut y = vec![0f32; x.len()];
            layer_norm_rows(isa, &x, &mut y, &w, &b, 1e-5);
            for r in 0..3 {
                let row: Vec<f64> = x[r * n..(r + 1) * n].iter().map(|&v| v as f64).collect();
                let mean = row.iter().sum::<f64>() / n as f64;
                let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64;
                for j in 0..n {
                    let want = (row[j] - mean) / (var + 1e-5).sqrt() * w[j] as f64 + b[j] as f64;
                    assert!((y[r * n + j] as f64 - want).abs() < 1e-5, "{isa}: {} vs {want}", y[r * n + j]);
                }
            }
            // Softmax with a causal mask; row 0 sees one column.
            let cols = 19;
            let mut s: Vec<f32> = (0..cols * cols).map(|i| ((i * 31 % 17) as f32 - 8.0) * 0.9).collect();
            let orig = s.clone();
            let mask: Vec<f32> =
                (0..cols * cols).map(|i| if i % cols > i / cols { f32::NEG_INFINITY } else { 0.0 }).collect();
            softmax_rows(isa, &mut s, cols, 0.5, Some(&mask));
            for r in 0..cols {
                let row = &s[r * cols..(r + 1) * cols];
                let max = (0..=r).map(|j| orig[r * cols + j] as f64 * 0.5).fold(f64::MIN, f64::max);
                let total: f64 = (0..=r).map(|j| (orig[r * cols + j] as f64 * 0.5 - max).exp()).sum();
                for j in 0..cols {
                    let want = if j > r { 0.0 } else { (orig[r * cols + j] as f64 * 0.5 - max).exp() / total };
                    assert!((row[j] as f64 - want).abs() < 1e-6, "{isa} softmax[{r}][{j}] {} vs {want}", row[j]);
                }
            }
        }
    }
}
