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
                let new_long = ((n as u64 * long as u64) / short.max(1) as u64).max(1) as u32;
                if w <= h {
                    (new_long, n)
                } else {
                    (n, new_long)
                }
            }
        }
    }

    /// Runs the whole pipeline on a decoded image; returns normalised CHW values.
    pub fn preprocess(&self, image: &DynamicImage) -> Result<Pixels> {
        if image.width() == 0 || image.height() == 0 {
            return Err(Error::Preprocess("image has no pixels".into()));
        }
        let rgb = to_rgb(image);
        let rgb = if self.do_resize {
            let (h, w) = self.resize_target(rgb.height(), rgb.width());
            resize(&rgb, w, h, self.filter().map_err(Error::Preprocess)?)
        } else {
            rgb
        };
        let (ch, cw) = if self.do_center_crop { exact(self.crop_size) } else { (rgb.height(), rgb.width()) };
        let (h, w) = (rgb.height() as i64, rgb.width() as i64);
        // transformers' center_crop: top = (h - ch) // 2 (floor), padding with zeros when
        // the crop is larger than the image.
        let top = (h - ch as i64).div_euclid(2);
        let left = (w - cw as i64).div_euclid(2);
        let scale = if self.do_rescale { self.rescale_factor as f32 } else { 1.0 };
        let plane = (ch * cw) as usize;
        let mut data = vec![0f32; 3 * plane];
        for y in 0..ch as i64 {
            for x in 0..cw as i64 {
                let (sy, sx) = (y + top, x + left);
                let px = if sy >= 0 && sy < h && sx >= 0 && sx < w {
                    rgb.get_pixel(sx as u32, sy as u32).0
                } else {
                    [0, 0, 0]
                };
                let o = (y * cw as i64 + x) as usize;
                for c in 0..3 {
                    let v = px[c] as f32 * scale;
                    data[c * plane + o] =
                        if self.do_normalize { (v - self.image_mean[c]) / self.image_std[c] } else { v };
                }
            }
        }
        Ok(Pixels { channels: 3, height: ch as usize, width: cw as usize, data })
    }
}

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

/// PIL's `precompute_coeffs` + `normalize_coeffs_8bpc`: per output index, the first input
/// index, the tap count, and fixed-point weights.
fn coeffs(in_size: u32, out_size: u32, filter: fn(f64) -> f64, support: f64) -> (Vec<(usize, usize)>, Vec<i32>, usize) {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = support * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size as usize);
    let mut kk = vec![0i32; out_size as usize * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size as usize {
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
            kk[xx * ksize + x] = if w < 0.0 { (-0.5 + f) as i32 } else { (0.5 + f) as i32 };
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
    let (in_w, in_h) = img.dimensions();
    if (in_w, in_h) == (out_w, out_h) {
        return img.clone();
    }
    if filter == Resample::Nearest {
        return nearest(img, out_w, out_h);
    }
    let (f, support): (fn(f64) -> f64, f64) = match filter {
        Resample::Bicubic => (bicubic, 2.0),
        _ => (triangle, 1.0),
    };
    let src = img.as_raw();
    // Horizontal pass over only the rows the vertical pass will read.
    let (vb, vk, vks) = coeffs(in_h, out_h, f, support);
    let first = vb.first().map(|b| b.0).unwrap_or(0);
    let last = vb.last().map(|b| b.0 + b.1).unwrap_or(in_h as usize);
    let (tmp, tmp_w, row0) = if in_w != out_w {
        let (hb, hk, hks) = coeffs(in_w, out_w, f, support);
        let rows = last - first;
        let mut tmp = vec![0u8; rows * out_w as usize * 3];
        for (r, out_row) in tmp.chunks_exact_mut(out_w as usize * 3).enumerate() {
            let row = &src[(r + first) * in_w as usize * 3..][..in_w as usize * 3];
            for (xx, &(xmin, n)) in hb.iter().enumerate() {
                let k = &hk[xx * hks..][..n];
                let mut ss = [1i32 << (PRECISION_BITS - 1); 3];
                for (x, &kw) in k.iter().enumerate() {
                    let p = &row[(xmin + x) * 3..][..3];
                    for c in 0..3 {
                        ss[c] += p[c] as i32 * kw;
                    }
                }
                for c in 0..3 {
                    out_row[xx * 3 + c] = clip8(ss[c]);
                }
            }
        }
        (tmp, out_w as usize, first)
    } else {
        (src.to_vec(), in_w as usize, 0)
    };
    if in_h == out_h {
        return RgbImage::from_raw(out_w, out_h, tmp).expect("buffer size matches");
    }
    let stride = tmp_w * 3;
    let mut out = vec![0u8; out_h as usize * stride];
    for (yy, &(ymin, n)) in vb.iter().enumerate() {
        let k = &vk[yy * vks..][..n];
        let out_row = &mut out[yy * stride..][..stride];
        for (i, o) in out_row.iter_mut().enumerate() {
            let mut ss = 1i32 << (PRECISION_BITS - 1);
            for (y, &kw) in k.iter().enumerate() {
                ss += tmp[(ymin - row0 + y) * stride + i] as i32 * kw;
            }
            *o = clip8(ss);
        }
    }
    RgbImage::from_raw(out_w, out_h, out).expect("buffer size matches")
}

fn nearest(img: &RgbImage, out_w: u32, out_h: u32) -> RgbImage {
    let (in_w, in_h) = img.dimensions();
    RgbImage::from_fn(out_w, out_h, |x, y| {
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
