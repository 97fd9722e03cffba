//! f32 GEMM with weights packed at load time, and the dispatch between it and the BF16
//! kernel ([`crate::bf16_gemm`]): `C = act(A · W + bias)` or `C += A · W + bias`.
//!
//! # Layout
//!
//! `W` (K × N) is cut into panels of [`NR`] = 64 columns; a panel holds, for each k, its
//! 64 values (columns past N are zero), panels one after the other, 64-byte aligned. The
//! micro-kernels stream a panel from the top while broadcasting A's values, so the
//! weights are never re-packed per call (candle's matmul re-packs B on every call, 18% of
//! a batch-1 CLIP forward).
//!
//! # Kernels
//!
//! * AVX-512: a 6 × 64 tile of C in 24 zmm accumulators; per k, 4 loads of B, 6
//!   broadcasts of A and 24 FMAs.
//! * AVX2 + FMA: a 6 × 16 tile in 12 ymm accumulators, run over the panel's four
//!   16-column strips.
//! * Scalar: plain loops over the same layout, for other CPUs and as the reference.
//!
//! The loops around them (Goto-style) are those of the BF16 kernel: a grid of tasks over
//! rows × panels, K cut into blocks of [`KC`] values so that a panel's block stays in L2
//! while every row tile of the task uses it. The activation is applied by the task to its
//! own tile of C once its last K block is stored, while the tile is in cache.

use super::math::{activate, Act};
use super::Isa;
use rayon::prelude::*;

/// Columns of a packed panel.
pub const NR: usize = 64;
/// Rows of the micro-tile.
const MR: usize = 6;
/// K values per block.
const KC: usize = 256;
/// Tasks of at most this many rows prefetch the next K block (see [`task`]).
const PREFETCH_ROWS: usize = 16 * MR;

/// 64 bytes, so that each panel starts on a cache line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// What a packed weight holds: f32, or a 16-bit float widened to f32 as the kernels load
/// it (exactly: every f16 and bf16 value is an f32 value), so that a half-precision
/// weight reads half the memory of an f32 one at the f32 kernels' rate. Decoding one
/// token at a time is bound by that memory.
pub trait Elem: Copy + Default + Send + Sync + std::fmt::Debug + 'static {
    const KIND: ElemKind;
    fn from_f32(x: f32) -> Self;
    fn to_f32(self) -> f32;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElemKind {
    F32,
    F16,
    Bf16,
}

impl Elem for f32 {
    const KIND: ElemKind = ElemKind::F32;
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

macro_rules! half_elem {
    ($t:ty, $kind:ident) => {
        impl Elem for $t {
            const KIND: ElemKind = ElemKind::$kind;
            #[inline(always)]
            fn from_f32(x: f32) -> Self {
                <$t>::from_f32(x)
            }
            #[inline(always)]
            fn to_f32(self) -> f32 {
                <$t>::to_f32(self)
            }
        }
    };
}
half_elem!(half::f16, F16);
half_elem!(half::bf16, Bf16);

/// A K × N weight, packed for the micro-kernels, in f32 or (see [`Elem`]) f16 or bf16.
#[derive(Clone)]
pub struct Packed<E: Elem> {
    k: usize,
    n: usize,
    data: Vec<Line>,
    _elem: std::marker::PhantomData<E>,
}

/// The f32 packed weight of the encoders.
pub type PackedF32 = Packed<f32>;

impl<E: Elem> Default for Packed<E> {
    fn default() -> Self {
        Self { k: 0, n: 0, data: Vec::new(), _elem: std::marker::PhantomData }
    }
}

impl<E: Elem> std::fmt::Debug for Packed<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Packed").field("elem", &E::KIND).field("k", &self.k).field("n", &self.n).finish()
    }
}

impl<E: Elem> Packed<E> {
    /// From `w`, K × N row-major.
    pub fn pack(w: &[f32], k: usize, n: usize) -> Self {
        assert_eq!(w.len(), k * n, "Packed::pack: w has {} values, not K·N = {k}·{n}", w.len());
        let mut p = Self::default();
        p.repack(k, n, |kk, j| w[kk * n + j]);
        p
    }

    /// From `w_nk`, N × K row-major: PyTorch's `Linear.weight` (out × in) as stored,
    /// rounded to the element type; the panels are filled on the thread pool.
    pub fn pack_transposed(w_nk: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w_nk.len(), k * n, "Packed::pack_transposed: w has {} values, not N·K = {n}·{k}", w_nk.len());
        let rounded: Vec<E> = w_nk.par_iter().map(|&x| E::from_f32(x)).collect();
        Self::pack_nk(&rounded, n, k)
    }

    /// From `w_nk`, N × K row-major (PyTorch's out × in), already in this element type
    /// (copied, not rounded); the panels are filled on the thread pool.
    pub fn pack_nk(w_nk: &[E], n: usize, k: usize) -> Self {
        assert_eq!(w_nk.len(), k * n, "Packed::pack_nk: w has {} values, not N·K = {n}·{k}", w_nk.len());
        let mut p = Self::default();
        let all = p.reshape(k, n);
        if k == 0 {
            return p;
        }
        all.par_chunks_mut(k * NR).enumerate().for_each(|(jp, panel)| {
            let cols = NR.min(n - jp * NR);
            // 16 rows of K at a time, written 16 values to a panel row.
            for j0 in (0..cols).step_by(16) {
                let rows: Vec<&[E]> = (j0..(j0 + 16).min(cols)).map(|jj| &w_nk[(jp * NR + jj) * k..][..k]).collect();
                for kk in 0..k {
                    let out = &mut panel[kk * NR + j0..][..rows.len()];
                    for (o, r) in out.iter_mut().zip(&rows) {
                        *o = r[kk];
                    }
                }
            }
        });
        p
    }

    /// Packs W[k][j] = `w(k, j)` (rounded to the element type) into this buffer, reusing
    /// its memory.
    pub fn repack(&mut self, k: usize, n: usize, w: impl Fn(usize, usize) -> f32) {
        let all = self.reshape(k, n);
        for jp in 0..n.div_ceil(NR) {
            let panel = &mut all[jp * k * NR..(jp + 1) * k * NR];
            let cols = NR.min(n - jp * NR);
            for kk in 0..k {
                for (jj, x) in panel[kk * NR..kk * NR + cols].iter_mut().enumerate() {
                    *x = E::from_f32(w(kk, jp * NR + jj));
                }
            }
        }
    }

    /// Packs W, K × N, given row by row: `row(k)` is W[k][0..N] (contiguous, copied in
    /// panel-wide pieces). Reuses this buffer's memory like [`repack`](Self::repack).
    pub fn repack_from_rows<'a>(&mut self, k: usize, n: usize, row: impl Fn(usize) -> &'a [f32]) {
        let all = self.reshape(k, n);
        for kk in 0..k {
            let r = row(kk);
            assert_eq!(r.len(), n, "Packed::repack_from_rows: row {kk} has {} values, not {n}", r.len());
            for (jp, piece) in r.chunks(NR).enumerate() {
                let at = jp * k * NR + kk * NR;
                for (d, s) in all[at..at + piece.len()].iter_mut().zip(piece) {
                    *d = E::from_f32(*s);
                }
            }
        }
    }

    /// The buffer for a K × N weight, zero where it pads; kept (padding and all) when the
    /// shape is the one already packed.
    fn reshape(&mut self, k: usize, n: usize) -> &mut [E] {
        let values = n.div_ceil(NR) * k * NR;
        let lines = (values * std::mem::size_of::<E>()).div_ceil(64);
        if (self.k, self.n) != (k, n) || self.data.len() != lines {
            self.data.clear();
            self.data.resize(lines, Line([0; 64]));
            self.k = k;
            self.n = n;
        }
        // SAFETY: the lines hold at least `values` elements' bytes, 64-byte aligned (more
        // than any Elem needs); every bit pattern (zero included) is a valid f32, f16 or
        // bf16.
        unsafe { std::slice::from_raw_parts_mut(self.data.as_mut_ptr() as *mut E, values) }
    }

    /// Packs W, K × N, given column by column: `col(j)` is W[0..K][j] (contiguous: e.g.
    /// row j of a matrix whose transpose is W). Reuses this buffer's memory like
    /// [`repack`](Self::repack).
    pub fn repack_from_cols<'a>(&mut self, k: usize, n: usize, col: impl Fn(usize) -> &'a [f32]) {
        let all = self.reshape(k, n);
        for j in 0..n {
            let c = col(j);
            assert_eq!(c.len(), k, "Packed::repack_from_cols: column {j} has {} values, not {k}", c.len());
            let panel = &mut all[(j / NR) * k * NR..(j / NR + 1) * k * NR];
            for (kk, v) in c.iter().enumerate() {
                panel[kk * NR + j % NR] = E::from_f32(*v);
            }
        }
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn n(&self) -> usize {
        self.n
    }

    /// The packed values, padding included: panel after panel, K rows of [`NR`] each.
    pub fn values(&self) -> &[E] {
        let values = self.n.div_ceil(NR) * self.k * NR;
        // SAFETY: as in `reshape`: the lines hold these values.
        unsafe { std::slice::from_raw_parts(self.data.as_ptr() as *const E, values) }
    }

    /// W[k][j], widened to f32.
    pub fn get(&self, k: usize, j: usize) -> f32 {
        assert!(k < self.k && j < self.n, "Packed::get: ({k}, {j}) outside {}×{}", self.k, self.n);
        self.values()[(j / NR) * self.k * NR + k * NR + j % NR].to_f32()
    }

    fn panel_ptr(&self, jp: usize) -> *const E {
        debug_assert!(jp < self.n.div_ceil(NR));
        // SAFETY (of the add): panel jp starts inside (or at the end of) the buffer.
        unsafe { (self.data.as_ptr() as *const E).add(jp * self.k * NR) }
    }
}

/// What the f32 micro-kernels stream: a weight's panels, K rows of [`NR`] values each,
/// as loadable elements.
trait Panels: Sync {
    type E: Elem;
    fn k(&self) -> usize;
    fn n(&self) -> usize;
    /// Rows `k0..k0 + kn` of panel `jp` ([`NR`] values each, contiguous), valid until the
    /// next call on this thread.
    ///
    /// # Safety
    /// `jp` is a panel of the weight, `k0 + kn ≤ K`, and `isa` is at most what the
    /// hardware has.
    unsafe fn block(&self, isa: Isa, jp: usize, k0: usize, kn: usize) -> *const Self::E;

    /// A q8_0 weight, for the fused kernel of a few rows.
    fn as_q8(&self) -> Option<&PackedQ8> {
        None
    }
}

impl<E: Elem> Panels for Packed<E> {
    type E = E;
    fn k(&self) -> usize {
        self.k
    }
    fn n(&self) -> usize {
        self.n
    }
    unsafe fn block(&self, _: Isa, jp: usize, k0: usize, _: usize) -> *const E {
        self.panel_ptr(jp).add(k0 * NR)
    }
}

/// Values per block of [`PackedQ8`] (ggml's `QK8_0`).
pub const Q8_BLOCK: usize = 32;

/// A K × N weight in ggml's `q8_0` format: the K values of each column in blocks of 32
/// that share one f16 scale `d = max|w| / 127`, each value `round(w / d)` in an i8 (8.5
/// bits a weight). Packed in panels of [`NR`] columns: per panel, K rows of NR i8 (K padded
/// with zeros to whole blocks), and per block NR scales. The kernels widen a block to f32
/// in registers (AVX-512) or in a scratch block, and multiply with f32 activations
/// (candle's `q8_0` matmul rounds the activations to 8 bits as well).
#[derive(Clone, Default)]
pub struct PackedQ8 {
    k: usize,
    n: usize,
    q: Vec<Line>,
    scales: Vec<half::f16>,
}

impl std::fmt::Debug for PackedQ8 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedQ8").field("k", &self.k).field("n", &self.n).finish()
    }
}

thread_local! {
    /// A block of a [`PackedQ8`] panel widened to f32 ([`KC`] × [`NR`]).
    static Q8_SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl PackedQ8 {
    fn padded_k(k: usize) -> usize {
        k.div_ceil(Q8_BLOCK) * Q8_BLOCK
    }

    /// Quantizes PyTorch's out × in weight (`w_nk`, N × K row-major) as ggml does.
    pub fn quantize_transposed(w_nk: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w_nk.len(), n * k, "PackedQ8::quantize_transposed: w has {} values, not N·K = {n}·{k}", w_nk.len());
        let kp = Self::padded_k(k);
        let (blocks, panels) = (kp / Q8_BLOCK, n.div_ceil(NR));
        let mut q = vec![Line([0; 64]); panels * kp * NR / 64];
        let mut scales = vec![half::f16::ZERO; panels * blocks * NR];
        if kp > 0 {
            // Panel by panel on the thread pool (each writes its own values and scales).
            q.par_chunks_mut(kp * NR / 64).zip(scales.par_chunks_mut(blocks * NR)).enumerate().for_each(|(jp, (lines, scales))| {
                // SAFETY: the lines are plain bytes; i8 has the size and alignment of u8.
                let qb = unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr() as *mut i8, lines.len() * 64) };
                for jj in 0..NR.min(n - jp * NR) {
                    let j = jp * NR + jj;
                    for (b, vals) in w_nk[j * k..(j + 1) * k].chunks(Q8_BLOCK).enumerate() {
                        let amax = vals.iter().fold(0f32, |m, x| m.max(x.abs()));
                        let d = amax / 127.0;
                        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                        scales[b * NR + jj] = half::f16::from_f32(d);
                        for (t, x) in vals.iter().enumerate() {
                            // (`round`: half away from zero, as ggml's `roundf`.)
                            qb[(b * Q8_BLOCK + t) * NR + jj] = (x * id).round() as i8;
                        }
                    }
                }
            });
        }
        PackedQ8 { k, n, q, scales }
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn n(&self) -> usize {
        self.n
    }

    /// W[k][j] as the kernels see it (the i8 times its block's scale).
    pub fn get(&self, k: usize, j: usize) -> f32 {
        assert!(k < self.k && j < self.n, "PackedQ8::get: ({k}, {j}) outside {}×{}", self.k, self.n);
        let (kp, blocks) = (Self::padded_k(self.k), Self::padded_k(self.k) / Q8_BLOCK);
        let q = self.q_bytes()[((j / NR) * kp + k) * NR + j % NR];
        q as f32 * self.scales[((j / NR) * blocks + k / Q8_BLOCK) * NR + j % NR].to_f32()
    }

    fn q_bytes(&self) -> &[i8] {
        // SAFETY: as in `quantize_transposed`.
        unsafe { std::slice::from_raw_parts(self.q.as_ptr() as *const i8, self.q.len() * 64) }
    }
}

/// `out[r][j] = q[r][j] · scale(r)[j]` for `rows` rows of [`NR`]; `scales` holds the
/// NR scales of each block of [`Q8_BLOCK`] rows from the first (a whole block).
#[inline(always)]
fn widen_q8_generic(q: &[i8], scales: &[half::f16], out: &mut [f32]) {
    let mut s = [0f32; NR];
    for (r, (out, q)) in out.chunks_exact_mut(NR).zip(q.chunks_exact(NR)).enumerate() {
        if r % Q8_BLOCK == 0 {
            for (s, h) in s.iter_mut().zip(&scales[(r / Q8_BLOCK) * NR..][..NR]) {
                *s = h.to_f32();
            }
        }
        for ((o, &q), s) in out.iter_mut().zip(q).zip(&s) {
            *o = q as f32 * s;
        }
    }
}

fn widen_q8(isa: Isa, q: &[i8], scales: &[half::f16], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        unsafe fn v512(q: &[i8], scales: &[half::f16], out: &mut [f32]) {
            widen_q8_generic(q, scales, out)
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn v256(q: &[i8], scales: &[half::f16], out: &mut [f32]) {
            widen_q8_generic(q, scales, out)
        }
        match isa.f32_level() {
            // SAFETY: f32_level() never exceeds what the hardware has; the body is safe Rust.
            Isa::Avx512 => return unsafe { v512(q, scales, out) },
            // SAFETY: as above.
            Isa::Avx2 => return unsafe { v256(q, scales, out) },
            _ => {}
        }
    }
    widen_q8_generic(q, scales, out)
}

impl Panels for PackedQ8 {
    type E = f32;
    fn as_q8(&self) -> Option<&PackedQ8> {
        Some(self)
    }
    fn k(&self) -> usize {
        self.k
    }
    fn n(&self) -> usize {
        self.n
    }
    unsafe fn block(&self, isa: Isa, jp: usize, k0: usize, kn: usize) -> *const f32 {
        debug_assert!(k0.is_multiple_of(Q8_BLOCK) && kn <= KC);
        let (kp, blocks) = (Self::padded_k(self.k), Self::padded_k(self.k) / Q8_BLOCK);
        let q = &self.q_bytes()[(jp * kp + k0) * NR..][..kn * NR];
        let scales = &self.scales[(jp * blocks + k0 / Q8_BLOCK) * NR..];
        Q8_SCRATCH.with(|buf| {
            let mut buf = buf.borrow_mut();
            if buf.len() < KC * NR {
                buf.resize(KC * NR, 0.0);
            }
            widen_q8(isa, q, scales, &mut buf[..kn * NR]);
            // The buffer lives as long as the thread and is only resized above: the
            // pointer stays valid until the next call on this thread.
            buf.as_ptr()
        })
    }
}

/// A weight in the form one of the kernels takes.
#[derive(Debug, Clone)]
pub enum PackedWeight {
    F32(PackedF32),
    /// f16 values, widened to f32 as loaded.
    F16(Packed<half::f16>),
    /// bf16 values, widened to f32 as loaded (exact products, unlike [`Self::Bf16`]).
    Bf16Widened(Packed<half::bf16>),
    /// For the BF16 dot-product kernel: the activations are rounded to bf16 too.
    Bf16(std::sync::Arc<crate::bf16_gemm::PackedB>),
    /// ggml `q8_0` blocks, widened to f32 per block in cache.
    Q8(PackedQ8),
    /// For the int8 dot-product kernel: the activations are quantized per row too.
    I8(std::sync::Arc<crate::int8_gemm::PackedI8>),
}

impl PackedWeight {
    /// PyTorch's `out × in` weight, packed for f32 or (where the CPU has it) BF16.
    pub fn from_torch(w_nk: &[f32], n: usize, k: usize, bf16: bool) -> Self {
        if bf16 && crate::bf16_gemm::available() {
            PackedWeight::Bf16(std::sync::Arc::new(crate::bf16_gemm::PackedB::pack_transposed(w_nk, n, k)))
        } else {
            PackedWeight::F32(PackedF32::pack_transposed(w_nk, n, k))
        }
    }

    pub fn k(&self) -> usize {
        match self {
            PackedWeight::F32(p) => p.k,
            PackedWeight::F16(p) => p.k,
            PackedWeight::Bf16Widened(p) => p.k,
            PackedWeight::Bf16(p) => p.k(),
            PackedWeight::Q8(p) => p.k,
            PackedWeight::I8(p) => p.k(),
        }
    }

    pub fn n(&self) -> usize {
        match self {
            PackedWeight::F32(p) => p.n,
            PackedWeight::F16(p) => p.n,
            PackedWeight::Bf16Widened(p) => p.n,
            PackedWeight::Bf16(p) => p.n(),
            PackedWeight::Q8(p) => p.n,
            PackedWeight::I8(p) => p.n(),
        }
    }

    pub fn is_bf16(&self) -> bool {
        matches!(self, PackedWeight::Bf16(_))
    }
}

/// What the GEMM does with its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Epilogue {
    /// Applied to `A·W + bias` before the store (only without `accumulate`).
    pub act: Act,
    /// `C += A·W + bias` (a residual connection) instead of `C = …`.
    pub accumulate: bool,
}

impl Epilogue {
    pub const STORE: Epilogue = Epilogue { act: Act::None, accumulate: false };
    pub const ACCUMULATE: Epilogue = Epilogue { act: Act::None, accumulate: true };
    pub fn act(act: Act) -> Self {
        Epilogue { act, accumulate: false }
    }
}

/// `c (M × N) = act(a (M × K) · w + bias)`, or `c += a · w + bias`; all row-major with
/// rows of K and N values. Runs on rayon's pool with the kernels of `isa` (or the best
/// the hardware has below it; a BF16 weight always runs on the BF16 kernel).
pub fn gemm(isa: Isa, a: &[f32], m: usize, w: &PackedWeight, bias: Option<&[f32]>, c: &mut [f32], ep: Epilogue) {
    let (k, n) = (w.k(), w.n());
    assert_eq!(a.len(), m * k, "cpu::gemm: a has {} values, not M·K = {m}·{k}", a.len());
    assert_eq!(c.len(), m * n, "cpu::gemm: c has {} values, not M·N = {m}·{n}", c.len());
    if let Some(b) = bias {
        assert_eq!(b.len(), n, "cpu::gemm: bias has {} values, not N = {n}", b.len());
    }
    assert!(!(ep.accumulate && ep.act != Act::None), "cpu::gemm: an activation cannot follow accumulation");
    match w {
        PackedWeight::Bf16(b) => crate::bf16_gemm::gemm_at(isa, a, m, b, bias, c, ep),
        PackedWeight::F32(b) => gemm_f32(isa.f32_level(), a, k, m, b, bias, c, n, ep),
        PackedWeight::F16(b) => gemm_f32(isa.f32_level(), a, k, m, b, bias, c, n, ep),
        PackedWeight::Bf16Widened(b) => gemm_f32(isa.f32_level(), a, k, m, b, bias, c, n, ep),
        PackedWeight::Q8(b) => gemm_f32(isa.f32_level(), a, k, m, b, bias, c, n, ep),
        PackedWeight::I8(b) => crate::int8_gemm::gemm_at(isa, a, m, b, bias, c, ep),
    }
}

/// [`gemm`] with strides and on the calling thread only, for f32 weights: rows of `a` are
/// `lda` apart, rows of `c` `ldc` apart (so a head's columns of a wider matrix can be
/// read and written in place).
#[allow(clippy::too_many_arguments)]
pub fn gemm_strided(isa: Isa, a: &[f32], lda: usize, m: usize, w: &PackedF32, c: &mut [f32], ldc: usize, ep: Epilogue) {
    assert!(m == 0 || c.len() >= (m - 1) * ldc + w.n, "cpu::gemm_strided: c too short");
    // SAFETY: c holds the m rows of w.n values ldc apart (just checked).
    unsafe { gemm_strided_raw(isa, a, lda, m, w, c.as_mut_ptr(), ldc, ep) }
}

/// [`gemm_strided`] writing through a raw pointer, for tasks that each write their own
/// columns of one output (no `&mut` slice may then cover the other tasks' columns).
///
/// # Safety
/// `c` points at m rows `ldc` apart, each with `w.n()` writable values that nothing else
/// accesses during the call.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_strided_raw(isa: Isa, a: &[f32], lda: usize, m: usize, w: &PackedF32, c: *mut f32, ldc: usize, ep: Epilogue) {
    strided_raw(isa, a, lda, m, w, c, ldc, ep)
}

/// The first `k` rows and `n` columns of a packed weight, as a weight of its own: its
/// panels are a prefix of the weight's, each panel's rows a prefix of that panel's.
struct Prefix<'a> {
    w: &'a PackedF32,
    k: usize,
    n: usize,
}

impl Panels for Prefix<'_> {
    type E = f32;
    fn k(&self) -> usize {
        self.k
    }
    fn n(&self) -> usize {
        self.n
    }
    unsafe fn block(&self, isa: Isa, jp: usize, k0: usize, kn: usize) -> *const f32 {
        self.w.block(isa, jp, k0, kn)
    }
}

/// [`gemm_strided_raw`] with only the first `k` rows and `n` columns of `w` (A has `k`
/// columns): for attention, where a causal mask leaves the later keys of a block of
/// queries unused.
///
/// # Safety
/// As [`gemm_strided_raw`], with `n` in place of `w.n()`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_strided_prefix_raw(isa: Isa, a: &[f32], lda: usize, m: usize, w: &PackedF32, (k, n): (usize, usize), c: *mut f32, ldc: usize, ep: Epilogue) {
    assert!(k <= w.k && n <= w.n, "cpu::gemm_strided_prefix: {k} × {n} of a {} × {} weight", w.k, w.n);
    strided_raw(isa, a, lda, m, &Prefix { w, k, n }, c, ldc, ep)
}

#[allow(clippy::too_many_arguments)]
unsafe fn strided_raw<P: Panels<E = f32>>(isa: Isa, a: &[f32], lda: usize, m: usize, w: &P, c: *mut f32, ldc: usize, ep: Epilogue) {
    let (k, n) = (w.k(), w.n());
    assert!(m == 0 || a.len() >= (m - 1) * lda + k, "cpu::gemm_strided: a too short");
    assert!(lda >= k && ldc >= n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for i in 0..m {
            let row = std::slice::from_raw_parts_mut(c.add(i * ldc), n);
            if !ep.accumulate {
                row.fill(0.0);
            }
            activate(isa, ep.act, row);
        }
        return;
    }
    task(isa.f32_level(), a.as_ptr(), lda, w, None, c, ldc, (0, m), (0, n.div_ceil(NR)), ep)
}

/// A pointer that may cross threads: the tasks write disjoint tiles of C.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub *mut f32);
// SAFETY: only used to hand disjoint tiles of one buffer to the tasks of one call, which
// all end before the call returns.
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}
impl SendPtr {
    /// (A method, so that closures capture the whole wrapper, not the raw field.)
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// How a micro-kernel starts its accumulators.
#[derive(Clone, Copy)]
pub(crate) enum Init {
    Zero,
    /// From the bias (a pointer to the tile's first column).
    Bias(*const f32),
    /// From C (a later K block, or accumulation).
    Load,
    /// From C plus the bias (accumulation, first K block).
    LoadBias(*const f32),
}

impl Init {
    /// The start of the K block at `k0` for a tile whose bias starts at `bias`.
    pub(crate) fn at(k0: usize, bias: Option<*const f32>, accumulate: bool) -> Init {
        match (k0, bias, accumulate) {
            (0, Some(b), false) => Init::Bias(b),
            (0, Some(b), true) => Init::LoadBias(b),
            (0, None, false) => Init::Zero,
            _ => Init::Load,
        }
    }
}

/// The task grid of one call: `(mt, nt)` row groups × panel groups, as even as whole
/// micro-tiles allow, at most about `mc` rows × `nc` columns each, and at least
/// `per_thread` per thread where the shape allows, so that rayon can even out the threads
/// (and a core another process is using) by stealing. Shared with the BF16 and int8
/// kernels.
///
/// Among the grids that keep to those bounds (and at most twice the tasks needed), the
/// one whose tasks, handed in order to whichever thread is free, finish soonest
/// ([`grid_span`]); then the one with the fewest row groups (each re-reads the weights),
/// then the fewest tasks. For 77 rows (13 tiles) × 8 panels on 2 threads, the first grid
/// that had 8 tasks was 3 × 3: 9 tasks of 8 to 15 tile-panels, one thread doing 57 of the
/// 104; 1 × 8 gives each 52. Chosen once per shape and thread count (a thread-local cache).
pub(crate) fn task_grid(m: usize, mr: usize, panels: usize, nr: usize, mc: usize, nc: usize, per_thread: usize) -> (usize, usize) {
    let threads = rayon::current_num_threads();
    let key = (m, mr, panels, nr, mc, nc, per_thread, threads);
    thread_local! {
        static GRIDS: std::cell::RefCell<std::collections::HashMap<(usize, usize, usize, usize, usize, usize, usize, usize), (usize, usize)>> = Default::default();
    }
    if let Some(g) = GRIDS.with(|c| c.borrow().get(&key).copied()) {
        return g;
    }
    let g = choose_grid(m.div_ceil(mr), panels, (mc / mr).max(1), (nc / nr).max(1), threads, per_thread);
    GRIDS.with(|c| {
        let mut c = c.borrow_mut();
        if c.len() > 4096 {
            c.clear();
        }
        c.insert(key, g);
    });
    g
}

/// [`task_grid`] in micro-tiles: `rt` row tiles, `pn` panels, tasks of at most `mtiles`
/// row tiles and `npanels` panels.
fn choose_grid(rt: usize, pn: usize, mtiles: usize, npanels: usize, threads: usize, per_thread: usize) -> (usize, usize) {
    let (rt, pn) = (rt.max(1), pn.max(1));
    let mt0 = rt.div_ceil(mtiles).clamp(1, rt);
    let nt0 = pn.div_ceil(npanels).clamp(1, pn);
    let want = (threads.max(1) * per_thread.max(1)).min(rt * pn);
    let limit = 2 * want.max(mt0 * nt0);
    let mut best: Option<((usize, usize, usize), (usize, usize))> = None;
    for mt in mt0..=rt {
        if mt * nt0 > limit {
            break;
        }
        for nt in nt0..=pn {
            let tasks = mt * nt;
            if tasks > limit {
                break;
            }
            if tasks < want && (mt < rt || nt < pn) {
                continue;
            }
            let key = (grid_span(rt, mt, pn, nt, threads), mt, tasks);
            if best.is_none_or(|(b, _)| key < b) {
                best = Some((key, (mt, nt)));
            }
        }
    }
    best.map_or((mt0, nt0), |(_, g)| g)
}

/// When the last of `threads` threads finishes a grid of `mt × nt` tasks over `rt` row
/// tiles × `pn` panels (split as the kernels split them), each task taken in order by
/// the first free thread, counting one unit per tile-panel.
pub(crate) fn grid_span(rt: usize, mt: usize, pn: usize, nt: usize, threads: usize) -> usize {
    let mut free = vec![0usize; threads.max(1)];
    for g in 0..mt {
        let rows = (g + 1) * rt / mt - g * rt / mt;
        for h in 0..nt {
            let cols = (h + 1) * pn / nt - h * pn / nt;
            let t = (0..free.len()).min_by_key(|&i| free[i]).unwrap_or(0);
            free[t] += rows * cols;
        }
    }
    free.into_iter().max().unwrap_or(0)
}

#[allow(clippy::too_many_arguments)]
fn gemm_f32<P: Panels>(
    isa: Isa,
    a: &[f32],
    lda: usize,
    m: usize,
    b: &P,
    bias: Option<&[f32]>,
    c: &mut [f32],
    ldc: usize,
    ep: Epilogue,
) {
    let (k, n) = (b.k(), b.n());
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for row in c.chunks_mut(ldc).take(m) {
            let row = &mut row[..n];
            if !ep.accumulate {
                row.fill(0.0);
            }
            if let Some(bias) = bias {
                row.iter_mut().zip(bias).for_each(|(c, b)| *c += b);
            }
            activate(isa, ep.act, row);
        }
        return;
    }
    let panels = n.div_ceil(NR);
    let cptr = SendPtr(c.as_mut_ptr());
    let bias = bias.map(|b| b.as_ptr() as usize);
    let run = |rows: (usize, usize), pans: (usize, usize)| {
        // SAFETY: the task writes rows × panels of C only, inside the buffer (checked by
        // the callers' length asserts), and no other task of this call touches them; the
        // level was capped to the hardware by f32_level().
        unsafe { task(isa, a.as_ptr(), lda, b, bias.map(|p| p as *const f32), cptr.get(), ldc, rows, pans, ep) }
    };
    let (mt, nt) = task_grid(m, MR, panels, NR, 512, 192, 4);
    let rt = m.div_ceil(MR);
    (0..mt * nt).into_par_iter().for_each(|t| {
        let (g, h) = (t / nt, t % nt);
        run((g * rt / mt * MR, ((g + 1) * rt / mt * MR).min(m)), (h * panels / nt, (h + 1) * panels / nt));
    });
}

/// One task: C[rows, panels] over all of K, then its activation.
///
/// # Safety
/// `a` holds rows `m0..m1` of K values `lda` apart, `c` rows `ldc` apart covering the
/// panels' columns (up to N), `bias` (if any) N values, and `isa` is at most what the
/// hardware has.
#[allow(clippy::too_many_arguments)]
unsafe fn task<P: Panels>(
    isa: Isa,
    a: *const f32,
    lda: usize,
    b: &P,
    bias: Option<*const f32>,
    c: *mut f32,
    ldc: usize,
    (m0, m1): (usize, usize),
    (p0, p1): (usize, usize),
    ep: Epilogue,
) {
    let (k, n) = (b.k(), b.n());
    #[cfg(target_arch = "x86_64")]
    if let (Some(q8), true) = (b.as_q8(), isa >= Isa::Avx512) {
        // Widening each block in registers as it streams by, two rows at a time: a token
        // step reads the weight at the memory's rate (through the scratch below, at a
        // third of it), and a 37-row prefill runs at 390 GFLOP/s (the scratch: 340).
        let (kp, blocks) = (PackedQ8::padded_k(k), PackedQ8::padded_k(k) / Q8_BLOCK);
        for jp in p0..p1 {
            let j = jp * NR;
            let (q, scales) = (q8.q_bytes().as_ptr().add(jp * kp * NR), q8.scales.as_ptr().add(jp * blocks * NR));
            let init = Init::at(0, bias.map(|p| p.add(j)), ep.accumulate);
            let mut i = m0;
            while i < m1 {
                let (ap, cp, cols) = (a.add(i * lda), c.add(i * ldc + j), NR.min(n - j));
                if m1 - i >= 2 {
                    x86::q8_tile512::<2>(k, ap, lda, q, scales, cp, ldc, cols, init);
                    i += 2;
                } else {
                    x86::q8_tile512::<1>(k, ap, lda, q, scales, cp, ldc, cols, init);
                    i += 1;
                }
            }
        }
        finish_act(isa, c, ldc, (m0, m1), (p0, p1), n, ep);
        return;
    }
    // K blocks let several row tiles reuse a block of the panels from L2. A task of one
    // row tile (a token step) reuses nothing: it streams each panel whole instead, one
    // stream at a time (5% more of the memory's rate than in blocks of 256).
    let kc = if m1 - m0 <= MR && b.as_q8().is_none() { k } else { KC };
    // A task of few rows (a batch-1 image, a text query) is bound by reading the weights
    // from memory: its first row tile of each block also asks for the next block (the
    // panel's next K rows, contiguous) into L2, so that memory works while the block's
    // other tiles compute. On a 2-core Intel Xeon (`magpie bench --precision f32`,
    // alternating runs): CLIP at batch 1 19.6–20.3 → 21.8–22.5 images/s, an 8-token query
    // 9.4–9.6 → 7.1–7.3 ms; at batch 16 (tasks of hundreds of rows, left alone: there the
    // prefetch cost 10%) the same.
    let prefetch_next = kc == KC && m1 - m0 <= PREFETCH_ROWS;
    let mut k0 = 0;
    while k0 < k {
        let kn = kc.min(k - k0);
        for jp in p0..p1 {
            let bp = b.block(isa, jp, k0, kn);
            let j = jp * NR;
            let cols = NR.min(n - j);
            let init = Init::at(k0, bias.map(|p| p.add(j)), ep.accumulate);
            let mut i = m0;
            while i < m1 {
                let rows = MR.min(m1 - i);
                let ap = a.add(i * lda + k0);
                let cp = c.add(i * ldc + j);
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx512 | Isa::Avx512Bf16 | Isa::Amx => x86::tile512(rows, kn, ap, lda, bp, cp, ldc, cols, init, if i == m0 && prefetch_next { kn } else { 0 }),
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 => {
                        for s in 0..NR / 16 {
                            let sc = cols.saturating_sub(s * 16).min(16);
                            if sc == 0 {
                                break;
                            }
                            let init = match init {
                                Init::Bias(p) => Init::Bias(p.add(s * 16)),
                                Init::LoadBias(p) => Init::LoadBias(p.add(s * 16)),
                                other => other,
                            };
                            x86::tile256(rows, kn, ap, lda, bp.add(s * 16), cp.add(s * 16), ldc, sc, init);
                        }
                    }
                    _ => tile_scalar(rows, kn, ap, lda, bp, cp, ldc, cols, init),
                }
                i += MR;
            }
        }
        k0 += kn;
    }
    finish_act(isa, c, ldc, (m0, m1), (p0, p1), n, ep);
}

/// A task's activation over its tile of C, once stored.
///
/// # Safety
/// `c` as for [`task`].
unsafe fn finish_act(isa: Isa, c: *mut f32, ldc: usize, (m0, m1): (usize, usize), (p0, p1): (usize, usize), n: usize, ep: Epilogue) {
    if ep.act != Act::None && !ep.accumulate {
        let (j0, j1) = (p0 * NR, (p1 * NR).min(n));
        for i in m0..m1 {
            activate(isa, ep.act, std::slice::from_raw_parts_mut(c.add(i * ldc + j0), j1 - j0));
        }
    }
}

/// The portable micro-kernel: `rows` × `cols` of C over `kn` values of K.
///
/// # Safety
/// As for the SIMD kernels: `a` rows `lda` apart with `kn` values, `b` `kn` rows of
/// [`NR`], `c` rows `ldc` apart with `cols` values, the bias `cols` values.
#[allow(clippy::too_many_arguments)]
unsafe fn tile_scalar<E: Elem>(rows: usize, kn: usize, a: *const f32, lda: usize, b: *const E, c: *mut f32, ldc: usize, cols: usize, init: Init) {
    for r in 0..rows {
        let cr = c.add(r * ldc);
        let mut acc = [0f32; NR];
        for (j, x) in acc.iter_mut().enumerate().take(cols) {
            *x = match init {
                Init::Zero => 0.0,
                Init::Bias(p) => *p.add(j),
                Init::Load => *cr.add(j),
                Init::LoadBias(p) => *cr.add(j) + *p.add(j),
            };
        }
        let ar = a.add(r * lda);
        for p in 0..kn {
            let x = *ar.add(p);
            let brow = std::slice::from_raw_parts(b.add(p * NR), NR);
            for (acc, w) in acc.iter_mut().zip(brow) {
                *acc += x * w.to_f32();
            }
        }
        for (j, x) in acc.iter().enumerate().take(cols) {
            *cr.add(j) = *x;
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use super::{Elem, ElemKind, Init, NR};
    use std::arch::x86_64::*;

    /// Whether a tile of `cols` columns fills all NV vectors, and each vector's lane mask.
    #[inline]
    pub(crate) fn col_masks<const NV: usize>(cols: usize) -> (bool, [u16; NV]) {
        let mut mask = [0u16; NV];
        for (v, m) in mask.iter_mut().enumerate() {
            *m = ((1u32 << cols.saturating_sub(v * 16).min(16)) - 1) as u16;
        }
        (cols == NV * 16, mask)
    }

    /// A micro-tile's f32 accumulators (R rows × NV vectors) as `init` says: zero, the
    /// bias, C, or C plus the bias. Shared by the f32 and BF16 kernels.
    ///
    /// # Safety
    /// AVX-512 F present; `c` R rows `ldc` apart and a bias pointer readable where `mask`
    /// has lanes.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn init_tile<const R: usize, const NV: usize>(init: Init, c: *const f32, ldc: usize, full: bool, mask: &[u16; NV]) -> [[__m512; NV]; R] {
        let load = |p: *const f32, v: usize| if full { _mm512_loadu_ps(p) } else { _mm512_maskz_loadu_ps(mask[v], p) };
        let mut acc = [[_mm512_setzero_ps(); NV]; R];
        match init {
            Init::Zero => {}
            Init::Bias(bias) => {
                for v in 0..NV {
                    let x = load(bias.add(v * 16), v);
                    for row in acc.iter_mut() {
                        row[v] = x;
                    }
                }
            }
            Init::Load | Init::LoadBias(_) => {
                for (r, row) in acc.iter_mut().enumerate() {
                    for (v, x) in row.iter_mut().enumerate() {
                        *x = load(c.add(r * ldc + v * 16), v);
                        if let Init::LoadBias(bias) = init {
                            *x = _mm512_add_ps(*x, load(bias.add(v * 16), v));
                        }
                    }
                }
            }
        }
        acc
    }

    /// Stores a micro-tile's accumulators into C (the lanes of `mask` only, unless full).
    ///
    /// # Safety
    /// AVX-512 F present; `c` R rows `ldc` apart, writable where `mask` has lanes.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn store_tile<const R: usize, const NV: usize>(acc: &[[__m512; NV]; R], c: *mut f32, ldc: usize, full: bool, mask: &[u16; NV]) {
        for (r, row) in acc.iter().enumerate() {
            for (v, x) in row.iter().enumerate() {
                let p = c.add(r * ldc + v * 16);
                if full {
                    _mm512_storeu_ps(p, *x);
                } else {
                    _mm512_mask_storeu_ps(p, mask[v], *x);
                }
            }
        }
    }

    /// C[0..R, 0..cols] (= | +=) A[0..R, 0..k] · W for one panel of a q8_0 weight from
    /// its first row: per block of 32 rows the i8 values are widened in registers and
    /// their products summed, then the sum is scaled into the accumulators.
    ///
    /// # Safety
    /// AVX-512 F present; `a` R rows of `k` values `lda` apart; `q` the panel's rows
    /// (padded to whole blocks) of [`NR`] i8, `scales` its NR scales per block; `c` R rows
    /// `ldc` apart with `cols ≤ NR` writable values; a bias pointer `cols` readable values.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn q8_tile512<const R: usize>(k: usize, a: *const f32, lda: usize, q: *const i8, scales: *const half::f16, c: *mut f32, ldc: usize, cols: usize, init: Init) {
        let (full, mask) = col_masks::<4>(cols);
        let mut acc = init_tile::<R, 4>(init, c, ldc, full, &mask);
        let mut ap = [a; R];
        for (r, p) in ap.iter_mut().enumerate() {
            *p = a.add(r * lda);
        }
        let (mut qp, mut sp) = (q, scales as *const u16);
        let mut p = 0;
        while p < k {
            let rows = super::Q8_BLOCK.min(k - p);
            let mut blk = [[_mm512_setzero_ps(); 4]; R];
            for t in p..p + rows {
                let mut bv = [_mm512_setzero_ps(); 4];
                for (v, x) in bv.iter_mut().enumerate() {
                    *x = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(qp.add(v * 16) as *const __m128i)));
                }
                for r in 0..R {
                    let av = _mm512_set1_ps(*ap[r].add(t));
                    for v in 0..4 {
                        blk[r][v] = _mm512_fmadd_ps(av, bv[v], blk[r][v]);
                    }
                }
                qp = qp.add(NR);
            }
            for v in 0..4 {
                let s = _mm512_cvtph_ps(_mm256_loadu_si256(sp.add(v * 16) as *const __m256i));
                for r in 0..R {
                    acc[r][v] = _mm512_fmadd_ps(blk[r][v], s, acc[r][v]);
                }
            }
            // Past a partial last block the padding rows are skipped with it.
            qp = qp.add((super::Q8_BLOCK - rows) * NR);
            sp = sp.add(NR);
            p += rows;
        }
        store_tile::<R, 4>(&acc, c, ldc, full, &mask);
    }

    /// 16 values of a packed weight, widened to f32.
    ///
    /// # Safety
    /// AVX-512 F present; `p` has 16 readable values.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load512<E: Elem>(p: *const E) -> __m512 {
        match E::KIND {
            ElemKind::F32 => _mm512_loadu_ps(p as *const f32),
            ElemKind::F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)),
            // bf16 is the top half of an f32.
            ElemKind::Bf16 => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i)))),
        }
    }

    /// 8 values of a packed weight, widened to f32.
    ///
    /// # Safety
    /// AVX2 and F16C present; `p` has 8 readable values.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn load256<E: Elem>(p: *const E) -> __m256 {
        match E::KIND {
            ElemKind::F32 => _mm256_loadu_ps(p as *const f32),
            ElemKind::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
            ElemKind::Bf16 => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i)))),
        }
    }

    /// A tile of up to 6 rows and `cols` columns: one kernel instance per row count and
    /// per number of 16-column vectors, so that a narrow last panel (a head width of 88
    /// is 64 + 24) computes 2 vectors, not 4. `pf` as for [`kernel512`].
    ///
    /// # Safety
    /// AVX-512 F present; pointers as for [`kernel512`].
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile512<E: Elem>(rows: usize, kn: usize, a: *const f32, lda: usize, b: *const E, c: *mut f32, ldc: usize, cols: usize, init: Init, pf: usize) {
        macro_rules! by_rows {
            ($nv:literal) => {
                match rows {
                    6 => kernel512::<E, 6, $nv>(kn, a, lda, b, c, ldc, cols, init, pf),
                    5 => kernel512::<E, 5, $nv>(kn, a, lda, b, c, ldc, cols, init, pf),
                    4 => kernel512::<E, 4, $nv>(kn, a, lda, b, c, ldc, cols, init, pf),
                    3 => kernel512::<E, 3, $nv>(kn, a, lda, b, c, ldc, cols, init, pf),
                    2 => kernel512::<E, 2, $nv>(kn, a, lda, b, c, ldc, cols, init, pf),
                    1 => kernel512::<E, 1, $nv>(kn, a, lda, b, c, ldc, cols, init, pf),
                    _ => unreachable!("cpu::gemm: tile of {rows} rows"),
                }
            };
        }
        match cols.div_ceil(16) {
            4 => by_rows!(4),
            3 => by_rows!(3),
            2 => by_rows!(2),
            1 => by_rows!(1),
            _ => unreachable!("cpu::gemm: tile of {cols} columns"),
        }
    }

    /// C[0..R, 0..cols] (= | +=) A[0..R, 0..kn] · B[0..kn, 0..16·NV] (B rows 64 apart);
    /// with `pf` > 0, each step also prefetches into L2 the B row `pf` rows further on.
    ///
    /// # Safety
    /// AVX-512 F present; `a` has R rows of `kn` readable values `lda` apart; `b` `kn`
    /// rows of 16·NV readable values, [`NR`] apart; `c` R rows `ldc` apart with
    /// `cols ≤ 16·NV` writable values; a bias pointer `cols` readable values.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn kernel512<E: Elem, const R: usize, const NV: usize>(kn: usize, a: *const f32, lda: usize, b: *const E, c: *mut f32, ldc: usize, cols: usize, init: Init, pf: usize) {
        let (full, mask) = col_masks::<NV>(cols);
        let mut acc = init_tile::<R, NV>(init, c, ldc, full, &mask);
        let mut ap = [a; R];
        for (r, p) in ap.iter_mut().enumerate() {
            *p = a.add(r * lda);
        }
        let mut bp = b;
        for p in 0..kn {
            if pf > 0 {
                for v in 0..NV {
                    // A hint only: prefetching never faults, wherever it points.
                    _mm_prefetch::<_MM_HINT_T1>(bp.wrapping_add(pf * NR + v * 16) as *const i8);
                }
            }
            let mut bv = [_mm512_setzero_ps(); NV];
            for (v, x) in bv.iter_mut().enumerate() {
                *x = load512(bp.add(v * 16));
            }
            for r in 0..R {
                let av = _mm512_set1_ps(*ap[r].add(p));
                for v in 0..NV {
                    acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
                }
            }
            bp = bp.add(NR);
        }
        store_tile::<R, NV>(&acc, c, ldc, full, &mask);
    }

    /// A tile of up to 6 rows × 16 columns (one strip of a panel).
    ///
    /// # Safety
    /// AVX2 and FMA present; pointers as for [`kernel256`].
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn tile256<E: Elem>(rows: usize, kn: usize, a: *const f32, lda: usize, b: *const E, c: *mut f32, ldc: usize, cols: usize, init: Init) {
        match rows {
            6 => kernel256::<E, 6>(kn, a, lda, b, c, ldc, cols, init),
            5 => kernel256::<E, 5>(kn, a, lda, b, c, ldc, cols, init),
            4 => kernel256::<E, 4>(kn, a, lda, b, c, ldc, cols, init),
            3 => kernel256::<E, 3>(kn, a, lda, b, c, ldc, cols, init),
            2 => kernel256::<E, 2>(kn, a, lda, b, c, ldc, cols, init),
            1 => kernel256::<E, 1>(kn, a, lda, b, c, ldc, cols, init),
            _ => unreachable!("cpu::gemm: tile of {rows} rows"),
        }
    }

    /// C[0..R, 0..cols] (= | +=) A[0..R, 0..kn] · B strip[0..kn, 0..16] (B rows 64 apart).
    ///
    /// # Safety
    /// AVX2 and FMA present; `a` R rows of `kn` values `lda` apart; `b` `kn` rows of 16
    /// readable values, [`NR`] apart; `c` R rows `ldc` apart with `cols ≤ 16` writable
    /// values; a bias pointer `cols` readable values.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn kernel256<E: Elem, const R: usize>(kn: usize, a: *const f32, lda: usize, b: *const E, c: *mut f32, ldc: usize, cols: usize, init: Init) {
        // Partial strips go through a 16-value buffer per row (loads and stores only).
        let full = cols == 16;
        let load = |p: *const f32| -> [__m256; 2] {
            if full {
                [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))]
            } else {
                let mut t = [0f32; 16];
                std::ptr::copy_nonoverlapping(p, t.as_mut_ptr(), cols);
                [_mm256_loadu_ps(t.as_ptr()), _mm256_loadu_ps(t.as_ptr().add(8))]
            }
        };
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        match init {
            Init::Zero => {}
            Init::Bias(bias) => {
                let x = load(bias);
                for row in acc.iter_mut() {
                    *row = x;
                }
            }
            Init::Load | Init::LoadBias(_) => {
                for (r, row) in acc.iter_mut().enumerate() {
                    *row = load(c.add(r * ldc));
                    if let Init::LoadBias(bias) = init {
                        let bv = load(bias);
                        row[0] = _mm256_add_ps(row[0], bv[0]);
                        row[1] = _mm256_add_ps(row[1], bv[1]);
                    }
                }
            }
        }
        let mut ap = [a; R];
        for (r, p) in ap.iter_mut().enumerate() {
            *p = a.add(r * lda);
        }
        let mut bp = b;
        for p in 0..kn {
            let b0 = load256(bp);
            let b1 = load256(bp.add(8));
            for r in 0..R {
                let av = _mm256_broadcast_ss(&*ap[r].add(p));
                acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
            }
            bp = bp.add(NR);
        }
        for (r, row) in acc.iter().enumerate() {
            let p = c.add(r * ldc);
            if full {
                _mm256_storeu_ps(p, row[0]);
                _mm256_storeu_ps(p.add(8), row[1]);
            } else {
                let mut t = [0f32; 16];
                _mm256_storeu_ps(t.as_mut_ptr(), row[0]);
                _mm256_storeu_ps(t.as_mut_ptr().add(8), row[1]);
                std::ptr::copy_nonoverlapping(t.as_ptr(), p, cols);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_grids_are_even_and_keep_their_bounds() {
        // (row tiles, panels): text queries, batch-1 and batch-16 images, ViT-g, odd ones.
        for (rt, pn) in [(13, 8), (13, 32), (13, 24), (2, 8), (2, 32), (9, 36), (9, 12), (9, 48), (134, 48), (134, 12), (43, 22), (1, 1), (1, 5), (7, 1), (3, 3)] {
            for threads in [1, 2, 3, 4, 8] {
                let (mtiles, npanels) = (85, 3);
                let (mt, nt) = choose_grid(rt, pn, mtiles, npanels, threads, 4);
                assert!(mt >= 1 && mt <= rt && nt >= 1 && nt <= pn, "{rt}×{pn}: {mt}×{nt}");
                // Tasks no larger than the blocking asks.
                assert!(rt.div_ceil(mt) <= mtiles && pn.div_ceil(nt) <= npanels, "{rt}×{pn}: {mt}×{nt}");
                // Enough tasks to steal, where there are that many tiles.
                assert!(mt * nt >= (threads * 4).min(rt * pn), "{rt}×{pn} on {threads}: {mt}×{nt}");
                // At least as even as the old rule (split the longer side until there are
                // enough tasks), and never worse than the busiest thread's fair share plus
                // one task.
                let old = {
                    let (mut a, mut b) = (rt.div_ceil(mtiles).max(1), pn.div_ceil(npanels).max(1));
                    while a * b < threads * 4 && (a < rt || b < pn) {
                        if b < pn && (a >= rt || pn / b >= rt / a) {
                            b += 1
                        } else {
                            a += 1
                        }
                    }
                    (a, b)
                };
                let span = grid_span(rt, mt, pn, nt, threads);
                assert!(span <= grid_span(rt, old.0, pn, old.1, threads), "{rt}×{pn} on {threads}: {mt}×{nt} worse than {old:?}");
                let biggest = rt.div_ceil(mt) * pn.div_ceil(nt);
                assert!(span <= (rt * pn).div_ceil(threads) + biggest, "{rt}×{pn} on {threads}: span {span}");
            }
        }
        // 77 rows × 512 columns (fc2 of a 77-token query) on 2 threads: perfectly even.
        assert_eq!(grid_span(13, choose_grid(13, 8, 85, 3, 2, 4).0, 8, choose_grid(13, 8, 85, 3, 2, 4).1, 2), 52);
        assert_eq!(grid_span(13, 3, 8, 3, 2), 57);
    }

    pub(crate) struct Rng(pub u64);
    impl Rng {
        pub fn f32(&mut self) -> f32 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
        pub fn vec(&mut self, len: usize) -> Vec<f32> {
            (0..len).map(|_| self.f32()).collect()
        }
    }

    /// act(a·w + bias) (+ c0) in f64, w K × N row-major.
    #[allow(clippy::too_many_arguments)]
    fn naive(a: &[f32], m: usize, k: usize, w: &[f32], n: usize, bias: Option<&[f32]>, c0: Option<&[f32]>, act: Act) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = bias.map_or(0.0, |b| b[j] as f64);
                for kk in 0..k {
                    s += a[i * k + kk] as f64 * w[kk * n + j] as f64;
                }
                if let Some(c0) = c0 {
                    s += c0[i * n + j] as f64;
                }
                let mut v = [s as f32];
                activate(Isa::Scalar, act, &mut v);
                c[i * n + j] = if act == Act::None { s } else { v[0] as f64 };
            }
        }
        c
    }

    fn levels() -> Vec<Isa> {
        let mut v: Vec<Isa> = Isa::ALL.iter().map(|i| i.f32_level()).collect();
        v.dedup();
        v
    }

    #[test]
    fn every_level_matches_the_naive_product() {
        every_level_matches_the_naive_product_with::<f32>(|w, k, n| PackedWeight::F32(PackedF32::pack(w, k, n)));
    }

    #[test]
    fn half_precision_weights_widen_exactly() {
        every_level_matches_the_naive_product_with::<half::f16>(|w, k, n| PackedWeight::F16(Packed::pack(w, k, n)));
        every_level_matches_the_naive_product_with::<half::bf16>(|w, k, n| PackedWeight::Bf16Widened(Packed::pack(w, k, n)));
        // Already rounded values in PyTorch's out × in layout are copied as they are, into
        // the panels that packing the K × N matrix gives.
        let w: Vec<half::f16> = Rng(3).vec(5 * 70).into_iter().map(half::f16::from_f32).collect();
        let mut w_nk = vec![half::f16::ZERO; 70 * 5];
        for kk in 0..5 {
            for j in 0..70 {
                w_nk[j * 5 + kk] = w[kk * 70 + j];
            }
        }
        let p = Packed::<half::f16>::pack_nk(&w_nk, 70, 5);
        assert_eq!(p.get(4, 69), w[4 * 70 + 69].to_f32());
        assert_eq!(p.get(2, 3), w[2 * 70 + 3].to_f32());
        assert_eq!(p.values()[5 * NR + 10], half::f16::ZERO, "padding of the second panel");
        let wide: Vec<f32> = w.iter().map(|x| x.to_f32()).collect();
        assert_eq!(Packed::<half::f16>::pack(&wide, 5, 70).values(), p.values());
    }

    #[test]
    fn q8_weights_quantize_as_ggml_and_multiply_exactly() {
        let mut rng = Rng(77);
        // Block of 32 values of one column: scale max|w|/127 (as f16), values round(w/d).
        let (n, k) = (3, 64);
        let mut w_nk = rng.vec(n * k);
        w_nk[k..2 * k].fill(0.0); // an all-zero column: scale 0, values 0
        w_nk[5] = 2.5; // the first block of column 0 has its max at 2.5
        let p = PackedQ8::quantize_transposed(&w_nk, n, k);
        let d = 2.5f32 / 127.0;
        assert_eq!(p.get(5, 0), 127.0 * half::f16::from_f32(d).to_f32());
        assert_eq!(p.get(7, 0), (w_nk[7] / d).round() * half::f16::from_f32(d).to_f32());
        assert!((0..k).all(|kk| p.get(kk, 1) == 0.0));
        for kk in 0..k {
            let x = w_nk[2 * k + kk];
            assert!((p.get(kk, 2) - x).abs() <= 1.0 / 127.0 * 0.5 + 1e-3, "w[{kk}][2] {x} -> {}", p.get(kk, 2));
        }
        // The product against the naive one on the dequantized weights, every level,
        // shapes with partial panels and K blocks of 256 and several row tiles.
        for isa in levels() {
            for &(m, k, n) in &[(1, 32, 1), (1, 96, 70), (1, 40, 65), (2, 512, 130), (3, 96, 70), (4, 64, 130), (5, 40, 65), (7, 320, 64), (13, 64, 200)] {
                let w_nk = rng.vec(n * k);
                let p = PackedQ8::quantize_transposed(&w_nk, n, k);
                let deq: Vec<f32> = (0..k * n).map(|i| p.get(i / n, i % n)).collect();
                let (a, bias) = (rng.vec(m * k), rng.vec(n));
                let pw = PackedWeight::Q8(p);
                for ep in [Epilogue::STORE, Epilogue::act(Act::Relu), Epilogue::ACCUMULATE] {
                    let c0 = rng.vec(m * n);
                    let mut c = if ep.accumulate { c0.clone() } else { vec![f32::NAN; m * n] };
                    gemm(isa, &a, m, &pw, Some(&bias), &mut c, ep);
                    let want = naive(&a, m, k, &deq, n, Some(&bias), ep.accumulate.then_some(&c0[..]), ep.act);
                    for (idx, (x, y)) in c.iter().zip(&want).enumerate() {
                        let tol = 1e-5 * (k as f64).sqrt() * (1.0 + y.abs());
                        assert!((*x as f64 - y).abs() <= tol, "{isa} q8 M={m} K={k} N={n} {ep:?}: c[{idx}] = {x}, want {y}");
                    }
                }
            }
        }
    }

    /// The product on every level, with weights of element type E (the reference uses
    /// the weights rounded to E).
    fn every_level_matches_the_naive_product_with<E: Elem>(pack: impl Fn(&[f32], usize, usize) -> PackedWeight) {
        let mut rng = Rng(0xfeed_beef);
        let shapes = [(1, 1, 1), (1, 7, 65), (1, 300, 200), (5, 64, 64), (6, 33, 17), (7, 300, 130), (13, 257, 200), (50, 64, 50), (61, 513, 129)];
        for isa in levels() {
            for &(m, k, n) in &shapes {
                for (with_bias, ep) in [(false, Epilogue::STORE), (true, Epilogue::act(Act::QuickGelu)), (true, Epilogue::act(Act::Relu)), (true, Epilogue::ACCUMULATE), (false, Epilogue::ACCUMULATE)] {
                    let (a, w, bias, c0) = (rng.vec(m * k), rng.vec(k * n), rng.vec(n), rng.vec(m * n));
                    let bias = with_bias.then_some(&bias[..]);
                    let pw = pack(&w, k, n);
                    let rounded: Vec<f32> = w.iter().map(|&x| E::from_f32(x).to_f32()).collect();
                    let mut c = if ep.accumulate { c0.clone() } else { vec![f32::NAN; m * n] };
                    gemm(isa, &a, m, &pw, bias, &mut c, ep);
                    let want = naive(&a, m, k, &rounded, n, bias, ep.accumulate.then_some(&c0[..]), ep.act);
                    for (idx, (x, y)) in c.iter().zip(&want).enumerate() {
                        let tol = 1e-5 * (k as f64).sqrt() * (1.0 + y.abs());
                        assert!((*x as f64 - y).abs() <= tol, "{isa} {:?} M={m} K={k} N={n} {ep:?}: c[{idx}] = {x}, want {y}", E::KIND);
                    }
                }
            }
        }
    }

    #[test]
    fn strided_runs_in_place_on_part_of_a_matrix() {
        // A head's 8 columns of a 5 × 24 matrix, times an 8 × 6 weight, into columns
        // 10..16 of a 5 × 20 output; the rest untouched.
        let mut rng = Rng(11);
        let (m, lda, k, n, ldc) = (5, 24, 8, 6, 20);
        let big = rng.vec(m * lda);
        let w = rng.vec(k * n);
        let pw = PackedF32::pack(&w, k, n);
        for isa in levels() {
            let mut out = vec![-7.0f32; m * ldc];
            gemm_strided(isa, &big[3..], lda, m, &pw, &mut out[10..], ldc, Epilogue::STORE);
            for i in 0..m {
                for j in 0..ldc {
                    let got = out[i * ldc + j];
                    if (10..16).contains(&j) {
                        let want: f32 = (0..k).map(|kk| big[3 + i * lda + kk] * w[kk * n + j - 10]).sum();
                        assert!((got - want).abs() < 1e-5, "{isa} [{i}][{j}] {got} vs {want}");
                    } else {
                        assert_eq!(got, -7.0, "{isa}: [{i}][{j}] was written");
                    }
                }
            }
        }
    }

    #[test]
    fn packing_layouts_agree_and_k_zero_gives_the_bias() {
        let mut rng = Rng(5);
        let (k, n) = (9, 70);
        let w = rng.vec(k * n);
        let mut w_nk = vec![0f32; n * k];
        for kk in 0..k {
            for j in 0..n {
                w_nk[j * k + kk] = w[kk * n + j];
            }
        }
        let (p1, p2) = (PackedF32::pack(&w, k, n), PackedF32::pack_transposed(&w_nk, n, k));
        let f = |p: &PackedF32| p.values().iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(f(&p1), f(&p2));
        // Second panel, k = 2, column 65 → W[2][65]; the padding is zero.
        assert_eq!(f(&p1)[k * NR + 2 * NR + 1], w[2 * n + 65].to_bits());
        assert_eq!(f(&p1)[k * NR + 2 * NR + 6], 0);
        // Repacking into a used buffer, same shape or not, equals a fresh pack.
        let mut reused = PackedF32::pack(&rng.vec(k * n), k, n);
        for (kk, nn) in [(k, n), (k, n), (4, 130), (k, n)] {
            let w2 = rng.vec(kk * nn);
            reused.repack(kk, nn, |a, b| w2[a * nn + b]);
            assert_eq!(f(&reused), f(&PackedF32::pack(&w2, kk, nn)), "{kk}×{nn}");
            let cols: Vec<Vec<f32>> = (0..nn).map(|j| (0..kk).map(|a| w2[a * nn + j]).collect()).collect();
            reused.repack_from_cols(kk, nn, |j| &cols[j]);
            assert_eq!(f(&reused), f(&PackedF32::pack(&w2, kk, nn)), "{kk}×{nn} by columns");
            reused.repack_from_rows(kk, nn, |a| &w2[a * nn..(a + 1) * nn]);
            assert_eq!(f(&reused), f(&PackedF32::pack(&w2, kk, nn)), "{kk}×{nn} by rows");
        }
        let z = PackedWeight::F32(PackedF32::pack(&[], 0, 3));
        let mut c = vec![f32::NAN; 6];
        gemm(Isa::Scalar, &[], 2, &z, Some(&[1.0, 2.0, 3.0]), &mut c, Epilogue::STORE);
        assert_eq!(c, [1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
    }

    #[test]
    #[should_panic(expected = "not M·K")]
    fn shape_mismatch_panics() {
        let w = PackedWeight::F32(PackedF32::pack(&[0.0; 6], 2, 3));
        gemm(Isa::Scalar, &[0.0; 5], 2, &w, None, &mut [0.0; 6], Epilogue::STORE);
    }

    /// GFLOP/s of the f32 kernel on the ViT GEMM shapes (compare with the f32 FMA peak of
    /// `cargo bench --bench clip`):
    /// `cargo test -p magpie-models --release --lib f32_gflops -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn f32_gflops() {
        let isa = Isa::detect().f32_level();
        eprintln!("f32 kernel at {isa}, {} threads; GFLOP/s, best of 10", rayon::current_num_threads());
        let mut rng = Rng(5);
        for (m, k, n) in [(800, 768, 3072), (800, 3072, 768), (800, 768, 2304), (50, 768, 3072), (257, 1408, 6144), (600, 128, 64)] {
            let (a, w_nk, bias) = (rng.vec(m * k), rng.vec(n * k), rng.vec(n));
            let w = PackedWeight::F32(PackedF32::pack_transposed(&w_nk, n, k));
            let mut c = vec![0f32; m * n];
            let flops = 2.0 * (m * k * n) as f64;
            let reps = ((2e9 / flops) as usize).clamp(1, 50);
            let mut best = f64::MAX;
            for _ in 0..10 {
                let t = std::time::Instant::now();
                for _ in 0..reps {
                    gemm(isa, &a, m, &w, Some(&bias), &mut c, Epilogue::STORE);
                }
                best = best.min(t.elapsed().as_secs_f64() / reps as f64);
            }
            eprintln!("{m:>5} {k:>5} {n:>5}  {:>7.1}", flops / best / 1e9);
        }
    }
}
