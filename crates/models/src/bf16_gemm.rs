//! BF16 dot-product GEMM for x86-64 CPUs with AVX512_BF16: `y = x · W (+ bias)`.
//!
//! Made for the linear layers of the vision transformers: `x` is an M × K matrix of f32
//! activations (row-major), `W` a K × N weight known at load time, `y` an M × N f32
//! matrix. `vdpbf16ps` multiplies pairs of bf16 values and adds both products into an f32
//! lane, so it does twice the work of an f32 FMA per instruction; on Zen 5 that is about
//! 1 TFLOP/s on two cores against about 0.5 for f32 FMA.
//!
//! # Numbers
//!
//! Activations are rounded to bf16 (round to nearest even, `vcvtne2ps2bf16`) once per
//! call, weights once at [`PackedB::pack`]; products are exact in f32 and accumulated in
//! f32. The relative error of a dot product is thus that of rounding the inputs to 8
//! significant bits, about 3e-3 over random data, independent of K. The bias is the
//! accumulators' starting value.
//!
//! # Layouts
//!
//! `vdpbf16ps acc, a, b` computes, in each 32-bit lane `i`,
//! `acc[i] += a.hi[i] * b.hi[i]` then `acc[i] += a.lo[i] * b.lo[i]` (two f32 roundings),
//! where `lo`/`hi` are the two bf16 halves of the lane. A lane therefore holds two
//! consecutive-k values ("a k pair"), and both operands must agree on that pairing:
//!
//! * A (activations), converted per call: row-major `M × ⌈K/2⌉` u32 words, word `p` of row
//!   `i` = `bf16(x[i][2p]) | bf16(x[i][2p+1]) << 16`. That is just the bf16 row itself, so
//!   the conversion is a streaming `vcvtne2ps2bf16`, no transposition. An odd K gets a zero
//!   in the last high half. Rows are padded to an odd number of cache lines (so that the
//!   kernel's rows do not all map to the same L1 sets when K·2 bytes is a multiple of
//!   4 KiB, as for K = 6144). The buffer is kept per calling thread between calls.
//! * B (weights), packed once: column panels of [`NR`] columns; inside a panel, for each k
//!   pair `p`, the [`NR`] words `bf16(W[2p][j]) | bf16(W[2p+1][j]) << 16`, j over the
//!   panel's columns. Panel after panel, each `⌈K/2⌉ · NR` words, 64-byte aligned; the
//!   columns past N are zero.
//!
//! # Algorithm
//!
//! The micro-kernel keeps an `MR × NR` = 6 × 64 tile of C in 24 zmm accumulators. For each
//! k pair it loads the panel's 4 vectors of B and, for each of the 6 rows, broadcasts the
//! row's A word and issues 4 `vdpbf16ps`: 10 loads per 24 dot-products, 29 of the 32
//! registers, and 24 independent accumulation chains, enough to cover the instruction's
//! latency at 2 per cycle. Row counts below 6 (the last tile of a task) get their own
//! instances of the kernel, so no row is computed in vain; columns past N are computed on
//! the zero padding and not stored. 64 columns divide every width of the CLIP and BLIP-2
//! vision towers (768, 1024, 1408, 2304, 3072, 4096, 4224, 6144).
//!
//! Around it, Goto-style loops. The output is cut into a grid of tasks (row groups ×
//! panel groups, at most about `mc` × `nc`, at least 4 per thread so that rayon's
//! stealing evens out the threads, also for M = 1); each task owns its part of C. Inside a
//! task, K is cut into blocks of `kc` = 512 pairs; per block, the loop runs over the
//! task's panels and, inside, over its row tiles: the A micro-panel (6 rows × 2 KiB) sits
//! in L1, the panel's B block (128 KiB) is reused from L2 by every row tile, the task's A
//! block from L2/L3. C is loaded and stored once per K block, so blocks much smaller than
//! 512 pairs (a B block that fits L1) measured slower, not faster.
//!
//! # Three-term split (near-f32 accuracy)
//!
//! [`PackedB::pack_transposed_x3`] packs a weight for products close to f32's: each
//! value is split into `hi = bf16(w)` and `lo = bf16(w − hi)` (together 16 significant
//! bits), and likewise each activation at every call. The GEMM then runs on a K three
//! times as deep, `[a_hi, a_hi, a_lo] · [w_hi; w_lo; w_hi]`, that is
//! `a_hi·w_hi + a_hi·w_lo + a_lo·w_hi`: only `a_lo·w_lo` (relative size 2⁻¹⁸) and the
//! inputs' rounding past 16 bits (2⁻¹⁷) are lost, against 2⁻⁹ for one term. Each of the
//! three parts of K is padded to a multiple of 32 values with zeros. It pays where the
//! BF16 kernel is more than three times as fast as f32 (AMX tiles).
//!
//! Only `[w_hi; w_lo]` is stored: the third part of K reads the first part's panel rows
//! again (K blocks never straddle the two), so the weight takes 4 bytes per value, as
//! in f32, not 6, and a call that streams it from memory (few rows) reads no more than
//! f32 does; the second reading of `w_hi` comes from L2.
//!
//! On a 2-core Zen 5 this runs at 0.93–1.0 TFLOP/s for the ViT shapes (x · W of
//! 800 × 768 · 768 × 3072 and the like), about 2.1× candle's f32 matmul; see
//! `bench_gflops` in the tests.

use crate::cpu::gemm::{task_grid, Epilogue, Init, SendPtr};
use crate::cpu::math::{activate, Act};
use crate::cpu::Isa;
use rayon::prelude::*;

/// Columns of a packed B panel, and of the micro-kernel's tile: 4 zmm vectors.
pub const NR: usize = NV * 16;
/// zmm vectors across the micro-tile.
const NV: usize = 4;
/// Rows of the micro-kernel's tile.
const MR: usize = 6;

/// Whether this CPU runs [`gemm`]: x86-64 with AVX-512 F, BW and BF16.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this process runs [`gemm`] on AMX tiles (see [`amx`]): the CPU has AMX BF16
/// and the operating system granted the tile state. Checked once.
pub fn amx_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        amx::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
pub mod amx;

/// How many times faster this GEMM is than the f32 one on the kernels of `isa`, measured
/// once per process and kernel (AMX tiles or AVX-512 dot products) by a short race of the
/// two on a 128 × 768 · 768 × 768 product (a CLIP layer's shape; about 10 ms in all, on
/// one thread): BF16 dot products are not faster than f32 FMA on every CPU that has them
/// (on a 2-core Xeon, `vdpbf16ps` measured half the f32 FMA rate). `None` where `isa`
/// lacks BF16 dot products.
pub fn speedup_over_f32(isa: Isa) -> Option<f64> {
    static RACES: [std::sync::OnceLock<f64>; 2] = [std::sync::OnceLock::new(), std::sync::OnceLock::new()];
    let isa = isa.supported();
    if isa < Isa::Avx512Bf16 {
        return None;
    }
    let amx = isa >= Isa::Amx;
    // On one thread of a pool of its own: the kernels' ratio is a property of a core, and
    // a race across all cores is at the mercy of every other process. (The 0.86× once seen
    // under the CLI tests' load, when two processes of one library chose different
    // precisions, was a debug build's race, which measures 0.85× here unloaded; auto no
    // longer trusts that one: `clip::auto_takes_bf16`.) From outside a pool every call
    // would pay thread wake-ups, a larger share of the short f32 call (3.5× once on a Zen 4).
    Some(*RACES[amx as usize].get_or_init(|| match rayon::ThreadPoolBuilder::new().num_threads(1).build() {
        Ok(pool) => pool.install(|| race(isa)),
        Err(_) => crate::cpu::on_pool(|| race(isa)),
    }))
}

fn race(isa: Isa) -> f64 {
    use crate::cpu::gemm::{gemm as gemm_cpu, PackedF32, PackedWeight};
    let (m, k, n) = (128, 768, 768);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let a: Vec<f32> = (0..m * k).map(|_| next()).collect();
    let w: Vec<f32> = (0..n * k).map(|_| next() * 0.1).collect();
    let f32w = PackedWeight::F32(PackedF32::pack_transposed(&w, n, k));
    let bf16w = PackedB::pack_transposed(&w, n, k);
    let mut c = vec![0f32; m * n];
    let mut best = [f64::MAX; 2];
    // Round 0 warms up (page faults, the pool's threads, the kernels' scratch). The two
    // take turns going first, so that neither always follows the other.
    for round in 0..8 {
        let mut times = [0.0; 2];
        for which in [round % 2, 1 - round % 2] {
            let t = std::time::Instant::now();
            if which == 0 {
                gemm_cpu(isa, &a, m, &f32w, None, &mut c, Epilogue::STORE);
            } else {
                gemm_at(isa, &a, m, &bf16w, None, &mut c, Epilogue::STORE);
            }
            times[which] = t.elapsed().as_secs_f64();
        }
        if round > 0 {
            best = [best[0].min(times[0]), best[1].min(times[1])];
        }
    }
    let speedup = best[0] / best[1];
    let flops = 2.0 * (m * k * n) as f64;
    tracing::info!(
        "BF16 GEMM on {isa} kernels: {:.0} GFLOP/s, f32: {:.0} GFLOP/s ({speedup:.2}×)",
        flops / best[1] / 1e9,
        flops / best[0] / 1e9
    );
    speedup
}

/// Round an f32 to bf16, nearest even (the rounding of `vcvtne2ps2bf16` for finite,
/// normal values; NaNs stay NaNs).
pub fn f32_to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16; // quiet, keeps the sign
    }
    let round = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(round) >> 16) as u16
}

/// The f32 value of a bf16.
pub fn bf16_to_f32(x: u16) -> f32 {
    f32::from_bits((x as u32) << 16)
}

/// 64 bytes, so that the packed weights start on a cache line (the micro-kernel's B loads
/// then never straddle two lines).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(crate) struct Line(pub(crate) [u32; 16]);

/// A K × N weight in bf16, in the micro-kernel's layout (see the module docs).
pub struct PackedB {
    /// The columns of A: K, or the logical K of a three-term weight.
    ka: usize,
    /// For a three-term weight: the stride of its three parts of K (`ka` rounded up to
    /// 32), of which two are stored (`w_hi`, `w_lo`) and the third reads the first again;
    /// 0 for a plain one.
    seg: usize,
    n: usize,
    /// Columns per panel (a multiple of 16).
    nr: usize,
    /// ⌈K/2⌉: the k pairs of one panel column (K being the logical depth: `ka`, or
    /// `3 · seg` for a three-term weight).
    kp: usize,
    /// The pairs stored per panel: `kp` rounded up to 16 (zeros past `kp`: an AMX tile
    /// holds 16 pairs of each of its rows), or `seg` (two parts) for a three-term weight.
    kps: usize,
    /// ⌈N/nr⌉ panels of `kps · nr` words.
    data: Vec<Line>,
}

impl std::fmt::Debug for PackedB {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedB").field("k", &self.ka).field("n", &self.n).field("nr", &self.nr).field("terms", &if self.seg > 0 { 3 } else { 1 }).finish()
    }
}

impl PackedB {
    /// Pack `w`, K × N row-major (the transpose of PyTorch's `Linear.weight`).
    pub fn pack(w: &[f32], k: usize, n: usize) -> PackedB {
        assert_eq!(
            w.len(),
            k * n,
            "bf16_gemm::PackedB::pack: w has {} values, not K·N = {k}·{n}",
            w.len()
        );
        Self::pack_with(k, n, NR, |kk, j| w[kk * n + j])
    }

    /// Pack `w_nk`, N × K row-major: PyTorch's `Linear.weight` (out × in) as stored.
    pub fn pack_transposed(w_nk: &[f32], n: usize, k: usize) -> PackedB {
        assert_eq!(
            w_nk.len(),
            k * n,
            "bf16_gemm::PackedB::pack_transposed: w has {} values, not N·K = {n}·{k}",
            w_nk.len()
        );
        Self::pack_with(k, n, NR, |kk, j| w_nk[j * k + kk])
    }

    /// As [`Self::pack_transposed`], split into three bf16 terms for products of near-f32
    /// accuracy at three times the work (see the module docs).
    pub fn pack_transposed_x3(w_nk: &[f32], n: usize, k: usize) -> PackedB {
        assert_eq!(
            w_nk.len(),
            k * n,
            "bf16_gemm::PackedB::pack_transposed_x3: w has {} values, not N·K = {n}·{k}",
            w_nk.len()
        );
        let seg = k.next_multiple_of(32);
        // The stored parts: w_hi, then w_lo (the logical third part is w_hi again).
        let mut b = Self::pack_with(2 * seg, n, NR, |kk, j| {
            let (part, kk) = (kk / seg, kk % seg);
            if kk >= k {
                return 0.0;
            }
            let w = w_nk[j * k + kk];
            let hi = bf16_to_f32(f32_to_bf16(w));
            // Rounded to bf16 by the packing: lo = bf16(w − hi), w − hi being exact.
            if part == 1 {
                w - hi
            } else {
                hi
            }
        });
        debug_assert_eq!(b.kps, seg);
        b.ka = k;
        b.seg = seg;
        b.kp = 3 * seg / 2;
        b
    }

    /// The logical pairs of K a call runs over, padded to whole AMX steps of 16.
    fn depth_pairs(&self) -> usize {
        self.kp.next_multiple_of(16)
    }

    /// The logical pair from which the panels are read from their start again (the
    /// third part of a three-term weight, `w_hi` once more); past the depth otherwise.
    /// K blocks are cut there.
    fn restart_pair(&self) -> usize {
        if self.seg > 0 {
            self.seg
        } else {
            usize::MAX
        }
    }

    /// Where logical pair `p` is stored in a panel.
    fn stored_pair(&self, p: usize) -> usize {
        let r = self.restart_pair();
        if p >= r {
            p - r
        } else {
            p
        }
    }

    /// The end of the K block of at most `kc` pairs that starts at logical pair `p0`: no
    /// further than the depth `kp` and not across [`Self::restart_pair`].
    fn block_end(&self, p0: usize, kc: usize, depth: usize) -> usize {
        let r = self.restart_pair();
        let end = (p0 + kc).min(depth);
        if p0 < r && end > r {
            r
        } else {
            end
        }
    }

    /// 3 for a weight packed by [`Self::pack_transposed_x3`], else 1.
    pub fn terms(&self) -> usize {
        if self.seg > 0 {
            3
        } else {
            1
        }
    }

    fn pack_with(k: usize, n: usize, nr: usize, w: impl Fn(usize, usize) -> f32 + Sync) -> PackedB {
        assert!(nr.is_multiple_of(16));
        let kp = k.div_ceil(2);
        let kps = kp.next_multiple_of(16);
        let panels = n.div_ceil(nr);
        let panel_words = kps * nr; // a multiple of 16
        let mut data = vec![Line([0; 16]); panels * panel_words / 16];
        let get = |kk: usize, j: usize| {
            if kk < k && j < n {
                f32_to_bf16(w(kk, j)) as u32
            } else {
                0
            }
        };
        data.par_chunks_mut((panel_words / 16).max(1))
            .enumerate()
            .for_each(|(jp, panel)| {
                let words = lines_as_words_mut(panel);
                for p in 0..kp {
                    for jj in 0..nr {
                        let j = jp * nr + jj;
                        words[p * nr + jj] = get(2 * p, j) | get(2 * p + 1, j) << 16;
                    }
                }
            });
        PackedB { ka: k, seg: 0, n, nr, kp, kps, data }
    }

    /// K, the inner dimension (the columns of A).
    pub fn k(&self) -> usize {
        self.ka
    }

    /// N, the output columns.
    pub fn n(&self) -> usize {
        self.n
    }

    /// The words of panel `jp`.
    fn panel(&self, jp: usize) -> &[u32] {
        let len = self.kps * self.nr;
        &lines_as_words(&self.data)[jp * len..(jp + 1) * len]
    }
}

pub(crate) fn lines_as_words(lines: &[Line]) -> &[u32] {
    // SAFETY: Line is 16 u32 with no padding.
    unsafe { std::slice::from_raw_parts(lines.as_ptr() as *const u32, lines.len() * 16) }
}

pub(crate) fn lines_as_words_mut(lines: &mut [Line]) -> &mut [u32] {
    // SAFETY: Line is 16 u32 with no padding.
    unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr() as *mut u32, lines.len() * 16) }
}

/// `c = a · b (+ bias)`: `a` is M × K row-major f32, `b` the packed K × N weight, `bias`
/// N values added to every row, `c` M × N row-major, overwritten. Runs on rayon's pool.
///
/// Panics if the shapes disagree or the CPU lacks the instructions ([`available`]).
pub fn gemm(a: &[f32], m: usize, b: &PackedB, bias: Option<&[f32]>, c: &mut [f32]) {
    gemm_ep(a, m, b, bias, c, Epilogue::STORE)
}

/// [`gemm`] with an epilogue: an activation applied by each task to its tile of C once
/// stored, or accumulation into C (`c += a · b + bias`, a residual connection). On AMX
/// tiles where the process has them and `MAGPIE_CPU_ISA` allows ([`Isa::detect`]).
pub fn gemm_ep(a: &[f32], m: usize, b: &PackedB, bias: Option<&[f32]>, c: &mut [f32], ep: Epilogue) {
    gemm_at(Isa::detect(), a, m, b, bias, c, ep)
}

/// [`gemm_ep`] on the kernels of `isa`: AMX tiles at [`Isa::Amx`] (where the hardware has
/// them; else, as below it, AVX-512 BF16 dot products).
pub fn gemm_at(isa: Isa, a: &[f32], m: usize, b: &PackedB, bias: Option<&[f32]>, c: &mut [f32], ep: Epilogue) {
    let (k, n) = (b.ka, b.n);
    assert_eq!(
        a.len(),
        m * k,
        "bf16_gemm::gemm: a has {} values, not M·K = {m}·{k}",
        a.len()
    );
    assert_eq!(
        c.len(),
        m * n,
        "bf16_gemm::gemm: c has {} values, not M·N = {m}·{n}",
        c.len()
    );
    if let Some(bias) = bias {
        assert_eq!(
            bias.len(),
            n,
            "bf16_gemm::gemm: bias has {} values, not N = {n}",
            bias.len()
        );
    }
    assert!(
        available(),
        "bf16_gemm::gemm needs AVX-512 F, BW and BF16 (check bf16_gemm::available())"
    );
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the CPU features were just checked.
    unsafe {
        if isa.supported() >= Isa::Amx {
            x86::gemm::<MR, NV>(a, m, b, bias, c, &x86::Blocking::AMX, ep, true)
        } else {
            x86::gemm::<MR, NV>(a, m, b, bias, c, &x86::Blocking::default(), ep, false)
        }
    };
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use super::*;
    use crate::cpu::gemm::x86::{col_masks, init_tile, store_tile};
    use std::arch::x86_64::*;

    /// Cache blocking of one call; see the module docs. Shared with the int8 kernel.
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Blocking {
        /// k words (pairs here, quads for int8) per K block.
        pub kc: usize,
        /// Rows per task (rounded to the micro-tile).
        pub mc: usize,
        /// Columns per task (rounded to the panels).
        pub nc: usize,
        /// At least this many tasks per thread, when the shape allows.
        pub tasks_per_thread: usize,
    }

    impl Blocking {
        /// For the AMX kernel: K blocks of 256 pairs (a 32-row block of A is then 32 KiB,
        /// reused from L1 by every panel of the task).
        pub const AMX: Blocking = Blocking {
            kc: 256,
            mc: 256,
            nc: 256,
            tasks_per_thread: 4,
        };
    }

    impl Default for Blocking {
        fn default() -> Self {
            Blocking {
                kc: 512,
                mc: 512,
                nc: 192,
                tasks_per_thread: 4,
            }
        }
    }

    /// [`super::gemm`] with a given micro-tile and blocking; shapes already checked.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW and BF16 ([`available`]), and AMX if `amx`
    /// ([`amx::available`]).
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn gemm<const MR: usize, const NV: usize>(
        a: &[f32],
        m: usize,
        b: &PackedB,
        bias: Option<&[f32]>,
        c: &mut [f32],
        blk: &Blocking,
        ep: Epilogue,
        amx: bool,
    ) {
        let (k, n, kp) = (b.ka, b.n, b.kp);
        let nr = NV * 16;
        assert_eq!(
            b.nr, nr,
            "bf16_gemm: B packed for {}-column panels, kernel wants {nr}",
            b.nr
        );
        if m == 0 || n == 0 {
            return;
        }
        if k == 0 {
            for row in c.chunks_mut(n) {
                if !ep.accumulate {
                    row.fill(0.0);
                }
                if let Some(bias) = bias {
                    row.iter_mut().zip(bias).for_each(|(c, b)| *c += b);
                }
                activate(Isa::Avx512, ep.act, row);
            }
            return;
        }

        // A in bf16, row-major pairs. Rows are padded to whole cache lines, and to an odd
        // number of them: with rows a multiple of 4 KiB apart (K = 6144), the micro-kernel's
        // rows would all fall into the same L1 sets.
        // AMX reads A in blocks of 16 rows: zero rows complete the last block.
        let lda = kp.next_multiple_of(16) | 16;
        let rows = if amx { m.next_multiple_of(16) } else { m };
        let mut scratch = SCRATCH.take();
        if scratch.len() < rows * lda / 16 {
            scratch = vec![Line([0; 16]); rows * lda / 16];
        }
        scratch[m * lda / 16..rows * lda / 16].fill(Line([0; 16]));
        let abuf = &mut scratch[..m * lda / 16];
        let rows_per_chunk = (4096 / lda).clamp(1, m.div_ceil(2).max(1));
        abuf.par_chunks_mut(rows_per_chunk * lda / 16)
            .enumerate()
            .for_each(|(ci, chunk)| {
                let words = lines_as_words_mut(chunk);
                for (ri, row) in words.chunks_mut(lda).enumerate() {
                    let i = ci * rows_per_chunk + ri;
                    let x = &a[i * k..(i + 1) * k];
                    // SAFETY: the caller vouches for the CPU features; `row` holds
                    // lda ≥ kp = 3·seg/2 words for a three-term weight.
                    unsafe {
                        if b.seg > 0 {
                            convert_row_x3(x, b.seg, row)
                        } else {
                            convert_row(x, row)
                        }
                    };
                }
            });
        let abf = lines_as_words(&scratch[..rows * lda / 16]);

        // Tasks: a grid of row groups × panel groups, as even as whole micro-tiles allow,
        // at most about mc × nc each, and at least `tasks_per_thread` per thread so that
        // rayon can even out the threads (and a busy core) by stealing.
        let kc = blk.kc.max(1);
        // Row groups in whole micro-tiles: AMX's are 32 rows (two tiles).
        let mr = if amx { 32 } else { MR };
        let (rt, pn) = (m.div_ceil(mr), n.div_ceil(nr));
        let (mt, nt) = task_grid(m, mr, pn, nr, blk.mc, blk.nc, blk.tasks_per_thread);
        let cptr = SendPtr(c.as_mut_ptr());
        let bias = bias.map(|b| b.as_ptr() as usize);
        (0..mt * nt).into_par_iter().for_each(|t| {
            let (g, h) = (t / nt, t % nt);
            let rows = (g * rt / mt * mr, ((g + 1) * rt / mt * mr).min(m));
            let panels = (h * pn / nt, (h + 1) * pn / nt);
            // SAFETY: the caller vouches for the CPU features; the task writes its rows × panels of C
            // only, which no other task touches. For AMX: the rows to the next multiple of 16
            // are in `abf` (zero past M), `lda` ≥ kps, and tasks start on multiples of 32 rows.
            unsafe {
                if amx {
                    amx::task(
                        abf.as_ptr(),
                        lda,
                        b,
                        bias.map(|p| p as *const f32),
                        cptr.get(),
                        n,
                        rows,
                        panels,
                        kc,
                        ep,
                    );
                    return;
                }
                task::<MR, NV>(
                    abf,
                    lda,
                    b,
                    bias.map(|p| p as *const f32),
                    cptr.get(),
                    n,
                    rows,
                    panels,
                    kc,
                    ep,
                )
            };
        });
        if scratch.len() * 64 <= SCRATCH_KEEP {
            SCRATCH.set(scratch);
        }
    }

    /// At most this many bytes of converted activations stay allocated per calling thread
    /// between calls (M·K·2: 800 × 3072 is 4.9 MB).
    const SCRATCH_KEEP: usize = 64 << 20;

    thread_local! {
        /// The converted activations of the last call, kept for the next one: allocating
        /// megabytes per call costs page faults. Taken while in use, so a nested call (a
        /// rayon task of this thread calling gemm) just allocates its own.
        static SCRATCH: std::cell::Cell<Vec<Line>> = const { std::cell::Cell::new(Vec::new()) };
    }

    /// One task: C[rows, panels] over all of K.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn task<const MR: usize, const NV: usize>(
        abf: &[u32],
        lda: usize,
        b: &PackedB,
        bias: Option<*const f32>,
        c: *mut f32,
        ldc: usize,
        (m0, m1): (usize, usize),
        (p0, p1): (usize, usize),
        kc: usize,
        ep: Epilogue,
    ) {
        const { assert!(MR <= 8, "tail_kernel covers up to 7 rows") };
        let (nr, kp, n) = (NV * 16, b.kp, b.n);
        let mut k0 = 0;
        while k0 < kp {
            let kn = b.block_end(k0, kc, kp) - k0;
            for jp in p0..p1 {
                let bp = b.panel(jp).as_ptr().add(b.stored_pair(k0) * nr);
                let j = jp * nr;
                let cols = nr.min(n - j);
                let init = Init::at(k0, bias.map(|p| p.add(j)), ep.accumulate);
                let mut i = m0;
                while i < m1 {
                    let rows = MR.min(m1 - i);
                    let ap = abf.as_ptr().add(i * lda + k0);
                    let cp = c.add(i * ldc + j);
                    if rows == MR {
                        kernel::<MR, NV>(kn, ap, lda, bp, cp, ldc, cols, init);
                    } else {
                        tail_kernel::<NV>(rows, kn, ap, lda, bp, cp, ldc, cols, init);
                    }
                    i += MR;
                }
            }
            k0 += kn;
        }
        activate_task(ep, c, ldc, (m0, m1), (p0 * nr, (p1 * nr).min(n)));
    }

    /// The epilogue's activation over a finished task's rows × columns of C (shared with
    /// the int8 kernel; nothing to do when accumulating or without an activation).
    ///
    /// # Safety
    /// AVX-512 F present; rows `m0..m1`, columns `j0..j1` of C (rows `ldc` apart) are
    /// writable and touched by no one else.
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn activate_task(ep: Epilogue, c: *mut f32, ldc: usize, (m0, m1): (usize, usize), (j0, j1): (usize, usize)) {
        if ep.act != Act::None && !ep.accumulate {
            for i in m0..m1 {
                activate(Isa::Avx512, ep.act, std::slice::from_raw_parts_mut(c.add(i * ldc + j0), j1 - j0));
            }
        }
    }

    /// The micro-kernel for fewer rows than MR (the last row tile): one instance per
    /// row count, so no row is computed in vain.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn tail_kernel<const NV: usize>(
        rows: usize,
        kn: usize,
        a: *const u32,
        lda: usize,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        cols: usize,
        init: Init,
    ) {
        match rows {
            1 => kernel::<1, NV>(kn, a, lda, b, c, ldc, cols, init),
            2 => kernel::<2, NV>(kn, a, lda, b, c, ldc, cols, init),
            3 => kernel::<3, NV>(kn, a, lda, b, c, ldc, cols, init),
            4 => kernel::<4, NV>(kn, a, lda, b, c, ldc, cols, init),
            5 => kernel::<5, NV>(kn, a, lda, b, c, ldc, cols, init),
            6 => kernel::<6, NV>(kn, a, lda, b, c, ldc, cols, init),
            7 => kernel::<7, NV>(kn, a, lda, b, c, ldc, cols, init),
            _ => unreachable!("bf16_gemm: tail of {rows} rows"),
        }
    }

    /// The micro-kernel: C[0..R, 0..cols] (=|+=) A[0..R, kn pairs] · B panel[kn pairs].
    ///
    /// `a` points at row 0's first pair (rows `lda` words apart), `b` at the panel's first
    /// pair (`NV · 16` words per pair), `c` at the tile (rows `ldc` apart). `cols ≤ NV · 16`
    /// columns are stored; the panel's padding columns are computed and dropped.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn kernel<const R: usize, const NV: usize>(
        kn: usize,
        a: *const u32,
        lda: usize,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        cols: usize,
        init: Init,
    ) {
        let (full, mask) = col_masks::<NV>(cols);
        let mut acc = init_tile::<R, NV>(init, c, ldc, full, &mask);

        let mut ap = [a; R];
        for (r, p) in ap.iter_mut().enumerate() {
            *p = a.add(r * lda);
        }
        let mut bp = b;
        for p in 0..kn {
            let mut bv = [_mm512_setzero_si512(); NV];
            for (v, x) in bv.iter_mut().enumerate() {
                *x = _mm512_loadu_si512(bp.add(v * 16) as *const __m512i);
            }
            for r in 0..R {
                let av = bh(_mm512_set1_epi32(*ap[r].add(p) as i32));
                for v in 0..NV {
                    acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bh(bv[v]));
                }
            }
            bp = bp.add(NV * 16);
        }
        store_tile::<R, NV>(&acc, c, ldc, full, &mask);
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn bh(x: __m512i) -> __m512bh {
        // SAFETY: both are 64 bytes of plain bits.
        unsafe { std::mem::transmute::<__m512i, __m512bh>(x) }
    }

    /// One row of A to bf16 pairs: `out[p] = bf16(x[2p]) | bf16(x[2p+1]) << 16`, zeros past
    /// the row's end (an odd K's last high half, and the row padding).
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn convert_row(x: &[f32], out: &mut [u32]) {
        let k = x.len();
        debug_assert!(out.len() * 2 >= k && out.len().is_multiple_of(16));
        let mut kk = 0;
        let mut o = 0;
        while kk + 32 <= k {
            let lo = _mm512_loadu_ps(x.as_ptr().add(kk));
            let hi = _mm512_loadu_ps(x.as_ptr().add(kk + 16));
            // The second operand fills the low 16 bf16, so x[kk] lands in word o's low half.
            let p = _mm512_cvtne2ps_pbh(hi, lo);
            _mm512_storeu_si512(
                out.as_mut_ptr().add(o) as *mut __m512i,
                std::mem::transmute::<__m512bh, __m512i>(p),
            );
            kk += 32;
            o += 16;
        }
        while o < out.len() {
            let left = k.saturating_sub(kk);
            let mlo = mask16(left);
            let mhi = mask16(left.saturating_sub(16));
            let lo = _mm512_maskz_loadu_ps(mlo, x.as_ptr().add(kk.min(k)));
            let hi = _mm512_maskz_loadu_ps(mhi, x.as_ptr().add((kk + 16).min(k)));
            let p = _mm512_cvtne2ps_pbh(hi, lo);
            _mm512_storeu_si512(
                out.as_mut_ptr().add(o) as *mut __m512i,
                std::mem::transmute::<__m512bh, __m512i>(p),
            );
            kk += 32;
            o += 16;
        }
    }

    /// One row of A split into three bf16 terms for a three-term weight: words
    /// `[0, seg/2)` and `[seg/2, seg)` hold `hi = bf16(x)` as [`convert_row`] does, words
    /// `[seg, 3·seg/2)` `lo = bf16(x − hi)`; zeros past K in each part and past them.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn convert_row_x3(x: &[f32], seg: usize, out: &mut [u32]) {
        let k = x.len();
        debug_assert!(seg >= k && seg.is_multiple_of(32) && out.len() * 2 >= 3 * seg);
        let half = seg / 2;
        // hi of 16 values, back in f32 (exact: bf16 is a prefix of f32).
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
        fn widen(v: __m512) -> __m512 {
            // SAFETY: 32 bytes of plain bits.
            let h = unsafe { std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(v)) };
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        }
        let mut kk = 0;
        let mut o = 0;
        while kk < seg {
            let left = k.saturating_sub(kk);
            let (mlo, mhi) = (mask16(left), mask16(left.saturating_sub(16)));
            let v0 = _mm512_maskz_loadu_ps(mlo, x.as_ptr().add(kk.min(k)));
            let v1 = _mm512_maskz_loadu_ps(mhi, x.as_ptr().add((kk + 16).min(k)));
            let hi = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(v1, v0));
            let lo0 = _mm512_sub_ps(v0, widen(v0));
            let lo1 = _mm512_sub_ps(v1, widen(v1));
            let lo = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(lo1, lo0));
            let p = out.as_mut_ptr().add(o);
            _mm512_storeu_si512(p as *mut __m512i, hi);
            _mm512_storeu_si512(p.add(half) as *mut __m512i, hi);
            _mm512_storeu_si512(p.add(seg) as *mut __m512i, lo);
            kk += 32;
            o += 16;
        }
        out[3 * half..].fill(0);
    }

    pub(crate) fn mask16(lanes: usize) -> u16 {
        ((1u32 << lanes.min(16)) - 1) as u16
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// xorshift64*, uniform in [-1, 1). Shared with the int8 kernel's tests.
    pub(crate) struct Rng(pub(crate) u64);
    impl Rng {
        fn f32(&mut self) -> f32 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
        pub(crate) fn vec(&mut self, len: usize) -> Vec<f32> {
            (0..len).map(|_| self.f32()).collect()
        }
    }

    /// Rows `rows` of `a · w (+ bias)` in f64.
    fn reference_f64(
        a: &[f32],
        rows: &[usize],
        w: &[f32],
        k: usize,
        n: usize,
        bias: Option<&[f32]>,
    ) -> Vec<f64> {
        let mut c = vec![0f64; rows.len() * n];
        for (ri, &i) in rows.iter().enumerate() {
            let row = &mut c[ri * n..(ri + 1) * n];
            if let Some(bias) = bias {
                for (c, b) in row.iter_mut().zip(bias) {
                    *c = *b as f64;
                }
            }
            for kk in 0..k {
                let x = a[i * k + kk] as f64;
                for (c, w) in row.iter_mut().zip(&w[kk * n..(kk + 1) * n]) {
                    *c += x * *w as f64;
                }
            }
        }
        c
    }

    /// What the hardware computes: bf16 inputs, and per k pair, `acc += hi·hi` then
    /// `acc += lo·lo`, each rounded to f32 (the products are exact), from the bias; or in
    /// AMX's documented order (`amx`): the low product first, the bias after all of K.
    fn reference_bf16_ordered(
        a: &[f32],
        m: usize,
        w: &[f32],
        k: usize,
        n: usize,
        bias: Option<&[f32]>,
        amx: bool,
    ) -> Vec<f32> {
        let r = |x: f32| bf16_to_f32(f32_to_bf16(x));
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let b = bias.map_or(0.0, |b| b[j]);
                let mut acc = if amx { 0.0 } else { b };
                for p in 0..k.div_ceil(2) {
                    let (lo, hi) = (2 * p, 2 * p + 1);
                    let plo = r(a[i * k + lo]) * r(w[lo * n + j]);
                    let phi = if hi < k { r(a[i * k + hi]) * r(w[hi * n + j]) } else { 0.0 };
                    if amx {
                        acc += plo;
                        acc += phi;
                    } else {
                        acc += phi;
                        acc += plo;
                    }
                }
                c[i * n + j] = if amx { acc + b } else { acc };
            }
        }
        c
    }

    pub(crate) fn rel_err(c: &[f32], reference: &[f64]) -> f64 {
        let (mut num, mut den) = (0f64, 0f64);
        for (c, r) in c.iter().zip(reference) {
            num += (*c as f64 - r) * (*c as f64 - r);
            den += r * r;
        }
        if den == 0.0 {
            num.sqrt()
        } else {
            (num / den).sqrt()
        }
    }

    #[test]
    fn bf16_rounding() {
        assert_eq!(f32_to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1.0).
        assert_eq!(f32_to_bf16(1.0 + 2f32.powi(-8)), 0x3f80);
        // 1 + 3·2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6: up.
        assert_eq!(f32_to_bf16(1.0 + 3.0 * 2f32.powi(-8)), 0x3f82);
        assert_eq!(f32_to_bf16(-2.5), 0xc020);
        assert!(bf16_to_f32(f32_to_bf16(f32::NAN)).is_nan());
        assert_eq!(bf16_to_f32(f32_to_bf16(f32::INFINITY)), f32::INFINITY);
    }

    #[test]
    fn matches_f64_reference() {
        if !available() {
            eprintln!("bf16_gemm: no AVX512_BF16 here, test skipped");
            return;
        }
        let mut rng = Rng(0x1234_5678_9abc_def1);
        let mut worst = 0f64;
        for &m in &[1, 3, 50, 257, 800] {
            for &k in &[1, 7, 64, 768, 1408] {
                for &n in &[1, 17, 768, 3072] {
                    let a = rng.vec(m * k);
                    let w = rng.vec(k * n);
                    let bias = rng.vec(n);
                    let bias = (n % 2 == 1).then_some(&bias[..]);
                    let b = PackedB::pack(&w, k, n);
                    let mut c = vec![f32::NAN; m * n];
                    gemm(&a, m, &b, bias, &mut c);
                    // The reference is checked on some rows only, to keep debug builds quick:
                    // the first and last few (the row tail) and one in the middle.
                    let mut rows: Vec<usize> = (0..m.min(4))
                        .chain(m.saturating_sub(7)..m)
                        .chain([m / 2])
                        .collect();
                    rows.sort_unstable();
                    rows.dedup();
                    let got: Vec<f32> = rows
                        .iter()
                        .flat_map(|&i| c[i * n..(i + 1) * n].iter().copied())
                        .collect();
                    let err = rel_err(&got, &reference_f64(&a, &rows, &w, k, n, bias));
                    assert!(err <= 1e-2, "M={m} K={k} N={n}: relative error {err}");
                    worst = worst.max(err);
                }
            }
        }
        eprintln!("bf16_gemm: worst relative error {worst:.2e}");
    }

    /// Three-term weights: errors of f32's order (within 3e-5 of the f64 product; about
    /// 4e-6 on the larger shapes) and, past a few products, at least 50 times smaller than
    /// one term's, on both kernels, odd K included (each part of K padded), with and
    /// without bias and accumulation.
    #[test]
    fn three_terms_near_f32() {
        if !available() {
            eprintln!("bf16_gemm: no AVX512_BF16 here, test skipped");
            return;
        }
        let mut rng = Rng(0x3333_5555_7777_9999);
        let mut worst = (0f64, f64::MAX);
        let isas: Vec<Isa> = [Isa::Avx512Bf16, Isa::Amx].into_iter().filter(|&i| i <= Isa::hardware()).collect();
        for &(m, k, n) in &[(1, 1, 1), (3, 7, 17), (50, 33, 64), (37, 100, 130), (65, 768, 2304), (16, 1408, 96)] {
            let a = rng.vec(m * k);
            let w = rng.vec(k * n);
            let w_nk: Vec<f32> = (0..n * k).map(|i| w[(i % k) * n + i / k]).collect();
            let bias = rng.vec(n);
            let start = rng.vec(m * n);
            let b3 = PackedB::pack_transposed_x3(&w_nk, n, k);
            let b1 = PackedB::pack_transposed(&w_nk, n, k);
            assert_eq!((b3.k(), b3.n(), b3.terms(), b1.terms()), (k, n, 3, 1));
            let rows: Vec<usize> = (0..m).collect();
            for &isa in &isas {
                for (bias, ep) in [(None, Epilogue::STORE), (Some(&bias[..]), Epilogue::STORE), (Some(&bias[..]), Epilogue::ACCUMULATE)] {
                    let mut want = reference_f64(&a, &rows, &w, k, n, bias);
                    let mut c3 = if ep.accumulate { start.clone() } else { vec![f32::NAN; m * n] };
                    let mut c1 = c3.clone();
                    if ep.accumulate {
                        want.iter_mut().zip(&start).for_each(|(w, s)| *w += *s as f64);
                    }
                    gemm_at(isa, &a, m, &b3, bias, &mut c3, ep);
                    gemm_at(isa, &a, m, &b1, bias, &mut c1, ep);
                    let (e3, e1) = (rel_err(&c3, &want), rel_err(&c1, &want));
                    assert!(e3 <= 3e-5, "{isa} M={m} K={k} N={n} {ep:?}: three terms' relative error {e3}");
                    worst = (worst.0.max(e3), worst.1.min(e1 / e3.max(1e-30)));
                    assert!(m * k * n < 1000 || e3 * 50.0 <= e1, "{isa} M={m} K={k} N={n} {ep:?}: three terms {e3}, one {e1}");
                }
            }
        }
        eprintln!("bf16_gemm three terms: worst relative error {:.2e}, at least {:.0}× smaller than one term's", worst.0, worst.1);
    }

    /// A three-term weight stores `[w_hi; w_lo]` and reads `w_hi` again for the third part
    /// of K: bit for bit what a plain weight of the whole `[w_hi; w_lo; w_hi]` gives with
    /// `[a_hi, a_hi, a_lo]` as A, on both kernels and with K blocks that end inside the
    /// parts, at their boundaries and past them.
    #[test]
    fn three_terms_reuse_the_high_part() {
        if !available() {
            eprintln!("bf16_gemm: no AVX512_BF16 here, test skipped");
            return;
        }
        let hi = |x: f32| bf16_to_f32(f32_to_bf16(x));
        let mut rng = Rng(0x5eed_0003);
        for &(m, k, n) in &[(5usize, 33usize, 70usize), (40, 100, 64), (17, 515, 130), (33, 64, 17)] {
            let seg = k.next_multiple_of(32);
            let (a, w_nk) = (rng.vec(m * k), rng.vec(n * k));
            let mut a3 = vec![0f32; m * 3 * seg];
            for i in 0..m {
                for kk in 0..k {
                    let x = a[i * k + kk];
                    let row = &mut a3[i * 3 * seg..];
                    (row[kk], row[seg + kk], row[2 * seg + kk]) = (hi(x), hi(x), hi(x - hi(x)));
                }
            }
            let mut w3 = vec![0f32; 3 * seg * n];
            for j in 0..n {
                for kk in 0..k {
                    let x = w_nk[j * k + kk];
                    (w3[kk * n + j], w3[(seg + kk) * n + j], w3[(2 * seg + kk) * n + j]) = (hi(x), hi(x - hi(x)), hi(x));
                }
            }
            let (b3, plain) = (PackedB::pack_transposed_x3(&w_nk, n, k), PackedB::pack(&w3, 3 * seg, n));
            assert_eq!(b3.data.len() * 3, plain.data.len() * 2, "two of the three parts stored");
            let bias = rng.vec(n);
            for amx in [false, true] {
                if amx && !amx_available() {
                    continue;
                }
                for kc in [16, 48, seg / 2, 512] {
                    let blk = x86::Blocking { kc, mc: 64, nc: 128, tasks_per_thread: 2 };
                    for ep in [Epilogue::STORE, Epilogue::ACCUMULATE] {
                        let start = rng.vec(m * n);
                        let (mut got, mut want) = (start.clone(), start);
                        run_at(&a, m, &b3, Some(&bias), &mut got, &blk, ep, amx);
                        run_at(&a3, m, &plain, Some(&bias), &mut want, &blk, ep, amx);
                        let same = got.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits());
                        assert!(same, "M={m} K={k} N={n} kc={kc} amx={amx} {ep:?}: differs from the explicit three parts");
                    }
                }
            }
        }
    }

    #[test]
    fn exact_against_scalar_bf16() {
        if !available() {
            eprintln!("bf16_gemm: no AVX512_BF16 here, test skipped");
            return;
        }
        let mut rng = Rng(42);
        for &(m, k, n) in &[
            (1, 1, 1),
            (3, 7, 17),
            (9, 64, 50),
            (17, 33, 100),
            (8, 600, 48),
            (13, 515, 97),
            (50, 130, 200),
            (7, 2100, 70),
        ] {
            for with_bias in [false, true] {
                let a = rng.vec(m * k);
                let w = rng.vec(k * n);
                let bias = rng.vec(n);
                let bias = with_bias.then_some(&bias[..]);
                let b = PackedB::pack(&w, k, n);
                for isa in [Isa::Avx512Bf16, Isa::Amx] {
                    if isa == Isa::Amx && !amx_available() {
                        continue;
                    }
                    let mut c = vec![f32::NAN; m * n];
                    gemm_at(isa, &a, m, &b, bias, &mut c, Epilogue::STORE);
                    let amx = isa == Isa::Amx;
                    let r = reference_bf16_ordered(&a, m, &w, k, n, bias, amx);
                    // AVX-512: the very bits. AMX sums a tile's pairs in an order of its own
                    // (not documented): within a few roundings of the sum of magnitudes.
                    let abs = |v: &[f32]| v.iter().map(|x| x.abs()).collect::<Vec<f32>>();
                    let mag = reference_bf16_ordered(&abs(&a), m, &abs(&w), k, n, bias.map(abs).as_deref(), amx);
                    for (idx, (x, y)) in c.iter().zip(&r).enumerate() {
                        if amx {
                            assert!(
                                (x - y).abs() <= 4.0 * f32::EPSILON * mag[idx],
                                "{isa}: M={m} K={k} N={n} bias={with_bias}: c[{idx}] {x} vs {y}"
                            );
                        } else {
                            assert_eq!(
                                x.to_bits(),
                                y.to_bits(),
                                "{isa}: M={m} K={k} N={n} bias={with_bias}: c[{idx}] {x} vs {y}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn blockings_agree() {
        // Every blocking sums in the same order, so all must give the same bits.
        if !available() {
            eprintln!("bf16_gemm: no AVX512_BF16 here, test skipped");
            return;
        }
        let (m, k, n) = (61, 1001, 211);
        let mut rng = Rng(7);
        let (a, w, bias) = (rng.vec(m * k), rng.vec(k * n), rng.vec(n));
        let b = PackedB::pack(&w, k, n);
        let mut want = vec![0f32; m * n];
        gemm_at(Isa::Avx512Bf16, &a, m, &b, Some(&bias), &mut want, Epilogue::STORE);
        for blk in [
            (1, 8, 48, 1),
            (7, 16, 96, 3),
            (100, 24, 48, 8),
            (500, 1000, 1000, 1),
        ] {
            let blk = x86::Blocking {
                kc: blk.0,
                mc: blk.1,
                nc: blk.2,
                tasks_per_thread: blk.3,
            };
            let mut c = vec![f32::NAN; m * n];
            // SAFETY: available() was checked above.
            unsafe { x86::gemm::<MR, NV>(&a, m, &b, Some(&bias), &mut c, &blk, Epilogue::STORE, false) };
            assert!(
                c.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{blk:?}"
            );
        }
    }

    /// Runs `x86::gemm` on AMX (or, with `amx` false, the AVX-512 kernel) with a blocking.
    fn run_at(a: &[f32], m: usize, b: &PackedB, bias: Option<&[f32]>, c: &mut [f32], blk: &x86::Blocking, ep: Epilogue, amx: bool) {
        assert!(available() && (!amx || amx_available()));
        // SAFETY: the features were just checked.
        unsafe { x86::gemm::<MR, NV>(a, m, b, bias, c, blk, ep, amx) };
    }

    #[test]
    fn amx_matches_the_avx512_kernel() {
        if !amx_available() {
            eprintln!("bf16_gemm: no AMX here (or the OS refused it), test skipped");
            return;
        }
        let mut rng = Rng(0xa3c5);
        let mut worst = (0f64, 0f64);
        // Odd sizes around the tiles' 16 rows, 32 k and 16 / 64 columns.
        for &m in &[1, 15, 16, 17, 31, 33, 50, 97] {
            for &k in &[1, 7, 31, 32, 33, 200, 515] {
                for &n in &[1, 17, 64, 65, 130] {
                    let a = rng.vec(m * k);
                    let w = rng.vec(k * n);
                    let bias = rng.vec(n);
                    let bias = ((m + n) % 2 == 1).then_some(&bias[..]);
                    let b = PackedB::pack(&w, k, n);
                    for ep in [Epilogue::STORE, Epilogue::ACCUMULATE, Epilogue::act(Act::QuickGelu)] {
                        let start = rng.vec(m * n);
                        let (mut want, mut got) = (start.clone(), start.clone());
                        run_at(&a, m, &b, bias, &mut want, &x86::Blocking::default(), ep, false);
                        run_at(&a, m, &b, bias, &mut got, &x86::Blocking::AMX, ep, true);
                        // Same inputs and products; the order of the two additions of a pair
                        // and the bias's place differ: a few ulps of the sums' magnitude.
                        let scale = (k as f64).sqrt() + 1.0;
                        let max = got.iter().zip(&want).map(|(x, y)| (*x as f64 - *y as f64).abs()).fold(0.0, f64::max);
                        assert!(max <= 1e-5 * scale, "M={m} K={k} N={n} {ep:?}: AMX differs by {max:e}");
                        let rows: Vec<usize> = (0..m).collect();
                        if ep == Epilogue::STORE {
                            let err = rel_err(&got, &reference_f64(&a, &rows, &w, k, n, bias));
                            assert!(err <= 1e-2, "M={m} K={k} N={n}: relative error {err}");
                            worst.1 = worst.1.max(err);
                        }
                        worst.0 = worst.0.max(max / scale);
                    }
                }
            }
        }
        eprintln!("bf16_gemm amx: worst difference from AVX-512 {:.2e} × (√K + 1), relative error {:.2e}", worst.0, worst.1);
    }

    #[test]
    fn amx_blockings_agree() {
        // K blocks meet through exact f32 stores and loads of the tiles: the same bits.
        if !amx_available() {
            eprintln!("bf16_gemm: no AMX here (or the OS refused it), test skipped");
            return;
        }
        let (m, k, n) = (83, 1001, 211);
        let mut rng = Rng(11);
        let (a, w, bias) = (rng.vec(m * k), rng.vec(k * n), rng.vec(n));
        let b = PackedB::pack(&w, k, n);
        let mut want = vec![f32::NAN; m * n];
        run_at(&a, m, &b, Some(&bias), &mut want, &x86::Blocking::AMX, Epilogue::STORE, true);
        for (kc, mc, nc, per_thread) in [(16, 32, 64, 1), (48, 64, 128, 3), (100, 32, 64, 8), (5000, 1000, 1000, 1)] {
            let blk = x86::Blocking { kc, mc, nc, tasks_per_thread: per_thread };
            let mut c = vec![f32::NAN; m * n];
            run_at(&a, m, &b, Some(&bias), &mut c, &blk, Epilogue::STORE, true);
            assert!(c.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits()), "{blk:?}");
        }
        // And through the public entry points: AMX at Isa::Amx, AVX-512 below it.
        let mut c = vec![f32::NAN; m * n];
        gemm_at(Isa::Amx, &a, m, &b, Some(&bias), &mut c, Epilogue::STORE);
        assert!(c.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits()));
        let mut avx = vec![f32::NAN; m * n];
        gemm_at(Isa::Avx512Bf16, &a, m, &b, Some(&bias), &mut avx, Epilogue::STORE);
        let mut plain = vec![f32::NAN; m * n];
        run_at(&a, m, &b, Some(&bias), &mut plain, &x86::Blocking::default(), Epilogue::STORE, false);
        assert!(avx.iter().zip(&plain).all(|(x, y)| x.to_bits() == y.to_bits()));
    }

    #[test]
    fn transposed_packing_and_edges() {
        let (k, n) = (9, 20);
        let mut rng = Rng(3);
        let w = rng.vec(k * n);
        let mut w_nk = vec![0f32; n * k];
        for kk in 0..k {
            for j in 0..n {
                w_nk[j * k + kk] = w[kk * n + j];
            }
        }
        let (b1, b2) = (
            PackedB::pack(&w, k, n),
            PackedB::pack_transposed(&w_nk, n, k),
        );
        assert_eq!(b1.data.len(), b2.data.len());
        assert!(lines_as_words(&b1.data) == lines_as_words(&b2.data));
        // Word p of column j: W[2p][j] low, W[2p+1][j] high; odd K and N padded with 0.
        let words = b1.panel(0);
        assert_eq!(
            words[NR + 3],
            f32_to_bf16(w[2 * n + 3]) as u32 | (f32_to_bf16(w[3 * n + 3]) as u32) << 16
        );
        assert_eq!(words[4 * NR + 3] >> 16, 0);
        assert_eq!(words[NR + n], 0);
        if !available() {
            eprintln!("bf16_gemm: no AVX512_BF16 here, rest of the test skipped");
            return;
        }
        // M = 0 and K = 0.
        gemm(&[], 0, &b1, None, &mut []);
        let b0 = PackedB::pack(&[], 0, n);
        let bias: Vec<f32> = (0..n).map(|j| j as f32).collect();
        let mut c = vec![f32::NAN; 2 * n];
        gemm(&[], 2, &b0, Some(&bias), &mut c);
        assert_eq!(&c[n..], &bias[..]);
    }

    #[test]
    #[should_panic(expected = "not M·K")]
    fn shape_mismatch_panics() {
        let b = PackedB::pack(&[0.0; 6], 2, 3);
        gemm(&[0.0; 5], 2, &b, None, &mut [0.0; 6]);
    }

    /// Process CPU seconds (all threads).
    fn cpu_seconds() -> f64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid out-pointer.
        unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
        ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
    }

    /// GFLOP/s of the ViT shapes against candle's f32 matmul (gemm crate, AVX-512), on
    /// rayon's pool: best wall-clock time, and "cpu", the flops per CPU second × threads,
    /// which stays meaningful when other processes share the cores.
    /// `cargo test -p magpie-models --release --lib bf16_gemm -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn bench_gflops() {
        if !available() {
            eprintln!("bf16_gemm: no AVX512_BF16 here, bench skipped");
            return;
        }
        use candle_core::{Device, Tensor};
        use std::time::Instant;
        let threads = rayon::current_num_threads();
        let shapes = [
            (800, 768, 3072),
            (800, 3072, 768),
            (257, 1408, 6144),
            (257, 6144, 1408),
            (50, 768, 2304),
            (800, 32, 3072),
            (256, 768, 256),
        ];
        eprintln!(
            "threads: {threads}; GFLOP/s, best of 20 (wall) | flops per CPU second × threads (cpu)"
        );
        eprintln!(
            "{:>5} {:>5} {:>5}  {:>10} {:>10} {:>5}  {:>9} {:>9} {:>5}",
            "M", "K", "N", "bf16 wall", "f32 wall", "ratio", "bf16 cpu", "f32 cpu", "ratio"
        );
        let mut rng = Rng(99);
        for (m, k, n) in shapes {
            let (a, w, bias) = (rng.vec(m * k), rng.vec(k * n), rng.vec(n));
            let b = PackedB::pack(&w, k, n);
            let mut c = vec![0f32; m * n];
            let ta = Tensor::from_slice(&a, (m, k), &Device::Cpu).unwrap();
            let tw = Tensor::from_slice(&w, (k, n), &Device::Cpu).unwrap();
            let flops = 2.0 * (m * k * n) as f64;
            let reps = ((2e9 / flops) as usize).clamp(1, 50);
            // [bf16, candle, amx] × [wall, cpu]: best seconds per call. They alternate so
            // that load from elsewhere hits all alike.
            let amx = amx_available();
            let mut best = [[f64::MAX; 2]; 3];
            for round in 0..21 {
                for (which, best) in best.iter_mut().enumerate() {
                    if which == 2 && !amx {
                        continue;
                    }
                    let (t, cpu) = (Instant::now(), cpu_seconds());
                    for _ in 0..reps {
                        match which {
                            0 => gemm_at(Isa::Avx512Bf16, &a, m, &b, Some(&bias), &mut c, Epilogue::STORE),
                            1 => drop(std::hint::black_box(ta.matmul(&tw).unwrap())),
                            _ => gemm_at(Isa::Amx, &a, m, &b, Some(&bias), &mut c, Epilogue::STORE),
                        }
                    }
                    if round > 0 {
                        // Round 0 warms up.
                        best[0] = best[0].min(t.elapsed().as_secs_f64() / reps as f64);
                        best[1] = best[1].min((cpu_seconds() - cpu) / threads as f64 / reps as f64);
                    }
                }
            }
            let g = |s: f64| flops / s / 1e9;
            let (bw, fw, bc, fc) = (g(best[0][0]), g(best[1][0]), g(best[0][1]), g(best[1][1]));
            let amx = if amx { format!("  amx {:>7.1} wall, {:>7.1} cpu, {:.2}× bf16", g(best[2][0]), g(best[2][1]), best[0][0] / best[2][0]) } else { String::new() };
            eprintln!(
                "{m:>5} {k:>5} {n:>5}  {bw:>10.1} {fw:>10.1} {:>5.2}  {bc:>9.1} {fc:>9.1} {:>5.2}{amx}",
                bw / fw,
                bc / fc
            );
        }
        // A short text query: few rows, each weight read once per call (as 12 layers of
        // distinct weights are), so the rate is that of streaming the weights. Called from
        // a thread of the pool, as the models call (`cpu::on_pool`), and from outside it.
        eprintln!("streaming distinct weights (a text query's shapes), GB/s of weights read (best of 30):");
        for (m, k, n, count) in [(8, 512, 2048, 24), (8, 2048, 512, 24), (77, 512, 2048, 24)] {
            let bs: Vec<PackedB> = (0..count).map(|_| PackedB::pack(&rng.vec(k * n), k, n)).collect();
            let a = rng.vec(m * k);
            let mut c = vec![0f32; m * n];
            let mut line = format!("{m:>5} {k:>5} {n:>5} × {count}:");
            // (isa, from a pool thread)
            let variants = [(Isa::Avx512Bf16, true), (Isa::Avx512Bf16, false), (Isa::Amx, true)];
            let mut best = [f64::MAX; 3];
            for _ in 0..30 {
                for (vi, &(isa, pooled)) in variants.iter().enumerate() {
                    if isa == Isa::Amx && !amx_available() {
                        continue;
                    }
                    let mut run = || {
                        let t = Instant::now();
                        for b in &bs {
                            gemm_at(isa, &a, m, b, None, &mut c, Epilogue::STORE);
                        }
                        t.elapsed().as_secs_f64()
                    };
                    let dt = if pooled { crate::cpu::on_pool(run) } else { run() };
                    best[vi] = best[vi].min(dt);
                }
            }
            for (vi, &(isa, pooled)) in variants.iter().enumerate() {
                if best[vi] < f64::MAX {
                    let how = if pooled { "" } else { " outside the pool" };
                    line += &format!("  {isa}{how} {:.1} GB/s ({:.0} µs per call)", (count * k * n * 2) as f64 / best[vi] / 1e9, best[vi] / count as f64 * 1e6);
                }
            }
            eprintln!("{line}");
        }
    }

    /// The image tower's QKV projection at batch 1 (50 rows) and 16 (800): 12 distinct
    /// weights of 768 → 2304, as 12 layers have, so that few rows stream them from
    /// memory: three bf16 terms on AMX against f32 and one bf16 term. Best of 15, ms for
    /// the 12. `cargo test -p magpie-models --release --lib qkv_streaming -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn qkv_streaming() {
        if !amx_available() {
            eprintln!("bf16_gemm: no AMX here, bench skipped");
            return;
        }
        use crate::cpu::gemm::{gemm as gemm_cpu, PackedWeight};
        use std::time::Instant;
        let (k, n, layers) = (768, 2304, 12);
        let mut rng = Rng(7);
        let ws: Vec<Vec<f32>> = (0..layers).map(|_| rng.vec(n * k)).collect();
        let x3: Vec<PackedB> = ws.iter().map(|w| PackedB::pack_transposed_x3(w, n, k)).collect();
        let b1: Vec<PackedB> = ws.iter().map(|w| PackedB::pack_transposed(w, n, k)).collect();
        let f32w: Vec<PackedWeight> = ws.iter().map(|w| PackedWeight::from_torch(w, n, k, false)).collect();
        for m in [50, 800] {
            let a = rng.vec(m * k);
            let mut c = vec![0f32; m * n];
            let mut best = [f64::MAX; 3];
            for _ in 0..15 {
                // Interleaved, so that load from elsewhere hits all three alike.
                for (v, best) in best.iter_mut().enumerate() {
                    let t = Instant::now();
                    for l in 0..layers {
                        match v {
                            0 => gemm_at(Isa::Amx, &a, m, &x3[l], None, &mut c, Epilogue::STORE),
                            1 => gemm_cpu(Isa::detect(), &a, m, &f32w[l], None, &mut c, Epilogue::STORE),
                            _ => gemm_at(Isa::Amx, &a, m, &b1[l], None, &mut c, Epilogue::STORE),
                        }
                    }
                    *best = best.min(t.elapsed().as_secs_f64());
                }
            }
            eprintln!("M {m:>4}: three-term bf16 (amx) {:.2} ms, f32 {:.2} ms, bf16 (amx) {:.2} ms", best[0] * 1e3, best[1] * 1e3, best[2] * 1e3);
        }
    }
}
