//! The same GEMM on AMX tiles (Intel Xeon Sapphire Rapids and later): `tdpbf16ps` multiplies
//! a 16 × 32 bf16 tile of A by a 32 × 16 tile of B into a 16 × 16 f32 tile of C, 16,384
//! flops per instruction, several times the rate of AVX-512 `vdpbf16ps` on those cores
//! (measured on a 2-core Xeon VM: about 135 GFLOP/s for `vdpbf16ps`, 270 for f32 FMA,
//! 650+ for `tdpbf16ps`).
//!
//! # Layouts
//!
//! The operands are the ones the AVX-512 kernel uses, which happen to be AMX's own:
//!
//! * A tile: 16 rows of 64 bytes, i.e. 16 k pairs (32 bf16) of 16 rows of the converted
//!   activations, loaded with the rows' stride (`lda` words).
//! * B tile: 16 rows of 64 bytes, row `p` = the 16 columns' words of k pair `p`
//!   (`bf16(W[2p][j]) | bf16(W[2p+1][j]) << 16`): 16 columns of a packed panel, loaded with
//!   the panel's stride of [`NR`](super::NR) words per pair. Panels hold a multiple of 16
//!   pairs (zeros past K), so the last tile of K reads zeros, never the next panel.
//! * C: four tiles of 16 × 16 f32, a 32 × 32 block, kept in tiles over a K block and in a
//!   task-local f32 buffer between K blocks. The bias, accumulation into C and the
//!   activation are applied when the task's buffer is complete.
//!
//! A rows past M are read from zero rows the caller appends (up to a multiple of 16), and
//! their results dropped; columns past N are computed on the panel's zero padding.
//!
//! # Numbers
//!
//! Per k pair, each lane adds both bf16 products to its f32 accumulator (products exact,
//! sums rounded to nearest even, denormals flushed), as `vdpbf16ps` does: the results
//! match the AVX-512 kernel to the last few bits (the order of the pair's two additions,
//! and where the bias is added, differ), and its error bounds hold unchanged.
//!
//! # The operating system
//!
//! Linux enables tile data per process on request (`arch_prctl(ARCH_REQ_XCOMP_PERM)`,
//! kernel 5.16 and later); [`available`] asks once and says no if the CPU, the kernel or a
//! hypervisor withholds it, and then the AVX-512 kernel runs. Each task loads the tile
//! configuration on its thread and releases the tiles when it ends, so no tile state
//! outlives a task (a rayon task here runs to its end on one thread: it calls nothing that
//! could run another task in between).

use super::{x86::activate_task, PackedB, NR};
use crate::cpu::gemm::Epilogue;
use std::arch::asm;
use std::arch::x86_64::*;

/// Whether this process may also run AMX INT8 tiles (`tdpbusd`, u8 × s8 into i32):
/// [`available`] and the CPU's AMX-INT8 bit. Used by [`crate::int8_gemm`].
pub fn int8_available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| available() && __cpuid_count(7, 0).edx >> 25 & 1 == 1)
}

/// Whether this process may run AMX BF16 tile instructions: the CPU has AMX-TILE,
/// AMX-BF16 and the AVX-512 BF16 set (the conversion and the epilogue use AVX-512), the
/// operating system saves tile state (XCR0 bits 17 and 18), and Linux granted this process
/// the tile data. Checked once per process.
pub fn available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(detect)
}

fn detect() -> bool {
    if !super::available() {
        return false;
    }
    // Leaf 7 only where leaf 0 says it exists (a higher leaf returns another's bits).
    if __cpuid_count(0, 0).eax < 7 {
        return false;
    }
    let osxsave = __cpuid_count(1, 0).ecx >> 27 & 1 == 1;
    let l7 = __cpuid_count(7, 0);
    let (amx_bf16, amx_tile) = (l7.edx >> 22 & 1 == 1, l7.edx >> 24 & 1 == 1);
    if !osxsave || !amx_bf16 || !amx_tile {
        return false;
    }
    // SAFETY: OSXSAVE is set, so xgetbv is enabled.
    let xcr0 = unsafe { xcr0() };
    const TILE_STATE: u64 = 3 << 17; // XTILECFG, XTILEDATA
    if xcr0 & TILE_STATE != TILE_STATE {
        return false;
    }
    request_permission()
}

#[target_feature(enable = "xsave")]
unsafe fn xcr0() -> u64 {
    _xgetbv(0)
}

#[cfg(target_os = "linux")]
fn request_permission() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with this request only changes which state components the
    // kernel lets this process use; it reads and writes no memory of ours.
    let r = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) };
    if r != 0 {
        tracing::info!(
            "AMX: the kernel refused tile data ({}); BF16 runs on AVX-512",
            std::io::Error::last_os_error()
        );
    }
    r == 0
}

#[cfg(not(target_os = "linux"))]
fn request_permission() -> bool {
    // Other systems: no known way to ask; do not guess.
    false
}

/// Palette 1, the 8 tiles all 16 rows × 64 bytes: tmm0–3 the C block (rows 0–15 and
/// 16–31 × columns 0–15 and 16–31: tmm0, tmm1, tmm2, tmm3), tmm4–5 the A tiles of rows
/// 0–15 and 16–31, tmm6–7 the B tiles of columns 0–15 and 16–31.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

const CONFIG: TileConfig = TileConfig {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

/// Bytes from one k pair of a panel to the next.
const B_STRIDE: usize = NR * 4;

thread_local! {
    /// A task's C block accumulators between K blocks, kept for the thread's next task.
    pub(crate) static ACC: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// One task of [`super::x86::gemm`] on AMX: C[m0..m1, panels p0..p1] over all of K.
///
/// # Safety
/// [`available`] is true; `abf` holds the converted rows `m0..m1.next_multiple_of(16)`
/// (`lda` words apart, `lda ≥ b.kps`, zeros past K and in the appended rows); `c` rows
/// `m0..m1` × the panels' columns (below N) are writable and touched by no one else;
/// `bias`, if any, has N readable values.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(super) unsafe fn task(
    abf: *const u32,
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
    debug_assert_eq!(b.nr, NR);
    let (depth, restart) = (b.depth_pairs(), b.restart_pair());
    debug_assert!(lda >= depth && b.kps.is_multiple_of(16) && b.stored_pair(depth - 1) < b.kps);
    let width = (p1 - p0) * NR;
    let mut acc = ACC.take();
    // SAFETY: as this function's; the panels hold kps pairs of B_STRIDE bytes, which the
    // logical steps map into (the third part of a three-term weight restarting at 0).
    accumulate::<false>(abf as *const u8, lda * 4, &|jp| b.panel(jp).as_ptr() as *const u8, depth / 16, restart / 16, (m0, m1), (p0, p1), (kc / 16).max(1), &mut acc);
    let accp = acc.as_mut_ptr();

    // The epilogue: C (=|+=) acc + bias, then the activation.
    let j0 = p0 * NR;
    let cols = width.min(b.n - j0);
    for i in m0..m1 {
        let src = accp.add((i - m0) * width);
        let dst = c.add(i * ldc + j0);
        let mut j = 0;
        while j < cols {
            let mask = super::x86::mask16(cols - j);
            let mut v = _mm512_maskz_loadu_ps(mask, src.add(j));
            if let Some(bias) = bias {
                v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, bias.add(j0 + j)));
            }
            if ep.accumulate {
                v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, dst.add(j)));
            }
            _mm512_mask_storeu_ps(dst.add(j), mask, v);
            j += 16;
        }
    }
    activate_task(ep, c, ldc, (m0, m1), (j0, j0 + cols));
    ACC.set(acc);
}

/// The tile loops of a task, for both element types: the sums of A rows `m0..m1` (rows
/// `lda` bytes apart, 64 bytes per step of K) times the panels `p0..p1` (`panel(jp)`:
/// `steps` steps of 16 rows `B_STRIDE` bytes apart) into `acc`, `⌈(m1−m0)/16⌉·16` rows
/// of `(p1−p0)·NR` values (f32 for BF16, i32 bits for INT8), K cut into blocks of
/// `kcs` steps. From step `restart` on (a three-term weight's third part) the panels are
/// read from their first step again; blocks are cut there (`restart ≥ steps`: never).
///
/// # Safety
/// [`available`] (and [`int8_available`] for `I8`); `steps ≥ 1`; A readable for rows
/// `m0..m1.next_multiple_of(16)` and `steps` steps; each panel for `steps.min(restart)`
/// steps and for `steps − restart` where that is positive.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn accumulate<const I8: bool>(
    abytes: *const u8,
    lda_b: usize,
    panel: &dyn Fn(usize) -> *const u8,
    steps: usize,
    restart: usize,
    (m0, m1): (usize, usize),
    (p0, p1): (usize, usize),
    kcs: usize,
    acc: &mut Vec<f32>,
) {
    let blocks = (m1 - m0).div_ceil(16); // 16-row blocks, the last one partly padding
    let width = (p1 - p0) * NR;
    if acc.len() < blocks * 16 * width {
        *acc = vec![0.0; blocks * 16 * width];
    }
    let accp = acc.as_mut_ptr();
    let ldacc_b = width * 4;
    debug_assert!(steps > 0, "the callers take K = 0 elsewhere");

    // SAFETY (the asm blocks below): the caller vouches for the CPU. Every tile load
    // reads 16 rows of 64 bytes at the given stride, inside the buffers described above:
    // A rows i..i+16 of step s (i < m1.next_multiple_of(16), s < steps); B steps of one
    // panel, 16 or 32 of its NR columns; the accumulator rows below blocks·16, columns
    // below width. The stores write the accumulators only.
    asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly, preserves_flags));
    let mut s0 = 0;
    while s0 < steps {
        let mut sn = kcs.min(steps - s0);
        if s0 < restart && s0 + sn > restart {
            sn = restart - s0;
        }
        let stored = if s0 >= restart { s0 - restart } else { s0 };
        let zero = s0 == 0;
        let mut blk = 0;
        while blk < blocks {
            let two = blk + 1 < blocks;
            let a = abytes.add((m0 + blk * 16) * lda_b + s0 * 64);
            for jp in p0..p1 {
                let bp = panel(jp).add(stored * 16 * B_STRIDE);
                for half in 0..2 {
                    let bh = bp.add(half * 128);
                    let cp = accp.add(blk * 16 * width + (jp - p0) * NR + half * 32) as *mut u8;
                    match (two, I8) {
                        (true, false) => block2(sn, a, lda_b, bh, cp, ldacc_b, zero),
                        (false, false) => block1(sn, a, lda_b, bh, cp, ldacc_b, zero),
                        (true, true) => block2_i8(sn, a, lda_b, bh, cp, ldacc_b, zero),
                        (false, true) => block1_i8(sn, a, lda_b, bh, cp, ldacc_b, zero),
                    }
                }
            }
            blk += if two { 2 } else { 1 };
        }
        s0 += sn;
    }
    asm!("tilerelease", options(nostack, nomem, preserves_flags));
}

/// How many steps of K ahead [`block1`] prefetches its B rows.
const PREFETCH_STEPS: usize = 4;

/// The block kernels for one tile product instruction (`$op`: `tdpbf16ps` for BF16 pairs
/// into f32, `tdpbusd` for u8 × s8 quads into i32; both take 16 × 64-byte tiles).
macro_rules! tile_blocks {
    ($block2:ident, $block1:ident, $op:literal) => {
/// A 32 × 32 block of C over `steps` tiles of K: C tiles from the accumulators at `c`
/// (or zero), 4 `tdpbf16ps` per step, back to the accumulators.
///
/// Software-pipelined: a step's loads go into the tiles the previous step has finished
/// reading (A0 after its two products, B0 after the third, A1 and B1 at the end), so that
/// loading overlaps the products. The tiles are not renamed: loading all four first and
/// then multiplying measured 660 GFLOP/s on one core, this order 1,700–2,100 (L1), 1,390
/// (L2).
///
/// # Safety
/// As in [`task`]: tiles configured; `a` 32 rows `lda` bytes apart, `b` pairs `B_STRIDE`
/// bytes apart with 32 columns, `c` 32 rows `ldc` bytes apart of 32 f32, for `steps ≥ 1`
/// steps of 64 bytes of A and 16 pairs of B.
#[inline]
unsafe fn $block2(steps: usize, a: *const u8, lda: usize, b: *const u8, c: *mut u8, ldc: usize, zero: bool) {
    let c1 = c.add(16 * ldc);
    if zero {
        asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem, preserves_flags));
    } else {
        asm!(
            "tileloadd tmm0, [{c0} + {s}*1]",
            "tileloadd tmm1, [{c0} + {s}*1 + 64]",
            "tileloadd tmm2, [{c1} + {s}*1]",
            "tileloadd tmm3, [{c1} + {s}*1 + 64]",
            c0 = in(reg) c, c1 = in(reg) c1, s = in(reg) ldc,
            options(nostack, readonly, preserves_flags)
        );
    }
    let a1 = a.add(16 * lda);
    asm!(
        "tileloadd tmm4, [{a0} + {la}*1]",
        "tileloadd tmm6, [{b} + {lb}*1]",
        "tileloadd tmm5, [{a1} + {la}*1]",
        "tileloadd tmm7, [{b} + {lb}*1 + 64]",
        a0 = in(reg) a, a1 = in(reg) a1, la = in(reg) lda, b = in(reg) b, lb = in(reg) B_STRIDE,
        options(nostack, readonly, preserves_flags)
    );
    for st in 1..steps {
        asm!(
            concat!($op, " tmm0, tmm4, tmm6"),
            concat!($op, " tmm1, tmm4, tmm7"),
            "tileloadd tmm4, [{a0} + {la}*1]",
            concat!($op, " tmm2, tmm5, tmm6"),
            "tileloadd tmm6, [{b} + {lb}*1]",
            concat!($op, " tmm3, tmm5, tmm7"),
            "tileloadd tmm5, [{a1} + {la}*1]",
            "tileloadd tmm7, [{b} + {lb}*1 + 64]",
            a0 = in(reg) a.add(st * 64), a1 = in(reg) a1.add(st * 64), la = in(reg) lda,
            b = in(reg) b.add(st * 16 * B_STRIDE), lb = in(reg) B_STRIDE,
            options(nostack, readonly, preserves_flags)
        );
    }
    asm!(
        concat!($op, " tmm0, tmm4, tmm6"),
        concat!($op, " tmm1, tmm4, tmm7"),
        concat!($op, " tmm2, tmm5, tmm6"),
        concat!($op, " tmm3, tmm5, tmm7"),
        "tilestored [{c0} + {s}*1], tmm0",
        "tilestored [{c0} + {s}*1 + 64], tmm1",
        "tilestored [{c1} + {s}*1], tmm2",
        "tilestored [{c1} + {s}*1 + 64], tmm3",
        c0 = in(reg) c, c1 = in(reg) c1, s = in(reg) ldc,
        options(nostack, preserves_flags)
    );
}

/// The 32-row block for the last 16 rows: a 16 × 32 block in tmm0 and tmm1. The tiles of the
/// second row of C are free here, so the operands are double-buffered instead: even steps
/// in tmm4, tmm6, tmm7, odd ones in tmm5, tmm2, tmm3.
///
/// # Safety
/// As [`block2`], with 16 rows of A and C.
#[inline]
unsafe fn $block1(steps: usize, a: *const u8, lda: usize, b: *const u8, c: *mut u8, ldc: usize, zero: bool) {
    if zero {
        asm!("tilezero tmm0", "tilezero tmm1", options(nostack, nomem, preserves_flags));
    } else {
        asm!(
            "tileloadd tmm0, [{c0} + {s}*1]",
            "tileloadd tmm1, [{c0} + {s}*1 + 64]",
            c0 = in(reg) c, s = in(reg) ldc,
            options(nostack, readonly, preserves_flags)
        );
    }
    let (ap, bp) = (|st: usize| a.add(st * 64), |st: usize| b.add(st * 16 * B_STRIDE));
    asm!(
        "tileloadd tmm4, [{a0} + {la}*1]",
        "tileloadd tmm6, [{b} + {lb}*1]",
        "tileloadd tmm7, [{b} + {lb}*1 + 64]",
        a0 = in(reg) a, la = in(reg) lda, b = in(reg) b, lb = in(reg) B_STRIDE,
        options(nostack, readonly, preserves_flags)
    );
    let mut st = 0;
    // Invariant: step `st` is loaded, in the even tiles if `st` is even.
    while st + 1 < steps {
        // Few rows (a text query) stream the weights once: the hardware prefetchers miss
        // the tiles' 128-byte rows 256 bytes apart. Fetching the rows of the step after
        // next-but-two measured 1.1–1.35× faster streaming at 8 rows.
        if st + PREFETCH_STEPS < steps {
            let q = bp(st + PREFETCH_STEPS);
            for r in 0..16 {
                _mm_prefetch::<_MM_HINT_T0>(q.add(r * B_STRIDE) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(q.add(r * B_STRIDE + 64) as *const i8);
            }
        }
        if st % 2 == 0 {
            asm!(
                "tileloadd tmm5, [{a0} + {la}*1]",
                "tileloadd tmm2, [{b} + {lb}*1]",
                "tileloadd tmm3, [{b} + {lb}*1 + 64]",
                concat!($op, " tmm0, tmm4, tmm6"),
                concat!($op, " tmm1, tmm4, tmm7"),
                a0 = in(reg) ap(st + 1), la = in(reg) lda, b = in(reg) bp(st + 1), lb = in(reg) B_STRIDE,
                options(nostack, readonly, preserves_flags)
            );
        } else {
            asm!(
                "tileloadd tmm4, [{a0} + {la}*1]",
                "tileloadd tmm6, [{b} + {lb}*1]",
                "tileloadd tmm7, [{b} + {lb}*1 + 64]",
                concat!($op, " tmm0, tmm5, tmm2"),
                concat!($op, " tmm1, tmm5, tmm3"),
                a0 = in(reg) ap(st + 1), la = in(reg) lda, b = in(reg) bp(st + 1), lb = in(reg) B_STRIDE,
                options(nostack, readonly, preserves_flags)
            );
        }
        st += 1;
    }
    if st % 2 == 0 {
        asm!(concat!($op, " tmm0, tmm4, tmm6"), concat!($op, " tmm1, tmm4, tmm7"), options(nostack, nomem, preserves_flags));
    } else {
        asm!(concat!($op, " tmm0, tmm5, tmm2"), concat!($op, " tmm1, tmm5, tmm3"), options(nostack, nomem, preserves_flags));
    }
    asm!(
        "tilestored [{c0} + {s}*1], tmm0",
        "tilestored [{c0} + {s}*1 + 64], tmm1",
        c0 = in(reg) c, s = in(reg) ldc,
        options(nostack, preserves_flags)
    );
}
    };
}

tile_blocks!(block2, block1, "tdpbf16ps");
tile_blocks!(block2_i8, block1_i8, "tdpbusd");

/// GFLOP/s of `tdpbf16ps` alone on `threads` threads, `iters` rounds of 4 independent
/// products on tiles that stay in registers: the ceiling the kernel is measured against
/// (benchmarks). `None` without AMX.
pub fn peak_gflops(threads: usize, iters: usize) -> Option<f64> {
    if !available() {
        return None;
    }
    let t = std::time::Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            // SAFETY: `available()` was checked (the permission is the process's).
            s.spawn(move || unsafe { spin(iters) });
        }
    });
    Some(4.0 * 16384.0 * (iters * threads) as f64 / t.elapsed().as_secs_f64() / 1e9)
}

/// # Safety
/// [`available`] is true.
unsafe fn spin(iters: usize) {
    if iters == 0 {
        return;
    }
    // SAFETY: tiles configured, zeroed (all operands are zero: no denormals, no NaNs),
    // multiplied in registers only, released; no memory but the configuration is read.
    unsafe {
        asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly, preserves_flags));
        asm!(
            "tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3",
            "tilezero tmm4", "tilezero tmm5", "tilezero tmm6", "tilezero tmm7",
            options(nostack, nomem, preserves_flags)
        );
        asm!(
            "2:",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "dec {n}",
            "jnz 2b",
            n = inout(reg) iters => _,
            options(nostack, nomem)
        );
        asm!("tilerelease", options(nostack, nomem, preserves_flags));
    }
}
