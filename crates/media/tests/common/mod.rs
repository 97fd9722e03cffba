//! Builders for test files: hand-made EXIF (TIFF) blocks, JPEG APP1 insertion, PNG
//! chunks, animated WebP. Nothing here uses the crate under test.
#![allow(dead_code)]

use std::io::Cursor;

use magpie_media::image::{self, DynamicImage, ImageFormat};

pub fn encode(img: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), format).unwrap();
    out
}

pub fn encode_jpeg(img: &DynamicImage, quality: u8) -> Vec<u8> {
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality)
        .encode_image(img)
        .unwrap();
    out
}

/// A deterministic, textured RGB image: gradients plus pseudo-random grain, so that JPEG
/// files have realistic entropy.
pub fn textured(width: u32, height: u32, seed: u32) -> DynamicImage {
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    let img = image::RgbImage::from_fn(width, height, |x, y| {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let grain = (state % 24) as i32 - 12;
        let fx = x as f32 / width as f32;
        let fy = y as f32 / height as f32;
        let wave = ((fx * 37.0).sin() * (fy * 23.0).cos() * 60.0) as i32;
        let r = (fx * 200.0) as i32 + wave + grain;
        let g = (fy * 200.0) as i32 - wave / 2 + grain;
        let b = ((fx + fy) * 100.0) as i32 + grain;
        image::Rgb([clamp(r), clamp(g), clamp(b)])
    });
    DynamicImage::ImageRgb8(img)
}

fn clamp(v: i32) -> u8 {
    v.clamp(0, 255) as u8
}

// ---------------------------------------------------------------- EXIF (TIFF) builder

/// One IFD entry: tag, TIFF type, count, little-endian value bytes.
pub struct Entry(pub u16, pub u16, pub u32, pub Vec<u8>);

pub fn ascii(tag: u16, s: &str) -> Entry {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    Entry(tag, 2, v.len() as u32, v)
}
pub fn short(tag: u16, v: u16) -> Entry {
    Entry(tag, 3, 1, v.to_le_bytes().to_vec())
}
pub fn rationals(tag: u16, v: &[(u32, u32)]) -> Entry {
    let bytes = v
        .iter()
        .flat_map(|(n, d)| [n.to_le_bytes(), d.to_le_bytes()].concat())
        .collect();
    Entry(tag, 5, v.len() as u32, bytes)
}

pub const TAG_MAKE: u16 = 0x010F;
pub const TAG_MODEL: u16 = 0x0110;
pub const TAG_ORIENTATION: u16 = 0x0112;
pub const TAG_DATETIME: u16 = 0x0132;
pub const TAG_EXIF_IFD: u16 = 0x8769;
pub const TAG_GPS_IFD: u16 = 0x8825;
pub const TAG_DATETIME_ORIGINAL: u16 = 0x9003;
pub const TAG_OFFSET_TIME_ORIGINAL: u16 = 0x9011;
pub const TAG_GPS_LAT_REF: u16 = 1;
pub const TAG_GPS_LAT: u16 = 2;
pub const TAG_GPS_LON_REF: u16 = 3;
pub const TAG_GPS_LON: u16 = 4;

fn ifd_size(entries: &[Entry]) -> usize {
    2 + 12 * entries.len()
        + 4
        + entries
            .iter()
            .map(|e| {
                if e.3.len() > 4 {
                    e.3.len().next_multiple_of(2)
                } else {
                    0
                }
            })
            .sum::<usize>()
}

fn write_ifd(out: &mut Vec<u8>, entries: &mut [Entry]) {
    entries.sort_by_key(|e| e.0);
    let start = out.len();
    let mut data_at = start + 2 + 12 * entries.len() + 4;
    let mut data = Vec::new();
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    for Entry(tag, ty, count, value) in entries.iter() {
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&ty.to_le_bytes());
        out.extend_from_slice(&count.to_le_bytes());
        if value.len() <= 4 {
            let mut v = value.clone();
            v.resize(4, 0);
            out.extend_from_slice(&v);
        } else {
            out.extend_from_slice(&(data_at as u32).to_le_bytes());
            data.extend_from_slice(value);
            if value.len() % 2 == 1 {
                data.push(0);
            }
            data_at += value.len().next_multiple_of(2);
        }
    }
    out.extend_from_slice(&0u32.to_le_bytes()); // no next IFD
    out.extend_from_slice(&data);
}

/// A little-endian TIFF block: IFD0, then an Exif IFD and a GPS IFD when non-empty.
pub fn exif_block(mut ifd0: Vec<Entry>, mut exif: Vec<Entry>, mut gps: Vec<Entry>) -> Vec<u8> {
    let pointer_count = (!exif.is_empty()) as usize + (!gps.is_empty()) as usize;
    let ifd0_size = ifd_size(&ifd0) + 12 * pointer_count;
    let exif_at = 8 + ifd0_size;
    let gps_at = exif_at + if exif.is_empty() { 0 } else { ifd_size(&exif) };
    if !exif.is_empty() {
        ifd0.push(Entry(
            TAG_EXIF_IFD,
            4,
            1,
            (exif_at as u32).to_le_bytes().to_vec(),
        ));
    }
    if !gps.is_empty() {
        ifd0.push(Entry(
            TAG_GPS_IFD,
            4,
            1,
            (gps_at as u32).to_le_bytes().to_vec(),
        ));
    }
    let mut out = b"II*\0".to_vec();
    out.extend_from_slice(&8u32.to_le_bytes());
    write_ifd(&mut out, &mut ifd0);
    assert_eq!(out.len(), exif_at);
    if !exif.is_empty() {
        write_ifd(&mut out, &mut exif);
    }
    assert_eq!(out.len(), gps_at);
    if !gps.is_empty() {
        write_ifd(&mut out, &mut gps);
    }
    out
}

/// Inserts an APP1 `Exif\0\0` segment carrying `tiff` right after the SOI marker.
pub fn jpeg_with_app1(jpeg: &[u8], tiff: &[u8]) -> Vec<u8> {
    assert_eq!(&jpeg[..2], &[0xFF, 0xD8]);
    let len = 2 + 6 + tiff.len();
    let mut out = vec![0xFF, 0xD8, 0xFF, 0xE1];
    out.extend_from_slice(&(len as u16).to_be_bytes());
    out.extend_from_slice(b"Exif\0\0");
    out.extend_from_slice(tiff);
    out.extend_from_slice(&jpeg[2..]);
    out
}

// ---------------------------------------------------------------- PNG

pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

pub fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut out = (data.len() as u32).to_be_bytes().to_vec();
    let mut body = kind.to_vec();
    body.extend_from_slice(data);
    out.extend_from_slice(&body);
    out.extend_from_slice(&crc32(&body).to_be_bytes());
    out
}

/// A complete, tiny PNG whose IHDR declares `width`×`height` RGB pixels.
pub fn png_declaring(width: u32, height: u32) -> Vec<u8> {
    let mut ihdr = width.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB, deflate, no filter, no interlace
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    out.extend(png_chunk(b"IHDR", &ihdr));
    // A valid zlib stream (one empty stored block); the data is far too short, but a
    // decoder that respects the limit never gets to read it.
    out.extend(png_chunk(
        b"IDAT",
        &[
            0x78, 0x01, 0x01, 0x00, 0x00, 0xFF, 0xFF, 0x00, 0x00, 0x00, 0x01,
        ],
    ));
    out.extend(png_chunk(b"IEND", &[]));
    out
}

// ---------------------------------------------------------------- WebP

fn riff_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut out = kind.to_vec();
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(data);
    if data.len() % 2 == 1 {
        out.push(0);
    }
    out
}

/// The `VP8L` chunk (header included) of a simple lossless WebP file.
fn vp8l_chunk(webp: &[u8]) -> Vec<u8> {
    assert_eq!(&webp[12..16], b"VP8L", "expected a simple lossless WebP");
    let len = u32::from_le_bytes(webp[16..20].try_into().unwrap()) as usize;
    webp[12..20 + len.next_multiple_of(2)].to_vec()
}

fn u24(v: u32) -> [u8; 3] {
    let b = v.to_le_bytes();
    [b[0], b[1], b[2]]
}

/// An animated WebP whose frames are the given same-sized RGBA images.
pub fn animated_webp(frames: &[image::RgbaImage]) -> Vec<u8> {
    let (w, h) = frames[0].dimensions();
    let mut vp8x = vec![0x10 | 0x02, 0, 0, 0]; // alpha + animation
    vp8x.extend_from_slice(&u24(w - 1));
    vp8x.extend_from_slice(&u24(h - 1));
    let mut body = b"WEBP".to_vec();
    body.extend(riff_chunk(b"VP8X", &vp8x));
    body.extend(riff_chunk(b"ANIM", &[0, 0, 0, 0, 0, 0]));
    for frame in frames {
        let mut single = Vec::new();
        image::codecs::webp::WebPEncoder::new_lossless(&mut single)
            .encode(frame.as_raw(), w, h, image::ExtendedColorType::Rgba8)
            .unwrap();
        let mut anmf = Vec::new();
        anmf.extend_from_slice(&u24(0)); // x / 2
        anmf.extend_from_slice(&u24(0)); // y / 2
        anmf.extend_from_slice(&u24(w - 1));
        anmf.extend_from_slice(&u24(h - 1));
        anmf.extend_from_slice(&u24(100)); // duration, ms
        anmf.push(0b10); // no blending, no disposal
        anmf.extend(vp8l_chunk(&single));
        body.extend(riff_chunk(b"ANMF", &anmf));
    }
    let mut out = b"RIFF".to_vec();
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend(body);
    out
}
