//! Format detection by magic bytes. Extensions are never consulted: a PNG named
//! `.jpg` is a PNG.

use serde::{Deserialize, Serialize};

/// An image container format, as recognised from its first bytes.
///
/// Serialised as a lowercase string (`"jpeg"`, `"png"`, `"webp"`, …). [`Format::Heic`] and
/// [`Format::Avif`] are recognised only to name them in an error: we do not decode them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Jpeg,
    Png,
    Gif,
    WebP,
    Bmp,
    Tiff,
    /// HEIF/HEIC (`ftyp` box with a HEIF brand). Not decoded.
    Heic,
    /// AVIF (`ftyp` box with an AVIF brand). Not decoded.
    Avif,
}

impl Format {
    /// Whether [`crate::decode_bytes`] can decode this format.
    pub fn is_decodable(self) -> bool {
        !matches!(self, Format::Heic | Format::Avif)
    }

    /// The lowercase name used in serde and in the database (`"jpeg"`, `"webp"`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Jpeg => "jpeg",
            Format::Png => "png",
            Format::Gif => "gif",
            Format::WebP => "webp",
            Format::Bmp => "bmp",
            Format::Tiff => "tiff",
            Format::Heic => "heic",
            Format::Avif => "avif",
        }
    }

    pub(crate) fn to_image_format(self) -> Option<image::ImageFormat> {
        use image::ImageFormat as F;
        Some(match self {
            Format::Jpeg => F::Jpeg,
            Format::Png => F::Png,
            Format::Gif => F::Gif,
            Format::WebP => F::WebP,
            Format::Bmp => F::Bmp,
            Format::Tiff => F::Tiff,
            Format::Heic | Format::Avif => return None,
        })
    }
}

/// Upper-case display name, as used in error messages (`JPEG`, `HEIC`, …).
impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Format::Jpeg => "JPEG",
            Format::Png => "PNG",
            Format::Gif => "GIF",
            Format::WebP => "WebP",
            Format::Bmp => "BMP",
            Format::Tiff => "TIFF",
            Format::Heic => "HEIC",
            Format::Avif => "AVIF",
        })
    }
}

/// Recognises an image format from the first bytes of a file (16 are enough for all
/// but HEIC/AVIF, whose `ftyp` box may list its compatible brands further on).
///
/// ```
/// use magpie_media::{sniff, Format};
/// assert_eq!(sniff(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"), Some(Format::Png));
/// assert_eq!(sniff(b"hello, world"), None);
/// ```
pub fn sniff(bytes: &[u8]) -> Option<Format> {
    let b = bytes;
    if b.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return Some(Format::Jpeg);
    }
    if b.starts_with(b"\x89PNG\r\n\x1a\n") {
        return Some(Format::Png);
    }
    if b.starts_with(b"GIF87a") || b.starts_with(b"GIF89a") {
        return Some(Format::Gif);
    }
    if b.len() >= 12 && &b[0..4] == b"RIFF" && &b[8..12] == b"WEBP" {
        return Some(Format::WebP);
    }
    // TIFF and BigTIFF, both byte orders.
    if b.starts_with(b"II*\0")
        || b.starts_with(b"MM\0*")
        || b.starts_with(b"II+\0")
        || b.starts_with(b"MM\0+")
    {
        return Some(Format::Tiff);
    }
    // "BM" alone is two ASCII letters; also require a known DIB header size, as PIL does.
    if b.len() >= 18 && b.starts_with(b"BM") {
        let dib = u32::from_le_bytes([b[14], b[15], b[16], b[17]]);
        if matches!(dib, 12 | 16 | 40 | 52 | 56 | 64 | 108 | 124) {
            return Some(Format::Bmp);
        }
    }
    sniff_isobmff(b)
}

/// HEIF family: `[size]ftyp[major brand][minor version][compatible brands…]`.
fn sniff_isobmff(b: &[u8]) -> Option<Format> {
    if b.len() < 12 || &b[4..8] != b"ftyp" {
        return None;
    }
    let size = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
    let end = size.clamp(12, b.len().min(4096));
    let major = &b[8..12];
    let compatible = b.get(16..end).unwrap_or(&[]);
    let brands = std::iter::once(major).chain(compatible.chunks_exact(4));
    let mut heif = false;
    for brand in brands {
        match brand {
            b"avif" | b"avis" => return Some(Format::Avif),
            b"heic" | b"heix" | b"hevc" | b"hevx" | b"heim" | b"heis" | b"hevm" | b"hevs"
            | b"mif1" | b"msf1" => heif = true,
            _ => {}
        }
    }
    heif.then_some(Format::Heic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_bytes() {
        assert_eq!(sniff(&[0xFF, 0xD8, 0xFF, 0xE0]), Some(Format::Jpeg));
        assert_eq!(sniff(b"GIF89a\x01\x00"), Some(Format::Gif));
        assert_eq!(sniff(b"RIFF\x10\0\0\0WEBPVP8L"), Some(Format::WebP));
        assert_eq!(sniff(b"RIFF\x10\0\0\0WAVEfmt "), None);
        assert_eq!(sniff(b"II*\0\x08\0\0\0"), Some(Format::Tiff));
        assert_eq!(sniff(b"MM\0*\0\0\0\x08"), Some(Format::Tiff));
        let mut bmp = b"BM".to_vec();
        bmp.extend_from_slice(&[0; 12]);
        bmp.extend_from_slice(&40u32.to_le_bytes());
        assert_eq!(sniff(&bmp), Some(Format::Bmp));
        assert_eq!(sniff(b"BMW is a car brand, not a bitmap"), None);
        assert_eq!(sniff(b""), None);
        assert_eq!(sniff(&[0xFF, 0xD8]), None);
    }

    #[test]
    fn heif_family_is_named() {
        let heic = b"\0\0\0\x18ftypheic\0\0\0\0mif1heic";
        assert_eq!(sniff(heic), Some(Format::Heic));
        let avif = b"\0\0\0\x1cftypavif\0\0\0\0avifmif1miaf";
        assert_eq!(sniff(avif), Some(Format::Avif));
        // Generic HEIF major brand with AVIF among the compatible brands is AVIF.
        let avif_mif1 = b"\0\0\0\x18ftypmif1\0\0\0\0mif1avif";
        assert_eq!(sniff(avif_mif1), Some(Format::Avif));
        // An MP4 video is an ISO-BMFF file but no image.
        let mp4 = b"\0\0\0\x18ftypisom\0\0\x02\0isomiso2";
        assert_eq!(sniff(mp4), None);
        assert!(!Format::Heic.is_decodable());
        assert_eq!(Format::Heic.to_string(), "HEIC");
    }
}
