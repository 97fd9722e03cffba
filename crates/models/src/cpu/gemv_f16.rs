//! `y = x · W (+ bias)` for a few rows of `x` and f16 weights: the language model's
//! decoding steps in `--caption-precision f16`, where each step reads every weight once
//! and the speed is the memory bandwidth's. candle's f16 matmul reaches about 33 GB/s
//! there on this machine; streaming the weights in 64-column strips, converting them with
//! `vcvtph2ps` and accumulating in f32 registers reaches the bandwidth torch does.
//!
//! `W` is K × N row-major f16 (the transposed layout [`crate::nn::Linear`] keeps). One
//! rayon task per strip of 64 columns runs down all K rows with the strip's sums of every
//! row of `x` in registers; W is read exactly once.

use super::Isa;
use rayon::prelude::*;

/// Rows of `x` the kernel takes at once (more rows: call again, or use a GEMM).
pub const MAX_ROWS: usize = 4;

/// Whether [`gemv_f16`] runs on this CPU (AVX-512 F: `vcvtph2ps` on zmm).
pub fn available() -> bool {
    Isa::detect() >= Isa::Avx512
}

/// f16 bits to f32 (IEEE binary16: subnormals, infinities and NaN included).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, _) => {
            // Subnormal: normalise.
            let shift = man.leading_zeros() - 21;
            sign | ((113 - shift) << 23) | (((man << shift) & 0x3ff) << 13)
        }
        (0x1f, _) => sign | 0x7f80_0000 | (man << 13),
        _ => sign | ((exp + 112) << 23) | (man << 13),
    };
    f32::from_bits(bits)
}

/// `y (m × n) = x (m × k) · W (k × n) (+ bias)`, W given as f16 bits, sums in f32.
///
/// Panics if the shapes disagree, `m > MAX_ROWS`, or the CPU lacks AVX-512 ([`available`]).
pub fn gemv_f16(x: &[f32], m: usize, w: &[u16], k: usize, n: usize, bias: Option<&[f32]>, y: &mut [f32]) {
    assert!(m <= MAX_ROWS, "gemv_f16: {m} rows, at most {MAX_ROWS}");
    assert_eq!(x.len(), m * k, "gemv_f16: x has {} values, not M·K = {m}·{k}", x.len());
    assert_eq!(w.len(), k * n, "gemv_f16: w has {} values, not K·N = {k}·{n}", w.len());
    assert_eq!(y.len(), m * n, "gemv_f16: y has {} values, not M·N = {m}·{n}", y.len());
    if let Some(b) = bias {
        assert_eq!(b.len(), n, "gemv_f16: bias has {} values, not N = {n}", b.len());
    }
    assert!(available(), "gemv_f16 needs AVX-512 F (check gemv_f16::available())");
    if m == 0 || n == 0 {
        return;
    }
    let yp = super::gemm::SendPtr(y.as_mut_ptr());
    (0..n.div_ceil(64)).into_par_iter().for_each(|s| {
        let (j0, j1) = (s * 64, (s * 64 + 64).min(n));
        // SAFETY: AVX-512 F checked above; the task writes columns j0..j1 of y's rows only,
        // which no other task touches, and y outlives the loop; slices were length-checked.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            x86::strip(x, m, w, k, n, bias, yp.get(), j0, j1)
        };
    });
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::f16_to_f32;
    use std::arch::x86_64::*;

    /// Columns j0..j1 (at most 64) of every row of y.
    ///
    /// # Safety
    /// AVX-512 F present; shapes as checked by `gemv_f16`; `y` points at m × n writable
    /// values of which this call writes columns j0..j1.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn strip(x: &[f32], m: usize, w: &[u16], k: usize, n: usize, bias: Option<&[f32]>, y: *mut f32, j0: usize, j1: usize) {
        let vecs = (j1 - j0) / 16;
        macro_rules! run {
            ($r:literal) => {
                match vecs {
                    4 => kernel::<$r, 4>(x, w, k, n, bias, y, j0),
                    3 => kernel::<$r, 3>(x, w, k, n, bias, y, j0),
                    2 => kernel::<$r, 2>(x, w, k, n, bias, y, j0),
                    1 => kernel::<$r, 1>(x, w, k, n, bias, y, j0),
                    _ => {}
                }
            };
        }
        match m {
            1 => run!(1),
            2 => run!(2),
            3 => run!(3),
            4 => run!(4),
            _ => unreachable!("gemv_f16: {m} rows"),
        }
        // Columns past the last whole vector of 16.
        for j in j0 + vecs * 16..j1 {
            for i in 0..m {
                let mut s = bias.map_or(0.0, |b| b[j]);
                for kk in 0..k {
                    s += x[i * k + kk] * f16_to_f32(w[kk * n + j]);
                }
                *y.add(i * n + j) = s;
            }
        }
    }

    /// R rows × NV·16 columns from column j0, over all K.
    ///
    /// # Safety
    /// As for [`strip`], with j0 + NV·16 ≤ n.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn kernel<const R: usize, const NV: usize>(x: &[f32], w: &[u16], k: usize, n: usize, bias: Option<&[f32]>, y: *mut f32, j0: usize) {
        let mut acc = [[_mm512_setzero_ps(); NV]; R];
        if let Some(b) = bias {
            for v in 0..NV {
                let bv = _mm512_loadu_ps(b.as_ptr().add(j0 + v * 16));
                for row in acc.iter_mut() {
                    row[v] = bv;
                }
            }
        }
        let wp = w.as_ptr().add(j0);
        for kk in 0..k {
            let row = wp.add(kk * n);
            let mut wv = [_mm512_setzero_ps(); NV];
            for (v, x) in wv.iter_mut().enumerate() {
                *x = _mm512_cvtph_ps(_mm256_loadu_si256(row.add(v * 16) as *const __m256i));
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let xv = _mm512_set1_ps(*x.get_unchecked(r * k + kk));
                for v in 0..NV {
                    acc[v] = _mm512_fmadd_ps(xv, wv[v], acc[v]);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (v, a) in acc.iter().enumerate() {
                _mm512_storeu_ps(y.add(r * n + j0 + v * 16), *a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// f32 to f16 bits, round to nearest even (reference for the tests only; finite,
    /// in-range values).
    fn f32_to_f16(x: f32) -> u16 {
        let bits = x.to_bits();
        let sign = ((bits >> 16) & 0x8000) as u16;
        if bits & 0x7fff_ffff == 0 {
            return sign;
        }
        let exp = ((bits >> 23) & 0xff) as i32 - 127 + 15;
        let man = bits & 0x7f_ffff;
        if exp <= 0 {
            // Subnormal f16.
            let m = (man | 0x80_0000) >> (14 - exp);
            let round = ((man | 0x80_0000) >> (13 - exp)) & 1;
            return sign | (m + round) as u16;
        }
        let m = man >> 13;
        let rest = man & 0x1fff;
        let up = rest > 0x1000 || (rest == 0x1000 && m & 1 == 1);
        sign | (((exp as u32) << 10 | m) + up as u32) as u16
    }

    #[test]
    fn f16_conversion_is_exact() {
        for &x in &[0.0f32, -0.0, 1.0, -2.5, 65504.0, 6.1035156e-5, 5.9604645e-8, 0.33325195, -1234.0] {
            assert_eq!(f16_to_f32(f32_to_f16(x)), x, "{x}");
        }
        assert!(f16_to_f32(0x7c00).is_infinite() && f16_to_f32(0x7e00).is_nan());
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x03ff), 1023.0 * 2f32.powi(-24));
    }

    #[test]
    fn matches_a_naive_product() {
        if !available() {
            eprintln!("gemv_f16: no AVX-512 here, test skipped");
            return;
        }
        let mut s = 0x1234_5678u64;
        let mut rnd = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        for &(m, k, n) in &[(1, 1, 1), (1, 7, 16), (2, 33, 70), (3, 130, 129), (4, 257, 200), (1, 64, 2560), (4, 300, 50)] {
            let x: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
            let w: Vec<u16> = (0..k * n).map(|_| f32_to_f16(rnd())).collect();
            let bias: Vec<f32> = (0..n).map(|_| rnd()).collect();
            for with_bias in [false, true] {
                let b = with_bias.then_some(&bias[..]);
                let mut y = vec![f32::NAN; m * n];
                gemv_f16(&x, m, &w, k, n, b, &mut y);
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = b.map_or(0.0, |b| b[j] as f64)
                            + (0..k).map(|kk| x[i * k + kk] as f64 * f16_to_f32(w[kk * n + j]) as f64).sum::<f64>();
                        let got = y[i * n + j] as f64;
                        assert!((got - want).abs() <= 1e-5 * (k as f64).sqrt() * (1.0 + want.abs()), "M={m} K={k} N={n} [{i}][{j}]: {got} vs {want}");
                    }
                }
            }
        }
    }
}
