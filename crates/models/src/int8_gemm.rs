//! Int8 dot-product GEMM for x86-64 CPUs with AVX-512 VNNI: `y = x · W (+ bias)` with
//! `W` quantized once at load and `x` quantized per row at every call ("W8A8 dynamic",
//! as ONNX Runtime's and FBGEMM's dynamically quantized linear layers).
//!
//! `vpdpbusd` multiplies four unsigned bytes by four signed bytes and adds the four
//! products into a 32-bit lane: 64 multiply-adds per zmm instruction, twice
//! `vdpbf16ps`'s 32 ([`crate::bf16_gemm`]) and four times an f32 FMA's 16. Made for the
//! linear layers of BLIP-2's ViT-g, whose GEMMs at the BF16 peak would still take longer
//! than the encoder's time budget.
//!
//! # Numbers
//!
//! * Weights: symmetric per output column, `w ≈ s_w[j] · q`, `q ∈ [−127, 127]`,
//!   `s_w[j] = max_k |W[k][j]| / 127`.
//! * Activations: asymmetric per row, `x ≈ s_a[i] · (q − z[i])`, `q ∈ [0, 255]`, over the
//!   row's range widened to include 0 (so that 0 is exact: padding, ReLU zeros),
//!   `s_a = (max − min) / 255`, `z = round(−min / s_a)`.
//! * Then `y[i][j] = bias[j] + s_a[i] s_w[j] (Σ_k q_a q_w − z[i] Σ_k q_w[k][j])`: the
//!   integer sums are exact (|Σ| < 2³¹ for K < 65,000), the column sums are computed at
//!   load, and only the scaling is in f32.
//!
//! The error of one output is that of rounding both inputs to 8 bits: relative to the
//! row's range and the column's largest weight, not to each value. Trained transformers
//! have a few input channels of huge magnitude in every row (the "outlier features" of
//! LLM.int8(), Dettmers et al. 2022; "massive activations", Sun et al. 2024), which would
//! stretch every row's range; so, as LLM.int8() does, the input columns whose largest
//! value exceeds [`OUTLIER_RATIO`] times the median column's (at most [`MAX_OUTLIERS`] of
//! them, found at every call) are left out of the int8 product and added in f32 with the
//! dequantized weights, in the micro-kernel's store. Use it where the model tolerates
//! 8-bit inputs (BLIP-2's quantized modes); CLIP keeps f32 and BF16.
//!
//! # Layouts
//!
//! A 32-bit lane holds four consecutive-k values ("a k quad"), byte `t` being `k = 4p + t`:
//!
//! * A, per call: row-major `M × ⌈K/4⌉` words of u8 quads, rows padded to an odd number of
//!   cache lines (see [`crate::bf16_gemm`] for why), with the row's scale and `s_a · z`.
//! * B, packed once: column panels of [`NR`] columns; inside a panel, for each k quad `p`,
//!   the [`NR`] words holding `q_w[4p..4p+4][j]`, j over the panel's columns; past K and N
//!   zero. Per column `s_w` and `s_w · Σ_k q_w`, zero past N.
//!
//! # Algorithm
//!
//! As the BF16 kernel: an `MR × NR` = 6 × 64 tile of 32-bit sums in 24 zmm registers,
//! per quad 4 loads of B, 6 broadcasts of A and 24 `vpdpbusd`; Goto-style K blocks of
//! `kc` quads, B's block reused from L2 by the task's row tiles. At the end of each K
//! block the integer sums are converted and scaled into C (f32), the first block adding
//! the bias and the zero-point correction, so that blocks never carry integers across.
//!
//! Where the process has AMX INT8 tiles (Xeon Sapphire Rapids and later; `MAGPIE_CPU_ISA`
//! at `amx`), the same layouts feed `tdpbusd` (u8 × s8 quads into a 16 × 16 tile of i32):
//! an A tile is 16 rows × 16 quads, a B tile 16 quads × 16 columns of a panel (panels hold
//! a multiple of 16 quads, zeros past K), through the BF16 kernel's tile loops
//! ([`crate::bf16_gemm::amx::accumulate`]). The sums of all of K stay integers, then are
//! scaled as above: bit-identical to the VNNI kernel where it takes K in one block.
//! 1.2–2.8× the VNNI kernel's rate on ViT-g's shapes on a 2-core Xeon (`bench_gops`).

use crate::bf16_gemm::{lines_as_words as words, lines_as_words_mut as words_mut, Line};
use crate::cpu::gemm::{task_grid, Epilogue, SendPtr};
use rayon::prelude::*;

/// Columns of a packed B panel, and of the micro-kernel's tile: 4 zmm vectors.
pub const NR: usize = NV * 16;
const NV: usize = 4;
/// Rows of the micro-kernel's tile.
const MR: usize = 6;

/// Whether this CPU runs [`gemm`]: x86-64 with AVX-512 F, BW and VNNI.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The symmetric int8 quantization of one weight column: its scale and values.
pub fn quantize_column(col: impl Iterator<Item = f32> + Clone) -> (f32, impl Iterator<Item = i8>) {
    let amax = col.clone().fold(0f32, |m, v| m.max(v.abs()));
    let scale = if amax.is_finite() && amax > 0.0 { amax / 127.0 } else { 0.0 };
    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    (scale, col.map(move |v| (v * inv).round_ties_even().clamp(-127.0, 127.0) as i8))
}

/// The asymmetric u8 quantization of one activation row: `(s_a, z)`. `s_a` is 0 for an
/// all-zero (or non-finite) row, whose values then all quantize to `z` = 0.
pub fn row_params(x: &[f32]) -> (f32, i32) {
    let (lo, hi) = x.iter().fold((0f32, 0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    params_from_range(lo, hi)
}

fn params_from_range(lo: f32, hi: f32) -> (f32, i32) {
    let scale = (hi - lo) / 255.0;
    if !(scale.is_finite() && scale > 0.0) {
        return (0.0, 0);
    }
    let z = (-lo * (1.0 / scale)).round_ties_even().clamp(0.0, 255.0) as i32;
    (scale, z)
}

/// One activation value quantized with `inv = 1/s_a` (0 for an all-zero row) and `z`.
#[inline(always)]
pub fn quantize_value(x: f32, inv: f32, z: i32) -> u8 {
    ((x * inv).round_ties_even() as i32 + z).clamp(0, 255) as u8
}

/// An input column is an outlier when its largest |value| exceeds this many times the
/// median column's largest.
pub const OUTLIER_RATIO: f32 = 8.0;
/// At most this many outlier columns per call (the largest), and none when K < 64.
pub const MAX_OUTLIERS: usize = 16;

/// The outlier columns (ascending) for the column maxima `colmax`: see the module docs.
pub fn outlier_columns(colmax: &[f32]) -> Vec<usize> {
    let k = colmax.len();
    if k < 64 {
        return Vec::new();
    }
    let mut sorted = colmax.to_vec();
    let (_, median, _) = sorted.select_nth_unstable_by(k / 2, |a, b| a.total_cmp(b));
    let limit = *median * OUTLIER_RATIO;
    let mut out: Vec<usize> = (0..k).filter(|&c| colmax[c] > limit).collect();
    if out.len() > MAX_OUTLIERS {
        out.sort_by(|&a, &b| colmax[b].total_cmp(&colmax[a]));
        out.truncate(MAX_OUTLIERS);
        out.sort_unstable();
    }
    out
}

/// A K × N weight in int8, in the micro-kernel's layout (see the module docs).
pub struct PackedI8 {
    k: usize,
    n: usize,
    /// ⌈K/4⌉: the k quads of one panel column.
    kq: usize,
    /// `kq` rounded up to 16, the quads stored per panel (zeros past `kq`): an AMX tile
    /// holds 16 quads of each of its rows.
    kqs: usize,
    /// ⌈N/NR⌉ panels of `kqs · NR` words.
    data: Vec<Line>,
    /// `s_w` per column, zero-padded to whole panels.
    scale: Vec<f32>,
    /// `s_w · Σ_k q_w` per column, zero-padded to whole panels.
    wsum: Vec<f32>,
}

impl std::fmt::Debug for PackedI8 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedI8").field("k", &self.k).field("n", &self.n).finish()
    }
}

impl PackedI8 {
    /// Quantizes and packs `w_nk`, N × K row-major: PyTorch's `Linear.weight` (out × in)
    /// as stored, whose rows are the output columns quantized here.
    pub fn pack_transposed(w_nk: &[f32], n: usize, k: usize) -> PackedI8 {
        assert_eq!(w_nk.len(), n * k, "int8_gemm::PackedI8::pack_transposed: w has {} values, not N·K = {n}·{k}", w_nk.len());
        Self::pack_with(k, n, |j| &w_nk[j * k..(j + 1) * k])
    }

    /// Quantizes and packs `w`, K × N row-major.
    pub fn pack(w: &[f32], k: usize, n: usize) -> PackedI8 {
        assert_eq!(w.len(), k * n, "int8_gemm::PackedI8::pack: w has {} values, not K·N = {k}·{n}", w.len());
        let w_nk: Vec<f32> = (0..n * k).map(|t| w[(t % k) * n + t / k]).collect();
        Self::pack_transposed(&w_nk, n, k)
    }

    fn pack_with<'a>(k: usize, n: usize, col: impl Fn(usize) -> &'a [f32] + Sync) -> PackedI8 {
        let kq = k.div_ceil(4);
        let kqs = kq.next_multiple_of(16);
        let panels = n.div_ceil(NR);
        let panel_words = kqs * NR;
        let mut data = vec![Line([0; 16]); panels * panel_words / 16];
        let mut scale = vec![0f32; panels * NR];
        let mut wsum = vec![0f32; panels * NR];
        data.par_chunks_mut((panel_words / 16).max(1))
            .zip(scale.par_chunks_mut(NR).zip(wsum.par_chunks_mut(NR)))
            .enumerate()
            .for_each(|(jp, (panel, (scale, wsum)))| {
                let words = words_mut(panel);
                let mut q = vec![0i8; kq * 4];
                for jj in 0..NR.min(n.saturating_sub(jp * NR)) {
                    let (s, values) = quantize_column(col(jp * NR + jj).iter().copied());
                    q.iter_mut().zip(values).for_each(|(q, v)| *q = v);
                    scale[jj] = s;
                    wsum[jj] = s * q.iter().map(|&v| v as i32).sum::<i32>() as f32;
                    for (p, quad) in q.chunks_exact(4).enumerate() {
                        words[p * NR + jj] = u32::from_le_bytes([quad[0] as u8, quad[1] as u8, quad[2] as u8, quad[3] as u8]);
                    }
                }
            });
        PackedI8 { k, n, kq, kqs, data, scale, wsum }
    }

    /// K, the inner dimension.
    pub fn k(&self) -> usize {
        self.k
    }

    /// N, the output columns.
    pub fn n(&self) -> usize {
        self.n
    }

    /// The quantized weight `q_w[kk][j]` and the column's scale (for tests and references).
    pub fn get(&self, kk: usize, j: usize) -> (i8, f32) {
        let w = words(&self.data)[(j / NR) * self.kqs * NR + (kk / 4) * NR + j % NR];
        (w.to_le_bytes()[kk % 4] as i8, self.scale[j])
    }

    /// Row `kk` of the dequantized weight, `s_w[j] · q_w[kk][j]` for every column of the
    /// panels (zero past N), into `out`.
    fn dequantized_row(&self, kk: usize, out: &mut [f32]) {
        let d = words(&self.data);
        for (j, o) in out.iter_mut().enumerate() {
            let w = d[(j / NR) * self.kqs * NR + (kk / 4) * NR + j % NR];
            *o = self.scale[j] * (w.to_le_bytes()[kk % 4] as i8) as f32;
        }
    }

    fn panel(&self, jp: usize) -> &[u32] {
        let len = self.kqs * NR;
        &words(&self.data)[jp * len..(jp + 1) * len]
    }
}

/// `c = a · b (+ bias)` with the epilogue `ep` (an activation, or accumulation into C):
/// `a` is M × K row-major f32, quantized per row on the way in, `b` the packed weight,
/// `c` M × N row-major. Runs on rayon's pool.
///
/// Panics if the shapes disagree or the CPU lacks the instructions ([`available`]).
pub fn gemm_ep(a: &[f32], m: usize, b: &PackedI8, bias: Option<&[f32]>, c: &mut [f32], ep: Epilogue) {
    gemm_at(crate::cpu::Isa::detect(), a, m, b, bias, c, ep)
}

/// [`gemm_ep`] on the kernels of `isa`: AMX INT8 tiles at [`crate::cpu::Isa::Amx`] where
/// the process has them ([`crate::bf16_gemm::amx::int8_available`]), else AVX-512 VNNI.
pub fn gemm_at(isa: crate::cpu::Isa, a: &[f32], m: usize, b: &PackedI8, bias: Option<&[f32]>, c: &mut [f32], ep: Epilogue) {
    let (k, n) = (b.k, b.n);
    assert_eq!(a.len(), m * k, "int8_gemm::gemm: a has {} values, not M·K = {m}·{k}", a.len());
    assert_eq!(c.len(), m * n, "int8_gemm::gemm: c has {} values, not M·N = {m}·{n}", c.len());
    if let Some(bias) = bias {
        assert_eq!(bias.len(), n, "int8_gemm::gemm: bias has {} values, not N = {n}", bias.len());
    }
    assert!(available(), "int8_gemm::gemm needs AVX-512 F, BW and VNNI (check int8_gemm::available())");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the CPU features were just checked (AMX's by int8_available).
    unsafe {
        let amx = isa.supported() >= crate::cpu::Isa::Amx && crate::bf16_gemm::amx::int8_available();
        x86::gemm(a, m, b, bias, c, &x86::blocking(), ep, amx)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (isa, ep);
}

/// [`gemm_ep`] storing `a · b (+ bias)`.
pub fn gemm(a: &[f32], m: usize, b: &PackedI8, bias: Option<&[f32]>, c: &mut [f32]) {
    gemm_ep(a, m, b, bias, c, Epilogue::STORE)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    pub(super) use crate::bf16_gemm::x86::Blocking;
    use crate::bf16_gemm::x86::{activate_task, mask16};
    use crate::cpu::gemm::x86::col_masks;
    use std::arch::x86_64::*;

    /// The BF16 kernel's blocking, with K blocks of `kc` quads: 768 (3,072 k) measured
    /// fastest on the ViT-g shapes (256: 5-10% slower, all of K: 10-25%).
    pub(super) fn blocking() -> Blocking {
        Blocking { kc: 768, ..Blocking::default() }
    }

    /// The quantized activations of one call, kept per calling thread between calls.
    #[derive(Default)]
    struct Quantized {
        rows: Vec<Line>,
        /// Per row: `s_a` and `s_a · z`.
        scale: Vec<f32>,
        zs: Vec<f32>,
    }

    thread_local! {
        /// Taken while in use, so that a nested call (a rayon task of this thread calling
        /// gemm) allocates its own.
        static SCRATCH: std::cell::Cell<Quantized> = std::cell::Cell::new(Quantized::default());
    }

    /// At most this many bytes of quantized activations stay allocated per thread.
    const SCRATCH_KEEP: usize = 32 << 20;

    /// What one micro-tile needs to finish its first K block.
    #[derive(Clone, Copy)]
    struct First {
        bias: Option<*const f32>,
        accumulate: bool,
        /// The outlier columns' part: `no` columns, their values for the tile's rows
        /// (`xo`, rows `no` apart) and dequantized weights for its columns (`wo`, rows
        /// `ldw` apart).
        no: usize,
        xo: *const f32,
        wo: *const f32,
        ldw: usize,
    }

    /// [`super::gemm_ep`] with a given blocking; shapes already checked. On AMX tiles if
    /// `amx`.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW and VNNI ([`available`]), and AMX INT8 if `amx`
    /// ([`crate::bf16_gemm::amx::int8_available`]).
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn gemm(a: &[f32], m: usize, b: &PackedI8, bias: Option<&[f32]>, c: &mut [f32], blk: &Blocking, ep: Epilogue, amx: bool) {
        let (k, n, kq) = (b.k, b.n, b.kq);
        if m == 0 || n == 0 {
            return;
        }
        let amx = amx && kq > 0;
        let lda = kq.next_multiple_of(16) | 16;
        // AMX reads A in blocks of 16 rows: zero rows complete the last block.
        let padded = if amx { m.next_multiple_of(16) } else { m };
        let mut q = SCRATCH.take();
        if q.rows.len() < padded * lda / 16 {
            q.rows = vec![Line([0; 16]); padded * lda / 16];
        }
        q.rows[m * lda / 16..padded * lda / 16].fill(Line([0; 16]));
        q.scale.resize(m, 0.0);
        q.zs.resize(m, 0.0);
        let rows_per_chunk = (16384 / lda).clamp(1, m.div_ceil(2).max(1));
        // Pass 1: each row's range (kept in `scale`/`zs` for now) and the column maxima.
        let colmax = q
            .scale
            .par_chunks_mut(rows_per_chunk)
            .zip(q.zs.par_chunks_mut(rows_per_chunk))
            .enumerate()
            .map(|(ci, (lo, hi))| {
                let mut mx = vec![0f32; k];
                for ri in 0..lo.len() {
                    let i = ci * rows_per_chunk + ri;
                    // SAFETY: the caller vouches for the CPU features.
                    (lo[ri], hi[ri]) = unsafe { range_and_column_maxima(&a[i * k..(i + 1) * k], &mut mx) };
                }
                mx
            })
            .reduce_with(|mut a, b| {
                a.iter_mut().zip(&b).for_each(|(a, b)| *a = a.max(*b));
                a
            })
            .unwrap_or_default();
        // Outlier columns: their values (M × no) and dequantized weight rows (no × panels·NR).
        let outliers = outlier_columns(&colmax);
        let no = outliers.len();
        let ldw = n.div_ceil(NR) * NR;
        let xo: Vec<f32> = (0..m).flat_map(|i| outliers.iter().map(move |&c| a[i * k + c])).collect();
        let mut wo = vec![0f32; no * ldw];
        for (o, &c) in outliers.iter().enumerate() {
            b.dequantized_row(c, &mut wo[o * ldw..(o + 1) * ldw]);
        }
        // Pass 2: quantize, each row over its range; with outliers, a copy of the row with
        // them zeroed and its range anew (0 quantizes to exactly z: they add nothing to
        // the integer sums).
        {
            let rows = &mut q.rows[..m * lda / 16];
            rows.par_chunks_mut(rows_per_chunk * lda / 16)
                .zip(q.scale.par_chunks_mut(rows_per_chunk).zip(q.zs.par_chunks_mut(rows_per_chunk)))
                .enumerate()
                .for_each(|(ci, (chunk, (scale, zs)))| {
                    let mut copy = if no > 0 { vec![0f32; k] } else { Vec::new() };
                    let mut unused = if no > 0 { vec![0f32; k] } else { Vec::new() };
                    for (ri, row) in words_mut(chunk).chunks_mut(lda).enumerate() {
                        let i = ci * rows_per_chunk + ri;
                        let mut x = &a[i * k..(i + 1) * k];
                        let (mut lo, mut hi) = (scale[ri], zs[ri]);
                        if no > 0 {
                            copy.copy_from_slice(x);
                            outliers.iter().for_each(|&c| copy[c] = 0.0);
                            x = &copy;
                            // SAFETY: as above.
                            (lo, hi) = unsafe { range_and_column_maxima(x, &mut unused) };
                        }
                        let (s, z) = params_from_range(lo, hi);
                        // SAFETY: as above.
                        unsafe { quantize_row(x, row, s, z) };
                        scale[ri] = s;
                        zs[ri] = s * z as f32;
                    }
                });
        }
        let (aq, sa, zs) = (words(&q.rows), &q.scale[..m], &q.zs[..m]);

        let kc = blk.kc.max(1);
        // Row groups in whole micro-tiles: AMX's are 32 rows (two tiles).
        let mr = if amx { 32 } else { MR };
        let (rt, pn) = (m.div_ceil(mr), n.div_ceil(NR));
        let (mt, nt) = task_grid(m, mr, pn, NR, blk.mc, blk.nc, blk.tasks_per_thread);
        let cptr = SendPtr(c.as_mut_ptr());
        let bias = bias.map(|b| b.as_ptr() as usize);
        let outl = Outliers { no, xo: &xo, wo: &wo, ldw };
        (0..mt * nt).into_par_iter().for_each(|t| {
            let (g, h) = (t / nt, t % nt);
            let rows = (g * rt / mt * mr, ((g + 1) * rt / mt * mr).min(m));
            let panels = (h * pn / nt, (h + 1) * pn / nt);
            // SAFETY: the caller vouches for the CPU features; the task writes its rows ×
            // panels of C only, which no other task touches. For AMX: the rows to the next
            // multiple of 16 are in `aq` (zero past M), `lda` ≥ kqs, tasks start on
            // multiples of 32 rows.
            unsafe {
                if amx {
                    task_amx(aq, lda, sa, zs, b, bias.map(|p| p as *const f32), &outl, cptr.get(), n, rows, panels, kc, ep)
                } else {
                    task(aq, lda, sa, zs, b, bias.map(|p| p as *const f32), &outl, cptr.get(), n, rows, panels, kc, ep)
                }
            };
        });
        if q.rows.len() * 64 <= SCRATCH_KEEP {
            SCRATCH.set(q);
        }
    }

    /// The outlier columns of one call: `xo` M × `no`, `wo` `no` × `ldw`.
    struct Outliers<'a> {
        no: usize,
        xo: &'a [f32],
        wo: &'a [f32],
        ldw: usize,
    }

    /// One task: C[rows, panels] over all of K.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn task(
        aq: &[u32],
        lda: usize,
        sa: &[f32],
        zs: &[f32],
        b: &PackedI8,
        bias: Option<*const f32>,
        outl: &Outliers,
        c: *mut f32,
        ldc: usize,
        (m0, m1): (usize, usize),
        (p0, p1): (usize, usize),
        kc: usize,
        ep: Epilogue,
    ) {
        let (kq, n) = (b.kq, b.n);
        let mut k0 = 0;
        // K = 0 still runs one (empty) block: C gets the bias.
        while k0 < kq || (k0 == 0 && kq == 0) {
            let kn = kc.min(kq - k0);
            for jp in p0..p1 {
                let bp = b.panel(jp).as_ptr().add(k0 * NR);
                let j = jp * NR;
                let cols = NR.min(n - j);
                let (sw, ws) = (b.scale.as_ptr().add(j), b.wsum.as_ptr().add(j));
                let mut i = m0;
                while i < m1 {
                    let rows = MR.min(m1 - i);
                    let ap = aq.as_ptr().add(i * lda + k0);
                    let cp = c.add(i * ldc + j);
                    let (ra, rz) = (sa.as_ptr().add(i), zs.as_ptr().add(i));
                    let first = (k0 == 0).then(|| {
                        let (xo, wo) = if outl.no > 0 {
                            (outl.xo.as_ptr().add(i * outl.no), outl.wo.as_ptr().add(j))
                        } else {
                            (std::ptr::null(), std::ptr::null())
                        };
                        First { bias: bias.map(|p| p.add(j)), accumulate: ep.accumulate, no: outl.no, xo, wo, ldw: outl.ldw }
                    });
                    match rows {
                        6 => kernel::<6>(kn, ap, lda, bp, cp, ldc, cols, ra, rz, sw, ws, first),
                        5 => kernel::<5>(kn, ap, lda, bp, cp, ldc, cols, ra, rz, sw, ws, first),
                        4 => kernel::<4>(kn, ap, lda, bp, cp, ldc, cols, ra, rz, sw, ws, first),
                        3 => kernel::<3>(kn, ap, lda, bp, cp, ldc, cols, ra, rz, sw, ws, first),
                        2 => kernel::<2>(kn, ap, lda, bp, cp, ldc, cols, ra, rz, sw, ws, first),
                        _ => kernel::<1>(kn, ap, lda, bp, cp, ldc, cols, ra, rz, sw, ws, first),
                    }
                    i += MR;
                }
            }
            if kq == 0 {
                break;
            }
            k0 += kn;
        }
        activate_task(ep, c, ldc, (m0, m1), (p0 * NR, (p1 * NR).min(n)));
    }

    /// [`task`] on AMX INT8 tiles: the exact integer sums of all of K in tiles (through
    /// [`crate::bf16_gemm::amx::accumulate`]), then scaled into C as [`kernel`] does.
    ///
    /// # Safety
    /// As [`task`], and AMX INT8 ([`crate::bf16_gemm::amx::int8_available`]); `aq` holds
    /// the rows to `m1.next_multiple_of(16)`, `lda ≥ b.kqs`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn task_amx(
        aq: &[u32],
        lda: usize,
        sa: &[f32],
        zs: &[f32],
        b: &PackedI8,
        bias: Option<*const f32>,
        outl: &Outliers,
        c: *mut f32,
        ldc: usize,
        (m0, m1): (usize, usize),
        (p0, p1): (usize, usize),
        kc: usize,
        ep: Epilogue,
    ) {
        use crate::bf16_gemm::amx;
        debug_assert!(lda >= b.kqs && aq.len() >= m1.next_multiple_of(16) * lda);
        let width = (p1 - p0) * NR;
        let mut acc = amx::ACC.take();
        // SAFETY: as this function's; the panels hold kqs quads of NR words.
        amx::accumulate::<true>(aq.as_ptr() as *const u8, lda * 4, &|jp| b.panel(jp).as_ptr() as *const u8, b.kqs / 16, usize::MAX, (m0, m1), (p0, p1), (kc / 16).max(1), &mut acc);
        let sums = acc.as_ptr() as *const i32;
        let j0 = p0 * NR;
        let cols = width.min(b.n - j0);
        // Per column: s_w, s_w Σ q_w and the bias (zero-padded to whole panels, except
        // the bias, read under the mask).
        // One K block: every row starts as the VNNI kernel's first block does.
        let first = First {
            bias: bias.map(|p| p.add(j0)),
            accumulate: ep.accumulate,
            no: outl.no,
            xo: outl.xo.as_ptr(),
            wo: if outl.no > 0 { outl.wo.as_ptr().add(j0) } else { std::ptr::null() },
            ldw: outl.ldw,
        };
        for i in m0..m1 {
            let (s, z) = (_mm512_set1_ps(sa[i]), _mm512_set1_ps(zs[i]));
            let row = sums.add((i - m0) * width);
            let dst = c.add(i * ldc + j0);
            let mut j = 0;
            while j < cols {
                let mask = mask16(cols - j);
                let base = first_base(&first, i, j, dst.add(j), mask, z, _mm512_loadu_ps(b.wsum.as_ptr().add(j0 + j)));
                let sum = _mm512_cvtepi32_ps(_mm512_loadu_si512(row.add(j) as *const __m512i));
                let y = _mm512_fmadd_ps(sum, _mm512_mul_ps(s, _mm512_loadu_ps(b.scale.as_ptr().add(j0 + j))), base);
                _mm512_mask_storeu_ps(dst.add(j), mask, y);
                j += 16;
            }
        }
        activate_task(ep, c, ldc, (m0, m1), (j0, j0 + cols));
        amx::ACC.set(acc);
    }

    /// The micro-kernel: the integer sums of A[0..R, kn quads] · B panel[kn quads], scaled
    /// into C[0..R, 0..cols]: `C = C₀ + s_a s_w · Σ`, where C₀ is C itself after the first
    /// K block, and on the first block the bias minus the zero-point term `s_a z · s_w Σ q_w`
    /// (plus C when accumulating).
    ///
    /// `a` points at row 0's first quad (rows `lda` words apart), `b` at the panel's first
    /// quad (`NR` words per quad), `c` at the tile (rows `ldc` apart), `ra`/`rz` at the
    /// tile's rows' `s_a`/`s_a z`, `sw`/`ws` at its columns' `s_w`/`s_w Σ q_w` (readable for
    /// NR columns: zero-padded to whole panels). `cols ≤ NR` columns are stored.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn kernel<const R: usize>(
        kn: usize,
        a: *const u32,
        lda: usize,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        cols: usize,
        ra: *const f32,
        rz: *const f32,
        sw: *const f32,
        ws: *const f32,
        first: Option<First>,
    ) {
        let mut acc = [[_mm512_setzero_si512(); NV]; R];
        let mut ap = [a; R];
        for (r, p) in ap.iter_mut().enumerate() {
            *p = a.add(r * lda);
        }
        let mut bp = b;
        for p in 0..kn {
            let mut bv = [_mm512_setzero_si512(); NV];
            for (v, x) in bv.iter_mut().enumerate() {
                *x = _mm512_load_si512(bp.add(v * 16) as *const __m512i);
            }
            for r in 0..R {
                let av = _mm512_set1_epi32(*ap[r].add(p) as i32);
                for v in 0..NV {
                    acc[r][v] = _mm512_dpbusd_epi32(acc[r][v], av, bv[v]);
                }
            }
            bp = bp.add(NR);
        }

        let (full, mask) = col_masks::<NV>(cols);
        let load = |p: *const f32, v: usize| if full { _mm512_loadu_ps(p) } else { _mm512_maskz_loadu_ps(mask[v], p) };
        let swv: [__m512; NV] = std::array::from_fn(|v| _mm512_loadu_ps(sw.add(v * 16)));
        let wsv: [__m512; NV] = std::array::from_fn(|v| _mm512_loadu_ps(ws.add(v * 16)));
        for (r, row) in acc.iter().enumerate() {
            let s = _mm512_set1_ps(*ra.add(r));
            let z = _mm512_set1_ps(*rz.add(r));
            for v in 0..NV {
                let p = c.add(r * ldc + v * 16);
                let base = match first {
                    None => load(p, v),
                    Some(f) => first_base(&f, r, v * 16, p, if full { u16::MAX } else { mask[v] }, z, wsv[v]),
                };
                let y = _mm512_fmadd_ps(_mm512_cvtepi32_ps(row[v]), _mm512_mul_ps(s, swv[v]), base);
                if full {
                    _mm512_storeu_ps(p, y);
                } else {
                    _mm512_mask_storeu_ps(p, mask[v], y);
                }
            }
        }
    }

    /// The start of 16 outputs on the first K block, before the integer sums are added:
    /// C (when accumulating) + the bias + the outlier columns' part − `s_a z · s_w Σ q_w`,
    /// for row `r` of `f`'s tile and its columns `col..col + 16` (`c` pointing at them,
    /// `mask` the ones inside N, `z` = `s_a z` of the row, `ws` = `s_w Σ q_w` of the columns).
    ///
    /// # Safety
    /// As [`kernel`]'s first block: `f`'s pointers readable for the tile's rows and
    /// columns (the outliers' weights for whole panels), `c` under `mask`.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn first_base(f: &First, r: usize, col: usize, c: *const f32, mask: u16, z: __m512, ws: __m512) -> __m512 {
        let mut base = if f.accumulate { _mm512_maskz_loadu_ps(mask, c) } else { _mm512_setzero_ps() };
        if let Some(bias) = f.bias {
            base = _mm512_add_ps(base, _mm512_maskz_loadu_ps(mask, bias.add(col)));
        }
        for o in 0..f.no {
            let x = _mm512_set1_ps(*f.xo.add(r * f.no + o));
            base = _mm512_fmadd_ps(x, _mm512_loadu_ps(f.wo.add(o * f.ldw + col)), base);
        }
        _mm512_fnmadd_ps(z, ws, base)
    }

    /// The range of row `x`, widened to include 0, and `colmax[c] = max(colmax[c], |x[c]|)`.
    #[target_feature(enable = "avx512f")]
    unsafe fn range_and_column_maxima(x: &[f32], colmax: &mut [f32]) -> (f32, f32) {
        let k = x.len();
        debug_assert!(colmax.len() >= k);
        let (mut lo, mut hi) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut kk = 0;
        while kk < k {
            let m = mask16(k - kk);
            let v = _mm512_maskz_loadu_ps(m, x.as_ptr().add(kk));
            lo = _mm512_min_ps(lo, v);
            hi = _mm512_max_ps(hi, v);
            let cm = colmax.as_mut_ptr().add(kk);
            _mm512_mask_storeu_ps(cm, m, _mm512_max_ps(_mm512_maskz_loadu_ps(m, cm), _mm512_abs_ps(v)));
            kk += 16;
        }
        (_mm512_reduce_min_ps(lo), _mm512_reduce_max_ps(hi))
    }

    /// One row of A to u8 quads with `(s_a, z)` (zeros past the row's end, which the zero
    /// weights of the padding ignore anyway), as [`quantize_value`] computes them.
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn quantize_row(x: &[f32], out: &mut [u32], scale: f32, z: i32) {
        let k = x.len();
        debug_assert!(out.len() * 4 >= k && out.len().is_multiple_of(16));
        let inv = _mm512_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
        let zv = _mm512_set1_epi32(z);
        let bytes = out.as_mut_ptr() as *mut u8;
        let mut kk = 0;
        while kk < k {
            let m = mask16(k - kk);
            let v = _mm512_maskz_loadu_ps(m, x.as_ptr().add(kk));
            // cvtps rounds to nearest even (MXCSR's default), as round_ties_even.
            let q = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v, inv)), zv);
            let q = _mm512_max_epi32(q, _mm512_setzero_si512());
            // Unsigned saturation to u8: the clamp to 255.
            let q8 = _mm512_cvtusepi32_epi8(q);
            if k - kk >= 16 {
                _mm_storeu_si128(bytes.add(kk) as *mut __m128i, q8);
            } else {
                let mut tail = [0u8; 16];
                _mm_storeu_si128(tail.as_mut_ptr() as *mut __m128i, q8);
                std::ptr::copy_nonoverlapping(tail.as_ptr(), bytes.add(kk), k - kk);
            }
            kk += 16;
        }
        // Zero the rest of the row (the last quad's unused bytes and the padding).
        std::slice::from_raw_parts_mut(bytes.add(k), out.len() * 4 - k).fill(0);
    }


    #[cfg(test)]
    pub(super) fn with_blocking(a: &[f32], m: usize, b: &PackedI8, bias: Option<&[f32]>, c: &mut [f32], blk: Blocking) {
        with_blocking_at(a, m, b, bias, c, blk, false)
    }

    /// With a given blocking, on the VNNI kernel or (`amx`) on AMX tiles.
    #[cfg(test)]
    pub(super) fn with_blocking_at(a: &[f32], m: usize, b: &PackedI8, bias: Option<&[f32]>, c: &mut [f32], blk: Blocking, amx: bool) {
        assert!(available() && (!amx || crate::bf16_gemm::amx::int8_available()));
        // SAFETY: just checked.
        unsafe { gemm(a, m, b, bias, c, &blk, Epilogue::STORE, amx) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bf16_gemm::tests::{rel_err, Rng};
    use crate::cpu::math::Act;

    /// The largest |value| of each of the K columns of the M × K matrix `a` (what the
        /// kernel's first pass computes along with the row ranges).
    fn column_maxima(a: &[f32], m: usize, k: usize) -> Vec<f32> {
        if k == 0 {
            return Vec::new();
        }
        let rows_per = (16384 / k).max(1);
        a[..m * k]
            .par_chunks(rows_per * k)
            .map(|rows| {
                let mut mx = vec![0f32; k];
                for row in rows.chunks_exact(k) {
                    mx.iter_mut().zip(row).for_each(|(m, v)| *m = m.max(v.abs()));
                }
                mx
            })
            .reduce_with(|mut a, b| {
                a.iter_mut().zip(&b).for_each(|(a, b)| *a = a.max(*b));
                a
            })
            .unwrap_or_else(|| vec![0.0; k])
    }

    /// What the kernel computes, in f64 from the same quantized values: bias + s_a s_w
    /// (Σ q_a q_w − z Σ q_w), the sums exact, the outlier columns' part apart.
    fn reference_quantized(a: &[f32], m: usize, b: &PackedI8, bias: Option<&[f32]>) -> Vec<f64> {
        let (k, n) = (b.k(), b.n());
        let outliers = outlier_columns(&column_maxima(a, m, k));
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            let mut row = a[i * k..(i + 1) * k].to_vec();
            outliers.iter().for_each(|&o| row[o] = 0.0);
            let (s, z) = row_params(&row);
            let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
            let qa: Vec<i64> = row.iter().map(|&x| quantize_value(x, inv, z) as i64).collect();
            for j in 0..n {
                let (mut dot, mut sum) = (0i64, 0i64);
                let sw = if k > 0 { b.get(0, j).1 } else { 0.0 };
                for (kk, &qa) in qa.iter().enumerate() {
                    let q = b.get(kk, j).0;
                    dot += qa * q as i64;
                    sum += q as i64;
                }
                let bj = bias.map_or(0.0, |b| b[j] as f64);
                let outl: f64 = outliers.iter().map(|&o| a[i * k + o] as f64 * sw as f64 * b.get(o, j).0 as f64).sum();
                c[i * n + j] = bj + outl + s as f64 * sw as f64 * (dot - z as i64 * sum) as f64;
            }
        }
        c
    }

    /// `a · w (+ bias)` in f64, unquantized.
    fn reference_f64(a: &[f32], m: usize, w: &[f32], k: usize, n: usize, bias: Option<&[f32]>) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = bias.map_or(0.0, |b| b[j] as f64) + (0..k).map(|kk| a[i * k + kk] as f64 * w[kk * n + j] as f64).sum::<f64>();
            }
        }
        c
    }

    #[test]
    fn quantization_is_exact_where_it_must_be() {
        // 0 is exact, the range's ends map to 0 and 255, symmetric weights to ±127.
        let row = [-1.0f32, 0.0, 0.5, 3.0];
        let (s, z) = row_params(&row);
        assert!((s - 4.0 / 255.0).abs() < 1e-7, "{s}");
        assert_eq!(z, 64); // 1 / (4/255) = 63.75 → 64
        let inv = 1.0 / s;
        assert_eq!(quantize_value(0.0, inv, z), 64);
        assert_eq!(quantize_value(3.0, inv, z), 255);
        assert_eq!(quantize_value(-1.0, inv, z), 0);
        assert_eq!(quantize_value(100.0, inv, z), 255, "clamped");
        // A positive row: 0 is its minimum, z = 0.
        assert_eq!(row_params(&[0.5, 2.0]).1, 0);
        // An all-zero row has no scale.
        assert_eq!(row_params(&[0.0; 5]), (0.0, 0));
        assert_eq!(row_params(&[f32::INFINITY, 1.0]), (0.0, 0));
        let (s, q) = quantize_column([0.5f32, -1.27, 0.0].into_iter());
        assert!((s - 0.01).abs() < 1e-7);
        assert_eq!(q.collect::<Vec<_>>(), vec![50, -127, 0]);
        let (s, q) = quantize_column([0.0f32; 3].into_iter());
        assert_eq!((s, q.collect::<Vec<_>>()), (0.0, vec![0, 0, 0]));
    }

    #[test]
    fn packing_layout() {
        let (k, n) = (9, 70);
        let mut rng = Rng(3);
        let w = rng.vec(k * n);
        let b = PackedI8::pack(&w, k, n);
        for j in [0, 5, 63, 64, 69] {
            let col: Vec<f32> = (0..k).map(|kk| w[kk * n + j]).collect();
            let (s, q) = quantize_column(col.iter().copied());
            for (kk, q) in q.enumerate() {
                assert_eq!(b.get(kk, j), (q, s), "k {kk} col {j}");
            }
            // Quad 2 of a 9-deep column holds k = 8 and three zeros.
            let w = words(&b.data)[(j / NR) * b.kqs * NR + 2 * NR + j % NR];
            assert_eq!(w >> 8, 0);
        }
        // Columns past N are zero, scales too.
        assert_eq!(words(&b.data)[b.kqs * NR + 70 - 64 + 1], 0);
        assert_eq!(b.scale[127], 0.0);
        // From PyTorch's out × in layout, the same bytes.
        let mut w_nk = vec![0f32; n * k];
        for kk in 0..k {
            for j in 0..n {
                w_nk[j * k + kk] = w[kk * n + j];
            }
        }
        let t = PackedI8::pack_transposed(&w_nk, n, k);
        assert!(words(&t.data) == words(&b.data) && t.scale == b.scale && t.wsum == b.wsum);
    }

    #[test]
    fn matches_the_quantized_reference_and_stays_close_to_f32() {
        if !available() {
            eprintln!("int8_gemm: no AVX-512 VNNI here, test skipped");
            return;
        }
        let mut rng = Rng(0x5eed);
        let mut worst = 0f64;
        for &(m, k, n) in &[(1, 1, 1), (3, 7, 17), (7, 64, 65), (13, 515, 97), (50, 130, 200), (8, 1600, 48), (17, 33, 128)] {
            for (with_bias, shift) in [(false, 0.0), (true, 0.0), (true, 0.7)] {
                // `shift` makes the rows mostly positive (as after a GELU): z far from 128.
                let a: Vec<f32> = rng.vec(m * k).iter().map(|v| v + shift).collect();
                let w = rng.vec(k * n);
                let bias = rng.vec(n);
                let bias = with_bias.then_some(&bias[..]);
                let b = PackedI8::pack(&w, k, n);
                let mut c = vec![f32::NAN; m * n];
                gemm(&a, m, &b, bias, &mut c);
                let q = reference_quantized(&a, m, &b, bias);
                let scale = q.iter().fold(1e-30f64, |s, v| s.max(v.abs()));
                for (idx, (x, y)) in c.iter().zip(&q).enumerate() {
                    assert!((*x as f64 - y).abs() <= 2e-6 * scale, "M={m} K={k} N={n}: c[{idx}] {x} vs {y}");
                }
                let err = rel_err(&c, &reference_f64(&a, m, &w, k, n, bias));
                assert!(err < 2e-2, "M={m} K={k} N={n}: relative error {err} against f32");
                worst = worst.max(err);
            }
        }
        eprintln!("int8_gemm: worst relative error against unquantized {worst:.2e}");
    }

    #[test]
    fn outlier_columns_are_kept_out_of_the_int8_product() {
        if !available() {
            eprintln!("int8_gemm: no AVX-512 VNNI here, test skipped");
            return;
        }
        let (m, k, n) = (37, 1001, 130);
        let mut rng = Rng(0x0071_1e55);
        let mut a = rng.vec(m * k);
        let cols = [3usize, 100, 517, 1000];
        for i in 0..m {
            for (t, &c) in cols.iter().enumerate() {
                a[i * k + c] *= 40.0 + 10.0 * t as f32;
            }
        }
        let colmax = column_maxima(&a, m, k);
        assert_eq!(outlier_columns(&colmax), cols);
        // Beyond MAX_OUTLIERS, the largest are kept.
        let mut many = vec![1f32; 200];
        (0..40).for_each(|c| many[c * 5] = 100.0 + c as f32);
        let kept = outlier_columns(&many);
        assert_eq!(kept, (24..40).map(|c| c * 5).collect::<Vec<_>>());
        assert!(outlier_columns(&[1.0, 100.0, 1.0]).is_empty(), "none for K < 64");

        let (w, bias) = (rng.vec(k * n), rng.vec(n));
        let b = PackedI8::pack(&w, k, n);
        let mut c = vec![f32::NAN; m * n];
        gemm(&a, m, &b, Some(&bias), &mut c);
        let q = reference_quantized(&a, m, &b, Some(&bias));
        let scale = q.iter().fold(1e-30f64, |s, v| s.max(v.abs()));
        for (idx, (x, y)) in c.iter().zip(&q).enumerate() {
            assert!((*x as f64 - y).abs() <= 2e-6 * scale, "c[{idx}] {x} vs {y}");
        }
        // As close to f32 as without the outliers: their columns cost the others nothing.
        let err = rel_err(&c, &reference_f64(&a, m, &w, k, n, Some(&bias)));
        assert!(err < 1e-2, "relative error {err} against f32");
        // A per-row range over the outliers too would be ~40x coarser.
        let mut plain = vec![0f64; m * n];
        for i in 0..m {
            let row = &a[i * k..(i + 1) * k];
            let (s, z) = row_params(row);
            let qa: Vec<f64> = row.iter().map(|&x| (quantize_value(x, 1.0 / s, z) as i32 - z) as f64 * s as f64).collect();
            for j in 0..n {
                plain[i * n + j] = bias[j] as f64 + (0..k).map(|kk| qa[kk] * w[kk * n + j] as f64).sum::<f64>();
            }
        }
        let plain: Vec<f32> = plain.iter().map(|&v| v as f32).collect();
        let plain_err = rel_err(&plain, &reference_f64(&a, m, &w, k, n, Some(&bias)));
        assert!(plain_err > 5.0 * err, "without the outlier columns apart: {plain_err}, with: {err}");
    }

    /// AMX tiles against the VNNI kernel: the same exact integer sums, scaled the same
    /// way, so bit-identical where the VNNI kernel takes K in one block (K ≤ 3,072), within
    /// f32 rounding past it; odd shapes, outlier columns, bias, accumulation, activation.
    #[test]
    fn amx_matches_the_vnni_kernel() {
        if !crate::bf16_gemm::amx::int8_available() {
            eprintln!("int8_gemm: no AMX INT8 here, test skipped");
            return;
        }
        let mut rng = Rng(0x5eed_1234);
        for &(m, k, n) in &[(1, 1, 1), (5, 7, 17), (33, 100, 130), (50, 768, 2304), (17, 1408, 64), (70, 6144, 96)] {
            let mut a = rng.vec(m * k);
            if k >= 100 {
                // Two outlier columns, which run beside the int8 product.
                for i in 0..m {
                    a[i * k + 3] *= 60.0;
                    a[i * k + k - 1] *= 80.0;
                }
            }
            let (w, bias) = (rng.vec(k * n), rng.vec(n));
            let b = PackedI8::pack(&w, k, n);
            let start: Vec<f32> = rng.vec(m * n);
            for ep in [Epilogue::STORE, Epilogue::ACCUMULATE, Epilogue::act(Act::Relu)] {
                let init = if ep.accumulate { start.clone() } else { vec![f32::NAN; m * n] };
                let (mut vnni, mut amx) = (init.clone(), init);
                // SAFETY: both kernels' features were checked.
                unsafe {
                    x86::gemm(&a, m, &b, Some(&bias), &mut vnni, &x86::blocking(), ep, false);
                    x86::gemm(&a, m, &b, Some(&bias), &mut amx, &x86::blocking(), ep, true);
                }
                if k <= 3072 {
                    let diff = vnni.iter().zip(&amx).position(|(x, y)| x.to_bits() != y.to_bits());
                    assert!(diff.is_none(), "M={m} K={k} N={n} {ep:?}: differ at {diff:?}");
                } else {
                    let e = vnni.iter().zip(&amx).map(|(x, y)| (x - y).abs() / (x.abs() + 1.0)).fold(0f32, f32::max);
                    assert!(e < 1e-5, "M={m} K={k} N={n} {ep:?}: {e}");
                }
            }
            // Other blockings on AMX (K blocks carry integers in the tiles' buffer: exact).
            let mut want = vec![0f32; m * n];
            x86::with_blocking_at(&a, m, &b, Some(&bias), &mut want, x86::blocking(), true);
            for blk in [(16, 8, 64, 1), (48, 32, 128, 3), (5000, 1000, 1000, 1)] {
                let blk = x86::Blocking { kc: blk.0, mc: blk.1, nc: blk.2, tasks_per_thread: blk.3 };
                let mut c = vec![f32::NAN; m * n];
                x86::with_blocking_at(&a, m, &b, Some(&bias), &mut c, blk, true);
                assert!(c.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits()), "M={m} K={k} N={n} {blk:?}");
            }
        }
    }

    #[test]
    fn epilogues_blockings_and_edges() {
        if !available() {
            eprintln!("int8_gemm: no AVX-512 VNNI here, test skipped");
            return;
        }
        let (m, k, n) = (61, 1001, 211);
        let mut rng = Rng(7);
        let (a, w, bias) = (rng.vec(m * k), rng.vec(k * n), rng.vec(n));
        let b = PackedI8::pack(&w, k, n);
        let mut want = vec![0f32; m * n];
        gemm(&a, m, &b, Some(&bias), &mut want);
        for blk in [(1, 8, 64, 1), (7, 16, 128, 3), (100, 24, 64, 8), (500, 1000, 1000, 1)] {
            let blk = x86::Blocking { kc: blk.0, mc: blk.1, nc: blk.2, tasks_per_thread: blk.3 };
            let mut c = vec![f32::NAN; m * n];
            x86::with_blocking(&a, m, &b, Some(&bias), &mut c, blk);
            // K blocks round once more per block: equal up to f32 rounding.
            let e = c.iter().zip(&want).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(e < 1e-4, "{blk:?}: {e}");
        }
        // Accumulation: C += a·b + bias.
        let mut c: Vec<f32> = (0..m * n).map(|i| i as f32 * 1e-3).collect();
        gemm_ep(&a, m, &b, Some(&bias), &mut c, Epilogue::ACCUMULATE);
        for (i, (x, y)) in c.iter().zip(&want).enumerate() {
            assert!((x - (y + i as f32 * 1e-3)).abs() < 1e-4, "accumulate [{i}]");
        }
        // An activation after the store.
        let mut c = vec![0f32; m * n];
        gemm_ep(&a, m, &b, Some(&bias), &mut c, Epilogue::act(Act::Relu));
        assert!(c.iter().zip(&want).all(|(x, y)| *x == y.max(0.0)));
        // M = 0, K = 0 (bias only), an all-zero row (bias only).
        gemm(&[], 0, &b, None, &mut []);
        let b0 = PackedI8::pack(&[], 0, n);
        let mut c = vec![f32::NAN; 2 * n];
        gemm(&[], 2, &b0, Some(&bias), &mut c);
        assert_eq!(&c[n..], &bias[..]);
        let mut c = vec![f32::NAN; n];
        gemm(&vec![0.0; k], 1, &b, Some(&bias), &mut c);
        assert_eq!(c, bias);
    }

    #[test]
    #[should_panic(expected = "not M·K")]
    fn shape_mismatch_panics() {
        let b = PackedI8::pack(&[0.0; 6], 2, 3);
        gemm(&[0.0; 5], 2, &b, None, &mut [0.0; 6]);
    }

    /// GOP/s of the ViT shapes, int8 against the BF16 kernel, best of 20:
    /// `cargo test -p magpie-models --release --lib int8_gemm -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn bench_gops() {
        if !available() || !crate::bf16_gemm::available() {
            eprintln!("int8_gemm: needs AVX-512 VNNI and BF16, bench skipped");
            return;
        }
        use std::time::Instant;
        let threads = rayon::current_num_threads();
        // The peak: 12 independent vpdpbusd chains per thread, registers only.
        #[target_feature(enable = "avx512f,avx512vnni")]
        unsafe fn vnni_loop(n: usize) -> i32 {
            use std::arch::x86_64::*;
            let (a, b) = (_mm512_set1_epi32(0x0101_0101), _mm512_set1_epi32(0x0102_0304));
            let mut acc = [_mm512_setzero_si512(); 12];
            for _ in 0..n {
                for x in acc.iter_mut() {
                    *x = _mm512_dpbusd_epi32(*x, a, b);
                }
            }
            acc.iter().fold(0, |s, x| s ^ _mm512_reduce_add_epi32(*x))
        }
        let n = 20_000_000;
        let peak = (0..5)
            .map(|_| {
                let t = Instant::now();
                // SAFETY: available() was checked.
                let x: i32 = (0..threads).into_par_iter().map(|_| unsafe { vnni_loop(n) }).sum();
                std::hint::black_box(x);
                (threads * n * 12 * 128) as f64 / t.elapsed().as_secs_f64() / 1e9
            })
            .fold(0f64, f64::max);
        eprintln!("threads: {threads}; GOP/s, best of 20; vpdpbusd peak {peak:.0} GOP/s");
        let amx = crate::bf16_gemm::amx::int8_available();
        eprintln!("bf16 on {}; int8 amx: AMX INT8 tiles", crate::cpu::Isa::detect());
        eprintln!("{:>5} {:>5} {:>5}  {:>8} {:>8} {:>8} {:>9}", "M", "K", "N", "int8", "int8 amx", "bf16", "int8/bf16");
        let mut rng = Rng(99);
        for (m, k, n) in [(257, 1408, 4224), (257, 1408, 1408), (257, 1408, 6144), (257, 6144, 1408), (800, 768, 3072), (32, 768, 768)] {
            let (a, w, bias) = (rng.vec(m * k), rng.vec(k * n), rng.vec(n));
            let b = PackedI8::pack(&w, k, n);
            let bb = crate::bf16_gemm::PackedB::pack(&w, k, n);
            let mut c = vec![0f32; m * n];
            let ops = 2.0 * (m * k * n) as f64;
            let reps = ((2e9 / ops) as usize).clamp(1, 50);
            let mut best = [f64::MAX; 3];
            for round in 0..21 {
                for (which, best) in best.iter_mut().enumerate() {
                    if which == 1 && !amx {
                        continue;
                    }
                    let t = Instant::now();
                    for _ in 0..reps {
                        match which {
                            // SAFETY: the features were checked.
                            0 | 1 => unsafe { x86::gemm(&a, m, &b, Some(&bias), &mut c, &x86::blocking(), Epilogue::STORE, which == 1) },
                            _ => crate::bf16_gemm::gemm(&a, m, &bb, Some(&bias), &mut c),
                        }
                    }
                    if round > 0 {
                        *best = best.min(t.elapsed().as_secs_f64() / reps as f64);
                    }
                }
            }
            let g = |s: f64| ops / s / 1e9;
            let fastest = best[0].min(best[1]);
            eprintln!(
                "{m:>5} {k:>5} {n:>5}  {:>8.0} {:>8} {:>8.0} {:>9.2}  (VNNI kernel at {:.0}% of the vpdpbusd peak)",
                g(best[0]),
                if amx { format!("{:.0}", g(best[1])) } else { "-".into() },
                g(best[2]),
                best[2] / fastest,
                100.0 * g(best[0]) / peak
            );
        }
    }
}
