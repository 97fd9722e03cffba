//! DC-only JPEG decoding: the 1/8-scale image of a baseline JPEG, one pixel per 8×8 block.
//!
//! A block's DC coefficient is 8× the mean of its 64 samples, so the 1/8-scale image needs
//! no inverse DCT at all, only the DC coefficients (what libjpeg's `scale_denom = 8` and
//! Pillow's `draft` compute). The AC coefficients still have to be walked, because
//! Huffman codes have no byte boundaries, but they are *skipped*: one table lookup gives a
//! symbol's code length plus its extra bits and how far it moves along the block, and
//! neither the value nor the coefficient is ever formed. That leaves about a quarter of a
//! full decoder's entropy-decoding work, and on a 12-megapixel photo it is what makes
//! decoding cheaper than the embedding it feeds (see `examples/jpeg_speed.rs`). Long 4:4:4
//! and grey scans are walked by 32 speculative lanes in AVX-512 registers where the CPU
//! has them ([`lanes`]; 1.1–1.5× faster, the same planes).
//!
//! Covered: baseline and extended sequential Huffman JPEGs with 8-bit samples, one
//! interleaved scan holding every component, grey or three components (YCbCr or RGB by
//! the rules jpeg-decoder applies), any sampling factors, restart intervals. And
//! progressive Huffman JPEGs (8-bit, grey or three components), from their DC scans
//! alone: the first DC scan and its successive-approximation refinements are decoded, the
//! AC scans only stepped over (a 12 MP progressive photo: 5 ms instead of 108 through
//! jpeg-decoder's reduced-scale path). Their subsampled chroma comes from whole-block
//! means, interpolated, not half-block ones (those need AC coefficients). Everything else
//! (arithmetic coding, 12-bit, CMYK, multi-scan sequential, a DNL height, data that ends
//! early or does not parse) returns `None` and the caller uses the general decoders,
//! which also give the authoritative error.

use image::{DynamicImage, GrayImage, RgbImage};

mod lanes;

/// Bits looked up at once. Longer codes take the slow path (rare: real tables give the
/// frequent symbols short codes).
const LOOKUP_BITS: u32 = 11;

/// Decodes the 1/8-scale image: ⌈width/8⌉ × ⌈height/8⌉ pixels, each the mean of its block
/// (chroma interpolated between block centres as libjpeg's fancy upsampling does).
#[cfg(test)]
fn decode_dc(bytes: &[u8]) -> Option<DynamicImage> {
    DcJpeg::parse(bytes)?.decode()
}

/// A JPEG whose header this module reads (baseline or progressive, Huffman coded, 8-bit,
/// grey or three components), parsed once: its frame size is known before any decoding,
/// without handing the file to another decoder (the `image` crate's copies the whole file
/// before it reads the header).
pub(crate) struct DcJpeg<'a> {
    bytes: &'a [u8],
    header: Header,
}

impl<'a> DcJpeg<'a> {
    pub(crate) fn parse(bytes: &'a [u8]) -> Option<DcJpeg<'a>> {
        Some(DcJpeg { bytes, header: Header::parse(bytes)? })
    }

    /// Width and height of the frame (full size, before EXIF orientation).
    pub(crate) fn dims(&self) -> (u32, u32) {
        (self.header.width as u32, self.header.height as u32)
    }

    /// The 1/8-scale image, as [`decode_dc`].
    pub(crate) fn decode(&self) -> Option<DynamicImage> {
        let planes = decode_planes(self.bytes, &self.header)?;
        Some(self.header.to_image(&planes))
    }
}

/// Natural (row-major) index of each zig-zag position.
const ZIGZAG: [usize; 64] = [
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20,
    13, 6, 7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59,
    52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63,
];

#[derive(Debug, Clone)]
struct Component {
    id: u8,
    h: usize,
    v: usize,
    /// Quantisers in natural order.
    quant: [i32; 64],
    /// Output samples per block across and down: 1 (the block's mean, from its DC), or 2
    /// for a component subsampled 2:1 in that direction, whose half-block means put it at
    /// the full-resolution components' 1/8 scale (libjpeg scales chroma up through its
    /// inverse DCT in the same way rather than upsampling it).
    rh: usize,
    rv: usize,
    dc: usize,
    ac: usize,
}

impl Component {
    /// Whether its blocks need coefficient values, not only the DC.
    fn sub_blocks(&self) -> bool {
        self.rh > 1 || self.rv > 1
    }
}

#[derive(Debug)]
struct Header {
    width: usize,
    height: usize,
    comps: Vec<Component>,
    restart_interval: usize,
    rgb: bool,
    dc_tables: Vec<Option<Huffman>>,
    ac_tables: Vec<Option<Huffman>>,
    /// Offset of the first byte of entropy-coded data; in a progressive JPEG, of the
    /// first scan's SOS marker.
    scan_start: usize,
    /// Progressive (SOF2): only the DC scans are read ([`decode_progressive`]).
    progressive: bool,
}

impl Header {
    fn parse(b: &[u8]) -> Option<Header> {
        if b.get(..2)? != [0xFF, 0xD8] {
            return None;
        }
        let mut quant: [Option<[i32; 64]>; 4] = [None; 4];
        let mut dc_tables: Vec<Option<Huffman>> = (0..4).map(|_| None).collect();
        let mut ac_tables: Vec<Option<Huffman>> = (0..4).map(|_| None).collect();
        let mut frame: Option<(usize, usize, Vec<(u8, usize, usize, usize)>)> = None;
        let mut restart_interval = 0;
        let mut progressive = false;
        let mut jfif = false;
        let mut adobe: Option<u8> = None;
        let mut i = 2;
        loop {
            let (at, marker) = next_marker(b, i)?;
            i = at;
            if matches!(marker, 0xD8 | 0xD9) {
                return None; // a second SOI, or EOI before any scan
            }
            let (len, seg) = segment(b, i)?;
            match marker {
                // Baseline, extended sequential and progressive, Huffman coded.
                0xC0..=0xC2 => {
                    if frame.is_some() || seg.len() < 6 || seg[0] != 8 {
                        return None;
                    }
                    progressive = marker == 0xC2;
                    let height = u16::from_be_bytes([seg[1], seg[2]]) as usize;
                    let width = u16::from_be_bytes([seg[3], seg[4]]) as usize;
                    let n = seg[5] as usize;
                    if width == 0 || height == 0 || !(n == 1 || n == 3) || seg.len() < 6 + 3 * n {
                        return None;
                    }
                    let comps = (0..n)
                        .map(|c| {
                            let s = &seg[6 + 3 * c..9 + 3 * c];
                            (
                                s[0],
                                (s[1] >> 4) as usize,
                                (s[1] & 15) as usize,
                                s[2] as usize,
                            )
                        })
                        .collect::<Vec<_>>();
                    if comps.iter().any(|&(_, h, v, t)| {
                        !(1..=4).contains(&h) || !(1..=4).contains(&v) || t > 3
                    }) {
                        return None;
                    }
                    frame = Some((width, height, comps));
                }
                // Lossless, hierarchical, arithmetic: not here.
                0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF => return None,
                0xC4 => huffman_tables(seg, &mut dc_tables, Some(&mut ac_tables))?,
                0xDB => {
                    let mut s = seg;
                    while !s.is_empty() {
                        let (precision, id) = (s[0] >> 4, (s[0] & 15) as usize);
                        let size = match precision {
                            0 => 64,
                            1 => 128,
                            _ => return None,
                        };
                        let t = s.get(1..1 + size)?;
                        if id > 3 {
                            return None;
                        }
                        let mut q = [0; 64];
                        for (k, &n) in ZIGZAG.iter().enumerate() {
                            q[n] = if precision == 0 {
                                t[k] as i32
                            } else {
                                u16::from_be_bytes([t[2 * k], t[2 * k + 1]]) as i32
                            };
                        }
                        quant[id] = Some(q);
                        s = &s[1 + size..];
                    }
                }
                0xDD => {
                    restart_interval = u16::from_be_bytes([*seg.first()?, *seg.get(1)?]) as usize
                }
                0xE0 => jfif |= seg.starts_with(b"JFIF\0"),
                0xEE => {
                    if seg.len() >= 12 && seg.starts_with(b"Adobe") {
                        adobe = Some(seg[11]);
                    }
                }
                0xDA if progressive => {
                    // Every component of the frame, at its block means (the DC scans);
                    // the scans themselves are read by `decode_progressive`.
                    let (width, height, fc) = frame?;
                    let mut comps = Vec::with_capacity(fc.len());
                    for &(id, h, v, tq) in &fc {
                        if fc.iter().filter(|c| c.0 == id).count() > 1 {
                            return None;
                        }
                        let quant = quant[tq]?;
                        comps.push(Component { id, h, v, quant, rh: 1, rv: 1, dc: 0, ac: 0 });
                    }
                    if comps.len() == 1 {
                        comps[0].h = 1;
                        comps[0].v = 1;
                    }
                    let rgb = rgb_ids(&comps, jfif, adobe)?;
                    return Some(Header {
                        width,
                        height,
                        comps,
                        restart_interval,
                        rgb,
                        dc_tables,
                        ac_tables,
                        scan_start: i,
                        progressive,
                    });
                }
                0xDA => {
                    let (width, height, fc) = frame?;
                    let ns = *seg.first()? as usize;
                    // One scan with every component, in frame order, covering all 64
                    // coefficients without successive approximation.
                    if ns != fc.len() || seg.len() < 1 + 2 * ns + 3 {
                        return None;
                    }
                    let (ss, se, a) = (seg[1 + 2 * ns], seg[2 + 2 * ns], seg[3 + 2 * ns]);
                    if ss != 0 || se != 63 || a != 0 {
                        return None;
                    }
                    let mut comps = Vec::with_capacity(ns);
                    for (c, &(id, h, v, tq)) in fc.iter().enumerate() {
                        let (sid, t) = (seg[1 + 2 * c], seg[2 + 2 * c]);
                        let (dc, ac) = ((t >> 4) as usize, (t & 15) as usize);
                        if sid != id || dc > 3 || ac > 3 {
                            return None;
                        }
                        dc_tables[dc].as_ref()?;
                        ac_tables[ac].as_ref()?;
                        let quant = quant[tq]?;
                        comps.push(Component {
                            id,
                            h,
                            v,
                            quant,
                            rh: 1,
                            rv: 1,
                            dc,
                            ac,
                        });
                    }
                    if comps.len() == 1 {
                        // A lone component's scan is not interleaved: one block per MCU.
                        comps[0].h = 1;
                        comps[0].v = 1;
                    }
                    let hmax = comps.iter().map(|c| c.h).max()?;
                    let vmax = comps.iter().map(|c| c.v).max()?;
                    for c in &mut comps {
                        // Other ratios (4:1:1's 4, a 3) interpolate between block means.
                        c.rh = if hmax == 2 * c.h { 2 } else { 1 };
                        c.rv = if vmax == 2 * c.v { 2 } else { 1 };
                    }
                    let rgb = rgb_ids(&comps, jfif, adobe)?;
                    return Some(Header {
                        width,
                        height,
                        comps,
                        restart_interval,
                        rgb,
                        dc_tables,
                        ac_tables,
                        scan_start: i + 2 + len,
                        progressive,
                    });
                }
                _ => {}
            }
            i += 2 + len;
        }
    }

    /// A component's blocks across and down that hold image data: the blocks of a scan
    /// with it alone (MCU padding excluded).
    fn blocks(&self, c: &Component) -> (usize, usize) {
        (
            (self.width * c.h).div_ceil(self.hmax()).div_ceil(8),
            (self.height * c.v).div_ceil(self.vmax()).div_ceil(8),
        )
    }

    fn hmax(&self) -> usize {
        self.comps.iter().map(|c| c.h).max().unwrap_or(1)
    }

    fn vmax(&self) -> usize {
        self.comps.iter().map(|c| c.v).max().unwrap_or(1)
    }

    /// MCUs across and down.
    fn mcus(&self) -> (usize, usize) {
        (
            self.width.div_ceil(8 * self.hmax()),
            self.height.div_ceil(8 * self.vmax()),
        )
    }

    /// A component's output samples that hold image data (not MCU padding), across and
    /// down.
    fn samples(&self, c: &Component) -> (usize, usize) {
        (
            (self.width * c.h * c.rh).div_ceil(self.hmax()).div_ceil(8),
            (self.height * c.v * c.rv).div_ceil(self.vmax()).div_ceil(8),
        )
    }

    /// Zeroed planes for every component, MCU padding included.
    fn new_planes(&self) -> Vec<Plane> {
        let (mx, my) = self.mcus();
        self.comps
            .iter()
            .map(|c| {
                let (w, h) = self.samples(c);
                let stride = mx * c.h * c.rh;
                Plane {
                    data: vec![0; stride * my * c.v * c.rv],
                    stride,
                    w,
                    h,
                }
            })
            .collect()
    }

    fn to_image(&self, planes: &[Plane]) -> DynamicImage {
        let (ow, oh) = (self.width.div_ceil(8), self.height.div_ceil(8));
        if planes.len() == 1 {
            let p = &planes[0];
            let mut out = Vec::with_capacity(ow * oh);
            for y in 0..oh {
                out.extend_from_slice(&p.data[y * p.stride..y * p.stride + ow]);
            }
            return DynamicImage::ImageLuma8(
                GrayImage::from_raw(ow as u32, oh as u32, out).expect("size"),
            );
        }
        let (hmax, vmax) = (self.hmax(), self.vmax());
        let taps: Vec<Option<(Vec<Tap>, Vec<Tap>)>> = self
            .comps
            .iter()
            .zip(planes)
            .map(|(c, p)| {
                let (fh, fv) = (c.h * c.rh, c.v * c.rv);
                (fh != hmax || fv != vmax)
                    .then(|| (taps(ow, fh, hmax, p.w), taps(oh, fv, vmax, p.h)))
            })
            .collect();
        let mut scratch = vec![vec![0u8; ow]; 3];
        let mut out = vec![0u8; ow * oh * 3];
        for y in 0..oh {
            let mut rows: [&[u8]; 3] = [&[]; 3];
            for (c, (p, scratch)) in planes.iter().zip(scratch.iter_mut()).enumerate() {
                rows[c] = match &taps[c] {
                    // At full 1/8 resolution already (4:4:4, and 4:2:0 or 4:2:2 chroma
                    // through their half-block means).
                    None => &p.data[y * p.stride..y * p.stride + ow],
                    Some((tx, ty)) => {
                        let t = ty[y];
                        let r0 = &p.data[t.i0 * p.stride..];
                        let r1 = &p.data[t.i1 * p.stride..];
                        for (o, s) in scratch.iter_mut().zip(tx) {
                            let a = r0[s.i0] as f32 * s.w0 + r0[s.i1] as f32 * (1.0 - s.w0);
                            let b = r1[s.i0] as f32 * s.w0 + r1[s.i1] as f32 * (1.0 - s.w0);
                            *o = (a * t.w0 + b * (1.0 - t.w0) + 0.5) as u8;
                        }
                        scratch
                    }
                };
            }
            let line = &mut out[y * ow * 3..(y + 1) * ow * 3];
            if self.rgb {
                let pixels = line
                    .chunks_exact_mut(3)
                    .zip(rows[0].iter().zip(rows[1]).zip(rows[2]));
                for (px, ((&r, &g), &b)) in pixels {
                    px.copy_from_slice(&[r, g, b]);
                }
            } else {
                ycbcr_row(rows, line);
            }
        }
        DynamicImage::ImageRgb8(RgbImage::from_raw(ow as u32, oh as u32, out).expect("size"))
    }
}

/// Whether three components are RGB rather than YCbCr, by jpeg-decoder's rules (their
/// ids, a JFIF marker, Adobe's transform flag); `None` for the big-gamut variants.
fn rgb_ids(comps: &[Component], jfif: bool, adobe: Option<u8>) -> Option<bool> {
    if comps.len() != 3 {
        return Some(false);
    }
    Some(match [comps[0].id, comps[1].id, comps[2].id] {
        [1, 2, 3] => false,
        [82, 71, 66] => true,
        [1, 34, 35] | [114, 103, 98] => return None, // big-gamut variants
        _ if jfif => false,
        _ => adobe == Some(0),
    })
}

/// [`ycbcr_to_rgb`] of a row: Y, Cb and Cr samples in, RGB pixels out.
fn ycbcr_row(rows: [&[u8]; 3], out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2 (checked just above).
        unsafe { ycbcr_row_avx2(rows, out) };
        return;
    }
    ycbcr_row_plain(rows, out);
}

/// The same loop, compiled for AVX2 (which vectorises its arithmetic).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn ycbcr_row_avx2(rows: [&[u8]; 3], out: &mut [u8]) {
    ycbcr_row_plain(rows, out)
}

#[inline(always)]
fn ycbcr_row_plain([y, cb, cr]: [&[u8]; 3], out: &mut [u8]) {
    for (px, ((&y, &cb), &cr)) in out.chunks_exact_mut(3).zip(y.iter().zip(cb).zip(cr)) {
        px.copy_from_slice(&ycbcr_to_rgb(y, cb, cr));
    }
}

/// JFIF's YCbCr → RGB in libjpeg's 16-bit fixed point and rounding.
#[inline(always)]
fn ycbcr_to_rgb(y: u8, cb: u8, cr: u8) -> [u8; 3] {
    const HALF: i32 = 1 << 15;
    let (y, cb, cr) = (y as i32, cb as i32 - 128, cr as i32 - 128);
    let r = y + ((91_881 * cr + HALF) >> 16);
    let g = y + ((-22_554 * cb - 46_802 * cr + HALF) >> 16);
    let b = y + ((116_130 * cb + HALF) >> 16);
    [
        r.clamp(0, 255) as u8,
        g.clamp(0, 255) as u8,
        b.clamp(0, 255) as u8,
    ]
}

/// One output coordinate's two source samples and the first one's weight.
#[derive(Debug, Clone, Copy)]
struct Tap {
    i0: usize,
    i1: usize,
    w0: f32,
}

/// Linear interpolation between the centres of a component's blocks: output pixel `x`
/// (a full-resolution block) sits at `(x + ½)·f/fmax − ½` in the component's block grid.
/// For 2:1 this gives libjpeg's "fancy" ¾–¼ weights; for 1:1 the block itself.
fn taps(n: usize, f: usize, fmax: usize, len: usize) -> Vec<Tap> {
    (0..n)
        .map(|x| {
            if f == fmax {
                let i = x.min(len - 1);
                return Tap {
                    i0: i,
                    i1: i,
                    w0: 1.0,
                };
            }
            let pos = ((x as f32 + 0.5) * f as f32 / fmax as f32 - 0.5).max(0.0);
            let i0 = (pos.floor() as usize).min(len - 1);
            let i1 = (i0 + 1).min(len - 1);
            Tap {
                i0,
                i1,
                w0: 1.0 - (pos - i0 as f32).clamp(0.0, 1.0),
            }
        })
        .collect()
}

/// A component's 1/8-scale samples: `rh`×`rv` per block, MCU padding included.
struct Plane {
    data: Vec<u8>,
    stride: usize,
    /// Samples holding image data, across and down.
    w: usize,
    h: usize,
}

/// The entropy-coded data with byte stuffing removed, and where each restart interval
/// starts in it.
fn unstuff(b: &[u8], out: &mut Vec<u8>) -> Vec<usize> {
    #[cfg(target_arch = "x86_64")]
    if vbmi2() {
        // SAFETY: the CPU has AVX-512 F, BW and VBMI2 (checked just above).
        return unstuff_with(b, out, |b, i, out| unsafe { copy_stuffed_vbmi2(b, i, out) });
    }
    unstuff_with(b, out, copy_run)
}

/// Whether the AVX-512 VBMI2 unstuffing runs: [`avx512`], and the CPU has VBMI2.
#[cfg(target_arch = "x86_64")]
fn vbmi2() -> bool {
    avx512() && std::arch::is_x86_feature_detected!("avx512vbmi2")
}

/// [`copy_run`] that also takes the stuffed zeros out on the way: 64 bytes a step, the
/// 0x00 after each 0xFF dropped by a byte compress, until a 0xFF that is not followed by
/// 0x00 (a marker or a fill byte) or the last 64 bytes, where [`copy_run`] goes on. So it
/// returns at a 0xFF (or the end) like [`copy_run`], having appended `b[i..j]` unstuffed;
/// scans have a 0xFF every 256 bytes or so, which [`copy_run`] returns at each time. On a
/// 2-core Intel Xeon, unstuffing the clip bench's 2 MB scans took 10% fewer samples when
/// the file was cold in cache (its loads wait on memory either way), and `decode_bytes`
/// ran 2–3% faster on files just read.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi2")]
unsafe fn copy_stuffed_vbmi2(b: &[u8], mut i: usize, out: &mut Vec<u8>) -> usize {
    use std::arch::x86_64::*;
    out.reserve(b.len() - i + 64);
    let ff = _mm512_set1_epi8(-1);
    let zero = _mm512_setzero_si512();
    // Each step reads b[i..i + 65] (the byte after the 64th too).
    while i + 65 <= b.len() {
        // SAFETY: b[i..i + 65] is in `b`.
        let v = _mm512_loadu_si512(b.as_ptr().add(i) as *const _);
        let at_ff = _mm512_cmpeq_epi8_mask(v, ff);
        let dst = out.as_mut_ptr().add(out.len());
        if at_ff == 0 {
            // SAFETY: out holds its length plus b.len() − i + 64 ≥ 64 more bytes (its
            // length grows by at most what `i` does).
            _mm512_storeu_si512(dst as *mut _, v);
            out.set_len(out.len() + 64);
            i += 64;
            continue;
        }
        let after = _mm512_loadu_si512(b.as_ptr().add(i + 1) as *const _);
        let stuffed = at_ff & _mm512_cmpeq_epi8_mask(after, zero);
        let other = at_ff & !stuffed;
        // Bytes up to the first 0xFF that is not stuffed, less the stuffed zeros.
        let (upto, last) = if other != 0 { (other.trailing_zeros() as usize, 0) } else { (64, stuffed >> 63) };
        let within = if upto == 64 { u64::MAX } else { (1u64 << upto) - 1 };
        let keep = within & !(stuffed << 1);
        // SAFETY: as above (at most 64 bytes stored, `keep`'s count kept).
        _mm512_storeu_si512(dst as *mut _, _mm512_maskz_compress_epi8(keep, v));
        out.set_len(out.len() + keep.count_ones() as usize);
        if upto < 64 {
            return i + upto;
        }
        // A 0xFF last: its zero is the next step's first byte.
        i += 64 + last as usize;
    }
    copy_run(b, i, out)
}

/// [`unstuff`] with `copy` for the runs between 0xFF bytes.
fn unstuff_with(b: &[u8], out: &mut Vec<u8>, copy: impl Fn(&[u8], usize, &mut Vec<u8>) -> usize) -> Vec<usize> {
    out.clear();
    out.reserve(b.len() + 8);
    let mut starts = vec![0];
    let mut i = 0;
    loop {
        let j = copy(b, i, out);
        if j + 1 >= b.len() {
            break; // ran out without a marker: cut short
        }
        match b[j + 1] {
            0x00 => {
                out.push(0xFF);
                i = j + 2;
            }
            0xFF => i = j + 1, // fill byte before a marker
            0xD0..=0xD7 => {
                starts.push(out.len());
                i = j + 2;
            }
            _ => break, // EOI or another marker ends the scan
        }
    }
    out.extend_from_slice(&[0; 8]);
    starts
}

/// Appends `b[i..j]` to `out`, `j` being where the next 0xFF is (or the end), and
/// returns `j`.
fn copy_run(b: &[u8], i: usize, out: &mut Vec<u8>) -> usize {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { copy_run_avx2(b, i, out) };
    }
    copy_run_plain(b, i, out)
}

/// The highest SIMD level `MAGPIE_CPU_ISA` leaves the decoder (read once): 0 for
/// `scalar`, 1 for `avx2` (the AVX2 run copies), 2 otherwise (the AVX-512 lanes too, where
/// the CPU has them). The models' kernels take their level from the same variable.
fn simd_cap() -> u8 {
    static CAP: std::sync::OnceLock<u8> = std::sync::OnceLock::new();
    *CAP.get_or_init(|| match std::env::var("MAGPIE_CPU_ISA").map(|v| v.trim().to_ascii_lowercase()).as_deref() {
        Ok("scalar") => 0,
        Ok("avx2") => 1,
        _ => 2,
    })
}

/// Whether the decoder's AVX2 paths run: the CPU has AVX2 and `MAGPIE_CPU_ISA` allows it.
#[cfg(target_arch = "x86_64")]
fn avx2() -> bool {
    simd_cap() >= 1 && std::arch::is_x86_feature_detected!("avx2")
}

/// Whether the decoder's AVX-512 paths run (the lanes, and with VBMI2 the unstuffing): the
/// CPU has AVX-512 F and BW and `MAGPIE_CPU_ISA` allows them.
#[cfg(target_arch = "x86_64")]
fn avx512() -> bool {
    simd_cap() >= 2 && std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bw")
}

/// [`copy_run`] without SIMD: eight bytes at a time while none is 0xFF.
fn copy_run_plain(b: &[u8], i: usize, out: &mut Vec<u8>) -> usize {
    let mut j = i;
    while j + 8 <= b.len() {
        let w = u64::from_le_bytes(b[j..j + 8].try_into().expect("8 bytes"));
        let inv = !w;
        if (inv.wrapping_sub(0x0101_0101_0101_0101) & !inv & 0x8080_8080_8080_8080) != 0 {
            break;
        }
        j += 8;
    }
    while j < b.len() && b[j] != 0xFF {
        j += 1;
    }
    out.extend_from_slice(&b[i..j]);
    j
}

/// [`copy_run`], 32 bytes a step: each step's bytes are stored whole past the end of `out`
/// (within its capacity) before looking for a 0xFF among them, and `out`'s length then
/// takes only those before it. A scan has a 0xFF about every 256 bytes, so this is most of
/// unstuffing; with a copy per run and 8-byte steps, decoding a 2–3 MB 12 MP JPEG at
/// CLIP's scale took 0.2–0.4 ms longer on a Zen 5.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn copy_run_avx2(b: &[u8], mut i: usize, out: &mut Vec<u8>) -> usize {
    use std::arch::x86_64::*;
    let start = i;
    out.reserve(b.len() - i + 32);
    let dst = out.as_mut_ptr().add(out.len());
    let ff = _mm256_set1_epi8(-1);
    let mut j = b.len();
    while i + 32 <= b.len() {
        // SAFETY: b[i..i + 32] is in `b`; out's capacity holds its length plus
        // b.len() − start + 32 ≥ i − start + 32 bytes, so the store stays inside it.
        let v = _mm256_loadu_si256(b.as_ptr().add(i) as *const __m256i);
        _mm256_storeu_si256(dst.add(i - start) as *mut __m256i, v);
        let m = _mm256_movemask_epi8(_mm256_cmpeq_epi8(v, ff)) as u32;
        if m != 0 {
            j = i + m.trailing_zeros() as usize;
            break;
        }
        i += 32;
    }
    if j == b.len() {
        j = i + b[i..].iter().position(|&x| x == 0xFF).unwrap_or(b.len() - i);
        // SAFETY: as above, i − start + (j − i) ≤ b.len() − start bytes.
        std::ptr::copy_nonoverlapping(b.as_ptr().add(i), dst.add(i - start), j - i);
    }
    // SAFETY: the first j − start bytes past the old length were written: b[start..j].
    out.set_len(out.len() + j - start);
    j
}

thread_local! {
    /// The unstuffed scan, kept between images: a fresh multi-megabyte buffer per photo
    /// costs more in page faults than copying into it.
    static SCAN: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Each output sample's weight on each coefficient of its block, quantiser included:
/// `w[n][j]` for natural index `n` and sample `j = row·rh + column`. A sample is the mean
/// of the `8/r × 8/r` pixels it covers; the inverse DCT `f(x,y) = Σ C(u)C(v)/4 ·
/// F(v,u) cos((2x+1)uπ/16) cos((2y+1)vπ/16)` averaged over them leaves only the DC and
/// odd frequencies.
fn sample_weights(c: &Component) -> Vec<[f32; 4]> {
    let axis = |r: usize, a: usize, u: usize| -> f64 {
        let cu = if u == 0 {
            std::f64::consts::FRAC_1_SQRT_2
        } else {
            1.0
        };
        let span = 8 / r;
        let mean = (a * span..(a + 1) * span)
            .map(|x| ((2 * x + 1) as f64 * u as f64 * std::f64::consts::PI / 16.0).cos())
            .sum::<f64>()
            / span as f64;
        cu / 2.0 * mean
    };
    (0..64)
        .map(|n| {
            let (v, u) = (n / 8, n % 8);
            let mut w = [0f32; 4];
            for b in 0..c.rv {
                for a in 0..c.rh {
                    w[b * c.rh + a] =
                        (c.quant[n] as f64 * axis(c.rh, a, u) * axis(c.rv, b, v)) as f32;
                }
            }
            w
        })
        .collect()
}

fn decode_planes(bytes: &[u8], hd: &Header) -> Option<Vec<Plane>> {
    if hd.progressive {
        return decode_progressive(bytes, hd);
    }
    SCAN.with_borrow_mut(|data| {
        let starts = unstuff(&bytes[hd.scan_start..], data);
        if lanes::applies(data, hd) {
            lanes::decode(data, hd)
        } else {
            decode_scan(data, &starts, hd)
        }
    })
}

/// The next marker at or after `i` (fill bytes and standalone markers skipped): the
/// offset of its 0xFF and its code.
pub(crate) fn next_marker(b: &[u8], mut i: usize) -> Option<(usize, u8)> {
    loop {
        if *b.get(i)? != 0xFF {
            return None;
        }
        while *b.get(i + 1)? == 0xFF {
            i += 1;
        }
        let marker = *b.get(i + 1)?;
        if !matches!(marker, 0x01 | 0xD0..=0xD7) {
            return Some((i, marker));
        }
        i += 2;
    }
}

/// The length field and payload of the marker segment at `i`.
pub(crate) fn segment(b: &[u8], i: usize) -> Option<(usize, &[u8])> {
    let len = u16::from_be_bytes([*b.get(i + 2)?, *b.get(i + 3)?]) as usize;
    if len < 2 {
        return None;
    }
    Some((len, b.get(i + 4..i + 2 + len)?))
}

/// A DHT segment's tables into `dc` and, if given, `ac` (a progressive file's DC scans
/// need only the DC ones).
fn huffman_tables(seg: &[u8], dc: &mut [Option<Huffman>], mut ac: Option<&mut [Option<Huffman>]>) -> Option<()> {
    let mut s = seg;
    while !s.is_empty() {
        let (class, id) = (s[0] >> 4, (s[0] & 15) as usize);
        let counts: [u8; 16] = s.get(1..17)?.try_into().ok()?;
        let total: usize = counts.iter().map(|&c| c as usize).sum();
        let symbols = s.get(17..17 + total)?;
        if id > 3 || class > 1 {
            return None;
        }
        match (class, ac.as_deref_mut()) {
            (0, _) => dc[id] = Some(Huffman::new(&counts, symbols, false)?),
            (_, Some(ac)) => ac[id] = Some(Huffman::new(&counts, symbols, true)?),
            _ => {}
        }
        s = &s[17 + total..];
    }
    Some(())
}

/// A block's mean sample from its DC coefficient: libjpeg's 1×1 inverse DCT,
/// (DC·q + 4) >> 3, level-shifted.
fn dc_level(dc: i32, q: i32) -> u8 {
    (((dc as i64 * q as i64 + 4) >> 3) + 128).clamp(0, 255) as u8
}

/// Where the entropy-coded data at the start of `b` ends: the offset of the 0xFF that
/// begins the next marker other than a restart (stuffed 0xFF00 and fill bytes skipped).
/// `None` if no marker follows (data cut short).
fn scan_end(b: &[u8]) -> Option<usize> {
    let mut i = 0;
    loop {
        i += b.get(i..)?.iter().position(|&x| x == 0xFF)?;
        match *b.get(i + 1)? {
            0x00 | 0xD0..=0xD7 => i += 2,
            0xFF => i += 1,
            _ => return Some(i),
        }
    }
}

/// A progressive JPEG's 1/8-scale planes from its DC scans alone: the first scan of each
/// component (DC differences, Huffman coded, shifted left by Al) and its refinement
/// scans (one bit per block each); the AC scans, most of the file, are skipped over
/// without decoding. Every component reaches full DC precision, or `None` (the caller
/// then uses the general decoders). Subsampled components give their block means, which
/// `to_image` interpolates as it does 4:1:1 (there are no AC coefficients for half-block
/// means). The file must end with an EOI after well-formed scans.
fn decode_progressive(bytes: &[u8], hd: &Header) -> Option<Vec<Plane>> {
    let (mx, my) = hd.mcus();
    let grids: Vec<(usize, usize)> = hd.comps.iter().map(|c| (mx * c.h, my * c.v)).collect();
    let mut coef: Vec<Vec<i32>> = grids.iter().map(|&(w, h)| vec![0; w * h]).collect();
    // Each component's DC precision so far (the last scan's Al), None before its first.
    let mut al: Vec<Option<u8>> = vec![None; hd.comps.len()];
    // Tables and restart intervals may change between scans: walk them in file order
    // from the first scan, with the tables the header read before it.
    let mut dc_tables = hd.dc_tables.clone();
    let mut restart_interval = hd.restart_interval;
    let b = bytes;
    let mut i = hd.scan_start;
    loop {
        let (at, marker) = next_marker(b, i)?;
        i = at;
        match marker {
            0xD9 => break,
            0xD8 | 0xDC | 0xC0..=0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF => return None,
            _ => {}
        }
        let (len, seg) = segment(b, i)?;
        match marker {
            0xC4 => huffman_tables(seg, &mut dc_tables, None)?,
            0xDD => restart_interval = u16::from_be_bytes([*seg.first()?, *seg.get(1)?]) as usize,
            0xDA => {
                let ns = *seg.first()? as usize;
                if ns == 0 || ns > hd.comps.len() || seg.len() < 1 + 2 * ns + 3 {
                    return None;
                }
                let mut members = Vec::with_capacity(ns);
                for k in 0..ns {
                    let (sid, t) = (seg[1 + 2 * k], seg[2 + 2 * k]);
                    let c = hd.comps.iter().position(|c| c.id == sid)?;
                    if members.iter().any(|&(m, _)| m == c) {
                        return None;
                    }
                    members.push((c, (t >> 4) as usize));
                }
                let (ss, se, a) = (seg[1 + 2 * ns], seg[2 + 2 * ns], seg[3 + 2 * ns]);
                let (ah, a_l) = (a >> 4, a & 15);
                let data = i + 2 + len;
                let end = data + scan_end(b.get(data..)?)?;
                if ss == 0 {
                    if se != 0 || a_l > 13 {
                        return None;
                    }
                    for &(c, t) in &members {
                        // A first scan once; each refinement one bit below the last.
                        let ok = match (ah, al[c]) {
                            (0, None) => dc_tables.get(t)?.is_some(),
                            (ah, Some(prev)) => ah == prev && a_l + 1 == ah,
                            _ => false,
                        };
                        if !ok {
                            return None;
                        }
                        al[c] = Some(a_l);
                    }
                    SCAN.with_borrow_mut(|buf| {
                        let starts = unstuff(&b[data..end], buf);
                        dc_scan(buf, &starts, hd, &members, &dc_tables, restart_interval, ah, a_l, &grids, &mut coef)
                    })?;
                } else if se < ss || se > 63 || ns != 1 {
                    return None; // AC scans hold one component and a band of 1..=63
                }
                i = end;
                continue;
            }
            _ => {}
        }
        i += 2 + len;
    }
    if al.iter().any(|a| *a != Some(0)) {
        return None;
    }
    Some(
        hd.comps
            .iter()
            .zip(coef)
            .zip(&grids)
            .map(|((c, coef), &(gw, _))| {
                let (w, h) = hd.samples(c);
                let q = c.quant[0];
                Plane {
                    data: coef.iter().map(|&d| dc_level(d, q)).collect(),
                    stride: gw,
                    w,
                    h,
                }
            })
            .collect(),
    )
}

/// One DC scan of a progressive JPEG into `coef` (per component, its block grid):
/// interleaved in MCU order when it holds several components, else the component's own
/// blocks in raster order; `ah == 0` a first scan (differences shifted left by `al`),
/// else a refinement (one bit per block at `al`).
#[allow(clippy::too_many_arguments)]
fn dc_scan(
    data: &[u8],
    starts: &[usize],
    hd: &Header,
    members: &[(usize, usize)],
    tables: &[Option<Huffman>],
    restart_interval: usize,
    ah: u8,
    al: u8,
    grids: &[(usize, usize)],
    coef: &mut [Vec<i32>],
) -> Option<()> {
    let data_len = data.len() - 8;
    // Units: MCUs when interleaved, else blocks of the one component.
    let (uw, uh) = if members.len() > 1 { hd.mcus() } else { hd.blocks(&hd.comps[members[0].0]) };
    let total = uw * uh;
    let interval = if restart_interval == 0 { total } else { restart_interval };
    let (mut u, mut seg) = (0, 0);
    while u < total {
        let start = *starts.get(seg)?;
        let end = starts.get(seg + 1).copied().unwrap_or(data_len);
        let mut r = BitReader::new(data, start);
        let mut pred = [0i32; 4];
        for u in u..(u + interval).min(total) {
            let (ux, uy) = (u % uw, u / uw);
            for (k, &(c, t)) in members.iter().enumerate() {
                let comp = &hd.comps[c];
                let (n_h, n_v) = if members.len() > 1 { (comp.h, comp.v) } else { (1, 1) };
                let gw = grids[c].0;
                for v in 0..n_v {
                    for h in 0..n_h {
                        let idx = (uy * n_v + v) * gw + ux * n_h + h;
                        let x = coef[c].get_mut(idx)?;
                        if ah == 0 {
                            pred[k] = pred[k].wrapping_add(r.dc_diff(tables[t].as_ref()?)?);
                            *x = pred[k].wrapping_shl(al as u32);
                        } else {
                            *x |= r.bit() << al;
                        }
                    }
                }
            }
        }
        if r.consumed_bits() > end * 8 {
            return None;
        }
        u += interval;
        seg += 1;
    }
    Some(())
}

fn decode_scan(data: &[u8], starts: &[usize], hd: &Header) -> Option<Vec<Plane>> {
    let data_len = data.len() - 8;
    let (mx, my) = hd.mcus();
    let mut planes = hd.new_planes();
    let dc: Vec<&Huffman> = hd
        .comps
        .iter()
        .map(|c| hd.dc_tables[c.dc].as_ref().expect("checked at parse"))
        .collect();
    let ac: Vec<&Huffman> = hd
        .comps
        .iter()
        .map(|c| hd.ac_tables[c.ac].as_ref().expect("checked at parse"))
        .collect();
    let weights: Vec<Vec<[f32; 4]>> = hd.comps.iter().map(sample_weights).collect();
    let total = mx * my;
    let interval = if hd.restart_interval == 0 {
        total
    } else {
        hd.restart_interval
    };
    let mut seg = 0;
    let mut m = 0;
    while m < total {
        let start = *starts.get(seg)?;
        let end = starts.get(seg + 1).copied().unwrap_or(data_len);
        let mut r = BitReader::new(data, start);
        let mut pred = [0i32; 3];
        for m in m..(m + interval).min(total) {
            let (bx, by) = (m % mx, m / mx);
            for (c, comp) in hd.comps.iter().enumerate() {
                for v in 0..comp.v {
                    for h in 0..comp.h {
                        // Wrapping: corrupt data may drift; the clamps bound it.
                        pred[c] = pred[c].wrapping_add(r.dc_diff(dc[c])?);
                        let means = if comp.sub_blocks() {
                            Some(r.sample_means(ac[c], pred[c], &weights[c])?)
                        } else {
                            r.skip_ac(ac[c])?;
                            None
                        };
                        put_block(&mut planes[c], comp, (bx, by), (h, v), pred[c], means);
                    }
                }
            }
        }
        // Reading past the interval's end means its data is missing or corrupt.
        if r.consumed_bits() > end * 8 {
            return None;
        }
        m += interval;
        seg += 1;
    }
    Some(planes)
}

/// Writes block `(h, v)` of MCU `(bx, by)` of `comp` into its plane: the block's mean
/// from its DC (`pred`), or its sample means (components with sub-block samples).
#[inline(always)]
fn put_block(p: &mut Plane, comp: &Component, (bx, by): (usize, usize), (h, v): (usize, usize), pred: i32, means: Option<[f32; 4]>) {
    let row = (by * comp.v + v) * comp.rv * p.stride + bx * comp.h * comp.rh;
    let Some(means) = means else {
        p.data[row + h] = dc_level(pred, comp.quant[0]);
        return;
    };
    for b in 0..comp.rv {
        for a in 0..comp.rh {
            let s = means[b * comp.rh + a] + 128.5;
            p.data[row + b * p.stride + h * comp.rh + a] = s.clamp(0.0, 255.0) as u8;
        }
    }
}

/// MSB-first bit reader over unstuffed data padded with 8 zero bytes: the top `bits` bits
/// of `buf` are the next ones in the stream, and the bits below them already hold what
/// follows (the next refill ORs in the same values). Refilling is branch-free and leaves
/// ≥ 56 bits: enough for one symbol of any length (≤ 16 code bits + ≤ 15 extra bits) or
/// for two lookups of the skip table (≤ 26 bits each).
struct BitReader<'a> {
    data: &'a [u8],
    pos: usize,
    buf: u64,
    bits: u32,
}

impl<'a> BitReader<'a> {
    fn new(data: &'a [u8], pos: usize) -> Self {
        let mut r = BitReader {
            data,
            pos,
            buf: 0,
            bits: 0,
        };
        r.refill();
        r
    }

    #[inline(always)]
    fn refill(&mut self) {
        let next = match self.data.get(self.pos..self.pos + 8) {
            Some(w) => u64::from_be_bytes(w.try_into().expect("a slice of 8 bytes")),
            None => 0, // past the padding: only corrupt data gets here, caught by the caller
        };
        self.buf |= next >> self.bits;
        self.pos += ((63 - self.bits) >> 3) as usize;
        self.bits |= 56;
    }

    fn consumed_bits(&self) -> usize {
        self.pos * 8 - self.bits as usize
    }

    #[inline(always)]
    fn consume(&mut self, n: u32) {
        self.buf <<= n;
        self.bits -= n;
    }

    /// `size` bits as a coefficient ([`coefficient`]).
    #[inline(always)]
    fn value(&mut self, size: u32) -> i32 {
        let v = coefficient(self.buf, size);
        self.consume(size);
        v
    }

    /// One bit (a DC refinement).
    #[inline(always)]
    fn bit(&mut self) -> i32 {
        self.refill();
        let b = (self.buf >> 63) as i32;
        self.consume(1);
        b
    }

    /// A DC difference: a code for its size, then that many bits.
    #[inline(always)]
    fn dc_diff(&mut self, t: &Huffman) -> Option<i32> {
        self.refill();
        let (len, sym) = t.decode(self.buf)?;
        self.consume(len);
        Some(self.value(sym as u32 & 15))
    }

    /// Walks a block's 63 AC coefficients without forming them, one or two symbols per
    /// lookup.
    #[inline(always)]
    fn skip_ac(&mut self, t: &Huffman) -> Option<()> {
        let mut k = 1u32;
        loop {
            self.refill();
            for _ in 0..2 {
                let e = t.skip[(self.buf >> (64 - LOOKUP_BITS)) as usize];
                if e == 0 {
                    self.refill();
                    let (len, sym) = t.decode_slow(self.buf)?;
                    let (extra, adv) = ac_step(sym);
                    self.consume(len + extra);
                    k += adv;
                    if k >= 64 {
                        return Some(());
                    }
                    break;
                }
                if k + (e >> 18) >= 64 {
                    self.consume((e >> 13) & 31); // the block ends with the first symbol
                    return Some(());
                }
                // The low 6 bits alone: a 64-bit shift takes its count mod 64, so the
                // shift that this lookup's successor waits for is the load's next step.
                self.consume(e & 63);
                k += (e >> 6) & 127;
                if k >= 64 {
                    return Some(());
                }
            }
        }
    }

    /// Decodes a block's AC coefficients (its DC value is `dc`) into the means of the
    /// samples `w` defines.
    fn sample_means(&mut self, t: &Huffman, dc: i32, w: &[[f32; 4]]) -> Option<[f32; 4]> {
        let mut out = w[0].map(|x| x * dc as f32);
        let mut k = 1usize;
        while k < 64 {
            self.refill();
            let (len, sym) = t.decode(self.buf)?;
            self.consume(len);
            let (r, size) = ((sym >> 4) as usize, (sym & 15) as u32);
            if size == 0 {
                if r != 15 {
                    break; // EOB
                }
                k += 16;
                continue;
            }
            k += r;
            let v = self.value(size) as f32;
            if let Some(&n) = ZIGZAG.get(k) {
                for (o, x) in out.iter_mut().zip(w[n]) {
                    *o += v * x;
                }
            }
            k += 1;
        }
        Some(out)
    }
}

/// The `size` (≤ 15) bits at the top of `buf` as a coefficient: values below
/// 2^(size−1) are negative, v − (2^size − 1). Branch-free, and 0 for size 0.
#[inline(always)]
fn coefficient(buf: u64, size: u32) -> i32 {
    let v = ((buf >> 1) >> (63 - size)) as i32;
    let negative = (v - ((1 << size) >> 1)) >> 31; // all ones when v < 2^(size−1)
    v + (negative & (1 - (1 << size)))
}

/// An AC symbol's extra bits and how far it moves along the block: `r/s` with `s > 0` is
/// `r` zeros then one coefficient of `s` bits; `15/0` (ZRL) sixteen zeros; any other `r/0`
/// ends the block (EOB), as libjpeg reads it.
fn ac_step(sym: u8) -> (u32, u32) {
    let (r, s) = ((sym >> 4) as u32, (sym & 15) as u32);
    match (r, s) {
        (_, s) if s > 0 => (s, r + 1),
        (15, 0) => (0, 16),
        _ => (0, 64),
    }
}

/// A Huffman table: lookups on the next [`LOOKUP_BITS`] bits, and canonical-code limits
/// for longer codes.
#[derive(Debug, Clone)]
struct Huffman {
    /// `len | symbol << 5` of the code that prefixes the index; 0: the code is longer.
    sym: Box<[u16; 1 << LOOKUP_BITS]>,
    /// AC tables: the bits to consume (`len + extra bits`, bits 0–5) and the advance
    /// along the block (6–12) of the first symbol and, when it is not an EOB and the next
    /// code also fits in the index, the symbol after it together; then the first
    /// symbol's alone (13–17, 18–24). 0: longer.
    skip: Box<[u32; 1 << LOOKUP_BITS]>,
    /// For each length 1..=16: one past the largest code of that length (0: none), the
    /// first code, and the index of its symbol.
    max_code: [u32; 17],
    first_code: [u32; 17],
    first_index: [usize; 17],
    symbols: Vec<u8>,
}

impl Huffman {
    fn new(counts: &[u8; 16], symbols: &[u8], ac: bool) -> Option<Huffman> {
        const N: usize = 1 << LOOKUP_BITS;
        let mut sym: Box<[u16; N]> = vec![0u16; N].into_boxed_slice().try_into().ok()?;
        let mut skip: Box<[u32; N]> = vec![0u32; N].into_boxed_slice().try_into().ok()?;
        let mut max_code = [0u32; 17];
        let mut first_code = [0u32; 17];
        let mut first_index = [0usize; 17];
        let mut code = 0u32;
        let mut k = 0;
        for len in 1..=16u32 {
            let n = counts[len as usize - 1] as usize;
            first_code[len as usize] = code;
            first_index[len as usize] = k;
            for &s in &symbols[k..k + n] {
                if !ac && s > 15 {
                    return None;
                }
                if len <= LOOKUP_BITS {
                    let shift = LOOKUP_BITS - len;
                    let lo = (code << shift) as usize;
                    sym[lo..lo + (1 << shift)].fill(len as u16 | (s as u16) << 5);
                }
                code += 1;
            }
            k += n;
            if code > 1 << len {
                return None; // more codes than this length holds
            }
            max_code[len as usize] = if n > 0 { code } else { 0 };
            code <<= 1;
        }
        if ac {
            for (i, e) in skip.iter_mut().enumerate() {
                let first = sym[i];
                if first == 0 {
                    continue;
                }
                let (extra, adv) = ac_step((first >> 5) as u8);
                let n1 = (first & 31) as u32 + extra;
                let (mut n, mut a) = (n1, adv);
                if adv < 64 && n1 < LOOKUP_BITS {
                    // The next code, if it lies wholly inside the index.
                    let second = sym[(i << n1) & (N - 1)];
                    let len2 = (second & 31) as u32;
                    if second != 0 && n1 + len2 <= LOOKUP_BITS {
                        let (extra2, adv2) = ac_step((second >> 5) as u8);
                        n = n1 + len2 + extra2;
                        a = adv + adv2;
                    }
                }
                *e = n | a << 6 | n1 << 13 | adv << 18;
            }
        }
        Some(Huffman {
            sym,
            skip,
            max_code,
            first_code,
            first_index,
            symbols: symbols.to_vec(),
        })
    }

    /// (code length, symbol) of a code longer than the lookup at the top of `buf`.
    #[inline(never)]
    fn decode_slow(&self, buf: u64) -> Option<(u32, u8)> {
        for len in LOOKUP_BITS + 1..=16 {
            let code = (buf >> (64 - len)) as u32;
            let l = len as usize;
            if self.max_code[l] != 0 && code < self.max_code[l] && code >= self.first_code[l] {
                return Some((
                    len,
                    self.symbols[self.first_index[l] + (code - self.first_code[l]) as usize],
                ));
            }
        }
        None
    }

    /// (code length, symbol) of the code at the top of `buf`.
    #[inline(always)]
    fn decode(&self, buf: u64) -> Option<(u32, u8)> {
        let e = self.sym[(buf >> (64 - LOOKUP_BITS)) as usize];
        if e != 0 {
            return Some(((e & 31) as u32, (e >> 5) as u8));
        }
        self.decode_slow(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ycbcr_rows_are_the_per_pixel_conversion() {
        // Every Cb with Cr 0..=254 (a row of odd length) at a spread of Y, through the
        // dispatched path (AVX2 where the CPU has it) and the plain one.
        for y in [0u8, 1, 16, 77, 128, 200, 235, 254, 255] {
            for cb in 0..=255u8 {
                let cr: Vec<u8> = (0..=255u8).collect();
                let (ys, cbs) = (vec![y; 256], vec![cb; 256]);
                let n = 255; // odd
                let (mut fast, mut plain) = (vec![0u8; 3 * n], vec![0u8; 3 * n]);
                ycbcr_row([&ys[..n], &cbs[..n], &cr[..n]], &mut fast);
                ycbcr_row_plain([&ys[..n], &cbs[..n], &cr[..n]], &mut plain);
                for (i, &cr) in cr[..n].iter().enumerate() {
                    let want = ycbcr_to_rgb(y, cb, cr);
                    assert_eq!((&fast[3 * i..3 * i + 3], &plain[3 * i..3 * i + 3]), (&want[..], &want[..]), "{y} {cb} {cr}");
                }
            }
        }
    }
    use image::GenericImageView;

    /// A smooth colour image with grain, `width`×`height`.
    fn photo(width: u32, height: u32, grain: u32) -> RgbImage {
        let mut state = 0x1234_5679u32 ^ width ^ (height << 16);
        RgbImage::from_fn(width, height, |x, y| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            let g = (state % (2 * grain + 1)) as f32 - grain as f32;
            let (fx, fy) = (x as f32 / width as f32, y as f32 / height as f32);
            let wave = (fx * 23.0).sin() * (fy * 17.0).cos() * 60.0;
            let c = |v: f32| v.clamp(0.0, 255.0) as u8;
            image::Rgb([
                c(40.0 + fx * 170.0 + wave + g),
                c(200.0 - fy * 150.0 - wave / 2.0 + g),
                c(90.0 + (fx + fy) * 60.0 + g),
            ])
        })
    }

    fn encode(
        img: &RgbImage,
        quality: u8,
        sampling: jpeg_encoder::SamplingFactor,
        restart: Option<u16>,
    ) -> Vec<u8> {
        let mut out = Vec::new();
        let mut enc = jpeg_encoder::Encoder::new(&mut out, quality);
        enc.set_sampling_factor(sampling);
        if let Some(r) = restart {
            enc.set_restart_interval(r);
        }
        enc.encode(
            img.as_raw(),
            img.width() as u16,
            img.height() as u16,
            jpeg_encoder::ColorType::Rgb,
        )
        .unwrap();
        out
    }

    /// Each 8×8 block's mean of the full-size decode, channel by channel.
    fn block_means(full: &DynamicImage) -> Vec<f64> {
        let (w, h) = full.dimensions();
        let rgb = full.to_rgb8();
        let (ow, oh) = (w.div_ceil(8), h.div_ceil(8));
        let mut out = vec![0.0; (ow * oh * 3) as usize];
        for by in 0..oh {
            for bx in 0..ow {
                for c in 0..3usize {
                    let (mut s, mut n) = (0.0, 0.0);
                    for y in by * 8..((by + 1) * 8).min(h) {
                        for x in bx * 8..((bx + 1) * 8).min(w) {
                            s += rgb.get_pixel(x, y).0[c] as f64;
                            n += 1.0;
                        }
                    }
                    out[(by * ow + bx) as usize * 3 + c] = s / n;
                }
            }
        }
        out
    }

    /// `unstuff` one byte at a time: the data and the restart starts.
    fn unstuff_reference(b: &[u8]) -> (Vec<u8>, Vec<usize>) {
        let (mut out, mut starts, mut i) = (Vec::new(), vec![0], 0);
        while i < b.len() {
            if b[i] != 0xFF {
                out.push(b[i]);
                i += 1;
                continue;
            }
            match b.get(i + 1) {
                None => break,
                Some(0x00) => {
                    out.push(0xFF);
                    i += 2;
                }
                Some(0xFF) => i += 1,
                Some(0xD0..=0xD7) => {
                    starts.push(out.len());
                    i += 2;
                }
                Some(_) => break,
            }
        }
        out.extend_from_slice(&[0; 8]);
        (out, starts)
    }

    /// Runs of every length around the 8- and 32-byte steps between stuffed bytes, fill
    /// bytes and restart markers, ended by a marker, by the data, or by a lone 0xFF.
    #[test]
    fn unstuff_matches_a_byte_at_a_time_reading() {
        let mut state = 0x2545_F491u32;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state
        };
        let mut out = Vec::new();
        for case in 0..400 {
            let mut b = Vec::new();
            for _ in 0..next() % 12 {
                let run = [0, 1, 7, 8, 9, 31, 32, 33, 63, 64, 65, 300][next() as usize % 12];
                b.extend((0..run).map(|_| (next() % 255) as u8));
                b.extend_from_slice(match next() % 4 {
                    0 => &[0xFF, 0x00],
                    1 => &[0xFF, 0xFF, 0x00],
                    2 => &[0xFF, 0xD3],
                    _ => &[0x5A],
                });
            }
            b.extend_from_slice(match case % 3 {
                0 => &[0xFF, 0xD9, 0x11, 0x22][..],
                1 => &[0xFF][..],
                _ => &[][..],
            });
            let want = unstuff_reference(&b);
            let starts = unstuff(&b, &mut out);
            assert_eq!((out.clone(), starts), want, "case {case}");
            let starts = unstuff_with(&b, &mut out, copy_run_plain);
            assert_eq!((out.clone(), starts), want, "case {case}, without SIMD");
            let starts = unstuff_with(&b, &mut out, copy_run);
            assert_eq!((out.clone(), starts), want, "case {case}, AVX2 runs");
        }
        // A stuffed 0xFF at every offset of a 64-byte step, one or two in a step, and
        // markers and fill bytes right after them.
        for first in 0..140 {
            for (gap, tail) in [(37, &[0xFF, 0xD9][..]), (1, &[0xFF, 0xFF, 0x00, 0xFF, 0xD9]), (64, &[0xFF, 0xD2, 0x01, 0xFF, 0xD9]), (63, &[0xFF])] {
                let mut b: Vec<u8> = (0..first).map(|_| (next() % 255) as u8).collect();
                for _ in 0..4 {
                    b.extend_from_slice(&[0xFF, 0x00]);
                    b.extend((0..gap).map(|_| (next() % 255) as u8));
                }
                b.extend_from_slice(tail);
                b.extend((0..next() % 70).map(|_| (next() % 255) as u8));
                let want = unstuff_reference(&b);
                let starts = unstuff(&b, &mut out);
                assert_eq!((out.clone(), starts), want, "first {first}, gap {gap}");
            }
        }
    }

    #[test]
    fn dc_image_is_the_block_means() {
        use jpeg_encoder::SamplingFactor as S;
        for (w, h, sampling, restart) in [
            (203, 157, S::R_4_2_0, None),
            (64, 64, S::R_4_4_4, Some(3)),
            (121, 90, S::R_4_2_2, Some(1)),
            (77, 130, S::R_4_4_0, Some(7)),
            (1, 1, S::R_4_2_0, None),
            (9, 17, S::R_4_2_0, Some(2)),
        ] {
            let bytes = encode(&photo(w, h, 4), 90, sampling, restart);
            let dc = decode_dc(&bytes).expect("baseline JPEG");
            assert_eq!(dc.dimensions(), (w.div_ceil(8), h.div_ceil(8)));
            let full = image::load_from_memory(&bytes).unwrap();
            let want = block_means(&full);
            let got = dc.to_rgb8();
            // Edge blocks that the image only partly covers hold the encoder's padding.
            let (ow, full_w, full_h) = (w.div_ceil(8) as usize, (w / 8) as usize, (h / 8) as usize);
            let whole = |i: usize| (i / 3) % ow < full_w && (i / 3) / ow < full_h;
            let d: Vec<f64> = got
                .as_raw()
                .iter()
                .zip(&want)
                .enumerate()
                .filter(|&(i, _)| whole(i) || w < 8 || h < 8)
                .map(|(_, (&a, &b))| (a as f64 - b).abs())
                .collect();
            let mean = d.iter().sum::<f64>() / d.len() as f64;
            let max = d.iter().cloned().fold(0.0, f64::max);
            eprintln!("{w}x{h} {sampling:?} restart {restart:?}: mean {mean:.3} max {max:.2}");
            assert!(
                mean < 1.5 && max < 4.0,
                "{w}x{h} {sampling:?}: mean {mean} max {max}"
            );
        }
    }

    #[test]
    fn grey_is_the_block_means() {
        let rgb = photo(100, 75, 6);
        let grey: Vec<u8> = rgb.pixels().map(|p| p.0[1]).collect();
        let mut bytes = Vec::new();
        jpeg_encoder::Encoder::new(&mut bytes, 90)
            .encode(&grey, 100, 75, jpeg_encoder::ColorType::Luma)
            .unwrap();
        let dc = decode_dc(&bytes).expect("baseline grey JPEG");
        assert_eq!(dc.color(), image::ColorType::L8);
        let full = image::load_from_memory(&bytes).unwrap().to_luma8();
        let dc = dc.to_luma8();
        assert_eq!(dc.dimensions(), (13, 10));
        // Blocks 12 across and 9 down hold the encoder's padding too.
        for (bx, by, p) in dc.enumerate_pixels().filter(|&(x, y, _)| x < 12 && y < 9) {
            let (mut s, mut n) = (0.0, 0.0);
            for y in by * 8..((by + 1) * 8).min(75) {
                for x in bx * 8..((bx + 1) * 8).min(100) {
                    s += full.get_pixel(x, y).0[0] as f64;
                    n += 1.0;
                }
            }
            assert!(
                (p.0[0] as f64 - s / n).abs() < 1.5,
                "block {bx},{by}: {} vs {}",
                p.0[0],
                s / n
            );
        }
    }

    /// Mean and largest difference to the full decode's block means over the blocks the
    /// image covers entirely.
    fn block_error(dc: &DynamicImage, bytes: &[u8]) -> (f64, f64) {
        let full = image::load_from_memory(bytes).unwrap();
        let (w, h) = full.dimensions();
        assert_eq!(dc.dimensions(), (w.div_ceil(8), h.div_ceil(8)));
        let want = block_means(&full);
        let (ow, full_w, full_h) = (w.div_ceil(8) as usize, (w / 8) as usize, (h / 8) as usize);
        let whole = |i: usize| (i / 3) % ow < full_w && (i / 3) / ow < full_h;
        let d: Vec<f64> = dc.to_rgb8().as_raw().iter().zip(&want).enumerate().filter(|&(i, _)| whole(i)).map(|(_, (&a, &b))| (a as f64 - b).abs()).collect();
        (d.iter().sum::<f64>() / d.len() as f64, d.iter().cloned().fold(0.0, f64::max))
    }

    fn odd_fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!("{}/../../tests/fixtures/odd/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
    }

    /// The DC planes of a progressive JPEG against those of a baseline twin (same
    /// quantisers): full-resolution components identical, subsampled ones the means of the
    /// twin's half-block means (which need AC coefficients the DC scans do not have).
    fn assert_twin_planes(progressive: &[u8], baseline: &[u8]) {
        let (hp, hb) = (Header::parse(progressive).unwrap(), Header::parse(baseline).unwrap());
        assert!(hp.progressive && !hb.progressive);
        let (pp, pb) = (decode_planes(progressive, &hp).unwrap(), decode_planes(baseline, &hb).unwrap());
        for (c, (p, b)) in hb.comps.iter().zip(pp.iter().zip(&pb)) {
            let (rh, rv) = (c.rh, c.rv);
            // The twin's half blocks past the image's edge are not counted as samples.
            assert!(p.w * rh >= b.w && p.w * rh < b.w + rh && p.h * rv >= b.h && p.h * rv < b.h + rv);
            for y in 0..p.h {
                for x in 0..p.w {
                    let got = p.data[y * p.stride + x] as f64;
                    let twin: Vec<f64> = (0..rv).flat_map(|j| (0..rh).map(move |i| (j, i))).map(|(j, i)| b.data[(y * rv + j) * b.stride + x * rh + i] as f64).collect();
                    let want = twin.iter().sum::<f64>() / twin.len() as f64;
                    if rh * rv == 1 {
                        assert_eq!(got, want, "component {}, block {x},{y}", c.id);
                    } else {
                        assert!((got - want).abs() <= 1.5, "component {}, block {x},{y}: {got} vs {want} ({twin:?})", c.id);
                    }
                }
            }
        }
    }

    #[test]
    fn progressive_dc_scans_give_the_block_means() {
        // libjpeg's scan script (Pillow): DC in successive approximation (Al = 1, then a
        // refinement scan), 4:2:0, restart intervals of 3 MCUs.
        let bytes = odd_fixture("progressive.jpg");
        let dc = decode_dc(&bytes).expect("progressive JPEG");
        assert_eq!(dc.dimensions(), (10, 7));
        assert_twin_planes(&bytes, &odd_fixture("progressive-twin.jpg"));
        // Without its DC refinement scan the DC is not at full precision: refused.
        let refine = (0..bytes.len() - 12)
            .find(|&i| {
                let ns = bytes[i + 4] as usize;
                bytes[i..i + 2] == [0xFF, 0xDA] && bytes[i + 5 + 2 * ns] == 0 && bytes[i + 7 + 2 * ns] >> 4 > 0
            })
            .expect("a DC refinement scan");
        let end = refine + 14 + scan_end(&bytes[refine + 14..]).unwrap();
        let mut cut = bytes[..refine].to_vec();
        cut.extend_from_slice(&bytes[end..]);
        assert!(decode_dc(&cut).is_none());
        // Cut short (no EOI): refused, for the general decoders to judge.
        assert!(decode_dc(&bytes[..bytes.len() * 2 / 3]).is_none());

        // jpeg-encoder's spectral selection, with and without restart intervals.
        use jpeg_encoder::SamplingFactor as S;
        for (w, h, sampling, restart) in [(203, 157, S::R_4_2_0, None), (64, 64, S::R_4_4_4, Some(3)), (121, 90, S::R_4_2_2, Some(1)), (9, 17, S::R_4_2_0, Some(2))] {
            let img = photo(w, h, 4);
            let mut bytes = Vec::new();
            let mut enc = jpeg_encoder::Encoder::new(&mut bytes, 90);
            enc.set_progressive(true);
            enc.set_sampling_factor(sampling);
            if let Some(r) = restart {
                enc.set_restart_interval(r);
            }
            enc.encode(img.as_raw(), w as u16, h as u16, jpeg_encoder::ColorType::Rgb).unwrap();
            let dc = decode_dc(&bytes).expect("progressive JPEG");
            let baseline = encode(&img, 90, sampling, restart);
            assert_twin_planes(&bytes, &baseline);
            assert_eq!(dc.dimensions(), (w.div_ceil(8), h.div_ceil(8)));
            if sampling == S::R_4_4_4 {
                // The same DC coefficients, the same image; and the full decode's means.
                assert_eq!(decode_dc(&baseline).unwrap().to_rgb8(), dc.to_rgb8());
                let (mean, max) = block_error(&dc, &bytes);
                assert!(mean < 1.5 && max < 4.0, "{w}x{h}: mean {mean} max {max}");
            }
        }
    }

    #[test]
    fn corrupt_progressive_never_panics() {
        assert_corruption_is_survived(&odd_fixture("progressive.jpg"), 0x9E37_79B9, (10, 7));
    }

    #[test]
    fn what_it_does_not_cover_falls_back() {
        let img = photo(64, 48, 4);
        let mut cmyk = Vec::new();
        let px: Vec<u8> = img
            .pixels()
            .flat_map(|p| [p.0[0], p.0[1], p.0[2], 30])
            .collect();
        jpeg_encoder::Encoder::new(&mut cmyk, 90)
            .encode(&px, 64, 48, jpeg_encoder::ColorType::Cmyk)
            .unwrap();
        assert!(decode_dc(&cmyk).is_none());
        assert!(decode_dc(b"not a jpeg").is_none());
        assert!(decode_dc(&[0xFF, 0xD8]).is_none());
    }

    #[test]
    fn cut_short_is_refused() {
        let bytes = encode(
            &photo(160, 120, 8),
            90,
            jpeg_encoder::SamplingFactor::R_4_2_0,
            None,
        );
        assert!(decode_dc(&bytes).is_some());
        let scan = Header::parse(&bytes).unwrap().scan_start;
        for cut in [scan + 10, (scan + bytes.len()) / 2, bytes.len() - 40] {
            // Cut inside the scan and closed with an EOI, as a careless copy might be.
            let mut b = bytes[..cut].to_vec();
            b.extend_from_slice(&[0xFF, 0xD9]);
            assert!(decode_dc(&b).is_none(), "cut at {cut} of {}", bytes.len());
        }
    }

    /// 500 copies of `bytes` with 1 to 4 random bytes of the scans overwritten: none
    /// panics, any that still decodes has the right size, and most do not decode.
    fn assert_corruption_is_survived(bytes: &[u8], seed: u32, dims: (u32, u32)) {
        let scan = Header::parse(bytes).unwrap().scan_start;
        let mut state = seed;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as usize
        };
        let mut decoded = 0;
        for _ in 0..500 {
            let mut b = bytes.to_vec();
            for _ in 0..1 + next() % 4 {
                let i = scan + next() % (b.len() - scan - 2);
                b[i] = next() as u8;
            }
            if let Some(img) = decode_dc(&b) {
                assert_eq!(img.dimensions(), dims);
                decoded += 1;
            }
        }
        // Some corruptions still parse (a flipped sign bit); most do not.
        assert!(decoded < 500, "{decoded}");
    }

    #[test]
    fn corrupt_scans_never_panic() {
        let bytes = encode(&photo(96, 80, 8), 85, jpeg_encoder::SamplingFactor::R_4_2_0, Some(4));
        assert_corruption_is_survived(&bytes, 0x2545_F491, (12, 10));
    }
}
