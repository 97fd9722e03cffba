//! A pre-LayerNorm transformer encoder layer (CLIP's two towers, BLIP-2's ViT-g) on the
//! CPU kernels:
//!
//! ```text
//! x += out_proj(attention(qkv(LN1(x))))      // bias + residual fused into out_proj's store
//! x += fc2(act(fc1(LN2(x))))                 // bias + activation fused into fc1's store
//! ```
//!
//! The residual stream `x` is updated in place; the other buffers live in a [`Scratch`]
//! reused by every layer and every call. Attention runs one task per (sequence, head) on
//! the thread pool: Q·Kᵀ and P·V go through the f32 micro-kernels with K and V packed per
//! head (Q is read in place from the fused QKV output, the result written in place into
//! the head's columns). Where Q and K are held more exactly than the other projections
//! (f32 or three bf16 terms, in [`Precision::Bf16`]), V is a projection of its own on
//! their BF16 kernel, into its own buffer.

use super::gemm::{gemm, gemm_strided_prefix_raw, Epilogue, PackedF32, PackedWeight, SendPtr};
use super::math::{layer_norm_rows, softmax_rows, Act};
use super::Isa;
use rayon::prelude::*;

/// Time spent per stage of [`EncoderLayer::forward`], for benchmarks: off unless
/// [`profile::enable`]d (then each stage is timed with its own clock read).
pub mod profile {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    /// The stages, in the order [`take`] returns them.
    pub const STAGES: [&str; 6] = ["layer norms", "qkv", "attention", "out_proj + residual", "fc1 + activation", "fc2 + residual"];
    static ON: AtomicBool = AtomicBool::new(false);
    static NANOS: [AtomicU64; 6] = [const { AtomicU64::new(0) }; 6];

    pub fn enable(on: bool) {
        ON.store(on, Ordering::Relaxed);
    }

    /// Seconds per stage since the last call, and resets them.
    pub fn take() -> [f64; 6] {
        std::array::from_fn(|i| NANOS[i].swap(0, Ordering::Relaxed) as f64 * 1e-9)
    }

    #[inline]
    pub(super) fn time<R>(stage: usize, f: impl FnOnce() -> R) -> R {
        if !ON.load(Ordering::Relaxed) {
            return f();
        }
        let t = std::time::Instant::now();
        let r = f();
        NANOS[stage].fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        r
    }
}
use profile::time;

/// The numbers the big linear layers compute in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    F32,
    /// f32 arithmetic on weights stored in f16 (widened exactly as the kernel loads them):
    /// an f16 checkpoint's own values in half the memory of `F32`.
    F16Weights,
    /// The attention output projection and the MLP on BF16 dot products: activations and
    /// weights rounded to bf16, products accumulated in f32 (AVX-512 BF16; f32 on CPUs
    /// without it). The Q and K projections stay f32, or on AMX tiles (where the BF16
    /// kernel is several times f32's speed) run on three bf16 terms of activations and
    /// weights ([`crate::bf16_gemm::PackedB::pack_transposed_x3`]), as exact as f32 to
    /// ~2⁻¹⁶; V, whose error the softmax does not sharpen, is bf16 as the rest.
    /// LayerNorm, softmax, attention and the residual stream stay f32.
    Bf16,
    /// As `Bf16`, and the QKV projection too: faster, less exact attention.
    Bf16WithQkv,
    /// The attention output projection and the MLP on int8 dot products (AVX-512 VNNI,
    /// [`crate::int8_gemm`]): weights quantized per output channel at load, activations
    /// per row at each call, exact integer sums; the QKV projection on BF16 (f32 on CPUs
    /// without it). LayerNorm, softmax, attention and the residual stream stay f32.
    /// BLIP-2's quantized modes, whose language model is approximate anyway. On CPUs
    /// without VNNI: as `Bf16WithQkv`.
    Int8,
}

impl Precision {
    /// The precision the layers get on a CPU of level `isa`: `Int8` needs VNNI (and an
    /// AVX-512 level: `MAGPIE_CPU_ISA` below it turns it off), else falls back to the
    /// BF16 kernel, which needs AVX-512 BF16, else to f32.
    pub fn on(self, isa: Isa) -> Precision {
        let isa = isa.supported();
        match self {
            Precision::Int8 if isa >= Isa::Avx512 && crate::int8_gemm::available() => Precision::Int8,
            Precision::Int8 => Precision::Bf16WithQkv.on(isa),
            Precision::Bf16 | Precision::Bf16WithQkv if isa < Isa::Avx512Bf16 => Precision::F32,
            p => p,
        }
    }
}

/// One layer's weights as stored by PyTorch (`Linear.weight` is out × in), in f32.
#[derive(Debug, Clone)]
pub struct LayerWeights {
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub eps: f32,
    pub act: Act,
    pub ln1: (Vec<f32>, Vec<f32>),
    /// Q, K and V stacked: 3·hidden × hidden.
    pub qkv_w: Vec<f32>,
    pub qkv_b: Vec<f32>,
    pub out_w: Vec<f32>,
    pub out_b: Vec<f32>,
    pub ln2: (Vec<f32>, Vec<f32>),
    pub fc1_w: Vec<f32>,
    pub fc1_b: Vec<f32>,
    pub fc2_w: Vec<f32>,
    pub fc2_b: Vec<f32>,
}

/// A linear layer: packed weight and f32 bias.
#[derive(Debug, Clone)]
struct Dense {
    w: PackedWeight,
    b: Vec<f32>,
}

/// How one linear layer's weight is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    F32,
    F16,
    Bf16,
    /// Three bf16 terms: near-f32 products on the BF16 kernel, at three times its work.
    Bf16x3,
    Int8,
}

impl Dense {
    /// From PyTorch's out × in `w`, for the kernel of `kind` (which the CPU has).
    fn new(w: &[f32], b: &[f32], n: usize, k: usize, kind: Kind) -> Self {
        assert_eq!(b.len(), n, "bias of {} values for {n} outputs", b.len());
        let w = match kind {
            Kind::F16 => PackedWeight::F16(crate::cpu::Packed::pack_transposed(w, n, k)),
            Kind::Int8 => PackedWeight::I8(std::sync::Arc::new(crate::int8_gemm::PackedI8::pack_transposed(w, n, k))),
            Kind::Bf16x3 => PackedWeight::Bf16(std::sync::Arc::new(crate::bf16_gemm::PackedB::pack_transposed_x3(w, n, k))),
            Kind::Bf16 | Kind::F32 => PackedWeight::from_torch(w, n, k, kind == Kind::Bf16),
        };
        Dense { w, b: b.to_vec() }
    }

    fn forward(&self, isa: Isa, x: &[f32], m: usize, y: &mut [f32], ep: Epilogue) {
        gemm(isa, x, m, &self.w, Some(&self.b), y, ep)
    }
}

/// A packed encoder layer.
#[derive(Debug, Clone)]
pub struct EncoderLayer {
    isa: Isa,
    hidden: usize,
    intermediate: usize,
    heads: usize,
    eps: f32,
    act: Act,
    ln1: (Vec<f32>, Vec<f32>),
    /// Q, K and V (N = 3·hidden), or only Q and K (2·hidden) where `v` is separate.
    qkv: Dense,
    /// The V projection on the BF16 kernel of the other projections, where Q and K have
    /// a more exact one (f32, or three bf16 terms).
    v: Option<Dense>,
    out: Dense,
    ln2: (Vec<f32>, Vec<f32>),
    fc1: Dense,
    fc2: Dense,
}

/// Buffers reused across layers and calls.
#[derive(Debug, Default)]
pub struct Scratch {
    ln: Vec<f32>,
    qkv: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    mlp: Vec<f32>,
}

fn sized(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if v.len() < len {
        v.resize(len, 0.0);
    }
    &mut v[..len]
}

thread_local! {
    /// Per-thread attention buffers: packed Kᵀ, packed V and the scores.
    static HEAD: std::cell::RefCell<(PackedF32, PackedF32, Vec<f32>)> = Default::default();
}

impl EncoderLayer {
    /// Packs `w` for the kernels of `isa` (capped to the hardware) in `precision`.
    pub fn new(w: &LayerWeights, isa: Isa, precision: Precision) -> Self {
        let (h, i) = (w.hidden, w.intermediate);
        assert!(w.heads > 0 && h % w.heads == 0, "hidden size {h} is not a multiple of {} heads", w.heads);
        let isa = isa.supported();
        // (QKV, the others)
        let (qkv_kind, kind) = match precision.on(isa) {
            Precision::F32 => (Kind::F32, Kind::F32),
            Precision::F16Weights => (Kind::F16, Kind::F16),
            // Q·Kᵀ goes through a softmax that sharpens any error in Q or K: with the QKV
            // projection in bf16 too, the tiny parity fixture's image embeddings reached
            // only cosine 0.9977 against f32; with it in f32 (`Precision::Bf16`), 0.99994.
            // On AMX three terms (3× the work at 4–6× f32's rate) beat f32 and are as exact.
            Precision::Bf16 => (if isa >= Isa::Amx { Kind::Bf16x3 } else { Kind::F32 }, Kind::Bf16),
            Precision::Bf16WithQkv => (Kind::Bf16, Kind::Bf16),
            // QKV stays on BF16 (f32 without it): the softmax sharpens its error. With QKV
            // in int8 too, the sharp tiny-b fixture's first-step logits moved 0.26 from
            // f32 (0.087 with QKV in BF16), its vision output's cosine 0.99933 (0.99986).
            Precision::Int8 => (if isa >= Isa::Avx512Bf16 { Kind::Bf16 } else { Kind::F32 }, Kind::Int8),
        };
        // Where Q and K are held more exactly than the BF16 rest, V goes with the rest: the
        // softmax does not sharpen its error, which reaches the output linearly, as the
        // other projections' does (tiny-a's CLIP images with V in f32 / bf16: cosine
        // 0.99988 / 0.99989; the full-size photos 0.999997 either way). Not so for int8:
        // with V in int8 the sharp BLIP-2 fixtures' vision output fell from cosine
        // 0.99986 to 0.99965 (tiny-b) and their logits moved past the tests' bounds.
        let v_kind = (kind == Kind::Bf16 && qkv_kind != kind).then_some(kind);
        let check = |name: &str, v: &[f32], len: usize| assert_eq!(v.len(), len, "{name}: {} values, expected {len}", v.len());
        check("qkv weight", &w.qkv_w, 3 * h * h);
        check("qkv bias", &w.qkv_b, 3 * h);
        check("out_proj weight", &w.out_w, h * h);
        check("fc1 weight", &w.fc1_w, i * h);
        check("fc2 weight", &w.fc2_w, h * i);
        for (name, ln) in [("layer_norm1", &w.ln1), ("layer_norm2", &w.ln2)] {
            check(name, &ln.0, h);
            check(name, &ln.1, h);
        }
        // PyTorch's stacked weight is Q's, K's then V's rows (outputs × inputs).
        let (qkv, v) = match v_kind {
            Some(v_kind) => (
                Dense::new(&w.qkv_w[..2 * h * h], &w.qkv_b[..2 * h], 2 * h, h, qkv_kind),
                Some(Dense::new(&w.qkv_w[2 * h * h..], &w.qkv_b[2 * h..], h, h, v_kind)),
            ),
            None => (Dense::new(&w.qkv_w, &w.qkv_b, 3 * h, h, qkv_kind), None),
        };
        EncoderLayer {
            isa,
            hidden: h,
            intermediate: i,
            heads: w.heads,
            eps: w.eps,
            act: w.act,
            ln1: w.ln1.clone(),
            qkv,
            v,
            out: Dense::new(&w.out_w, &w.out_b, h, h, kind),
            ln2: w.ln2.clone(),
            fc1: Dense::new(&w.fc1_w, &w.fc1_b, i, h, kind),
            fc2: Dense::new(&w.fc2_w, &w.fc2_b, h, i, kind),
        }
    }

    /// Whether the output projection and the MLP run on the BF16 kernel.
    pub fn is_bf16(&self) -> bool {
        self.fc1.w.is_bf16()
    }

    /// Whether the output projection and the MLP run on the int8 kernel.
    pub fn is_int8(&self) -> bool {
        matches!(self.fc1.w, PackedWeight::I8(_))
    }

    /// Applies the layer to `x`, `batch` sequences of `seq` rows of `hidden` values, in
    /// place. `mask` is an additive `seq × seq` attention mask (−∞ where a position may not
    /// look), shared by all sequences and heads.
    pub fn forward(&self, x: &mut [f32], batch: usize, seq: usize, mask: Option<&[f32]>, s: &mut Scratch) {
        self.attend(x, batch, seq, mask, None, s);
        self.project_and_mlp(x, batch * seq, s);
    }

    /// [`forward`](Self::forward) where only one row of each sequence is wanted at the
    /// output (the class token of a ViT, the end-of-text token of CLIP's text tower):
    /// `rows[b]` of sequence `b`. Every row is still a key and a value of the attention,
    /// but only the wanted rows go on through the query, the output projection and the
    /// MLP. Returns those rows (`batch × hidden`) as [`forward`](Self::forward) would leave
    /// them, bit for bit: each row's products and norms are computed as there.
    pub fn forward_rows(&self, x: &[f32], batch: usize, seq: usize, mask: Option<&[f32]>, rows: &[usize], s: &mut Scratch) -> Vec<f32> {
        self.attend(x, batch, seq, mask, Some(rows), s);
        let h = self.hidden;
        let mut y: Vec<f32> = rows.iter().enumerate().flat_map(|(b, &r)| x[(b * seq + r) * h..][..h].iter().copied()).collect();
        self.project_and_mlp(&mut y, batch, s);
        y
    }

    /// The first half of the layer: LayerNorm 1 and the QKV projection of every row, then
    /// the attention of the query rows (all, or `query`'s one per sequence) into `s.attn`.
    fn attend(&self, x: &[f32], batch: usize, seq: usize, mask: Option<&[f32]>, query: Option<&[usize]>, s: &mut Scratch) {
        let (h, m, isa) = (self.hidden, batch * seq, self.isa);
        assert_eq!(x.len(), m * h, "encoder layer: {} values for {batch} × {seq} × {h}", x.len());
        if let Some(mask) = mask {
            assert_eq!(mask.len(), seq * seq, "attention mask of {} values for {seq} × {seq}", mask.len());
        }
        let ln = sized(&mut s.ln, m * h);
        time(0, || layer_norm_rows_par(isa, x, ln, &self.ln1, self.eps, h));
        let qkv = sized(&mut s.qkv, m * self.qkv.b.len());
        let mut v = self.v.as_ref().map(|_| sized(&mut s.v, m * h));
        time(1, || {
            self.qkv.forward(isa, ln, m, qkv, Epilogue::STORE);
            if let (Some(dense), Some(v)) = (&self.v, v.as_deref_mut()) {
                dense.forward(isa, ln, m, v, Epilogue::STORE)
            }
        });
        let attn = sized(&mut s.attn, if query.is_some() { batch } else { m } * h);
        time(2, || self.attention(qkv, v.as_deref(), attn, batch, seq, mask, query));
    }

    /// The second half, on `n` rows of the residual stream `y` (their attention in
    /// `s.attn`): the output projection added in, then LayerNorm 2 and the MLP added in.
    fn project_and_mlp(&self, y: &mut [f32], n: usize, s: &mut Scratch) {
        let (h, isa) = (self.hidden, self.isa);
        time(3, || self.out.forward(isa, &s.attn[..n * h], n, y, Epilogue::ACCUMULATE));
        let ln = sized(&mut s.ln, n * h);
        time(0, || layer_norm_rows_par(isa, y, ln, &self.ln2, self.eps, h));
        let mlp = sized(&mut s.mlp, n * self.intermediate);
        time(4, || self.fc1.forward(isa, ln, n, mlp, Epilogue::act(self.act)));
        time(5, || self.fc2.forward(isa, mlp, n, y, Epilogue::ACCUMULATE));
    }

    /// Floating-point operations of one forward per stage (as [`profile::STAGES`]) for
    /// `batch` sequences of `seq`: 2 per multiply-add of the products; the layer norms 0.
    pub fn flops(&self, batch: usize, seq: usize) -> [f64; 6] {
        let (m, h, i) = ((batch * seq) as f64, self.hidden as f64, self.intermediate as f64);
        let attn = 4.0 * batch as f64 * (seq * seq) as f64 * h;
        [0.0, 2.0 * m * h * 3.0 * h, attn, 2.0 * m * h * h, 2.0 * m * h * i, 2.0 * m * i * h]
    }

    /// [`flops`](Self::flops) of [`forward_rows`](Self::forward_rows): one query and one
    /// row of output per sequence.
    pub fn flops_rows(&self, batch: usize, seq: usize) -> [f64; 6] {
        let (b, h, i) = (batch as f64, self.hidden as f64, self.intermediate as f64);
        let full = self.flops(batch, seq);
        [0.0, full[1], 4.0 * b * seq as f64 * h, 2.0 * b * h * h, 2.0 * b * h * i, 2.0 * b * i * h]
    }

    /// softmax(Q·Kᵀ/√d + mask)·V per sequence and head, from the fused QKV rows
    /// (`[q | k | v]`, heads side by side in each) into `out` (heads side by side).
    ///
    /// With `query = Some(rows)`, only row `rows[b]` of sequence `b` is a query (all rows
    /// stay keys and values): `out` then holds one row per sequence.
    ///
    /// Under a mask, queries go in blocks of [`QUERY_BLOCK`] rows, each against the keys up
    /// to the last one its mask leaves open (a causal mask: the block's last row): the
    /// keys past it would get weight exactly 0, so the result is bit for bit that of all
    /// keys, for about half the work of a causal mask.
    #[allow(clippy::too_many_arguments)]
    fn attention(&self, qkv: &[f32], v: Option<&[f32]>, out: &mut [f32], batch: usize, seq: usize, mask: Option<&[f32]>, query: Option<&[usize]>) {
        self.attention_with(qkv, v, out, batch, seq, mask, query, true)
    }

    /// [`attention`](Self::attention), with `trim = false` taking every key for every
    /// query (for the tests).
    #[allow(clippy::too_many_arguments)]
    fn attention_with(&self, qkv: &[f32], v_own: Option<&[f32]>, out: &mut [f32], batch: usize, seq: usize, mask: Option<&[f32]>, query: Option<&[usize]>, trim: bool) {
        let (h, heads, isa) = (self.hidden, self.heads, self.isa);
        let d = h / heads;
        // Row stride of `qkv`: Q, K and V, or Q and K where V has its own rows of h.
        let ld = if v_own.is_some() { 2 * h } else { 3 * h };
        assert_eq!(qkv.len(), batch * seq * ld, "attention input of {} values for {batch} × {seq} × {ld}", qkv.len());
        if let Some(v) = v_own {
            assert_eq!(v.len(), batch * seq * h, "attention V of {} values for {batch} × {seq} × {h}", v.len());
        }
        let scale = (d as f32).powf(-0.5);
        let nq = if query.is_some() { 1 } else { seq };
        assert_eq!(out.len(), batch * nq * h, "attention output of {} values for {batch} × {nq} × {h}", out.len());
        if let Some(q) = query {
            assert!(q.len() == batch && q.iter().all(|&r| r < seq), "query rows {q:?} for {batch} sequences of {seq}");
        }
        // Keys a query row needs: up to the last one its mask leaves open (all, for a row
        // the mask closes entirely, whose softmax then gives zeros as before).
        let row_keys: Vec<usize> = (0..seq)
            .map(|i| match mask {
                Some(m) if trim => m[i * seq..(i + 1) * seq].iter().rposition(|&v| v != f32::NEG_INFINITY).map_or(seq, |j| j + 1),
                _ => seq,
            })
            .collect();
        // The query blocks of a sequence when all rows are queries, the same for every
        // sequence and head: (first row, rows, keys, the block of the mask: rows × keys).
        let block = if mask.is_some() && trim { QUERY_BLOCK } else { seq };
        let blocks: Vec<(usize, usize, usize, Option<Vec<f32>>)> = match query {
            Some(_) => Vec::new(),
            None => (0..seq)
                .step_by(block.max(1))
                .map(|r0| {
                    let nb = block.min(seq - r0);
                    let kn = row_keys[r0..r0 + nb].iter().copied().max().unwrap_or(seq);
                    let mb = mask.map(|m| (r0..r0 + nb).flat_map(|i| m[i * seq..][..kn].iter().copied()).collect());
                    (r0, nb, kn, mb)
                })
                .collect(),
        };
        let optr = SendPtr(out.as_mut_ptr());
        let out_len = out.len();
        (0..batch * heads).into_par_iter().for_each(|t| {
            let (bi, hd) = (t / heads, t % heads);
            let rows = &qkv[bi * seq * ld..(bi + 1) * seq * ld];
            // Row j of this head's K (part 1) or V (2): d contiguous values.
            let head_row = |part: usize, j: usize| match v_own {
                Some(v) if part == 2 => &v[(bi * seq + j) * h + hd * d..][..d],
                _ => &rows[j * ld + part * h + hd * d..][..d],
            };
            HEAD.with(|cell| {
                let (kt, v, scores) = &mut *cell.borrow_mut();
                // Kᵀ (d × seq): its column j is K's row j.
                kt.repack_from_cols(d, seq, |j| head_row(1, j));
                v.repack_from_rows(seq, d, |j| head_row(2, j));
                let mut run = |r0: usize, first: usize, nb: usize, kn: usize, m: Option<&[f32]>| {
                    let scores = sized(scores, nb * kn);
                    // SAFETY: `scores` holds nb rows of kn values; kn ≤ seq keys of the
                    // packed Kᵀ (d × seq), whose first kn columns are taken.
                    unsafe {
                        gemm_strided_prefix_raw(isa, &rows[first * ld + hd * d..], ld, nb, kt, (d, kn), scores.as_mut_ptr(), kn, Epilogue::STORE)
                    };
                    softmax_rows(isa, scores, kn, scale, m);
                    // SAFETY: rows bi·nq + r0.. + nb of `out`, columns hd·d..(hd+1)·d (ldc = h),
                    // are inside `out` (its length was checked) and written by this task
                    // alone; `out` outlives the loop. The first kn rows of the packed V
                    // (seq × d) are taken, as many as `scores` has columns.
                    unsafe {
                        debug_assert!((bi * nq + r0 + nb - 1) * h + (hd + 1) * d <= out_len);
                        gemm_strided_prefix_raw(isa, scores, kn, nb, v, (kn, d), optr.get().add((bi * nq + r0) * h + hd * d), h, Epilogue::STORE)
                    };
                };
                match query {
                    // One query row: its mask row's first kn values are the block.
                    Some(q) => {
                        let (r, kn) = (q[bi], row_keys[q[bi]]);
                        run(0, r, 1, kn, mask.map(|m| &m[r * seq..][..kn]));
                    }
                    None => {
                        for (r0, nb, kn, mb) in &blocks {
                            run(*r0, *r0, *nb, *kn, mb.as_deref());
                        }
                    }
                }
            });
        });
    }
}

/// Query rows per block of a masked attention (see [`EncoderLayer::attention`]).
const QUERY_BLOCK: usize = 16;

/// The layers of an encoder, applied to candle tensors (the embeddings before and the
/// heads after stay candle ops), with a pool of [`Scratch`] buffers so that concurrent
/// calls each get their own and repeated calls reuse them.
#[derive(Debug, Default)]
pub struct Stack {
    layers: Vec<EncoderLayer>,
    scratch: std::sync::Mutex<Vec<Scratch>>,
}

impl Clone for Stack {
    fn clone(&self) -> Self {
        Stack { layers: self.layers.clone(), scratch: Default::default() }
    }
}

impl Stack {
    pub fn new(layers: Vec<EncoderLayer>) -> Self {
        Stack { layers, scratch: Default::default() }
    }

    /// Whether the layers' MLPs run on the BF16 kernel.
    pub fn is_bf16(&self) -> bool {
        self.layers.first().is_some_and(EncoderLayer::is_bf16)
    }

    /// Whether the layers' MLPs run on the int8 kernel.
    pub fn is_int8(&self) -> bool {
        self.layers.first().is_some_and(EncoderLayer::is_int8)
    }

    /// All layers on `xs` (batch, seq, hidden) on the CPU, computed in f32 and returned in
    /// `xs`'s dtype; `mask` (seq, seq) additive.
    pub fn forward(&self, xs: &candle_core::Tensor, mask: Option<&candle_core::Tensor>) -> candle_core::Result<candle_core::Tensor> {
        let (b, s, h) = xs.dims3()?;
        let y = self.run(xs, mask, |x, mask, buf| {
            for l in &self.layers {
                l.forward(x, b, s, mask, buf);
            }
            std::mem::take(x)
        })?;
        candle_core::Tensor::from_vec(y, (b, s, h), xs.device())?.to_dtype(xs.dtype())
    }

    /// All layers on `xs` (batch, seq, hidden), keeping only row `rows[b]` of each
    /// sequence `b`: (batch, hidden), in `xs`'s dtype, as [`forward`](Self::forward)
    /// followed by picking those rows would give. The last layer computes its output for
    /// those rows alone ([`EncoderLayer::forward_rows`]): for CLIP's towers, which pool
    /// one row, that is 1/12 of the work less.
    pub fn forward_rows(&self, xs: &candle_core::Tensor, mask: Option<&candle_core::Tensor>, rows: &[usize]) -> candle_core::Result<candle_core::Tensor> {
        let (b, s, h) = xs.dims3()?;
        if rows.len() != b || rows.iter().any(|&r| r >= s) {
            candle_core::bail!("rows {rows:?} to keep for {b} sequences of {s}");
        }
        let y = self.run(xs, mask, |x, mask, buf| match self.layers.split_last() {
            Some((last, layers)) => {
                for l in layers {
                    l.forward(x, b, s, mask, buf);
                }
                last.forward_rows(x, b, s, mask, rows, buf)
            }
            None => rows.iter().enumerate().flat_map(|(i, &r)| x[(i * s + r) * h..][..h].to_vec()).collect(),
        })?;
        candle_core::Tensor::from_vec(y, (b, h), xs.device())?.to_dtype(xs.dtype())
    }

    /// `f` on a pool thread ([`super::on_pool`]) with `xs` and `mask` in f32 and scratch
    /// buffers from the pool of them.
    fn run(
        &self,
        xs: &candle_core::Tensor,
        mask: Option<&candle_core::Tensor>,
        f: impl FnOnce(&mut Vec<f32>, Option<&[f32]>, &mut Scratch) -> Vec<f32> + Send,
    ) -> candle_core::Result<Vec<f32>> {
        use candle_core::DType;
        let mut x: Vec<f32> = xs.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let mask: Option<Vec<f32>> = mask.map(|m| m.to_dtype(DType::F32)?.flatten_all()?.to_vec1()).transpose()?;
        let mut buf = self.scratch.lock().expect("scratch pool poisoned").pop().unwrap_or_default();
        let y = super::on_pool(|| f(&mut x, mask.as_deref(), &mut buf));
        self.scratch.lock().expect("scratch pool poisoned").push(buf);
        Ok(y)
    }

    /// Floating-point operations per stage (as [`profile::STAGES`]) of one forward.
    pub fn flops(&self, batch: usize, seq: usize) -> [f64; 6] {
        self.layers.iter().fold([0.0; 6], |acc, l| {
            let f = l.flops(batch, seq);
            std::array::from_fn(|i| acc[i] + f[i])
        })
    }

    /// The same for [`forward_rows`](Self::forward_rows).
    pub fn flops_rows(&self, batch: usize, seq: usize) -> [f64; 6] {
        let n = self.layers.len();
        self.layers.iter().enumerate().fold([0.0; 6], |acc, (j, l)| {
            let f = if j + 1 == n { l.flops_rows(batch, seq) } else { l.flops(batch, seq) };
            std::array::from_fn(|i| acc[i] + f[i])
        })
    }
}

/// LayerNorm of the rows of `x` into `y`, on the thread pool in chunks of rows.
pub fn layer_norm_rows_par(isa: Isa, x: &[f32], y: &mut [f32], (w, b): &(Vec<f32>, Vec<f32>), eps: f32, h: usize) {
    let rows_per = (16384 / h).max(1);
    y.par_chunks_mut(rows_per * h)
        .zip(x.par_chunks(rows_per * h))
        .for_each(|(y, x)| layer_norm_rows(isa, x, y, w, b, eps));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng_vec(seed: &mut u64, len: usize, scale: f32) -> Vec<f32> {
        (0..len)
            .map(|_| {
                *seed ^= *seed << 13;
                *seed ^= *seed >> 7;
                *seed ^= *seed << 17;
                ((*seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    fn weights(h: usize, i: usize, heads: usize, act: Act, seed: u64) -> LayerWeights {
        let mut s = seed;
        let ws = 1.0 / (h as f32).sqrt();
        LayerWeights {
            hidden: h,
            intermediate: i,
            heads,
            eps: 1e-5,
            act,
            ln1: (rng_vec(&mut s, h, 0.5).iter().map(|v| v + 1.0).collect(), rng_vec(&mut s, h, 0.1)),
            qkv_w: rng_vec(&mut s, 3 * h * h, ws),
            qkv_b: rng_vec(&mut s, 3 * h, 0.1),
            out_w: rng_vec(&mut s, h * h, ws),
            out_b: rng_vec(&mut s, h, 0.1),
            ln2: (rng_vec(&mut s, h, 0.5).iter().map(|v| v + 1.0).collect(), rng_vec(&mut s, h, 0.1)),
            fc1_w: rng_vec(&mut s, i * h, ws),
            fc1_b: rng_vec(&mut s, i, 0.1),
            fc2_w: rng_vec(&mut s, h * i, 1.0 / (i as f32).sqrt()),
            fc2_b: rng_vec(&mut s, h, 0.1),
        }
    }

    /// The layer written out naively in f64 from the PyTorch-layout weights.
    fn reference(w: &LayerWeights, x: &[f32], batch: usize, seq: usize, mask: Option<&[f32]>) -> Vec<f64> {
        let (h, i, heads) = (w.hidden, w.intermediate, w.heads);
        let d = h / heads;
        let ln = |x: &[f64], (g, b): &(Vec<f32>, Vec<f32>)| -> Vec<f64> {
            x.chunks(h)
                .flat_map(|r| {
                    let mean = r.iter().sum::<f64>() / h as f64;
                    let var = r.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / h as f64;
                    r.iter().enumerate().map(move |(j, v)| (v - mean) / (var + w.eps as f64).sqrt() * g[j] as f64 + b[j] as f64).collect::<Vec<_>>()
                })
                .collect()
        };
        let lin = |x: &[f64], wt: &[f32], b: &[f32], n: usize, k: usize| -> Vec<f64> {
            x.chunks(k).flat_map(|r| (0..n).map(move |o| b[o] as f64 + (0..k).map(|kk| r[kk] * wt[o * k + kk] as f64).sum::<f64>())).collect()
        };
        let mut xs: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let qkv = lin(&ln(&xs, &w.ln1), &w.qkv_w, &w.qkv_b, 3 * h, h);
        let mut attn = vec![0f64; batch * seq * h];
        for bi in 0..batch {
            for hd in 0..heads {
                let at = |r: usize, part: usize, kk: usize| qkv[(bi * seq + r) * 3 * h + part * h + hd * d + kk];
                for r in 0..seq {
                    let mut sc: Vec<f64> = (0..seq)
                        .map(|c| (0..d).map(|kk| at(r, 0, kk) * at(c, 1, kk)).sum::<f64>() / (d as f64).sqrt() + mask.map_or(0.0, |m| m[r * seq + c] as f64))
                        .collect();
                    let max = sc.iter().cloned().fold(f64::MIN, f64::max);
                    sc.iter_mut().for_each(|v| *v = (*v - max).exp());
                    let tot: f64 = sc.iter().sum();
                    for kk in 0..d {
                        attn[(bi * seq + r) * h + hd * d + kk] = (0..seq).map(|c| sc[c] / tot * at(c, 2, kk)).sum();
                    }
                }
            }
        }
        let o = lin(&attn, &w.out_w, &w.out_b, h, h);
        xs.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
        let mut f = lin(&ln(&xs, &w.ln2), &w.fc1_w, &w.fc1_b, i, h);
        f.iter_mut().for_each(|v| {
            let x = *v;
            *v = match w.act {
                Act::QuickGelu => x / (1.0 + (-1.702 * x).exp()),
                Act::GeluTanh => 0.5 * x * (1.0 + (0.7978845608 * (x + 0.044715 * x.powi(3))).tanh()),
                Act::Relu => x.max(0.0),
                Act::None => x,
                Act::Gelu => unreachable!("not used here"),
            }
        });
        let o = lin(&f, &w.fc2_w, &w.fc2_b, h, i);
        xs.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
        xs
    }

    fn cosine(a: &[f32], b: &[f64]) -> f64 {
        let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * y).sum();
        let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        let nb: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
        dot / (na * nb)
    }

    #[test]
    fn every_level_matches_a_naive_layer() {
        // Odd sizes: 3 heads of 12, 70 MLP units, sequences of 7 (causal) and 11.
        for (act, seq, causal) in [(Act::QuickGelu, 7, true), (Act::GeluTanh, 11, false)] {
            let (h, i, heads, batch) = (36, 70, 3, 2);
            let w = weights(h, i, heads, act, 0x9e37_79b9 + seq as u64);
            let mut s = 77u64;
            let x = rng_vec(&mut s, batch * seq * h, 1.0);
            let mask: Vec<f32> = (0..seq * seq).map(|t| if t % seq > t / seq { f32::NEG_INFINITY } else { 0.0 }).collect();
            let mask = causal.then_some(&mask[..]);
            let want = reference(&w, &x, batch, seq, mask);
            let mut levels: Vec<Isa> = Isa::ALL.iter().map(|i| i.supported()).collect();
            levels.dedup();
            for isa in levels {
                for precision in [Precision::F32, Precision::Bf16, Precision::F16Weights, Precision::Int8] {
                    let layer = EncoderLayer::new(&w, isa, precision);
                    let int8 = precision == Precision::Int8 && isa >= Isa::Avx512 && crate::int8_gemm::available();
                    assert_eq!(layer.is_int8(), int8);
                    // Int8 without VNNI falls back to BF16 (QKV too), where the CPU has it.
                    let bf16 = isa >= Isa::Avx512Bf16 && matches!(precision, Precision::Bf16 | Precision::Int8) && !int8;
                    assert_eq!(layer.is_bf16(), bf16);
                    // Int8's QKV is BF16 in any case where the CPU has it; Bf16's is three
                    // bf16 terms on AMX, else f32.
                    let qkv_x3 = isa >= Isa::Amx && precision == Precision::Bf16;
                    let qkv_bf16 = isa >= Isa::Avx512Bf16 && precision == Precision::Int8 || qkv_x3;
                    assert_eq!(matches!(layer.qkv.w, PackedWeight::Bf16(_)), qkv_bf16);
                    // Where Q and K are more exact than the rest, V is on the rest's kernel.
                    let v_own = layer.is_bf16() && precision == Precision::Bf16;
                    assert_eq!(layer.v.as_ref().map(|v| v.w.is_bf16()), v_own.then_some(true));
                    assert_eq!(layer.qkv.b.len(), if v_own { 2 * h } else { 3 * h });
                    // One bf16 term, also where Q and K take three (AMX).
                    if let Some(PackedWeight::Bf16(vb)) = layer.v.as_ref().map(|v| &v.w) {
                        assert_eq!(vb.terms(), 1);
                    }
                    if let PackedWeight::Bf16(b) = &layer.qkv.w {
                        assert_eq!(b.terms(), if qkv_x3 { 3 } else { 1 });
                    }
                    if qkv_x3 {
                        // As exact as f32 to about 2⁻¹⁶, unlike one bf16 term (~2⁻⁹).
                        let n = layer.qkv.b.len();
                        let f32_qkv = Dense::new(&w.qkv_w[..n * h], &w.qkv_b[..n], n, h, Kind::F32);
                        let (mut y3, mut y32) = (vec![0f32; batch * seq * n], vec![0f32; batch * seq * n]);
                        layer.qkv.forward(isa, &x, batch * seq, &mut y3, Epilogue::STORE);
                        f32_qkv.forward(Isa::Scalar, &x, batch * seq, &mut y32, Epilogue::STORE);
                        let y32: Vec<f64> = y32.iter().map(|&v| v as f64).collect();
                        let err = crate::bf16_gemm::tests::rel_err(&y3, &y32);
                        assert!(err < 3e-5, "{isa} three-term QKV: relative error {err:e} against f32");
                    }
                    let f16 = precision == Precision::F16Weights;
                    assert_eq!(matches!(layer.fc1.w, PackedWeight::F16(_)), f16);
                    let mut y = x.clone();
                    layer.forward(&mut y, batch, seq, mask, &mut Scratch::default());
                    let max_err = y.iter().zip(&want).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
                    let cos = cosine(&y, &want);
                    println!("{isa} {precision:?} {act:?}: max error {max_err:.2e}, cosine {cos:.7}");
                    let (tol, min_cos) = if int8 {
                        (1e-1, 0.9995)
                    } else if layer.is_bf16() {
                        (5e-2, 0.9999)
                    } else if f16 {
                        (5e-3, 0.99999)
                    } else {
                        (2e-5, 0.999_999_9)
                    };
                    assert!(max_err < tol, "{isa} {precision:?} {act:?}: max error {max_err:e}");
                    assert!(cos > min_cos, "{isa} {precision:?} {act:?}: cosine {cos}");
                }
            }
        }
    }

    #[test]
    fn masked_attention_skips_closed_keys_exactly() {
        // Causal, a mask that closes the last keys to everyone (padding), one with a fully
        // closed row, and one open everywhere but at random places; 77 keys span two
        // 64-column panels of Kᵀ and five blocks of queries.
        let (h, heads, batch) = (128, 2, 2);
        let w = weights(h, 8, heads, Act::Relu, 5);
        let mut levels: Vec<Isa> = Isa::ALL.iter().map(|i| i.supported()).collect();
        levels.dedup();
        for seq in [77, 20, 5] {
            let mut s = 3u64;
            let qkv = rng_vec(&mut s, batch * seq * 3 * h, 2.0);
            let inf = f32::NEG_INFINITY;
            let causal: Vec<f32> = (0..seq * seq).map(|t| if t % seq > t / seq { inf } else { 0.0 }).collect();
            let padded: Vec<f32> = (0..seq * seq).map(|t| if t % seq >= seq - 3 { inf } else { 0.1 * (t % 7) as f32 }).collect();
            let mut closed = causal.clone();
            closed[seq..2 * seq].fill(inf);
            let random: Vec<f32> = rng_vec(&mut s, seq * seq, 1.0).iter().map(|&v| if v > 0.6 { inf } else { v }).collect();
            for isa in &levels {
                let layer = EncoderLayer::new(&w, *isa, Precision::F32);
                for mask in [&causal, &padded, &closed, &random] {
                    for query in [None, Some(&[seq - 1, seq / 2][..])] {
                        let nq = if query.is_some() { 1 } else { seq };
                        let (mut a, mut b) = (vec![0f32; batch * nq * h], vec![0f32; batch * nq * h]);
                        layer.attention_with(&qkv, None, &mut a, batch, seq, Some(mask), query, true);
                        layer.attention_with(&qkv, None, &mut b, batch, seq, Some(mask), query, false);
                        assert_eq!(a, b, "{isa}, {seq} keys, query {query:?}");
                        assert!(a.iter().all(|v| v.is_finite()) && a.iter().any(|&v| v != 0.0));
                        // V in a buffer of its own (Q and K then 2h apart) gives the same.
                        let qk: Vec<f32> = qkv.chunks(3 * h).flat_map(|r| r[..2 * h].iter().copied()).collect();
                        let v: Vec<f32> = qkv.chunks(3 * h).flat_map(|r| r[2 * h..].iter().copied()).collect();
                        let mut c = vec![0f32; batch * nq * h];
                        layer.attention_with(&qk, Some(&v), &mut c, batch, seq, Some(mask), query, true);
                        assert_eq!(a, c, "{isa}, {seq} keys, query {query:?}, V apart");
                    }
                }
            }
        }
    }

    #[test]
    fn forward_rows_is_the_full_layer_at_those_rows() {
        // 3 sequences of 9, wanted rows first, last and in between; causal and not.
        let (h, i, heads, batch, seq) = (36, 70, 3, 3, 9);
        let rows = [0, 8, 4];
        let w = weights(h, i, heads, Act::QuickGelu, 0x51ed);
        let mut s = 91u64;
        let x = rng_vec(&mut s, batch * seq * h, 1.0);
        let causal: Vec<f32> = (0..seq * seq).map(|t| if t % seq > t / seq { f32::NEG_INFINITY } else { 0.0 }).collect();
        let mut levels: Vec<Isa> = Isa::ALL.iter().map(|i| i.supported()).collect();
        levels.dedup();
        for isa in levels {
            for precision in [Precision::F32, Precision::Bf16, Precision::Bf16WithQkv, Precision::Int8] {
                let layer = EncoderLayer::new(&w, isa, precision);
                for mask in [None, Some(&causal[..])] {
                    let mut full = x.clone();
                    layer.forward(&mut full, batch, seq, mask, &mut Scratch::default());
                    let got = layer.forward_rows(&x, batch, seq, mask, &rows, &mut Scratch::default());
                    assert_eq!(got.len(), batch * h);
                    for (b, &r) in rows.iter().enumerate() {
                        let want = &full[(b * seq + r) * h..][..h];
                        assert_eq!(&got[b * h..][..h], want, "{isa} {precision:?} causal {}: sequence {b}, row {r}", mask.is_some());
                    }
                    // And not merely the layer's input passed through.
                    assert!(got[..h] != x[..h]);
                }
            }
        }
        // The stack: every layer but the last in full, then the wanted rows.
        let stack = Stack::new((0..3).map(|l| EncoderLayer::new(&weights(h, i, heads, Act::Gelu, 7 + l), Isa::detect(), Precision::F32)).collect());
        let xs = candle_core::Tensor::from_vec(x.clone(), (batch, seq, h), &candle_core::Device::Cpu).unwrap();
        let mask = candle_core::Tensor::from_vec(causal.clone(), (seq, seq), &candle_core::Device::Cpu).unwrap();
        let full: Vec<Vec<Vec<f32>>> = stack.forward(&xs, Some(&mask)).unwrap().to_vec3().unwrap();
        let got: Vec<Vec<f32>> = stack.forward_rows(&xs, Some(&mask), &rows).unwrap().to_vec2().unwrap();
        for (b, &r) in rows.iter().enumerate() {
            assert_eq!(got[b], full[b][r]);
        }
        let err = stack.forward_rows(&xs, None, &[0, 9, 1]).unwrap_err().to_string();
        assert!(err.contains("[0, 9, 1]"), "{err}");
        assert_eq!(stack.flops_rows(batch, seq)[1], stack.flops(batch, seq)[1]);
        assert!(stack.flops_rows(batch, seq)[4] < stack.flops(batch, seq)[4]);
    }

    /// Attention alone, GFLOP/s for CLIP B/32 (16 × 50 tokens, 12 heads of 64) and ViT-g
    /// (257 tokens, 16 heads of 88); and a 77-token text query's causal attention (8 heads
    /// of 64, in query blocks), in µs a layer:
    /// `cargo test -p magpie-models --release --lib attention_gflops -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn attention_gflops() {
        for (batch, seq, heads, d) in [(16, 50, 12, 64), (1, 50, 12, 64), (1, 257, 16, 88), (1, 77, 8, 64)] {
            let h = heads * d;
            let layer = EncoderLayer::new(&weights(h, 8, heads, Act::Relu, 3), Isa::detect(), Precision::F32);
            let mut s = 5u64;
            let qkv = rng_vec(&mut s, batch * seq * 3 * h, 1.0);
            let mut out = vec![0f32; batch * seq * h];
            let flops = layer.flops(batch, seq)[2];
            let mut best = f64::MAX;
            for _ in 0..30 {
                let t = std::time::Instant::now();
                layer.attention(&qkv, None, &mut out, batch, seq, None, None);
                best = best.min(t.elapsed().as_secs_f64());
            }
            eprintln!("attention {batch}×{seq}, {heads} heads of {d}: {:.3} ms, {:.0} GFLOP/s", best * 1e3, flops / best / 1e9);
        }
        // A text query: causal, 77 tokens, as CLIP's text tower.
        let (seq, heads, d) = (77, 8, 64);
        let layer = EncoderLayer::new(&weights(heads * d, 8, heads, Act::Relu, 3), Isa::detect(), Precision::F32);
        let qkv = rng_vec(&mut 7u64, seq * 3 * heads * d, 1.0);
        let mask: Vec<f32> = (0..seq * seq).map(|i| if i % seq > i / seq { f32::NEG_INFINITY } else { 0.0 }).collect();
        let mut out = vec![0f32; seq * heads * d];
        let mut best = f64::MAX;
        for _ in 0..200 {
            let t = std::time::Instant::now();
            layer.attention(&qkv, None, &mut out, 1, seq, Some(&mask), None);
            best = best.min(t.elapsed().as_secs_f64());
        }
        eprintln!("causal attention 1×{seq}, {heads} heads of {d}: {:.1} µs (×12 layers: {:.3} ms)", best * 1e6, best * 12e3);
    }

    /// ViT-g's shapes (257 tokens, 1408 wide, 16 heads, MLP 6144, exact GELU) with
    /// random weights N(0, 1/fan_in), 39 layers, each precision against f32: the cosine of
    /// the residual stream per token after the last layer. "outliers" gives 4 of the 1408
    /// residual channels 30× the others' scale and LayerNorm gains up to 8 on them, as
    /// trained ViTs have ("massive activations"), which per-row int8 quantization is
    /// sensitive to. Also the time of the 39 layers, best of 3:
    /// `cargo test -p magpie-models --release --lib vitg_precisions -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn vitg_precisions() {
        let (h, i, heads, seq, layers) = (1408, 6144, 16, 257, 39);
        for outliers in [false, true] {
            let ws: Vec<LayerWeights> = (0..layers)
                .map(|l| {
                    let mut w = weights(h, i, heads, Act::Gelu, 1000 + l as u64);
                    if outliers {
                        for c in [7, 300, 901, 1400] {
                            w.ln1.0[c] = 8.0;
                            w.ln2.0[c] = 6.0;
                        }
                    }
                    w
                })
                .collect();
            let mut s = 11u64;
            let mut x = rng_vec(&mut s, seq * h, 1.0);
            if outliers {
                for t in 0..seq {
                    for c in [7, 300, 901, 1400] {
                        x[t * h + c] *= 30.0;
                    }
                }
            }
            let run = |p: Precision| {
                let stack: Vec<EncoderLayer> = ws.iter().map(|w| EncoderLayer::new(w, Isa::detect(), p)).collect();
                let mut sc = Scratch::default();
                let mut best = f64::MAX;
                let mut y = x.clone();
                // The best of 3 runs (the first also touches the scratch buffers).
                for _ in 0..3 {
                    y.copy_from_slice(&x);
                    let t = std::time::Instant::now();
                    for l in &stack {
                        l.forward(&mut y, 1, seq, None, &mut sc);
                    }
                    best = best.min(t.elapsed().as_secs_f64());
                }
                (y, best)
            };
            let (want, t32) = run(Precision::F32);
            let want: Vec<f64> = want.iter().map(|&v| v as f64).collect();
            for p in [Precision::Bf16, Precision::Bf16WithQkv, Precision::Int8] {
                profile::enable(true);
                profile::take();
                let (y, t) = run(p);
                profile::enable(false);
                let flops = EncoderLayer::new(&ws[0], Isa::Scalar, Precision::F32).flops(1, seq);
                let stages: Vec<String> = profile::take()
                    .iter()
                    .zip(profile::STAGES.iter().zip(flops))
                    .map(|(s, (name, f))| format!("{name} {:.2} ms ({:.0} G/s)", s / 3.0 / layers as f64 * 1e3, f * 3.0 * layers as f64 / s / 1e9))
                    .collect();
                eprintln!("  {p:?} per layer: {}", stages.join(", "));
                let worst = (0..seq).map(|t| cosine(&y[t * h..(t + 1) * h], &want[t * h..(t + 1) * h])).fold(1f64, f64::min);
                eprintln!("outliers {outliers}: {p:?} (on {:?}): cosine {:.6}, worst token {worst:.6}; {:.3} s vs f32 {t32:.3} s", p.on(Isa::detect()), cosine(&y, &want), t);
            }
        }
    }

    #[test]
    #[should_panic(expected = "multiple of")]
    fn heads_must_divide_the_width() {
        EncoderLayer::new(&weights(10, 8, 3, Act::Relu, 1), Isa::Scalar, Precision::F32);
    }
}
