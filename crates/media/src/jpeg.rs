//! JPEG specifics: reduced-scale decoding through the DCT (jpeg-decoder's `scale`), and
//! the end-of-image check that turns a silently grey-padded truncated file into an error.

use image::{DynamicImage, GrayImage, RgbImage};
use jpeg_decoder::PixelFormat;

/// The scale denominator (2, 4 or 8) for a JPEG of `width`×`height` when the caller needs
/// a shorter side of at least `min_side`: the largest reduction whose shorter side is
/// still ≥ 2·`min_side`, so that a later bicubic resize to `min_side` keeps its quality.
/// `None` when even halving would go below that (decode at full size).
pub fn reduction_for(width: u32, height: u32, min_side: u32) -> Option<u32> {
    let short = width.min(height) as u64;
    let need = 2 * min_side as u64;
    [8u32, 4, 2]
        .into_iter()
        .find(|&d| short.div_ceil(d as u64) >= need)
}

/// Decodes at 1/`denom` scale. `None` means "use the full-size decoder instead": the file
/// uses something this path does not cover (12-bit samples), or jpeg-decoder rejected it
/// (the full-size decoder then gives the authoritative error).
pub(crate) fn decode_scaled(bytes: &[u8], denom: u32, max_alloc: usize) -> Option<DynamicImage> {
    let mut decoder = jpeg_decoder::Decoder::new(bytes);
    decoder.set_max_decoding_buffer_size(max_alloc);
    decoder.read_info().ok()?;
    let info = decoder.info()?;
    if info.pixel_format == PixelFormat::L16 {
        return None;
    }
    let (w, h) = (info.width as u32, info.height as u32);
    let k = 8 / denom; // idct size: output = ceil(size · k / 8)
    let req = |n: u32| (n * k).div_ceil(8) as u16;
    let (ow, oh) = decoder.scale(req(w), req(h)).ok()?;
    if (ow as u32, oh as u32) != (req(w) as u32, req(h) as u32) {
        return None;
    }
    let pixels = decoder.decode().ok()?;
    let (ow, oh) = (ow as u32, oh as u32);
    match info.pixel_format {
        PixelFormat::L8 => GrayImage::from_raw(ow, oh, pixels).map(DynamicImage::ImageLuma8),
        PixelFormat::RGB24 => RgbImage::from_raw(ow, oh, pixels).map(DynamicImage::ImageRgb8),
        PixelFormat::CMYK32 => {
            if pixels.len() != ow as usize * oh as usize * 4 {
                return None;
            }
            let rgb = pixels.chunks_exact(4).flat_map(cmyk_to_rgb).collect();
            RgbImage::from_raw(ow, oh, rgb).map(DynamicImage::ImageRgb8)
        }
        PixelFormat::L16 => None,
    }
}

/// jpeg-decoder hands out true (non-inverted) CMYK, Adobe inversion already undone;
/// R = (255−C)(255−K)/255, rounded exactly as zune-jpeg (the full-size path) does, which
/// is also what Pillow's `convert("RGB")` computes for a CMYK JPEG.
fn cmyk_to_rgb(p: &[u8]) -> [u8; 3] {
    let k = 255 - p[3];
    [
        mul_div_255(255 - p[0], k),
        mul_div_255(255 - p[1], k),
        mul_div_255(255 - p[2], k),
    ]
}

fn mul_div_255(a: u8, b: u8) -> u8 {
    let t = a as u32 * b as u32 + 128;
    ((t + (t >> 8)) >> 8) as u8
}

/// Whether the entropy-coded data is followed by an EOI marker (`FF D9`). A truncated
/// JPEG lacks it, and both decoders would otherwise pad the missing rows with grey and
/// succeed. Entropy-coded data cannot contain `FF D9` (0xFF is stuffed as `FF 00`), but
/// EXIF thumbnails before the first SOS can, so the search starts at the first scan.
pub(crate) fn has_eoi(bytes: &[u8]) -> bool {
    if bytes.ends_with(&[0xFF, 0xD9]) {
        return true;
    }
    let Some(sos) = first_scan(bytes) else {
        return false;
    };
    bytes[sos..].windows(2).any(|w| w == [0xFF, 0xD9])
}

/// Offset of the first SOS segment, walking the marker segments after SOI.
fn first_scan(b: &[u8]) -> Option<usize> {
    let mut i = 2;
    loop {
        if *b.get(i)? != 0xFF {
            return None;
        }
        while *b.get(i + 1)? == 0xFF {
            i += 1; // fill bytes
        }
        let marker = *b.get(i + 1)?;
        match marker {
            0xDA => return Some(i),
            0x01 | 0xD0..=0xD8 => i += 2,
            _ => {
                let len = u16::from_be_bytes([*b.get(i + 2)?, *b.get(i + 3)?]) as usize;
                i += 2 + len;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reduction_keeps_twice_min_side() {
        // 4000×3000 for a 224 model: 3000/4 = 750 ≥ 448 but 3000/8 = 375 < 448.
        assert_eq!(reduction_for(4000, 3000, 224), Some(4));
        assert_eq!(reduction_for(4000, 3000, 100), Some(8));
        assert_eq!(reduction_for(4000, 3000, 700), Some(2));
        assert_eq!(reduction_for(4000, 3000, 751), None);
        assert_eq!(reduction_for(800, 600, 224), None);
        // Rounding up: 897/2 = 448.5 → 449 ≥ 448.
        assert_eq!(reduction_for(897, 2000, 224), Some(2));
        assert_eq!(reduction_for(895, 2000, 224), Some(2)); // 447.5 → 448
        assert_eq!(reduction_for(893, 2000, 224), None);
    }

    #[test]
    fn cmyk_conversion_matches_pil_formula() {
        assert_eq!(cmyk_to_rgb(&[0, 0, 0, 0]), [255, 255, 255]);
        assert_eq!(cmyk_to_rgb(&[255, 0, 0, 0]), [0, 255, 255]);
        assert_eq!(cmyk_to_rgb(&[0, 0, 0, 255]), [0, 0, 0]);
        // (255-100)(255-50)/255 = 124.6 → 125
        assert_eq!(cmyk_to_rgb(&[100, 100, 100, 50])[0], 125);
    }

    #[test]
    fn eoi_search_skips_exif_thumbnail() {
        // SOI, APP1 containing FF D9 (a thumbnail's EOI), SOS, data without EOI.
        let mut b = vec![0xFF, 0xD8, 0xFF, 0xE1, 0x00, 0x06, 0xFF, 0xD9, 0x00, 0x00];
        b.extend_from_slice(&[0xFF, 0xDA, 0x00, 0x02, 0x12, 0x34, 0xFF, 0x00, 0x56]);
        assert!(!has_eoi(&b));
        b.extend_from_slice(&[0xFF, 0xD9, 0x00, 0x00]); // EOI then trailing padding
        assert!(has_eoi(&b));
    }
}
