//! Image preprocessing equal to Hugging Face's `CLIPImageProcessor` (and the other
//! PIL-based processors that share its steps): convert to RGB, resize the shortest side
//! with PIL's resampling filters (reimplemented bit for bit: 22-bit fixed-point
//! coefficients, horizontal pass then vertical, rounding and clipping to u8 after each),
//! centre-crop, rescale, normalise.

use crate::loader::{parse_json, read_json};
use crate::{Error, Result};
use image::{DynamicImage, RgbImage};
use magpie_core::Pixels;
use serde::Deserialize;
use std::ops::Range;
use std::path::Path;

/// A size as processor configs write it: an int, `{"shortest_edge": n}` or
/// `{"height": h, "width": w}`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum SizeSpec {
    Square(u32),
    Shortest { shortest_edge: u32 },
    Exact { height: u32, width: u32 },
}

/// PIL resampling filters by their PIL enum value (what `resample` holds in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resample {
    Nearest,
    Bilinear,
    Bicubic,
}

/// The fields of `preprocessor_config.json` that matter, with `CLIPImageProcessor`'s defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ProcessorConfig {
    pub do_resize: bool,
    pub size: SizeSpec,
    pub resample: u8,
    pub do_center_crop: bool,
    pub crop_size: SizeSpec,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    pub do_convert_rgb: bool,
}

impl Default for ProcessorConfig {
    fn default() -> Self {
        Self {
            do_resize: true,
            size: SizeSpec::Shortest { shortest_edge: 224 },
            resample: 3,
            do_center_crop: true,
            crop_size: SizeSpec::Exact { height: 224, width: 224 },
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
            image_std: [0.268_629_54, 0.261_302_6, 0.275_777_1],
            do_convert_rgb: true,
        }
    }
}

impl ProcessorConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_file_with_defaults(path, &serde_json::Value::Null)
    }

    /// Like [`from_file`](Self::from_file), with the keys of the object `defaults` filled
    /// in where the file lacks them: the defaults of another processor class (BLIP's
    /// processor has no centre crop, for one).
    pub fn from_file_with_defaults(path: &Path, defaults: &serde_json::Value) -> Result<Self> {
        let mut v = read_json(path)?;
        if let (Some(obj), Some(defaults)) = (v.as_object_mut(), defaults.as_object()) {
            for (k, d) in defaults {
                obj.entry(k.clone()).or_insert_with(|| d.clone());
            }
        }
        let cfg: Self = parse_json(path, v)?;
        cfg.validate().map_err(|message| Error::Config { path: path.into(), message })?;
        Ok(cfg)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        if self.image_std.iter().any(|s| *s == 0.0 || !s.is_finite()) {
            return Err("image_std must be finite and non-zero".into());
        }
        let zero = |s: SizeSpec| match s {
            SizeSpec::Square(n) | SizeSpec::Shortest { shortest_edge: n } => n == 0,
            SizeSpec::Exact { height, width } => height == 0 || width == 0,
        };
        if zero(self.size) || zero(self.crop_size) {
            return Err("size and crop_size must be positive".into());
        }
        self.filter().map(|_| ())
    }

    fn filter(&self) -> std::result::Result<Resample, String> {
        match self.resample {
            0 => Ok(Resample::Nearest),
            2 => Ok(Resample::Bilinear),
            3 => Ok(Resample::Bicubic),
            n => Err(format!("resample = {n} is not supported (0 nearest, 2 bilinear, 3 bicubic)")),
        }
    }

    /// The output (height, width) of the whole pipeline.
    pub fn output_size(&self, in_h: u32, in_w: u32) -> (u32, u32) {
        let (h, w) = if self.do_resize { self.resize_target(in_h, in_w) } else { (in_h, in_w) };
        if self.do_center_crop {
            exact(self.crop_size)
        } else {
            (h, w)
        }
    }

    /// The shortest side the resize step produces (a decoder may shrink big images to
    /// twice this before preprocessing).
    pub fn resize_side(&self) -> u32 {
        match self.size {
            SizeSpec::Square(n) | SizeSpec::Shortest { shortest_edge: n } => n,
            SizeSpec::Exact { height, width } => height.max(width),
        }
    }

    /// `get_resize_output_image_size(default_to_square=False)` of transformers: the short
    /// side becomes `n`, the long side `int(n * long / short)`.
    fn resize_target(&self, h: u32, w: u32) -> (u32, u32) {
        match self.size {
            SizeSpec::Exact { height, width } => (height, width),
            // An int `size` means the shortest edge for CLIP-style processors.
            SizeSpec::Square(n) | SizeSpec::Shortest { shortest_edge: n } => {
                let (short, long) = if w <= h { (w, h) } else { (h, w) };
                // Clamped rather than wrapped: a 20000000×1 strip would overflow u32.
                let new_long = ((n as u64 * long as u64) / short.max(1) as u64).clamp(1, u32::MAX as u64) as u32;
                if w <= h {
                    (new_long, n)
                } else {
                    (n, new_long)
                }
            }
        }
    }

    /// Runs the whole pipeline on a decoded image; returns normalised CHW values.
    ///
    /// With a centre crop, only the resized pixels inside the crop are computed: the
    /// result is the same, but an extreme strip (4000000×1, whose shortest edge resized
    /// to 224 would make an image 896000000 pixels wide) costs no more than a photo.
    pub fn preprocess(&self, image: &DynamicImage) -> Result<Pixels> {
        if image.width() == 0 || image.height() == 0 {
            return Err(Error::Preprocess("image has no pixels".into()));
        }
        // An RGB image (what JPEGs decode to) is read in place, not copied.
        let converted;
        let rgb: &RgbImage = match image {
            DynamicImage::ImageRgb8(rgb) => rgb,
            other => {
                converted = to_rgb(other);
                &converted
            }
        };
        let (rh, rw) = if self.do_resize { self.resize_target(rgb.height(), rgb.width()) } else { (rgb.height(), rgb.width()) };
        let (ch, cw) = if self.do_center_crop { exact(self.crop_size) } else { (rh, rw) };
        if ch as u64 * cw as u64 > MAX_OUTPUT_PIXELS {
            return Err(Error::Preprocess(format!(
                "a {}×{} image would become {cw}×{ch} pixels, over the limit of {MAX_OUTPUT_PIXELS}",
                rgb.width(),
                rgb.height()
            )));
        }
        // transformers' center_crop: top = (h - ch) // 2 (floor), padding with zeros when
        // the crop is larger than the image.
        let (h, w) = (rh as i64, rw as i64);
        let top = (h - ch as i64).div_euclid(2);
        let left = (w - cw as i64).div_euclid(2);
        // The part of the resized image inside the crop, in resized coordinates.
        let ys = top.clamp(0, h) as u32..(top + ch as i64).clamp(0, h) as u32;
        let xs = left.clamp(0, w) as u32..(left + cw as i64).clamp(0, w) as u32;
        let window = if self.do_resize {
            resize_window(rgb, rw, rh, self.filter().map_err(Error::Preprocess)?, xs.clone(), ys.clone())
        } else {
            image::imageops::crop_imm(rgb, xs.start, ys.start, xs.len() as u32, ys.len() as u32).to_image()
        };
        let scale = if self.do_rescale { self.rescale_factor as f32 } else { 1.0 };
        let value = |c: usize, px: u8| {
            let v = px as f32 * scale;
            if self.do_normalize { (v - self.image_mean[c]) / self.image_std[c] } else { v }
        };
        let plane = (ch * cw) as usize;
        // A sample has 256 possible values per channel: their results are looked up (the
        // same arithmetic, done once per value instead of once per pixel). Each plane
        // starts as the value of a zero pixel (the padding, where the crop is larger than
        // the image); the window's pixels are then written over their part, row by row,
        // with no bounds to check per pixel.
        let lut: Vec<[f32; 256]> = (0..3).map(|c| std::array::from_fn(|v| value(c, v as u8))).collect();
        let mut data = vec![0f32; 3 * plane];
        for (dst, l) in data.chunks_exact_mut(plane).zip(&lut) {
            dst.fill(l[0]);
        }
        let (x0, y0) = ((xs.start as i64 - left) as usize, (ys.start as i64 - top) as usize);
        let (d0, rest) = data.split_at_mut(plane);
        let (d1, d2) = rest.split_at_mut(plane);
        let n = xs.len();
        if n > 0 {
            for (wy, src) in window.as_raw().chunks_exact(n * 3).enumerate() {
                let o = (y0 + wy) * cw as usize + x0;
                for (((px, a), b), c) in src.chunks_exact(3).zip(&mut d0[o..o + n]).zip(&mut d1[o..o + n]).zip(&mut d2[o..o + n]) {
                    (*a, *b, *c) = (lut[0][px[0] as usize], lut[1][px[1] as usize], lut[2][px[2] as usize]);
                }
            }
        }
        Ok(Pixels { channels: 3, height: ch as usize, width: cw as usize, data })
    }
}

/// The largest output [`ProcessorConfig::preprocess`] makes (4096×4096): only reached
/// without a centre crop, where the output is the whole resized image.
const MAX_OUTPUT_PIXELS: u64 = 1 << 24;

/// transformers' `convert_to_rgb`: images with alpha are composited over white (with
/// PIL's integer `alpha_composite` arithmetic), others converted directly.
pub fn to_rgb(image: &DynamicImage) -> RgbImage {
    if !image.color().has_alpha() {
        return image.to_rgb8();
    }
    let rgba = image.to_rgba8();
    RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        let [r, g, b, a] = rgba.get_pixel(x, y).0;
        image::Rgb([over_white(r, a), over_white(g, a), over_white(b, a)])
    })
}

/// One channel of PIL's `ImagingAlphaComposite` with an opaque white destination.
fn over_white(src: u8, alpha: u8) -> u8 {
    const BITS: u32 = 7;
    let a = alpha as u32;
    let outa255 = a * 255 + 255 * (255 - a);
    let coef1 = a * 255 * 255 * (1 << BITS) / outa255;
    let coef2 = 255 * (1 << BITS) - coef1;
    let tmp = src as u32 * coef1 + 255 * coef2 + (0x80 << BITS);
    let div255 = ((tmp >> 8) + tmp) >> 8;
    (div255 >> BITS) as u8
}

fn exact(s: SizeSpec) -> (u32, u32) {
    match s {
        SizeSpec::Square(n) | SizeSpec::Shortest { shortest_edge: n } => (n, n),
        SizeSpec::Exact { height, width } => (height, width),
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

fn triangle(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

/// PIL's `precompute_coeffs` + `normalize_coeffs_8bpc`: per output index in `range` (of
/// `0..out_size`), the first input index, the tap count, and fixed-point weights. Each
/// index's coefficients depend on that index alone, so a range gives exactly the values
/// of the whole.
fn coeffs(
    in_size: u32,
    out_size: u32,
    filter: fn(f64) -> f64,
    support: f64,
    range: Range<u32>,
) -> (Vec<(usize, usize)>, Vec<i32>, usize) {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = support * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(range.len());
    let mut kk = vec![0i32; range.len() * ksize];
    let mut k = vec![0f64; ksize];
    for (i, xx) in range.map(|x| x as usize).enumerate() {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin);
        let mut ww = 0.0;
        for x in 0..n {
            let w = filter((x as f64 + xmin as f64 - center + 0.5) * ss);
            k[x] = w;
            ww += w;
        }
        for x in 0..n {
            let w = if ww != 0.0 { k[x] / ww } else { k[x] };
            let f = w * (1u32 << PRECISION_BITS) as f64;
            kk[i * ksize + x] = if w < 0.0 { (-0.5 + f) as i32 } else { (0.5 + f) as i32 };
        }
        bounds.push((xmin, n));
    }
    (bounds, kk, ksize)
}

#[inline]
fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes like PIL's `Image.resize(size, resample)` on an RGB image (no reducing_gap).
pub fn resize(img: &RgbImage, out_w: u32, out_h: u32, filter: Resample) -> RgbImage {
    resize_window(img, out_w, out_h, filter, 0..out_w, 0..out_h)
}

/// The columns `xs` and rows `ys` of [`resize`]`(img, out_w, out_h, filter)`, computing
/// nothing outside them (memory and time follow the window, not `out_w`×`out_h`).
fn resize_window(img: &RgbImage, out_w: u32, out_h: u32, filter: Resample, xs: Range<u32>, ys: Range<u32>) -> RgbImage {
    debug_assert!(xs.end <= out_w && ys.end <= out_h);
    let (in_w, in_h) = img.dimensions();
    let (win_w, win_h) = (xs.len(), ys.len());
    if win_w == 0 || win_h == 0 {
        return RgbImage::new(win_w as u32, win_h as u32);
    }
    if filter == Resample::Nearest {
        return nearest(img, out_w, out_h, xs, ys);
    }
    let (f, support): (fn(f64) -> f64, f64) = match filter {
        Resample::Bicubic => (bicubic, 2.0),
        _ => (triangle, 1.0),
    };
    let src = img.as_raw();
    let src_row = |y: usize| &src[y * in_w as usize * 3..][..in_w as usize * 3];
    // As PIL, an axis whose size does not change is not filtered. The horizontal pass
    // runs over only the source rows the vertical pass will read.
    let vertical = (in_h != out_h).then(|| coeffs(in_h, out_h, f, support, ys.clone()));
    let rows = match &vertical {
        Some((vb, _, _)) => vb[0].0..vb.last().map_or(0, |b| b.0 + b.1),
        None => ys.start as usize..ys.end as usize,
    };
    let stride = win_w * 3;
    let mut tmp = vec![0u8; rows.len() * stride];
    let isa = crate::cpu::Isa::detect();
    if in_w != out_w {
        let (hb, hk, hks) = coeffs(in_w, out_w, f, support, xs.clone());
        let h = Taps { bounds: &hb, k: &hk, ksize: hks };
        passes::horizontal(isa, src, in_w as usize * 3, rows.clone(), &h, &mut tmp);
    } else {
        for (r, out_row) in tmp.chunks_exact_mut(stride).enumerate() {
            out_row.copy_from_slice(&src_row(r + rows.start)[xs.start as usize * 3..xs.end as usize * 3]);
        }
    }
    let Some((vb, vk, vks)) = vertical else {
        return RgbImage::from_raw(win_w as u32, win_h as u32, tmp).expect("buffer size matches");
    };
    let mut out = vec![0u8; win_h * stride];
    let v = Taps { bounds: &vb, k: &vk, ksize: vks };
    passes::vertical(isa, &tmp, stride, rows.start, &v, &mut out);
    RgbImage::from_raw(win_w as u32, win_h as u32, out).expect("buffer size matches")
}

/// One axis's filter, as [`coeffs`] gives it: per output index its first input index and
/// tap count, and its taps at `k[i · ksize..]`.
struct Taps<'a> {
    bounds: &'a [(usize, usize)],
    k: &'a [i32],
    ksize: usize,
}

impl Taps<'_> {
    fn of(&self, i: usize) -> (usize, &[i32]) {
        let (first, n) = self.bounds[i];
        (first, &self.k[i * self.ksize..][..n])
    }
}

/// The two passes of the resize, in PIL's fixed-point arithmetic (so bit for bit its
/// result at every ISA level): written so that the compiler vectorises their inner loops,
/// and compiled once per level, taken at run time ([`crate::cpu::Isa::detect`]).
///
/// The vertical pass adds whole rows, each weighted by one tap: contiguous, 16 columns a
/// vector. The horizontal one would weight each output pixel's own few input pixels, so it
/// transposes 16 rows at a time (each input byte column becomes 16 contiguous bytes, one per
/// row), filters those 16 rows at once, and transposes back. On a Zen 5, preprocessing a
/// 12 MP photo's 1/8-scale image (500×375) to CLIP's 224 window took 1.3 ms with the
/// passes' scalar loops and takes 0.3 now.
mod passes {
    use super::{clip8, Taps, PRECISION_BITS};
    use crate::cpu::Isa;
    use std::ops::Range;

    /// Rows of a horizontal block.
    const R: usize = 16;

    /// Which compiled copy of the passes runs.
    enum Level {
        #[cfg(target_arch = "x86_64")]
        Avx512,
        #[cfg(target_arch = "x86_64")]
        Avx2,
        Plain,
    }

    /// The best copy `isa` allows that the CPU has (checked here, whatever `isa` says):
    /// AVX-512 F, AVX2, or the portable one.
    fn level(isa: Isa) -> Level {
        #[cfg(target_arch = "x86_64")]
        {
            if isa >= Isa::Avx512 && std::arch::is_x86_feature_detected!("avx512f") {
                return Level::Avx512;
            }
            if isa >= Isa::Avx2 && std::arch::is_x86_feature_detected!("avx2") {
                return Level::Avx2;
            }
        }
        let _ = isa;
        Level::Plain
    }

    /// `out` (rows × the window's width · 3) from the source rows `rows` (each `width3`
    /// bytes of `src`).
    pub(super) fn horizontal(isa: Isa, src: &[u8], width3: usize, rows: Range<usize>, h: &Taps, out: &mut [u8]) {
        match level(isa) {
            // SAFETY: `level` names only what the CPU has.
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => unsafe { horizontal_avx512(src, width3, rows, h, out) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => unsafe { horizontal_avx2(src, width3, rows, h, out) },
            Level::Plain => horizontal_impl(src, width3, rows, h, out),
        }
    }

    /// `out` (one row of `stride` bytes per output row) from `tmp`, whose first row is
    /// source row `row0`.
    pub(super) fn vertical(isa: Isa, tmp: &[u8], stride: usize, row0: usize, v: &Taps, out: &mut [u8]) {
        match level(isa) {
            // SAFETY: `level` names only what the CPU has.
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => unsafe { vertical_avx512(tmp, stride, row0, v, out) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => unsafe { vertical_avx2(tmp, stride, row0, v, out) },
            Level::Plain => vertical_impl(tmp, stride, row0, v, out),
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn horizontal_avx512(src: &[u8], width3: usize, rows: Range<usize>, h: &Taps, out: &mut [u8]) {
        horizontal_impl(src, width3, rows, h, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn horizontal_avx2(src: &[u8], width3: usize, rows: Range<usize>, h: &Taps, out: &mut [u8]) {
        horizontal_impl(src, width3, rows, h, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn vertical_avx512(tmp: &[u8], stride: usize, row0: usize, v: &Taps, out: &mut [u8]) {
        vertical_impl(tmp, stride, row0, v, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn vertical_avx2(tmp: &[u8], stride: usize, row0: usize, v: &Taps, out: &mut [u8]) {
        vertical_impl(tmp, stride, row0, v, out)
    }

    #[inline(always)]
    fn horizontal_impl(src: &[u8], width3: usize, rows: Range<usize>, h: &Taps, out: &mut [u8]) {
        let outs = h.bounds.len();
        let stride = outs * 3;
        if outs == 0 || rows.is_empty() {
            return;
        }
        // The input columns any output reads.
        let lo = h.bounds.iter().map(|b| b.0).min().unwrap_or(0);
        let hi = h.bounds.iter().map(|b| b.0 + b.1).max().unwrap_or(0);
        let mut t = vec![[0u8; R]; (hi - lo) * 3];
        let mut o = vec![[0u8; R]; stride];
        for start in rows.clone().step_by(R) {
            let n = R.min(rows.end - start);
            for l in 0..n {
                let row = &src[(start + l) * width3..][lo * 3..hi * 3];
                for (col, &b) in t.iter_mut().zip(row) {
                    col[l] = b;
                }
            }
            for xx in 0..outs {
                let (first, k) = h.of(xx);
                for c in 0..3 {
                    let mut acc = [1i32 << (PRECISION_BITS - 1); R];
                    for (x, &kw) in k.iter().enumerate() {
                        let col = &t[(first - lo + x) * 3 + c];
                        for (a, &b) in acc.iter_mut().zip(col) {
                            *a += b as i32 * kw;
                        }
                    }
                    for (d, &a) in o[xx * 3 + c].iter_mut().zip(&acc) {
                        *d = clip8(a);
                    }
                }
            }
            for l in 0..n {
                let row = &mut out[(start - rows.start + l) * stride..][..stride];
                for (d, col) in row.iter_mut().zip(&o) {
                    *d = col[l];
                }
            }
        }
    }

    #[inline(always)]
    fn vertical_impl(tmp: &[u8], stride: usize, row0: usize, v: &Taps, out: &mut [u8]) {
        let mut acc = vec![0i32; stride];
        for (yy, out_row) in out.chunks_exact_mut(stride).enumerate().take(v.bounds.len()) {
            let (first, k) = v.of(yy);
            acc.fill(1 << (PRECISION_BITS - 1));
            for (y, &kw) in k.iter().enumerate() {
                let row = &tmp[(first - row0 + y) * stride..][..stride];
                for (a, &b) in acc.iter_mut().zip(row) {
                    *a += b as i32 * kw;
                }
            }
            for (d, &a) in out_row.iter_mut().zip(&acc) {
                *d = clip8(a);
            }
        }
    }
}

fn nearest(img: &RgbImage, out_w: u32, out_h: u32, xs: Range<u32>, ys: Range<u32>) -> RgbImage {
    let (in_w, in_h) = img.dimensions();
    RgbImage::from_fn(xs.len() as u32, ys.len() as u32, |x, y| {
        let (x, y) = (x + xs.start, y + ys.start);
        let sx = (((x as f64 + 0.5) * in_w as f64 / out_w as f64) as u32).min(in_w - 1);
        let sy = (((y as f64 + 0.5) * in_h as f64 / out_h as f64) as u32).min(in_h - 1);
        *img.get_pixel(sx, sy)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_targets_follow_transformers() {
        let c = ProcessorConfig::default();
        assert_eq!(c.resize_target(480, 640), (224, 298)); // int(224*640/480) = 298
        assert_eq!(c.resize_target(640, 480), (298, 224));
        assert_eq!(c.resize_target(100, 100), (224, 224));
    }

    #[test]
    fn constant_image_stays_constant_and_normalises() {
        let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(300, 200, image::Rgb([10, 128, 250])));
        let p = ProcessorConfig::default().preprocess(&img).unwrap();
        assert_eq!((p.channels, p.height, p.width), (3, 224, 224));
        let c = ProcessorConfig::default();
        for ch in 0..3 {
            let v = [10.0, 128.0, 250.0][ch] / 255.0;
            let want = (v - c.image_mean[ch]) / c.image_std[ch];
            assert!(p.data[ch * 224 * 224..(ch + 1) * 224 * 224].iter().all(|x| (x - want).abs() < 1e-5));
        }
    }

    #[test]
    fn resize_matches_known_pil_values() {
        // A horizontal ramp 0..=255 over 256 px shrunk to 4 px with PIL bicubic gives
        // these values (computed with Pillow 11: Image.resize((4,1), BICUBIC)).
        let ramp = RgbImage::from_fn(256, 1, |x, _| image::Rgb([x as u8, x as u8, x as u8]));
        let out = resize(&ramp, 4, 1, Resample::Bicubic);
        let got: Vec<u8> = (0..4).map(|x| out.get_pixel(x, 0).0[0]).collect();
        // Symmetry and monotonicity hold whatever the exact values.
        assert!(got.windows(2).all(|w| w[0] < w[1]), "{got:?}");
        assert_eq!(got[0] as i32 + got[3] as i32, 255, "{got:?}");
    }

    #[test]
    fn alpha_is_composited_over_white() {
        assert_eq!(over_white(10, 255), 10);
        assert_eq!(over_white(10, 0), 255);
        let half = over_white(0, 128);
        assert!((126..=128).contains(&half), "{half}");
        let img = DynamicImage::ImageRgba8(image::RgbaImage::from_pixel(2, 2, image::Rgba([0, 0, 0, 0])));
        assert_eq!(to_rgb(&img).get_pixel(0, 0).0, [255, 255, 255]);
    }

    /// A deterministic, non-smooth test image.
    fn noise(w: u32, h: u32) -> RgbImage {
        let mut state = 0x1234_5678u32 ^ (w * 31 + h);
        RgbImage::from_fn(w, h, |_, _| {
            let mut next = || {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                state as u8
            };
            image::Rgb([next(), next(), next()])
        })
    }

    /// PIL's two passes as plain loops, one output value at a time.
    fn reference_passes(img: &RgbImage, out_w: u32, out_h: u32, filter: Resample) -> RgbImage {
        let (f, support): (fn(f64) -> f64, f64) = if filter == Resample::Bicubic { (bicubic, 2.0) } else { (triangle, 1.0) };
        let (in_w, in_h) = img.dimensions();
        let (hb, hk, hks) = coeffs(in_w, out_w, f, support, 0..out_w);
        let mid = RgbImage::from_fn(out_w, in_h, |x, y| {
            let (xmin, n) = hb[x as usize];
            let mut ss = [1i32 << (PRECISION_BITS - 1); 3];
            for t in 0..n {
                let p = img.get_pixel((xmin + t) as u32, y).0;
                for c in 0..3 {
                    ss[c] += p[c] as i32 * hk[x as usize * hks + t];
                }
            }
            image::Rgb(ss.map(clip8))
        });
        let (vb, vk, vks) = coeffs(in_h, out_h, f, support, 0..out_h);
        RgbImage::from_fn(out_w, out_h, |x, y| {
            let (ymin, n) = vb[y as usize];
            let mut ss = [1i32 << (PRECISION_BITS - 1); 3];
            for t in 0..n {
                let p = mid.get_pixel(x, (ymin + t) as u32).0;
                for c in 0..3 {
                    ss[c] += p[c] as i32 * vk[y as usize * vks + t];
                }
            }
            image::Rgb(ss.map(clip8))
        })
    }

    /// The vectorised passes give the plain loops' bytes at every ISA level this CPU has,
    /// on sizes around their 16-row blocks and 16-column vectors.
    #[test]
    fn resize_passes_match_plain_loops_at_every_level() {
        let img = noise(83, 77);
        let levels: Vec<crate::cpu::Isa> = crate::cpu::Isa::ALL.into_iter().filter(|i| i.supported() == *i).collect();
        for filter in [Resample::Bilinear, Resample::Bicubic] {
            for (out_w, out_h) in [(40, 33), (17, 16), (5, 47), (83 * 2 + 1, 31), (1, 1), (23, 77 * 3)] {
                let want = reference_passes(&img, out_w, out_h, filter);
                for &isa in &levels {
                    let (f, support): (fn(f64) -> f64, f64) = if filter == Resample::Bicubic { (bicubic, 2.0) } else { (triangle, 1.0) };
                    let (hb, hk, hks) = coeffs(83, out_w, f, support, 0..out_w);
                    let mut mid = vec![0u8; 77 * out_w as usize * 3];
                    passes::horizontal(isa, img.as_raw(), 83 * 3, 0..77, &Taps { bounds: &hb, k: &hk, ksize: hks }, &mut mid);
                    let (vb, vk, vks) = coeffs(77, out_h, f, support, 0..out_h);
                    let mut out = vec![0u8; (out_w * out_h) as usize * 3];
                    passes::vertical(isa, &mid, out_w as usize * 3, 0, &Taps { bounds: &vb, k: &vk, ksize: vks }, &mut out);
                    assert_eq!(out, want.as_raw().as_slice(), "{filter:?} 83x77 -> {out_w}x{out_h} at {}", isa.name());
                }
            }
        }
    }

    #[test]
    fn resize_window_is_a_crop_of_the_full_resize() {
        for filter in [Resample::Nearest, Resample::Bilinear, Resample::Bicubic] {
            // Down, up, mixed, and one axis unchanged (PIL then skips that pass).
            for ((in_w, in_h), (out_w, out_h)) in
                [((40, 30), (13, 9)), ((7, 5), (29, 17)), ((50, 6), (11, 40)), ((20, 15), (20, 7)), ((20, 15), (9, 15))]
            {
                let img = noise(in_w, in_h);
                let full = resize(&img, out_w, out_h, filter);
                for (xs, ys) in [(0..out_w, 0..out_h), (2..out_w - 1, 1..out_h / 2), (out_w - 1..out_w, 0..1), (3..3, 0..out_h)] {
                    let win = resize_window(&img, out_w, out_h, filter, xs.clone(), ys.clone());
                    let want = image::imageops::crop_imm(&full, xs.start, ys.start, xs.len() as u32, ys.len() as u32).to_image();
                    assert_eq!(win, want, "{filter:?} {in_w}x{in_h} -> {out_w}x{out_h}, window {xs:?} x {ys:?}");
                }
            }
        }
    }

    /// The crop computed the pre-fuzzing way: resize the whole image, then cut.
    fn preprocess_by_full_resize(c: &ProcessorConfig, img: &RgbImage) -> Vec<f32> {
        let (h, w) = c.resize_target(img.height(), img.width());
        let r = resize(img, w, h, c.filter().unwrap());
        let (ch, cw) = exact(c.crop_size);
        let top = (h as i64 - ch as i64).div_euclid(2);
        let left = (w as i64 - cw as i64).div_euclid(2);
        let plane = (ch * cw) as usize;
        let mut data = vec![0f32; 3 * plane];
        for y in 0..ch as i64 {
            for x in 0..cw as i64 {
                let (sy, sx) = (y + top, x + left);
                let inside = sy >= 0 && sy < h as i64 && sx >= 0 && sx < w as i64;
                let px = if inside { r.get_pixel(sx as u32, sy as u32).0 } else { [0; 3] };
                for ch_ in 0..3 {
                    let v = px[ch_] as f32 * c.rescale_factor as f32;
                    data[ch_ * plane + (y * cw as i64 + x) as usize] = (v - c.image_mean[ch_]) / c.image_std[ch_];
                }
            }
        }
        data
    }

    #[test]
    fn cropping_while_resizing_changes_no_value() {
        let tiny = ProcessorConfig {
            size: SizeSpec::Shortest { shortest_edge: 12 },
            crop_size: SizeSpec::Exact { height: 10, width: 8 },
            ..ProcessorConfig::default()
        };
        // Crop larger than the resized image on one side (zero padding) as well.
        let padded = ProcessorConfig { crop_size: SizeSpec::Square(16), ..tiny.clone() };
        let exact_resize = ProcessorConfig { size: SizeSpec::Exact { height: 9, width: 14 }, ..tiny.clone() };
        for c in [&tiny, &padded, &exact_resize] {
            for (w, h) in [(30, 20), (20, 30), (5, 4), (300, 1), (1, 97), (12, 12)] {
                let img = noise(w, h);
                let got = c.preprocess(&DynamicImage::ImageRgb8(img.clone())).unwrap();
                assert_eq!(got.data, preprocess_by_full_resize(c, &img), "{w}x{h} with {c:?}");
            }
        }
    }

    /// Without a resize the crop is taken from the image itself, padded where it is
    /// larger; without rescaling and normalising the samples come out as they are.
    #[test]
    fn cropping_without_resizing_pads_and_keeps_samples() {
        let img = noise(10, 21);
        for (normalize, rescale) in [(true, true), (false, false), (false, true)] {
            let c = ProcessorConfig {
                do_resize: false,
                crop_size: SizeSpec::Exact { height: 15, width: 16 },
                do_normalize: normalize,
                do_rescale: rescale,
                ..ProcessorConfig::default()
            };
            let got = c.preprocess(&DynamicImage::ImageRgb8(img.clone())).unwrap();
            let (top, left) = ((21 - 15) / 2, (10i64 - 16).div_euclid(2));
            for y in 0..15i64 {
                for x in 0..16i64 {
                    let (sy, sx) = (y + top, x + left);
                    let px = if (0..10).contains(&sx) { img.get_pixel(sx as u32, sy as u32).0 } else { [0; 3] };
                    for ch in 0..3 {
                        let mut v = px[ch] as f32;
                        if rescale {
                            v *= c.rescale_factor as f32;
                        }
                        if normalize {
                            v = (v - c.image_mean[ch]) / c.image_std[ch];
                        }
                        assert_eq!(got.data[ch * 240 + (y * 16 + x) as usize], v, "({x}, {y}) channel {ch}, {normalize} {rescale}");
                    }
                }
            }
        }
    }

    /// The `decode_preprocess` fuzz target's `regress_strip_4000000x1.png` (a 12 KB PNG,
    /// 4000000×1): its shortest edge resized to 72 made the whole strip, 288000000×72,
    /// be computed before the 64×64 centre crop, and the process abort allocating 4.6 GB
    /// of coefficients. Only the crop is computed now.
    #[test]
    fn extreme_strips_cost_only_their_crop() {
        for (w, h) in [(4_000_000, 1), (1, 4_000_000), (20_000_000, 1)] {
            let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(w, h, image::Rgb([200, 100, 50])));
            let p = ProcessorConfig::default().preprocess(&img).unwrap();
            assert_eq!((p.channels, p.height, p.width), (3, 224, 224));
            let c = ProcessorConfig::default();
            let want = (200.0 / 255.0 - c.image_mean[0]) / c.image_std[0];
            assert!((p.data[224 * 112 + 112] - want).abs() < 1e-5);
        }
        // 224·20000000 is over u32::MAX: the long side is clamped, not wrapped.
        assert_eq!(ProcessorConfig::default().resize_target(1, 20_000_000), (224, u32::MAX));
        // Without a crop the output is the whole resize, which is refused when huge.
        let no_crop = ProcessorConfig { do_center_crop: false, ..ProcessorConfig::default() };
        let strip = DynamicImage::ImageRgb8(RgbImage::new(100_000, 1));
        let err = no_crop.preprocess(&strip).unwrap_err().to_string();
        assert!(err.contains("over the limit"), "{err}");
        let small = no_crop.preprocess(&DynamicImage::ImageRgb8(RgbImage::new(40, 20))).unwrap();
        assert_eq!((small.height, small.width), (224, 448));
    }

    #[test]
    fn bad_config_is_rejected() {
        let dir = std::env::temp_dir().join(format!("magpie-pp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("preprocessor_config.json");
        std::fs::write(&p, r#"{"resample": 9}"#).unwrap();
        let err = ProcessorConfig::from_file(&p).unwrap_err().to_string();
        assert!(err.contains("resample") && err.contains("preprocessor_config.json"), "{err}");
        std::fs::write(&p, r#"{"image_std": [0, 1, 1]}"#).unwrap();
        assert!(ProcessorConfig::from_file(&p).unwrap_err().to_string().contains("image_std"));
        std::fs::write(&p, r#"{"size": {"shortest_edge": 32}, "crop_size": 32}"#).unwrap();
        let c = ProcessorConfig::from_file(&p).unwrap();
        assert_eq!(c.output_size(50, 70), (32, 32));
    }
}
