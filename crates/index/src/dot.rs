//! The dot product of two f32 vectors, with explicit SIMD picked at run time (AVX-512F,
//! else AVX2 with FMA, else portable code), and [`UnitDot`], the distance of unit vectors
//! built on it that both the graph and the exact index score with.
//!
//! anndists' `DistDot` sums into a single SIMD register without FMA (one dependent add per
//! 8 floats) and asserts on every call; a graph search spends most of its time here.

use hnsw_rs::prelude::Distance;

/// `1 - a·b` for unit vectors, clamped at 0 (hnsw_rs asserts that distances are not
/// negative, and rounding can make the dot product of a vector with itself exceed 1).
///
/// hnsw_rs records this type's full path in its graph dump and reloads only under the
/// same path: moving or renaming it makes saved graphs unreadable (they load as corrupt
/// and are rebuilt), so bump `persist::FORMAT` when doing so.
#[derive(Debug, Clone, Copy, Default)]
pub struct UnitDot;

impl Distance<f32> for UnitDot {
    #[inline]
    fn eval(&self, a: &[f32], b: &[f32]) -> f32 {
        (1.0 - dot(a, b)).max(0.0)
    }
}

/// `a·b`. Panics if the lengths differ.
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot product of vectors of different lengths");
    #[cfg(target_arch = "x86_64")]
    {
        // The feature checks read a cached bit mask; they cost about as much as a branch.
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked above) and both slices hold a.len() floats.
            return unsafe { x86::dot_avx512(a.as_ptr(), b.as_ptr(), a.len()) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA (checked above) and both slices hold a.len() floats.
            return unsafe { x86::dot_avx2(a.as_ptr(), b.as_ptr(), a.len()) };
        }
    }
    dot_portable(a, b)
}

/// The fastest dot-product kernel this CPU runs, picked once (for loops that call it a
/// great many times: [`dot`] checks the CPU's features on each call).
#[derive(Clone, Copy)]
pub(crate) struct Kernel(unsafe fn(*const f32, *const f32, usize) -> f32);

impl Kernel {
    pub(crate) fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Kernel(x86::dot_avx512);
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                return Kernel(x86::dot_avx2);
            }
        }
        Kernel(dot_portable_raw)
    }

    /// `a·b`. Panics if the lengths differ.
    #[inline]
    pub(crate) fn dot(self, a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len(), "dot product of vectors of different lengths");
        // SAFETY: `detect` (the only constructor) picked a kernel whose CPU features are
        // present, and both slices hold a.len() floats.
        unsafe { (self.0)(a.as_ptr(), b.as_ptr(), a.len()) }
    }
}

/// # Safety
/// `a` and `b` must each point to `n` readable f32.
unsafe fn dot_portable_raw(a: *const f32, b: *const f32, n: usize) -> f32 {
    dot_portable(std::slice::from_raw_parts(a, n), std::slice::from_raw_parts(b, n))
}

/// Eight independent partial sums, which the compiler vectorises for the baseline target.
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Starts loading the cache lines of `v` (up to `lines` of them) ahead of a [`dot`] with
/// it. A hint only: it never faults, whatever the address.
#[inline(always)]
pub(crate) fn prefetch(v: *const f32, lines: usize) {
    #[cfg(target_arch = "x86_64")]
    for i in 0..lines {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: prefetch is a hint that never faults, so any address (even one past the
        // vector, which `wrapping_add` keeps from being UB to compute) is fine; SSE is
        // part of the x86_64 baseline.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(v.wrapping_add(i * 16) as *const i8) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (v, lines);
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must support AVX-512F, and `a` and `b` must each point to `n` readable f32.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn dot_avx512(a: *const f32, b: *const f32, n: usize) -> f32 {
        // Four accumulators hide the FMA latency; every load below reads floats i..i+16
        // (or, masked, i..n) with i + 16 <= n, inside both vectors.
        let (mut s0, mut s1, mut s2, mut s3) =
            (_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps());
        let mut i = 0;
        while i + 64 <= n {
            s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a.add(i)), _mm512_loadu_ps(b.add(i)), s0);
            s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a.add(i + 16)), _mm512_loadu_ps(b.add(i + 16)), s1);
            s2 = _mm512_fmadd_ps(_mm512_loadu_ps(a.add(i + 32)), _mm512_loadu_ps(b.add(i + 32)), s2);
            s3 = _mm512_fmadd_ps(_mm512_loadu_ps(a.add(i + 48)), _mm512_loadu_ps(b.add(i + 48)), s3);
            i += 64;
        }
        while i + 16 <= n {
            s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a.add(i)), _mm512_loadu_ps(b.add(i)), s0);
            i += 16;
        }
        if i < n {
            // The masked-off lanes are not read (no fault past the end).
            let m: __mmask16 = (1u16 << (n - i)) - 1;
            s1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a.add(i)), _mm512_maskz_loadu_ps(m, b.add(i)), s1);
        }
        _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)))
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA, and `a` and `b` must each point to `n` readable f32.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_avx2(a: *const f32, b: *const f32, n: usize) -> f32 {
        // Loads read floats i..i+8 with i + 8 <= n; the tail is read one float at a time.
        let (mut s0, mut s1, mut s2, mut s3) =
            (_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 32 <= n {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(i)), _mm256_loadu_ps(b.add(i)), s0);
            s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(i + 8)), _mm256_loadu_ps(b.add(i + 8)), s1);
            s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(i + 16)), _mm256_loadu_ps(b.add(i + 16)), s2);
            s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(i + 24)), _mm256_loadu_ps(b.add(i + 24)), s3);
            i += 32;
        }
        while i + 8 <= n {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(i)), _mm256_loadu_ps(b.add(i)), s0);
            i += 8;
        }
        let s = _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3));
        let q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
        let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
        let q = _mm_add_ss(q, _mm_shuffle_ps::<0b01>(q, q));
        let mut sum = _mm_cvtss_f32(q);
        while i < n {
            sum += *a.add(i) * *b.add(i);
            i += 1;
        }
        sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
    }

    fn vectors(n: usize, seed: u32) -> (Vec<f32>, Vec<f32>) {
        let mut s = seed.wrapping_mul(2654435761).max(1);
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s % 2001) as f32 / 1000.0 - 1.0
        };
        ((0..n).map(|_| next()).collect(), (0..n).map(|_| next()).collect())
    }

    /// Every length from 0 to 200 (all tails of every SIMD width) and a few large odd ones,
    /// each kernel this CPU can run against an f64 scalar reference.
    #[test]
    fn every_kernel_matches_a_scalar_reference_on_odd_lengths() {
        let lengths = (0..=200).chain([511, 513, 783, 784, 785, 1023, 1537]);
        for n in lengths {
            let (a, b) = vectors(n, n as u32 + 1);
            let want = reference(&a, &b);
            let tol = 1e-5 * (n as f64).max(1.0);
            let mut got = vec![
                ("dispatched", dot(&a, &b)),
                ("detected kernel", Kernel::detect().dot(&a, &b)),
                ("portable", dot_portable(&a, &b)),
            ];
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: AVX-512F checked; both vectors hold n floats.
                    got.push(("avx512", unsafe { x86::dot_avx512(a.as_ptr(), b.as_ptr(), n) }));
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: AVX2 and FMA checked; both vectors hold n floats.
                    got.push(("avx2", unsafe { x86::dot_avx2(a.as_ptr(), b.as_ptr(), n) }));
                }
            }
            for (name, g) in got {
                assert!((g as f64 - want).abs() <= tol, "{name}, n={n}: {g} vs {want}");
            }
        }
    }

    #[test]
    fn unit_dot_is_a_non_negative_distance() {
        let v = [0.6f32, 0.8, 0.0];
        assert_eq!(UnitDot.eval(&v, &v), 0.0);
        assert!((UnitDot.eval(&v, &[0.0, 0.0, 1.0]) - 1.0).abs() < 1e-7);
        assert!((UnitDot.eval(&v, &[-0.6, -0.8, 0.0]) - 2.0).abs() < 1e-6);
        // A vector whose dot with itself rounds above 1 is still at distance 0.
        let w = [1.0000001f32, 0.0];
        assert_eq!(UnitDot.eval(&w, &w), 0.0);
    }

    #[test]
    #[should_panic(expected = "different lengths")]
    fn lengths_must_match() {
        dot(&[1.0, 2.0], &[1.0]);
    }
}
