//! magpie-media: turns image files into pixels, safely.
//!
//! It owns format detection by content ([`sniff`]; extensions are never trusted), the
//! decompression-bomb guard ([`DecodeOptions::max_pixels`], checked against the header
//! before any pixel buffer exists), EXIF ([`ExifInfo`]: time, camera, GPS, orientation —
//! which is applied to the pixels), reduced-scale JPEG decoding (DC coefficients only, or
//! through the DCT) for images that only feed a model ([`DecodeOptions::min_side`]), the
//! colour conversion the models expect ([`to_rgb8`]) and small JPEG thumbnails
//! ([`thumbnail`]). Every error names the file, so the engine can record it and move on.
//!
//! ```
//! use magpie_media::{decode_bytes, to_rgb8, DecodeOptions, Format};
//!
//! // A PNG, whatever its name says.
//! let mut png = Vec::new();
//! magpie_media::image::RgbImage::from_pixel(64, 48, magpie_media::image::Rgb([200, 10, 10]))
//!     .write_to(&mut std::io::Cursor::new(&mut png), magpie_media::image::ImageFormat::Png)?;
//!
//! let opts = DecodeOptions { min_side: Some(224), ..DecodeOptions::default() };
//! let decoded = decode_bytes(&png, &opts, "holiday.jpg")?;
//! assert_eq!(decoded.meta.format, Format::Png);
//! assert_eq!((decoded.meta.width, decoded.meta.height), (64, 48));
//! assert_eq!(to_rgb8(&decoded.image).get_pixel(0, 0).0, [200, 10, 10]);
//!
//! let err = decode_bytes(b"just text", &opts, "notes.jpg").unwrap_err();
//! assert_eq!(err.to_string(), "notes.jpg: not an image (unrecognised content)");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod error;
mod exif;
mod jpeg;
mod jpeg_dc;
mod sniff;

use std::borrow::Cow;
use std::io::Cursor;
use std::path::Path;

use image::{DynamicImage, GenericImageView, ImageDecoder, ImageReader, Limits, RgbImage};
use serde::{Deserialize, Serialize};

pub use error::{Error, Result};
pub use exif::ExifInfo;
pub use image;
pub use jpeg::reduction_for;
pub use sniff::{sniff, Format};

/// Pillow's decompression-bomb limit: `Image.MAX_IMAGE_PIXELS` (89,478,485) warns, twice
/// that raises `DecompressionBombError`. We refuse at the same point.
pub const DEFAULT_MAX_PIXELS: u64 = 178_956_970;

/// Bytes per pixel of the widest colour type any of our decoders produces (RGBA f32).
const MAX_BYTES_PER_PIXEL: u64 = 16;
/// Headroom for decoders' intermediate buffers (strips, rows, palettes) beyond the output.
const INTERMEDIATE_HEADROOM: u64 = 64 << 20;

/// How to decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DecodeOptions {
    /// Refuse images whose header declares more pixels than this (width × height).
    pub max_pixels: u64,
    /// The shorter side the caller will resize to (a model's input side). When set, a
    /// large JPEG is decoded at reduced scale: at 1/8 from its DC coefficients alone (each
    /// pixel the exact mean of its 8×8 block) when that keeps the shorter side ≥
    /// `min_side`, otherwise at 1/2 or 1/4 through the DCT keeping it ≥ 2·`min_side` (see
    /// [`reduction_for`]). Other formats always decode at full size. `None`: full size
    /// always (thumbnails of originals, viewers).
    pub min_side: Option<u32>,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        DecodeOptions {
            max_pixels: DEFAULT_MAX_PIXELS,
            min_side: None,
        }
    }
}

impl DecodeOptions {
    /// Full-size decoding with the default pixel limit, but allowed to reduce JPEGs for a
    /// model whose input side is `min_side`.
    pub fn for_model(min_side: u32) -> Self {
        DecodeOptions {
            min_side: Some(min_side),
            ..Self::default()
        }
    }

    fn max_alloc(&self) -> u64 {
        self.max_pixels
            .saturating_mul(MAX_BYTES_PER_PIXEL)
            .saturating_add(INTERMEDIATE_HEADROOM)
    }

    fn check_pixels(&self, width: u32, height: u32, path: &Path) -> Result<()> {
        let pixels = width as u64 * height as u64;
        if pixels > self.max_pixels {
            return Err(Error::TooLarge {
                path: path.to_path_buf(),
                width,
                height,
                pixels,
                limit: self.max_pixels,
            });
        }
        Ok(())
    }
}

/// What we know about an image besides its pixels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageMeta {
    /// Width of the full-size image after EXIF orientation (even when the pixels were
    /// decoded at reduced scale).
    pub width: u32,
    /// Height of the full-size image after EXIF orientation.
    pub height: u32,
    pub format: Format,
    pub exif: ExifInfo,
}

/// A decoded image: pixels with EXIF orientation applied, and its metadata.
#[derive(Debug, Clone)]
pub struct Decoded {
    /// The pixels, upright. Smaller than `meta.width`×`meta.height` when a JPEG was
    /// decoded at reduced scale. Colour type as stored (use [`to_rgb8`] for models).
    pub image: DynamicImage,
    pub meta: ImageMeta,
}

/// Reads and decodes one file. The format is detected from the content.
pub fn decode_file(path: impl AsRef<Path>, opts: &DecodeOptions) -> Result<Decoded> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    decode_bytes(&bytes, opts, path)
}

/// Decodes an image held in memory (an upload, a file already read for hashing).
/// `path_for_errors` only labels errors.
pub fn decode_bytes(
    bytes: &[u8],
    opts: &DecodeOptions,
    path_for_errors: impl AsRef<Path>,
) -> Result<Decoded> {
    let path = path_for_errors.as_ref();
    if bytes.is_empty() {
        return Err(Error::Empty {
            path: path.to_path_buf(),
        });
    }
    let format = sniff(bytes).ok_or_else(|| Error::NotAnImage {
        path: path.to_path_buf(),
    })?;
    if !format.is_decodable() {
        return Err(Error::UnsupportedFormat {
            path: path.to_path_buf(),
            format,
        });
    }

    let exif = ExifInfo::from_container(bytes);
    // A decoder bug on hostile input must cost one file, not the whole walk.
    let (mut image, (width, height)) =
        std::panic::catch_unwind(|| decode_pixels(bytes, format, opts, path)).unwrap_or_else(
            |_| {
                Err(Error::Corrupt {
                    path: path.to_path_buf(),
                    format,
                    detail: "decoder panicked".into(),
                })
            },
        )?;

    let orientation = exif.orientation.unwrap_or(1);
    if let Some(o) = image::metadata::Orientation::from_exif(orientation as u8) {
        image.apply_orientation(o);
    }
    let (width, height) = if orientation >= 5 {
        (height, width)
    } else {
        (width, height)
    };
    Ok(Decoded {
        image,
        meta: ImageMeta {
            width,
            height,
            format,
            exif,
        },
    })
}

/// Pixels as stored plus the full-size (pre-orientation) dimensions.
fn decode_pixels(
    bytes: &[u8],
    format: Format,
    opts: &DecodeOptions,
    path: &Path,
) -> Result<(DynamicImage, (u32, u32))> {
    let image_error = |e| Error::from_image(path, format, e);
    if format == Format::Jpeg && !jpeg::has_eoi(bytes) {
        return Err(Error::Corrupt {
            path: path.to_path_buf(),
            format,
            detail: "no end-of-image marker; the file is cut short".into(),
        });
    }
    if format == Format::Jpeg {
        if let Some(side) = opts.min_side {
            // Shorter side still ≥ the model's at 1/8: one pixel per block, from the DC
            // coefficients alone (a box filter, so no aliasing for the resize that
            // follows). The frame's size comes from our own header reader, which does not
            // copy the file as the `image` crate's decoder does first.
            if let Some(jpeg) = jpeg_dc::DcJpeg::parse(bytes) {
                let (width, height) = jpeg.dims();
                opts.check_pixels(width, height, path)?;
                if width.min(height).div_ceil(8) >= side {
                    if let Some(image) = jpeg.decode() {
                        return Ok((image, (width, height)));
                    }
                }
            }
        }
    }
    let image_format = format.to_image_format().expect("decodable format");
    let mut reader = ImageReader::with_format(Cursor::new(bytes), image_format);
    let mut limits = Limits::default();
    limits.max_alloc = Some(opts.max_alloc());
    reader.limits(limits.clone());
    // Parses the header only; no pixel buffer yet.
    let decoder = reader.into_decoder().map_err(image_error)?;
    let (width, height) = decoder.dimensions();
    opts.check_pixels(width, height, path)?;

    if format == Format::Jpeg {
        if let Some(denom) = opts.min_side.and_then(|s| reduction_for(width, height, s)) {
            let max_alloc = usize::try_from(opts.max_alloc()).unwrap_or(usize::MAX);
            if let Some(image) = jpeg::decode_scaled(bytes, denom, max_alloc) {
                return Ok((image, (width, height)));
            }
        }
    }

    limits.reserve(decoder.total_bytes()).map_err(image_error)?;
    let image = DynamicImage::from_decoder(decoder).map_err(image_error)?;
    Ok((image, (width, height)))
}

/// The 8-bit RGB image a model sees, converting as Pillow's `convert("RGB")` does where
/// the two agree:
///
/// - grey → the value replicated in R, G and B;
/// - RGBA / grey+alpha → alpha dropped, **not** composited on any background;
/// - 16-bit → 8-bit by rounding `v·255/65535` (the `image` crate's rule). Pillow differs
///   here: it opens a 16-bit RGB PNG as 8-bit by keeping the high byte (`v >> 8`, at most
///   1 lower than ours), and a 16-bit grey PNG as mode `I;16`, whose `convert("RGB")`
///   *clips* at 255 instead of scaling, turning almost every pixel white. We scale,
///   which keeps the picture.
/// - float (32-bit TIFF) → clamped to [0, 1] and scaled to 0–255.
///
/// CMYK JPEGs are already RGB when decoded. Animated GIF/WebP decode to their first frame.
pub fn to_rgb8(image: &DynamicImage) -> RgbImage {
    match image {
        DynamicImage::ImageRgb8(rgb) => rgb.clone(),
        other => other.to_rgb8(),
    }
}

/// A JPEG thumbnail (quality 85) whose longer side is at most `max_side` (images already
/// that small keep their size). Transparent areas are composited on white — unlike
/// [`to_rgb8`], this is for people to look at.
pub fn thumbnail(image: &DynamicImage, max_side: u32) -> Result<Vec<u8>> {
    let max_side = max_side.clamp(1, u16::MAX as u32);
    let (w, h) = image.dimensions();
    if w == 0 || h == 0 {
        return Err(Error::Encode(format!("image is {w}×{h}")));
    }
    let small: Cow<DynamicImage> = if w.max(h) > max_side {
        Cow::Owned(image.thumbnail(max_side, max_side))
    } else {
        Cow::Borrowed(image)
    };
    let rgb = if small.color().has_alpha() {
        let rgba = small.to_rgba8();
        let mut rgb = RgbImage::new(rgba.width(), rgba.height());
        for (dst, src) in rgb.pixels_mut().zip(rgba.pixels()) {
            let a = src[3] as u32;
            for c in 0..3 {
                dst[c] = ((src[c] as u32 * a + 255 * (255 - a) + 127) / 255) as u8;
            }
        }
        rgb
    } else {
        small.to_rgb8()
    };
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 85)
        .encode_image(&rgb)
        .map_err(|e| Error::Encode(e.to_string()))?;
    Ok(out)
}

impl From<Error> for magpie_core::Error {
    fn from(e: Error) -> Self {
        let full = e.to_string();
        match e.path() {
            Some(path) => {
                let prefix = format!("{}: ", path.display());
                magpie_core::Error::WithPath {
                    path: path.to_path_buf(),
                    message: full.strip_prefix(&prefix).unwrap_or(&full).to_string(),
                }
            }
            None => magpie_core::Error::Model(full),
        }
    }
}
