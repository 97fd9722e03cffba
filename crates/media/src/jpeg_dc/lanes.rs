//! One baseline scan without restart markers, decoded by 32 lanes in AVX-512 registers.
//!
//! Entropy decoding is a chain: each code's length says where the next one starts, so one
//! decoder waits on its own table lookups (and on the branch that ends each block, which
//! it mispredicts about once a block): 73 cycles per 8×8 block on a Zen 5. Huffman codes
//! resynchronise, though: a decoder started at an arbitrary bit soon falls onto the true
//! code boundaries and from there decodes exactly what a decoder from the start would
//! (Klein and Wiseman, "Parallel Huffman decoding with applications to JPEG files", 2003;
//! Weißenberger and Schmidt, "Accelerating JPEG decompression on GPUs", 2021). So the scan
//! is cut into [`L`] equal runs of bits, one lane each; the first lane starts at the true
//! start, the others at a guess (the first block of an MCU). Sixteen lanes share each
//! vector register, and one step (a gather of each lane's table entry) advances all of
//! them by a DC symbol or one or two AC symbols, without a branch. A DC step also takes
//! the (up to two) AC symbols after the value whose codes lie inside its lookup, which
//! often ends a block of little detail in one step: on the clip bench's 2 MB 4:4:4 files
//! (about 30 bits a block) `decode_bytes` fell from 7.2–7.4 to 6.0–6.3 ms on a 2-core Intel
//! Xeon (with AMX; the Zen 5 figures below are from before). Each lane keeps the 64 bits
//! of its stream from a byte on; when one of them has read past the first 32, all of
//! them gather their next 64 (two gathers of eight 64-bit words, once every two or three
//! steps).
//!
//! Each lane records every block's DC difference, and the start (bit position and MCU
//! slot) of its first [`KEEP_POSITIONS`] blocks (of every block where 4:2:0 or 4:2:2
//! chroma is decoded again, below). Then, lane by lane, the decoding known to be true runs
//! on past the next lane's start until it reaches a block start that lane also recorded
//! in an equivalent slot: from there the two are the same decoding, and the next lane's
//! records are spliced on. A lane that does not meet the true decoding within those
//! blocks (or dies on a code no table holds) is dropped and the true decoding simply
//! continues through its bits.
//!
//! The lanes skip every block's AC coefficients. Components whose samples are finer than
//! their blocks (4:2:0 chroma) need those coefficients' values: their blocks are decoded
//! again from the recorded starts by the serial reader. The result is bit for bit the
//! serial decoder's ([`super::decode_scan`]), which the tests check, and `None` exactly
//! where that one fails.
//!
//! On a 2-core Zen 5 (fastest of alternating runs; whole `decode_bytes` at CLIP's scale),
//! a 12 MP JPEG took 5.3 ms in lanes against 12.2 serially (2 MB, 4:4:4, an upscaled
//! photo with grain), 10.4 against 12.9 (2.9 MB, 4:2:0) and 12.3 against 14.4 (3.1 MB,
//! 4:2:2). In a sampled profile of the steps the gather of the table entries took about a
//! fifth of the time and the two scatters of the block records a quarter; more lanes (48,
//! 64: the steps are bound by the gathers and scatters, not their latency), one scatter
//! for both registers' records and one log of all lanes' records sorted out afterwards
//! made them no faster. The records now wait in registers, four a lane, and go out as one
//! 16-byte store per lane (a 4 × 4 transpose): on a 2-core Zen 4, where a scatter of
//! sixteen costs about as much as a gather, `decode_bytes` over the clip bench's 4:4:4
//! files took 6.4–6.6 ms a file instead of 6.7–7.4, a grainy 4 MB 4:4:4 photo 11.0–11.4
//! instead of 11.7–12.9, a 3.5 MB 4:2:0 one 13.4–13.9 instead of 14.2–14.5 (four
//! alternating runs; together with the refill's 64-bit gathers).

use super::{
    ac_step, coefficient, put_block, sample_weights, BitReader, Component, Header, Huffman,
    Plane, LOOKUP_BITS,
};

/// Lanes: two registers of sixteen.
const L: usize = 32;

/// Scans shorter than this go to the serial decoder (each lane should cover many blocks).
const MIN_BYTES: usize = 256 << 10;

/// Scans from this long go to the serial decoder: a record holds a bit position in 26 bits
/// (with room for a lane's run past the end).
const MAX_BYTES: usize = (1 << 23) - 4096;

/// Records (of all lanes) whose regions a thread keeps between images: 2 × 8 MB.
const KEEP_RECORDS: usize = 2 << 20;

/// Vector steps between checks of the records' room.
const CHUNK: usize = 64;

/// Block starts (bit positions) a lane's vector steps record, unless every block's start
/// is needed (components with sub-block samples are decoded again from theirs): the
/// true decoding meets a lane within its first few blocks, and a lane not met within
/// these is dropped as one that never meets it. Past them only DC differences are
/// written.
const KEEP_POSITIONS: usize = 256;

/// Low bits of a record that hold its slot (a frame's sampling factors allow up to 48
/// blocks per MCU; the vector path takes at most 8).
const SLOT_BITS: u32 = 6;
const SLOT_MASK: u32 = (1 << SLOT_BITS) - 1;

/// Whether [`decode`] takes this scan (`data` unstuffed and padded with 8 zero bytes):
/// a long one (but under 8 MB) without restart markers, whose MCU has at most 8 blocks,
/// on a CPU with AVX-512 (F and BW). Components with sub-block samples (4:2:0 and 4:2:2
/// chroma) are decoded twice, skipped in the lanes and then again from their block
/// starts for their coefficients; on a Zen 5 2–3 MB photos of that kind still decode
/// 15–20% faster than serially (a 2 MB 4:4:4 one 2.3 times as fast).
pub(super) fn applies(data: &[u8], hd: &Header) -> bool {
    let bpm: usize = hd.comps.iter().map(|c| c.h * c.v).sum();
    data.len() >= MIN_BYTES && data.len() < MAX_BYTES && bpm <= 8 && hd.restart_interval == 0 && simd::available()
}

/// [`super::dc_level`] of each prediction, `q` a quantiser (at most 65535, as a table holds).
fn levels(preds: &[i32], q: i32, out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if super::avx2() {
        // SAFETY: the CPU has AVX2 (checked just above).
        unsafe { levels_avx2(preds, q, out) };
        return;
    }
    levels_plain(preds, q, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn levels_avx2(preds: &[i32], q: i32, out: &mut [u8]) {
    levels_plain(preds, q, out)
}

#[inline(always)]
fn levels_plain(preds: &[i32], q: i32, out: &mut [u8]) {
    for (o, &p) in out.iter_mut().zip(preds) {
        *o = level32(p, q);
    }
}

/// [`super::dc_level`] in 32-bit arithmetic, for quantisers up to 65535: a prediction beyond
/// −1025..=1024 gives 0 or 255 whatever the quantiser (≥ 1; 0 gives 128 either way), so
/// clamping it there first changes no result and keeps the product within 2^27.
#[inline(always)]
fn level32(p: i32, q: i32) -> u8 {
    (((p.clamp(-1025, 1024) * q + 4) >> 3) + 128).clamp(0, 255) as u8
}

/// What a lane needs to know of the scan, per MCU slot (one block of one component, in
/// MCU order).
struct Scan<'a> {
    /// Unstuffed data followed by 8 zero bytes.
    data: &'a [u8],
    /// Bits of data (the padding excluded).
    end_bits: usize,
    /// Lookup tables back to back: for AC tables [`Huffman::skip`]'s entries with the
    /// first symbol's fields moved to 13–18 and 19–25 (the pair's layout, 13 bits up),
    /// for DC ones [`dc_entry`]s; entries with [`LINK`] lead to a second table for
    /// longer codes, 0 is no code.
    tab: Vec<u32>,
    /// Per slot, where the table of its DC and of its AC coefficients start:
    /// `base[2 · slot + (k > 0)]`.
    base: Vec<u32>,
    dc_huff: Vec<&'a Huffman>,
    ac_huff: Vec<&'a Huffman>,
    /// Blocks per MCU.
    bpm: usize,
    /// Records of a lane's vector steps that hold their block start ([`KEEP_POSITIONS`],
    /// or all where components have sub-block samples).
    positions: usize,
    /// `same[a * bpm + b]`: decoding from slot `a` and from slot `b` is the same forever
    /// (the same tables, slot after slot), so a lane that meets the true decoding at a
    /// block start under the other label has met it all the same (as with one table set
    /// for all components).
    same: Vec<bool>,
}

impl<'a> Scan<'a> {
    fn new(data: &'a [u8], hd: &'a Header) -> Scan<'a> {
        let mut tab: Vec<u32> = Vec::new();
        // (is AC, table indices) → base, so that components sharing tables share them.
        let mut bases: Vec<((bool, (usize, usize)), u32)> = Vec::new();
        // A DC table's entries also skip the AC codes after the value that lie inside the
        // lookup, so they depend on the AC table that follows: (DC index, its AC index).
        let mut base_of = |ac: bool, idx: (usize, usize), h: &Huffman, next: &Huffman| -> u32 {
            if let Some(&(_, b)) = bases.iter().find(|(key, _)| *key == (ac, idx)) {
                return b;
            }
            let b = tab.len() as u32;
            if ac {
                // The first symbol's own fields 13 bits up, as wide as the pair's.
                tab.extend(h.skip.iter().map(|&e| (e & 0x1FFF) | ((e >> 13) & 31) << 13 | ((e >> 18) & 127) << 19));
            } else {
                tab.extend((0..1usize << LOOKUP_BITS).map(|i| dc_entry(i, h, next)));
            }
            // Codes longer than the lookup: a second table on the next 5 bits for each
            // prefix that starts some, linked from the first.
            for i in 0..1usize << LOOKUP_BITS {
                let at = b as usize + i;
                if tab[at] != 0 {
                    continue;
                }
                let sub: Vec<u32> = (0..1u64 << SUB_BITS)
                    .map(|j| {
                        let buf = (i as u64) << (64 - LOOKUP_BITS) | j << (64 - LOOKUP_BITS - SUB_BITS);
                        h.decode_slow(buf).map_or(0, |(len, sym)| long_entry(len, sym, ac))
                    })
                    .collect();
                if sub.iter().any(|&e| e != 0) {
                    tab[at] = LINK | tab.len() as u32;
                    tab.extend(sub);
                }
            }
            bases.push(((ac, idx), b));
            b
        };
        let (mut base, mut dc_huff, mut ac_huff, mut keys) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for comp in &hd.comps {
            let dc = hd.dc_tables[comp.dc].as_ref().expect("checked at parse");
            let ac = hd.ac_tables[comp.ac].as_ref().expect("checked at parse");
            let pair = [base_of(false, (comp.dc, comp.ac), dc, ac), base_of(true, (comp.ac, comp.ac), ac, ac)];
            for _ in 0..comp.h * comp.v {
                base.extend(pair);
                dc_huff.push(dc);
                ac_huff.push(ac);
                keys.push(pair);
            }
        }
        let bpm = keys.len();
        let same = (0..bpm * bpm)
            .map(|i| {
                let (a, b) = (i / bpm, i % bpm);
                (0..bpm).all(|t| keys[(a + t) % bpm] == keys[(b + t) % bpm])
            })
            .collect();
        let positions = if hd.comps.iter().any(Component::sub_blocks) { usize::MAX } else { KEEP_POSITIONS };
        Scan {
            data,
            end_bits: (data.len() - 8) * 8,
            tab,
            base,
            dc_huff,
            ac_huff,
            bpm,
            positions,
            same,
        }
    }
}

/// Bits a second-level table looks up: codes are at most 16 bits.
const SUB_BITS: u32 = 16 - LOOKUP_BITS;

/// A first-level entry that links to a second-level table (at its low bits).
const LINK: u32 = 1 << 31;

/// A second-level entry: one symbol of `len` code bits, as a skip entry (whose pair and
/// single fields agree) or a DC entry.
fn long_entry(len: u32, sym: u8, ac: bool) -> u32 {
    let size = (sym & 15) as u32;
    if ac {
        let (extra, adv) = ac_step(sym);
        let n = len + extra;
        n | adv << 6 | n << 13 | adv << 19
    } else {
        (len + size) | 1 << 6 | len << 13 | size << 26
    }
}

/// The entry for the code at the top of `bits` in the table at `base` (0: none).
fn lookup(tab: &[u32], base: u32, bits: u32) -> u32 {
    let e = tab[(base + (bits >> (32 - LOOKUP_BITS))) as usize];
    if e & LINK == 0 {
        return e;
    }
    tab[((e & !LINK) + ((bits << LOOKUP_BITS) >> (32 - SUB_BITS))) as usize]
}

/// The lookup entry of DC table `dc` at index `i`, laid out as a skip entry's first fields
/// (bits consumed, advance) with the DC code's length at 13–17 and the value's size at
/// 26–29 (bits 19–25 stay 0, so no "first symbol alone" ever applies). Where the AC codes
/// after the value lie inside the index (up to [`MERGED_AC`] of them, of table `ac`), the
/// entry skips them too, as [`super::BitReader::skip_ac`] would: their bits and their
/// advance along the block are added, up to the one that reaches its end. 0 (a longer
/// DC code) stays 0.
fn dc_entry(i: usize, dc: &Huffman, ac: &Huffman) -> u32 {
    let e = dc.sym[i];
    if e == 0 {
        return 0;
    }
    let (len, size) = ((e & 31) as u32, ((e >> 5) & 15) as u32);
    let (mut n, mut k) = (len + size, 1u32);
    for _ in 0..MERGED_AC {
        if k >= 64 || n >= LOOKUP_BITS {
            break;
        }
        let next = ac.sym[(i << n) & ((1 << LOOKUP_BITS) - 1)];
        if next == 0 || n + (next & 31) as u32 > LOOKUP_BITS {
            break;
        }
        let (extra, adv) = ac_step((next >> 5) as u8);
        n += (next & 31) as u32 + extra;
        k += adv;
    }
    n | k << 6 | len << 13 | size << 26
}

/// AC symbols a DC entry skips at most. One is merged only while fewer than
/// [`LOOKUP_BITS`] bits are taken, its code lies inside them and the block goes on, so
/// the count stays within 11 + 15 bits and the advance within 63 + 64, whatever this is.
const MERGED_AC: usize = 2;

/// `x`, through an empty assembly block the optimiser cannot see into, so that it does
/// not turn the arithmetic on a 0/1 value back into a branch (mispredicted about once a
/// block in the scalar steps).
#[inline(always)]
fn opaque(x: u32) -> u32 {
    let mut x = x as u64;
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    // SAFETY: an empty block that only names the register holding `x`.
    unsafe {
        std::arch::asm!("/* {0} */", inout(reg) x, options(pure, nomem, nostack, preserves_flags));
    }
    x as u32
}

/// A lane's decoding state, for the scalar steps (codes longer than the lookup, and the
/// true decoding's runs past a lane's end while splicing).
#[derive(Clone, Copy, Default, Debug)]
struct Hot {
    /// The next unread bit.
    bp: usize,
    /// The next coefficient of the block (0: its DC).
    k: u32,
    slot: u32,
    /// Met a code no table holds: takes no more steps.
    dead: bool,
}

/// A block start: its bit position << [`SLOT_BITS`] | slot (a scan under 8 MB), and its
/// DC difference.
type Record = (u32, i32);

impl Hot {
    /// Decodes one DC symbol, or one or two AC symbols, as a vector lane does; a block
    /// start (a DC) is handed to `record`. Reads past the data get zeros.
    fn step(&mut self, scan: &Scan, mut record: impl FnMut(Record)) {
        if self.dead {
            return;
        }
        let p = (self.bp >> 3).min(scan.data.len() - 8);
        let word = u64::from_be_bytes(scan.data[p..p + 8].try_into().expect("8 bytes"));
        // The next 57 bits or more at the top (zeros past the data).
        let buf = if self.bp >> 3 > p { 0 } else { word << (self.bp & 7) };
        let slot = self.slot as usize;
        let is_dc = self.k == 0;
        let at = (self.bp as u32) << SLOT_BITS | slot as u32;
        let e = lookup(&scan.tab, scan.base[2 * slot + !is_dc as usize], (buf >> 32) as u32);
        let (n, adv, v) = if e != 0 {
            let single = opaque((self.k + ((e >> 19) & 127)) >> 6);
            let f = e >> (13 * single);
            (f & 63, (f >> 6) & 127, coefficient(buf << ((e >> 13) & 31), e >> 26))
        } else {
            match slow(scan, buf, slot, is_dc) {
                Some(x) => x,
                None => {
                    self.dead = true;
                    if is_dc {
                        // Still a block start (the end of the block before).
                        record((at, 0));
                    }
                    return;
                }
            }
        };
        if is_dc {
            record((at, v));
        }
        self.bp += n as usize;
        let k = self.k + adv;
        if k >= 64 {
            self.k = 0;
            self.slot = if slot + 1 == scan.bpm { 0 } else { self.slot + 1 };
        } else {
            self.k = k;
        }
    }
}

/// A code longer than the lookup: (bits to consume, advance, DC value).
#[cold]
#[inline(never)]
fn slow(scan: &Scan, buf: u64, slot: usize, is_dc: bool) -> Option<(u32, u32, i32)> {
    let t = if is_dc { scan.dc_huff[slot] } else { scan.ac_huff[slot] };
    let (len, sym) = t.decode_slow(buf)?;
    let s = (sym & 15) as u32;
    if is_dc {
        Some((len + s, 1, coefficient(buf << len, s)))
    } else {
        let (extra, adv) = ac_step(sym);
        Some((len + extra, adv, 0))
    }
}

/// A lane: its state after the vector steps, and its records: the vector steps' `nv`
/// (whose DC differences stay in their region, read from there by [`assemble`]), then
/// those of scalar steps past them. `at` holds the block starts of the first
/// [`Lane::known`] vector records and then of every scalar one; `dc` the scalar ones' DC
/// differences.
#[derive(Default)]
struct Lane {
    hot: Hot,
    at: Vec<u32>,
    nv: usize,
    dc: Vec<i32>,
}

impl Lane {
    /// Records from the start that hold their block start: the vector steps' `nv`, or
    /// [`Scan::positions`] if fewer (the scalar steps' records, the others in `at`, come
    /// after all `nv`).
    fn known(&self) -> usize {
        self.at.len() - self.dc.len()
    }

    /// Records, the vector steps' and the scalar ones'.
    fn len(&self) -> usize {
        self.nv + self.dc.len()
    }

    /// Record `i`'s block start (with its slot), or `None` past the last. A vector record
    /// whose start was not kept reads as the last kept one (0 if none): they all lie
    /// before the lane's stop, where no other lane's blocks start, so in the searches of
    /// [`splice`] any of them is as good as its own, and the order stays sorted.
    fn at(&self, i: usize) -> Option<u32> {
        let known = self.known();
        if i < known {
            Some(self.at[i])
        } else if i < self.nv {
            Some(self.at[..known].last().copied().unwrap_or(0))
        } else {
            self.at.get(known + i - self.nv).copied()
        }
    }

    /// The first record from `from` on whose block start is not before `pos` (by
    /// [`at`](Self::at); the records' starts are sorted), or [`len`](Self::len).
    fn first_from(&self, from: usize, pos: usize) -> usize {
        let before = |x: u32| ((x >> SLOT_BITS) as usize) < pos;
        let known = self.known();
        if from < known {
            let i = from + self.at[from..known].partition_point(|&x| before(x));
            if i < known {
                return i;
            }
        }
        let from = from.max(known);
        if from < self.nv && !before(self.at(from).unwrap_or(0)) {
            return from;
        }
        let from = from.max(self.nv);
        from + self.at[known + from - self.nv..].partition_point(|&x| before(x))
    }
}

impl Lane {
    /// Steps until the next block start is recorded (or the lane dies).
    fn next_block(&mut self, scan: &Scan) {
        let n = self.at.len();
        while self.at.len() == n && !self.hot.dead {
            let Lane { hot, at, dc, .. } = self;
            hot.step(scan, |(a, d)| {
                at.push(a);
                dc.push(d);
            });
        }
    }
}

/// Lanes, the vector steps' records (block starts, DC differences), the spliced ones.
type Buffers = (Vec<Lane>, Vec<u32>, Vec<u32>, Spliced);

thread_local! {
    /// Lanes' records, the vector steps' record regions and the spliced records, kept
    /// between images (as the unstuffed scan is): fresh multi-megabyte buffers per photo
    /// cost page faults.
    static BUFFERS: std::cell::RefCell<Buffers> = const {
        std::cell::RefCell::new((Vec::new(), Vec::new(), Vec::new(), Spliced { dcs: Vec::new(), ats: Vec::new() }))
    };
}

/// The planes of a baseline scan without restart markers (`data` unstuffed and padded
/// with 8 zero bytes), as [`super::decode_scan`] gives them; only where [`applies`].
pub(super) fn decode(data: &[u8], hd: &Header) -> Option<Vec<Plane>> {
    decode_with(data, hd).map(|(planes, _)| planes)
}

/// [`decode`], also saying how many lanes were spliced on (the others were dropped and
/// decoded through by the lane before them).
pub(super) fn decode_with(data: &[u8], hd: &Header) -> Option<(Vec<Plane>, usize)> {
    decode_keeping(data, hd, None)
}

/// [`decode_with`], with `positions` (where given, and where not every block start is
/// needed) in place of [`KEEP_POSITIONS`]: fewer make lanes miss the true decoding
/// within them (for the tests).
fn decode_keeping(data: &[u8], hd: &Header, positions: Option<usize>) -> Option<(Vec<Plane>, usize)> {
    let mut scan = Scan::new(data, hd);
    if let (Some(p), KEEP_POSITIONS) = (positions, scan.positions) {
        scan.positions = p.max(1);
    }
    BUFFERS.with_borrow_mut(|(lanes, at, dc, spliced_recs)| {
        lanes.resize_with(L, Lane::default);
        let len = data.len() - 8;
        let starts: [usize; L] = std::array::from_fn(|l| len * l / L * 8);
        let stops: [usize; L] = std::array::from_fn(|l| len * (l + 1) / L * 8);
        let mut hot: [Hot; L] = std::array::from_fn(|l| Hot { bp: starts[l], ..Hot::default() });
        // Each lane's records in a region of its own, of `cap` records: twice a lane's
        // share of the blocks at first (regions grow where a lane finds more).
        let (mx, my) = hd.mcus();
        let mut cap = (mx * my * scan.bpm / L * 2).max(1024);
        let mut n = [0usize; L];
        simd::run(&scan, &mut hot, &stops, at, dc, &mut cap, &mut n);
        for (l, (lane, h)) in lanes.iter_mut().zip(hot).enumerate() {
            lane.hot = h;
            lane.nv = n[l];
            lane.at.clear();
            lane.at.extend_from_slice(&at[l * cap..][..n[l].min(scan.positions)]);
            lane.dc.clear();
        }
        let planes = splice(&scan, lanes, hd).and_then(|(runs, spliced)| Some((assemble(&scan, lanes, &runs, hd, (dc, cap), spliced_recs)?, spliced)));
        // Buffers past a 12 MP photo's needs are not kept for the next image.
        if at.len() > KEEP_RECORDS {
            (*at, *dc) = (Vec::new(), Vec::new());
        }
        if spliced_recs.dcs.capacity() > KEEP_RECORDS {
            *spliced_recs = Spliced { dcs: Vec::new(), ats: Vec::new() };
        }
        planes
    })
}

/// The runs of the true decoding, in order, as (lane, first record, end): each lane's
/// records from where the true decoding met them. Also how many lanes were spliced on.
/// `None` where the true decoding fails (a code no table holds, or data that ends before
/// the last block does).
fn splice(scan: &Scan, lanes: &mut [Lane], hd: &Header) -> Option<(Vec<(usize, usize, usize)>, usize)> {
    let (mx, my) = hd.mcus();
    let total = mx * my * scan.bpm;
    let pos = |x: u32| (x >> SLOT_BITS) as usize;
    let mut runs = Vec::with_capacity(lanes.len());
    // Records taken so far, and the lane now known true from record `from`.
    let (mut have, mut cur, mut from, mut spliced) = (0, 0, 0, 0);
    for l in 1..lanes.len() {
        let (head, tail) = lanes.split_at_mut(l);
        let (a, b) = (&mut head[cur], &tail[0]);
        if have + a.len() - from > total {
            break; // the true decoding already holds every block and the end
        }
        // Only b's first records hold their block starts: the true decoding must meet it
        // among those (b has taken no scalar steps yet, so all of its records are the
        // vector steps').
        let bk = b.known();
        if bk == 0 {
            continue;
        }
        let (first, last) = (pos(b.at[0]), pos(b.at[bk - 1]));
        let mut i = a.first_from(from, first);
        let mut j = 0;
        let met = loop {
            while i >= a.len() && !a.hot.dead && a.hot.bp <= last && have + a.len() - from <= total {
                a.next_block(scan);
            }
            let Some(x) = a.at(i) else { break None };
            while j < bk && pos(b.at[j]) < pos(x) {
                j += 1;
            }
            let Some(&y) = b.at[..bk].get(j) else { break None };
            if pos(y) == pos(x) && scan.same[(x & SLOT_MASK) as usize * scan.bpm + (y & SLOT_MASK) as usize] {
                break Some((i, j));
            }
            i += 1;
        };
        if let Some((i, j)) = met {
            runs.push((cur, from, i));
            have += i - from;
            (cur, from) = (l, j);
            spliced += 1;
        }
    }
    // The true decoding on to a block start past the last block: where that one ends.
    let a = &mut lanes[cur];
    while have + a.len() - from <= total && !a.hot.dead {
        a.next_block(scan);
    }
    if have + a.len() - from <= total {
        return None; // a code no table holds before the last block ends
    }
    runs.push((cur, from, a.len()));
    // Where the last block ends must lie within the data.
    let mut left = total;
    for &(l, from, to) in &runs {
        if to - from > left {
            if lanes[l].at(from + left).is_some_and(|x| pos(x) > scan.end_bits) {
                return None;
            }
            break;
        }
        left -= to - from;
    }
    Some((runs, spliced))
}

/// A stretch of spliced DC differences: a lane's vector records in its region (as u32),
/// or its scalar ones.
enum Seg<'a> {
    Region(&'a [u32]),
    Scalar(&'a [i32]),
}

impl Seg<'_> {
    fn len(&self) -> usize {
        match self {
            Seg::Region(r) => r.len(),
            Seg::Scalar(d) => d.len(),
        }
    }

    /// Its differences from `from` on into `out`, as many as `out` holds.
    fn copy_to(&self, from: usize, out: &mut [i32]) {
        match self {
            Seg::Region(r) => out.iter_mut().zip(&r[from..]).for_each(|(o, &d)| *o = d as i32),
            Seg::Scalar(d) => out.copy_from_slice(&d[from..from + out.len()]),
        }
    }
}

/// The spliced DC differences, and block starts where needed, in scan order.
struct Spliced {
    dcs: Vec<i32>,
    ats: Vec<u32>,
}

/// The planes from the spliced records, blocks in MCU order with the DC predictions
/// summed per component; blocks of components with sub-block samples decoded again from
/// their starts for their AC sums.
fn assemble(scan: &Scan, lanes: &[Lane], runs: &[(usize, usize, usize)], hd: &Header, (regions, cap): (&[u32], usize), buf: &mut Spliced) -> Option<Vec<Plane>> {
    let mut planes = hd.new_planes();
    let (mx, my) = hd.mcus();
    let total = mx * my * scan.bpm;
    let sub = hd.comps.iter().any(Component::sub_blocks);
    // The slices the spliced DC differences lie in, in order: each run's vector records
    // in their region, then its scalar ones.
    let mut segs: Vec<Seg> = Vec::with_capacity(2 * runs.len());
    for &(l, from, to) in runs {
        let nv = lanes[l].nv;
        if from < nv {
            segs.push(Seg::Region(&regions[l * cap..][from..to.min(nv)]));
        }
        if to > nv {
            segs.push(Seg::Scalar(&lanes[l].dc[from.max(nv) - nv..to - nv]));
        }
    }
    if segs.iter().map(Seg::len).sum::<usize>() < total {
        return None;
    }
    // Each slot: its component, its block within the MCU, and, for sub-block samples,
    // the weights.
    let mut slots: Vec<(usize, &Component, (usize, usize), Option<Vec<[f32; 4]>>)> = Vec::new();
    for (c, comp) in hd.comps.iter().enumerate() {
        let w = comp.sub_blocks().then(|| sample_weights(comp));
        for v in 0..comp.v {
            for h in 0..comp.h {
                slots.push((c, comp, (h, v), w.clone()));
            }
        }
    }
    let mut pred = [0i32; 3];
    if !sub && hd.comps.iter().all(|c| c.h == 1 && c.v == 1) {
        // One block per component per MCU, one sample per block: sample (bx, by) of each
        // plane in turn.
        // The predictions of a row first (a chain of adds per component, all components in
        // one pass, whose chains overlap), then their levels (no chain: vectorised).
        // A row's differences are copied from the slices into a buffer that stays in L1,
        // not all of them into one array first (2 MB for a 12 MP photo).
        let q: Vec<i32> = hd.comps.iter().map(|c| c.quant[0]).collect();
        let n = q.len();
        let mut preds = vec![0i32; mx * n];
        let mut row = vec![0i32; mx * n];
        let mut at = (0, 0); // (slice, offset)
        for by in 0..my {
            let mut filled = 0;
            while filled < row.len() {
                let seg = &segs[at.0];
                let k = (seg.len() - at.1).min(row.len() - filled);
                seg.copy_to(at.1, &mut row[filled..filled + k]);
                filled += k;
                at.1 += k;
                if at.1 == seg.len() {
                    at = (at.0 + 1, 0);
                }
            }
            for (x, mcu) in row.chunks_exact(n).enumerate() {
                for (c, &d) in mcu.iter().enumerate() {
                    pred[c] = pred[c].wrapping_add(d);
                    preds[c * mx + x] = pred[c];
                }
            }
            for ((p, out), &q) in planes.iter_mut().zip(preds.chunks_exact(mx)).zip(&q) {
                levels(out, q, &mut p.data[by * p.stride..][..mx]);
            }
        }
        return Some(planes);
    }
    // Otherwise the spliced DC differences (and, for sub-block components, block starts)
    // in order, in one array.
    let Spliced { dcs, ats } = buf;
    dcs.clear();
    ats.clear();
    for seg in &segs {
        match seg {
            Seg::Region(r) => dcs.extend(r.iter().map(|&d| d as i32)),
            Seg::Scalar(d) => dcs.extend_from_slice(d),
        }
    }
    if sub {
        for &(l, from, to) in runs {
            // Every block start is kept here, so the records' starts are `at` as it is.
            debug_assert_eq!(lanes[l].at.len(), lanes[l].len());
            ats.extend_from_slice(&lanes[l].at[from..to]);
        }
    }
    let mut i = 0;
    for by in 0..my {
        for bx in 0..mx {
            for (slot, (c, comp, hv, w)) in slots.iter().enumerate() {
                pred[*c] = pred[*c].wrapping_add(dcs[i]);
                let means = match w {
                    None => None,
                    Some(w) => {
                        let bit = (ats[i] >> SLOT_BITS) as usize;
                        let mut r = BitReader::new(scan.data, bit / 8);
                        r.consume((bit % 8) as u32);
                        // Both decode as they did in the lanes, with the same tables.
                        r.dc_diff(scan.dc_huff[slot])?;
                        Some(r.sample_means(scan.ac_huff[slot], pred[*c], w)?)
                    }
                };
                put_block(&mut planes[*c], comp, (bx, by), *hv, pred[*c], means);
                i += 1;
            }
        }
    }
    Some(planes)
}

/// The vector steps.
mod simd {
    use super::{Hot, Scan, L};

    pub(super) fn available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            super::super::avx512()
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// Runs every lane from `hot[l].bp` to its stop (`stops[l]`), writing lane l's block
    /// starts to `at[l·cap..]` (bit position << 6 | slot) and `dc[l·cap..]` (the DC
    /// difference), `n[l]` of them; `cap` grows as needed. Codes longer than the lookup
    /// take a scalar step.
    pub(super) fn run(scan: &Scan, hot: &mut [Hot; L], stops: &[usize; L], at: &mut Vec<u32>, dc: &mut Vec<u32>, cap: &mut usize, n: &mut [usize; L]) {
        #[cfg(target_arch = "x86_64")]
        if available() {
            // SAFETY: the CPU has AVX-512 F and BW (checked just above).
            unsafe { avx512::run(scan, hot, stops, at, dc, cap, n) };
            return;
        }
        let _ = (scan, hot, stops, at, dc, cap, n);
        unreachable!("the vector path is taken only where `available`");
    }

    #[cfg(target_arch = "x86_64")]
    mod avx512 {
        use super::super::{Hot, Scan, CHUNK, L, LINK, LOOKUP_BITS, SLOT_BITS, SUB_BITS};
        use std::arch::x86_64::*;

        /// Sixteen lanes' state.
        struct Regs {
            bp: __m512i,
            k: __m512i,
            slot: __m512i,
            stop: __m512i,
            /// Records written, and where the lane's region starts.
            n: __m512i,
            region: __m512i,
            /// The 64 bits from byte `wb` of the data (big-endian, in two halves): each
            /// lane's bits are gathered again only when it has read past the first 32.
            wb: __m512i,
            hi: __m512i,
            lo: __m512i,
            /// Records not yet written: lane i's j-th DC difference in element i of
            /// `dc[j]` and its block start in `at[j]` (where one is kept), `pending` of
            /// them; `at_pending` whether any of them has its start. [`flush`] writes
            /// them once a lane has [`FLUSH`], at the end of each chunk of steps, and
            /// before scalar steps (which write theirs directly).
            dc: [__m512i; FLUSH],
            at: [__m512i; FLUSH],
            pending: __m512i,
            at_pending: bool,
        }

        /// A half-done step ([`front`] to [`back`]): live lanes, their 32-bit windows, their
        /// table entries, the lanes inside a block's AC coefficients.
        type Front = (u16, __m512i, __m512i, u16);

        /// Records a lane holds in registers before they are written (a lane adds at most
        /// one a step, so a flush as soon as one lane has this many leaves room for all).
        const FLUSH: usize = 4;

        /// The big-endian word at byte `i` of `data` (0 past its end).
        fn word(data: &[u8], i: usize) -> u32 {
            data.get(i..i + 4).map_or(0, |b| u32::from_be_bytes(b.try_into().expect("4 bytes")))
        }

        fn lanes16(f: impl Fn(usize) -> u32) -> [u32; 16] {
            std::array::from_fn(f)
        }

        #[target_feature(enable = "avx512f,avx512bw")]
        unsafe fn load(v: [u32; 16]) -> __m512i {
            _mm512_loadu_si512(v.as_ptr() as *const _)
        }

        #[target_feature(enable = "avx512f,avx512bw")]
        unsafe fn store(v: __m512i) -> [u32; 16] {
            let mut out = [0u32; 16];
            _mm512_storeu_si512(out.as_mut_ptr() as *mut _, v);
            out
        }

        #[target_feature(enable = "avx512f,avx512bw")]
        pub(super) unsafe fn run(scan: &Scan, hot: &mut [Hot; L], stops: &[usize; L], at: &mut Vec<u32>, dc: &mut Vec<u32>, cap: &mut usize, n: &mut [usize; L]) {
            let bases = load(lanes16(|i| scan.base.get(i).copied().unwrap_or(0)));
            let bpm = _mm512_set1_epi32(scan.bpm as i32);
            let keep = _mm512_set1_epi32(scan.positions.min(u32::MAX as usize) as u32 as i32);
            // Kept from earlier images, not cleared: only records written are read.
            if at.len() < L * *cap {
                at.resize(L * *cap, 0);
                dc.resize(L * *cap, 0);
            }
            let mut regs: Vec<Regs> = (0..L / 16)
                .map(|g| Regs {
                    bp: load(lanes16(|i| hot[g * 16 + i].bp as u32)),
                    k: load(lanes16(|i| hot[g * 16 + i].k)),
                    slot: load(lanes16(|i| hot[g * 16 + i].slot)),
                    stop: load(lanes16(|i| stops[g * 16 + i] as u32)),
                    n: _mm512_setzero_si512(),
                    region: load(lanes16(|i| ((g * 16 + i) * *cap) as u32)),
                    wb: load(lanes16(|i| (hot[g * 16 + i].bp / 8) as u32)),
                    hi: load(lanes16(|i| word(scan.data, hot[g * 16 + i].bp / 8))),
                    lo: load(lanes16(|i| word(scan.data, hot[g * 16 + i].bp / 8 + 4))),
                    dc: [_mm512_setzero_si512(); FLUSH],
                    at: [_mm512_setzero_si512(); FLUSH],
                    pending: _mm512_setzero_si512(),
                    at_pending: false,
                })
                .collect();
            loop {
                // Room for a chunk more records in every region, or regions twice as big.
                let most = regs.iter().map(|r| store(r.n).into_iter().max().unwrap_or(0)).max().unwrap_or(0) as usize;
                // (A flush writes all FLUSH slots of each lane, counted or not.)
                if most + CHUNK + FLUSH + 1 > *cap {
                    let new = *cap * 2;
                    let (mut a2, mut d2) = (vec![0u32; L * new], vec![0u32; L * new]);
                    for l in 0..L {
                        a2[l * new..][..*cap].copy_from_slice(&at[l * *cap..][..*cap]);
                        d2[l * new..][..*cap].copy_from_slice(&dc[l * *cap..][..*cap]);
                    }
                    (*at, *dc, *cap) = (a2, d2, new);
                    for (g, r) in regs.iter_mut().enumerate() {
                        r.region = load(lanes16(|i| ((g * 16 + i) * new) as u32));
                    }
                }
                // Each lane reads its own stretch of the scan, 32 streams at once, more
                // than the hardware prefetchers follow: fetch the lines a chunk will
                // read (about 60 bytes a lane) ahead of the gathers.
                for r in regs.iter() {
                    for b in store(r.bp) {
                        for ahead in [64, 128] {
                            let at = ((b / 8) as usize + ahead).min(scan.data.len() - 1);
                            _mm_prefetch::<_MM_HINT_T0>(scan.data.as_ptr().add(at) as *const i8);
                        }
                    }
                }
                let mut any = false;
                for _ in 0..CHUNK {
                    let mut fronts = [None; L / 16];
                    for (f, r) in fronts.iter_mut().zip(regs.iter_mut()) {
                        *f = front(scan, r, bases);
                    }
                    for (f, r) in fronts.into_iter().zip(regs.iter_mut()) {
                        if let Some(f) = f {
                            back(scan, r, hot, f, (bpm, keep), *cap, at, dc);
                            any = true;
                        }
                    }
                }
                for r in regs.iter_mut() {
                    // SAFETY: the room checked above holds this chunk's records and FLUSH
                    // more (a lane adds at most one a step).
                    flush(r, at, dc);
                }
                if !any {
                    break;
                }
            }
            for (g, r) in regs.iter().enumerate() {
                let (bp, k, slot, count) = (store(r.bp), store(r.k), store(r.slot), store(r.n));
                for i in 0..16 {
                    let h = &mut hot[g * 16 + i];
                    (h.bp, h.k, h.slot) = (bp[i] as usize, k[i], slot[i]);
                    n[g * 16 + i] = count[i] as usize;
                }
            }
        }

        /// The first half of a step of sixteen lanes (those short of their stops; `None`
        /// when none is): their next bits and table entries, `(live, window, entry, AC
        /// lanes)`. `bases`: each slot's table bases, broadcast. `run` takes the first
        /// halves of both registers' steps before the second halves, so that their
        /// gathers are in flight together (grainy 12 MP photos 3–5% faster on a Zen 4;
        /// the bench's files, with fewer codes a block, the same).
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw")]
        unsafe fn front(scan: &Scan, r: &mut Regs, bases: __m512i) -> Option<Front> {
            let live = _mm512_cmplt_epu32_mask(r.bp, r.stop);
            if live == 0 {
                return None;
            }
            let data = scan.data.as_ptr() as *const i32;
            // The next 32 bits of each lane, from its 64 buffered ones; lanes that have
            // read past the first 32 of those gather the 64 from their byte first.
            let off = _mm512_sub_epi32(r.bp, _mm512_slli_epi32::<3>(r.wb));
            if _mm512_mask_cmpgt_epu32_mask(live, off, _mm512_set1_epi32(32)) != 0 {
                // All live lanes at once: a gather costs the same for one lane or all,
                // and a fresh lane has read at most 7 of its 64 bits, so the next step
                // or two need none.
                let refill = live;
                let byte = _mm512_srli_epi32::<3>(r.bp);
                // SAFETY (both gathers): a live lane's bp < stop ≤ 8·(data.len() − 8), so
                // its 8 bytes from bp/8 lie inside `data`; other lanes read nothing.
                // Eight bytes a lane in two gathers of eight 64-bit words (cheaper than two
                // of sixteen 32-bit ones), byte-swapped to big-endian words, whose high
                // and low halves are then dealt into `hi` and `lo`.
                let data64 = data as *const i64;
                let w0 = _mm512_mask_i32gather_epi64::<1>(_mm512_setzero_si512(), refill as u8, _mm512_castsi512_si256(byte), data64);
                let w1 = _mm512_mask_i32gather_epi64::<1>(_mm512_setzero_si512(), (refill >> 8) as u8, _mm512_extracti64x4_epi64::<1>(byte), data64);
                let swap = _mm512_set4_epi32(0x08090a0b, 0x0c0d0e0f, 0x00010203, 0x04050607);
                let (w0, w1) = (_mm512_shuffle_epi8(w0, swap), _mm512_shuffle_epi8(w1, swap));
                // Word i of w0 (lanes 0–7) or w1 (8–15): high half at dword 2i+1, low at 2i.
                let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
                let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
                r.hi = _mm512_mask_mov_epi32(r.hi, refill, _mm512_permutex2var_epi32(w0, odd, w1));
                r.lo = _mm512_mask_mov_epi32(r.lo, refill, _mm512_permutex2var_epi32(w0, even, w1));
                r.wb = _mm512_mask_mov_epi32(r.wb, refill, byte);
            }
            let s = _mm512_sub_epi32(r.bp, _mm512_slli_epi32::<3>(r.wb));
            // Shifts by 32 give 0, so s = 0 takes `hi` and s = 32 takes `lo`.
            let win = _mm512_or_si512(_mm512_sllv_epi32(r.hi, s), _mm512_srlv_epi32(r.lo, _mm512_sub_epi32(_mm512_set1_epi32(32), s)));
            let is_ac = _mm512_test_epi32_mask(r.k, r.k);
            let which = _mm512_add_epi32(_mm512_add_epi32(r.slot, r.slot), _mm512_maskz_set1_epi32(is_ac, 1));
            let base = _mm512_permutexvar_epi32(which, bases);
            let idx = _mm512_add_epi32(base, _mm512_srli_epi32::<{ 32 - LOOKUP_BITS }>(win));
            // SAFETY: `base` starts a table of 2^LOOKUP_BITS entries in `tab`, idx is below.
            let e = _mm512_mask_i32gather_epi32::<4>(_mm512_setzero_si512(), live, idx, scan.tab.as_ptr() as *const i32);
            // Codes longer than the lookup: the second table, on the next 5 bits.
            let link = _mm512_mask_cmplt_epi32_mask(live, e, _mm512_setzero_si512());
            let e = if link != 0 {
                let sub = _mm512_srli_epi32::<{ 32 - SUB_BITS }>(_mm512_slli_epi32::<LOOKUP_BITS>(win));
                let idx2 = _mm512_add_epi32(_mm512_and_si512(e, _mm512_set1_epi32(!LINK as i32)), sub);
                // SAFETY: a link points at a second table of 2^SUB_BITS entries in `tab`.
                _mm512_mask_i32gather_epi32::<4>(e, link, idx2, scan.tab.as_ptr() as *const i32)
            } else {
                e
            };
            Some((live, win, e, is_ac))
        }

        /// The second half of the step begun by [`front`]: the lanes' records and their
        /// advance. `(bpm, keep)`: blocks per MCU and [`Scan::positions`], broadcast.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw")]
        unsafe fn back(scan: &Scan, r: &mut Regs, hot: &mut [Hot; L], (live, win, e, is_ac): Front, (bpm, keep): (__m512i, __m512i), cap: usize, at: &mut [u32], dc: &mut [u32]) {
            let long = _mm512_mask_cmpeq_epi32_mask(live, e, _mm512_setzero_si512());
            if long != 0 {
                scalar_steps(scan, r, hot, long, cap, at, dc);
            }
            let live = live & !long;
            // A skip entry's first symbol alone (its fields 13 bits up) where it ends the
            // block; a DC entry has zeros there.
            let adv1 = _mm512_and_si512(_mm512_srli_epi32::<19>(e), _mm512_set1_epi32(127));
            // (A mask, not a multiply by 13: vpmulld's latency is on the steps' chain.)
            let single = _mm512_cmpge_epu32_mask(_mm512_add_epi32(r.k, adv1), _mm512_set1_epi32(64));
            let f = _mm512_mask_srli_epi32::<13>(e, single, e);
            let n = _mm512_and_si512(f, _mm512_set1_epi32(63));
            let adv = _mm512_and_si512(_mm512_srli_epi32::<6>(f), _mm512_set1_epi32(127));
            // DC lanes: the value after the code (`coefficient`), and the block's record.
            let is_dc = live & !is_ac;
            if is_dc != 0 {
                let len = _mm512_and_si512(_mm512_srli_epi32::<13>(e), _mm512_set1_epi32(31));
                let size = _mm512_srli_epi32::<26>(e);
                let t = _mm512_sllv_epi32(win, len);
                let v = _mm512_srlv_epi32(t, _mm512_sub_epi32(_mm512_set1_epi32(32), size));
                let top = _mm512_sllv_epi32(_mm512_set1_epi32(1), size);
                let neg = _mm512_cmplt_epi32_mask(v, _mm512_srli_epi32::<1>(top));
                let v = _mm512_mask_add_epi32(v, neg, v, _mm512_sub_epi32(_mm512_set1_epi32(1), top));
                // The block start only in a lane's first `positions` records.
                let with_pos = _mm512_mask_cmplt_epu32_mask(is_dc, r.n, keep);
                // The record into the lane's next free slot, for `flush` to write.
                let start = _mm512_or_si512(_mm512_slli_epi32::<SLOT_BITS>(r.bp), r.slot);
                for j in 0..FLUSH {
                    let here = _mm512_mask_cmpeq_epi32_mask(is_dc, r.pending, _mm512_set1_epi32(j as i32));
                    r.dc[j] = _mm512_mask_mov_epi32(r.dc[j], here, v);
                    if with_pos != 0 {
                        r.at[j] = _mm512_mask_mov_epi32(r.at[j], here & with_pos, start);
                    }
                }
                r.at_pending |= with_pos != 0;
                r.pending = _mm512_mask_add_epi32(r.pending, is_dc, r.pending, _mm512_set1_epi32(1));
                r.n = _mm512_mask_add_epi32(r.n, is_dc, r.n, _mm512_set1_epi32(1));
                // A lane adds at most one record a step: written out once one has FLUSH.
                if _mm512_cmpeq_epi32_mask(r.pending, _mm512_set1_epi32(FLUSH as i32)) != 0 {
                    // SAFETY: `run` keeps room for a chunk's records and FLUSH more.
                    flush(r, at, dc);
                }
            }
            r.bp = _mm512_mask_add_epi32(r.bp, live, r.bp, n);
            let k = _mm512_add_epi32(r.k, adv);
            let end = _mm512_mask_cmpge_epu32_mask(live, k, _mm512_set1_epi32(64));
            r.k = _mm512_mask_mov_epi32(r.k, live, _mm512_maskz_mov_epi32(!end, k));
            let slot = _mm512_mask_add_epi32(r.slot, end, r.slot, _mm512_set1_epi32(1));
            r.slot = _mm512_mask_mov_epi32(slot, _mm512_cmpeq_epi32_mask(slot, bpm), _mm512_setzero_si512());
        }

        /// Writes each lane's buffered records after its earlier ones in its region (block
        /// starts only where one is buffered): all [`FLUSH`] slots of every lane, as one
        /// 16-byte store a lane and array (past the counted ones they are stale values, at
        /// places the lane's next records overwrite and nothing reads before). Plain
        /// stores, against a scatter a step (sixteen stores to as many lines, a fifth of
        /// the steps' time on a Zen 4).
        ///
        /// # Safety
        /// AVX-512 F present; every lane's region has room for FLUSH records past its
        /// `n − pending` (`run` keeps a chunk's room and FLUSH more).
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw")]
        unsafe fn flush(r: &mut Regs, at: &mut [u32], dc: &mut [u32]) {
            let to = store(_mm512_add_epi32(r.region, _mm512_sub_epi32(r.n, r.pending)));
            debug_assert!(to.iter().all(|&t| t as usize + FLUSH <= dc.len().min(at.len())));
            // SAFETY (both): as the caller vouches.
            write_slots(r.dc, &to, dc.as_mut_ptr());
            if r.at_pending {
                write_slots(r.at, &to, at.as_mut_ptr());
                r.at_pending = false;
            }
            r.pending = _mm512_setzero_si512();
        }

        /// Lane l's four slots (element l of each of `s`) to `out[to[l]..][..4]`.
        ///
        /// # Safety
        /// AVX-512 F present; each `out[to[l]..][..4]` writable.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw")]
        unsafe fn write_slots(s: [__m512i; FLUSH], to: &[u32; 16], out: *mut u32) {
            const { assert!(FLUSH == 4, "a 4 × 4 transpose per 128-bit lane") };
            let [a, b, c, d] = s;
            let (ab_lo, ab_hi) = (_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
            let (cd_lo, cd_hi) = (_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
            // q[m]'s 128-bit part j: lane 4j + m's four slots, in order.
            let q = [
                _mm512_unpacklo_epi64(ab_lo, cd_lo),
                _mm512_unpackhi_epi64(ab_lo, cd_lo),
                _mm512_unpacklo_epi64(ab_hi, cd_hi),
                _mm512_unpackhi_epi64(ab_hi, cd_hi),
            ];
            for (m, q) in q.iter().enumerate() {
                _mm_storeu_si128(out.add(to[m] as usize) as *mut __m128i, _mm512_castsi512_si128(*q));
                _mm_storeu_si128(out.add(to[4 + m] as usize) as *mut __m128i, _mm512_extracti32x4_epi32::<1>(*q));
                _mm_storeu_si128(out.add(to[8 + m] as usize) as *mut __m128i, _mm512_extracti32x4_epi32::<2>(*q));
                _mm_storeu_si128(out.add(to[12 + m] as usize) as *mut __m128i, _mm512_extracti32x4_epi32::<3>(*q));
            }
        }

        /// The lanes in `which` take a scalar step (a code longer than the lookup), their
        /// records written to their regions.
        #[cold]
        #[target_feature(enable = "avx512f,avx512bw")]
        unsafe fn scalar_steps(scan: &Scan, r: &mut Regs, hot: &mut [Hot; L], which: u16, cap: usize, at: &mut [u32], dc: &mut [u32]) {
            // Records go straight to the regions here: the buffered ones first. SAFETY:
            // `run` keeps room for a chunk's records and FLUSH more.
            flush(r, at, dc);
            let (mut bp, mut k, mut slot, mut stop, mut n) = (store(r.bp), store(r.k), store(r.slot), store(r.stop), store(r.n));
            let region = store(r.region);
            for i in (0..16).filter(|i| which >> i & 1 != 0) {
                let lane = region[i] as usize / cap;
                let mut h = Hot { bp: bp[i] as usize, k: k[i], slot: slot[i], dead: hot[lane].dead };
                h.step(scan, |(a, d)| {
                    let to = (region[i] + n[i]) as usize;
                    (at[to], dc[to]) = (a, d as u32);
                    n[i] += 1;
                });
                hot[lane].dead = h.dead;
                (bp[i], k[i], slot[i]) = (h.bp as u32, h.k, h.slot);
                if h.dead {
                    stop[i] = 0; // no more steps
                }
            }
            (r.bp, r.k, r.slot, r.stop, r.n) = (load(bp), load(k), load(slot), load(stop), load(n));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{dc_level, decode_scan, unstuff, Header};
    use super::*;

    /// A photo-like JPEG (gradients, waves and grain) of `w`×`h` in `sampling` (None:
    /// grey), big enough for the lanes; `seed` 0 makes its top 60% one flat grey (a few
    /// bits a block, so that the first lanes find many times their share of blocks).
    fn jpeg(w: u16, h: u16, sampling: Option<jpeg_encoder::SamplingFactor>, seed: u32) -> Vec<u8> {
        let mut state = seed | 1;
        let mut px = Vec::with_capacity(w as usize * h as usize * 3);
        for y in 0..h as u32 {
            for x in 0..w as u32 {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                let g = (state % 25) as f32 - 12.0;
                let (fx, fy) = (x as f32 / w as f32, y as f32 / h as f32);
                let wave = (fx * 31.0).sin() * (fy * 17.0).cos() * 60.0;
                for c in 0..3 {
                    let v = if seed == 0 && fy < 0.6 { 128.0 } else { fx * 120.0 + fy * 60.0 * c as f32 + wave + g + 40.0 };
                    px.push(v.clamp(0.0, 255.0) as u8);
                }
            }
        }
        let mut out = Vec::new();
        let mut enc = jpeg_encoder::Encoder::new(&mut out, 92);
        match sampling {
            Some(s) => {
                enc.set_sampling_factor(s);
                enc.encode(&px, w, h, jpeg_encoder::ColorType::Rgb).unwrap();
            }
            None => {
                let grey: Vec<u8> = px.chunks(3).map(|p| p[1]).collect();
                enc.encode(&grey, w, h, jpeg_encoder::ColorType::Luma).unwrap();
            }
        }
        out
    }

    /// The serial decoder's planes and the lanes' (with how many lanes were spliced on),
    /// `None` for either where it refuses; `None` overall where the lanes do not apply.
    fn both(bytes: &[u8]) -> Option<(Option<Vec<Vec<u8>>>, Option<(Vec<Vec<u8>>, usize)>)> {
        both_keeping(bytes, None)
    }

    /// [`both`], the lanes keeping `positions` block starts (see [`decode_keeping`]).
    fn both_keeping(bytes: &[u8], positions: Option<usize>) -> Option<(Option<Vec<Vec<u8>>>, Option<(Vec<Vec<u8>>, usize)>)> {
        let hd = Header::parse(bytes)?;
        let mut data = Vec::new();
        let starts = unstuff(&bytes[hd.scan_start..], &mut data);
        if !applies(&data, &hd) {
            return None;
        }
        let planes = |p: Vec<Plane>| p.into_iter().map(|p| p.data).collect::<Vec<_>>();
        let serial = decode_scan(&data, &starts, &hd).map(planes);
        let lanes = decode_keeping(&data, &hd, positions).map(|(p, n)| (planes(p), n));
        Some((serial, lanes))
    }

    /// Lanes that keep only their first one or few block starts: those whose first blocks
    /// are not where the true decoding meets them are dropped, and the true decoding goes
    /// on through their bits; the planes are still the serial decoder's, and on 4:2:0
    /// (whose chroma needs every block start) nothing changes.
    #[test]
    fn lanes_keeping_few_block_starts_give_the_same_planes() {
        use jpeg_encoder::SamplingFactor as S;
        for (s, seed) in [(Some(S::R_4_4_4), 1), (None, 4), (Some(S::R_4_4_4), 0), (Some(S::R_4_2_0), 2)] {
            let bytes = jpeg(1600, 1200, s, seed);
            let Some((serial, all)) = both(&bytes) else { continue };
            let serial = serial.expect("a valid JPEG");
            let (planes, spliced_all) = all.expect("lanes decode it");
            assert!(planes == serial, "{s:?}");
            let mut fewest = spliced_all;
            for keep in [1, 2, 3, 8] {
                let (planes, spliced) = both_keeping(&bytes, Some(keep)).unwrap().1.expect("lanes decode it");
                assert!(planes == serial, "{s:?}, keeping {keep}");
                fewest = fewest.min(spliced);
                if s == Some(S::R_4_2_0) {
                    assert_eq!(spliced, spliced_all, "4:2:0 keeps every block start");
                }
            }
            if s != Some(S::R_4_2_0) {
                assert!(fewest < spliced_all, "{s:?}: keeping one block start dropped no lane ({spliced_all} spliced on)");
            }
        }
        // And on corrupt scans.
        corrupt_scans_keeping(&jpeg(1600, 1200, Some(S::R_4_4_4), 5), Some(2));
    }

    #[test]
    fn levels_in_32_bits_are_dc_level() {
        let qs = [0, 1, 2, 3, 7, 8, 16, 99, 255, 256, 1000, 32767, 65535];
        let ps: Vec<i32> = (-5000..5000).chain([i32::MIN, i32::MIN + 1, -1_000_000, 1_000_000, i32::MAX - 1, i32::MAX]).collect();
        for q in qs {
            // The dispatched path (AVX2 where the CPU has it) and the plain one.
            let (mut out, mut plain) = (vec![0u8; ps.len()], vec![0u8; ps.len()]);
            levels(&ps, q, &mut out);
            levels_plain(&ps, q, &mut plain);
            for ((&p, &o), &o2) in ps.iter().zip(&out).zip(&plain) {
                assert_eq!((o, o2), (dc_level(p, q), dc_level(p, q)), "prediction {p}, quantiser {q}");
            }
        }
    }

    #[test]
    fn lanes_give_the_serial_decoders_planes() {
        use jpeg_encoder::SamplingFactor as S;
        let cases = [
            (2400, 1800, Some(S::R_4_4_4)),
            (1600, 1200, Some(S::R_4_4_4)),
            (1600, 1200, Some(S::R_4_2_0)),
            (1201, 899, Some(S::R_4_2_2)),
            (1920, 1080, None),
        ];
        let mut checked = 0;
        for (i, &(w, h, s)) in cases.iter().enumerate() {
            let bytes = jpeg(w, h, s, i as u32);
            let Some((serial, lanes)) = both(&bytes) else {
                eprintln!("skipping {w}×{h} {s:?}: the lanes do not apply here (no AVX-512?)");
                continue;
            };
            let serial = serial.expect("a valid JPEG");
            let (lanes, spliced) = lanes.unwrap_or_else(|| panic!("lanes refused {w}×{h} {s:?}"));
            assert_eq!(lanes, serial, "{w}×{h} {s:?}");
            // Most lanes met the true decoding (a lane that did not was decoded through).
            assert!(spliced >= L / 2, "{w}×{h} {s:?}: {spliced} lanes spliced on");
            if i == 0 {
                // The flat part's lanes outgrew their first record regions.
                let hd = Header::parse(&bytes).unwrap();
                let (mx, my) = hd.mcus();
                let most = BUFFERS.with_borrow(|(lanes, ..)| lanes.iter().map(Lane::len).max().unwrap_or(0));
                assert!(most > mx * my * 3 / L * 2, "{most} records in one lane");
            }
            checked += 1;
        }
        if simd::available() {
            assert_eq!(checked, cases.len());
        }
    }

    /// Flipped bytes in the scan, and cut scans: the lanes refuse exactly what the serial
    /// decoder refuses and otherwise give its planes (garbage included).
    #[test]
    fn lanes_match_the_serial_decoder_on_corrupt_scans() {
        // 4:2:0, and 4:4:4 with a flat part (blocks of a DC and an EOB, one step each).
        for (sampling, seed) in [(jpeg_encoder::SamplingFactor::R_4_2_0, 3), (jpeg_encoder::SamplingFactor::R_4_4_4, 0)] {
            corrupt_scans(&jpeg(1600, 1200, Some(sampling), seed));
        }
    }

    fn corrupt_scans(bytes: &[u8]) {
        corrupt_scans_keeping(bytes, None)
    }

    fn corrupt_scans_keeping(bytes: &[u8], positions: Option<usize>) {
        let Some(hd) = Header::parse(bytes) else { panic!("valid") };
        let scan = hd.scan_start;
        let mut state = 0x2545_F491u32;
        let (mut refused, mut decoded) = (0, 0);
        for round in 0..12 {
            let mut b = bytes.to_vec();
            if round < 9 {
                for _ in 0..1 + round {
                    state ^= state << 13;
                    state ^= state >> 17;
                    state ^= state << 5;
                    let at = scan + (state as usize % (b.len() - scan - 2));
                    b[at] = (state >> 8) as u8;
                }
            } else {
                // Cut short, keeping an EOI.
                b.truncate(scan + (b.len() - scan) * (round - 8) / 4);
                b.extend_from_slice(&[0xFF, 0xD9]);
            }
            let Some((serial, lanes)) = both_keeping(&b, positions) else { continue };
            assert_eq!(lanes.as_ref().map(|l| &l.0), serial.as_ref(), "round {round}");
            if serial.is_some() {
                decoded += 1;
            } else {
                refused += 1;
            }
        }
        if simd::available() {
            assert!(refused > 0 && decoded > 0, "refused {refused}, decoded {decoded}");
        }
    }
}
