mod common;

use common::*;
use magpie_media::image::{self, DynamicImage, GenericImageView, ImageFormat, Rgb, Rgba};
use magpie_media::{decode_bytes, decode_file, thumbnail, to_rgb8, DecodeOptions, Error, Format};

fn opts() -> DecodeOptions {
    DecodeOptions::default()
}

/// Four flat quadrants (red, green, blue, white): survives lossy codecs, shows flips.
fn quadrants(w: u32, h: u32) -> DynamicImage {
    DynamicImage::ImageRgb8(image::RgbImage::from_fn(w, h, |x, y| {
        match (x < w / 2, y < h / 2) {
            (true, true) => Rgb([255, 0, 0]),
            (false, true) => Rgb([0, 255, 0]),
            (true, false) => Rgb([0, 0, 255]),
            (false, false) => Rgb([255, 255, 255]),
        }
    }))
}

fn assert_near(got: [u8; 3], want: [u8; 3], tol: u8, what: &str) {
    for c in 0..3 {
        assert!(
            got[c].abs_diff(want[c]) <= tol,
            "{what}: got {got:?}, want {want:?} (±{tol})"
        );
    }
}

fn assert_quadrants(img: &DynamicImage, tol: u8, what: &str) {
    let rgb = to_rgb8(img);
    let (w, h) = rgb.dimensions();
    let at = |x, y| rgb.get_pixel(x, y).0;
    assert_near(at(w / 4, h / 4), [255, 0, 0], tol, what);
    assert_near(at(3 * w / 4, h / 4), [0, 255, 0], tol, what);
    assert_near(at(w / 4, 3 * h / 4), [0, 0, 255], tol, what);
    assert_near(at(3 * w / 4, 3 * h / 4), [255, 255, 255], tol, what);
}

#[test]
fn every_format_decodes_by_content_under_a_wrong_name() {
    let img = quadrants(64, 48);
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (ImageFormat::Png, Format::Png, "photo.jpg", 0),
        (ImageFormat::Jpeg, Format::Jpeg, "photo.png", 40),
        (ImageFormat::Gif, Format::Gif, "photo.bmp", 8),
        (ImageFormat::WebP, Format::WebP, "photo.gif", 0),
        (ImageFormat::Bmp, Format::Bmp, "photo.tiff", 0),
        (ImageFormat::Tiff, Format::Tiff, "photo.webp", 0),
    ];
    for (encode_as, want, name, tol) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, encode(&img, encode_as)).unwrap();
        let d = decode_file(&path, &opts()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(d.meta.format, want, "{name}");
        assert_eq!((d.meta.width, d.meta.height), (64, 48), "{name}");
        assert_eq!(d.image.dimensions(), (64, 48), "{name}");
        assert_quadrants(&d.image, tol, name);
    }
}

#[test]
fn text_named_jpg_is_not_an_image_and_says_which_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.jpg");
    std::fs::write(&path, "shopping list: eggs, milk\n").unwrap();
    let err = decode_file(&path, &opts()).unwrap_err();
    assert!(matches!(err, Error::NotAnImage { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!("{}: not an image (unrecognised content)", path.display())
    );
    assert_eq!(err.path(), Some(path.as_path()));
}

#[test]
fn empty_and_missing_files_are_errors_with_path() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.png");
    std::fs::write(&empty, b"").unwrap();
    let err = decode_file(&empty, &opts()).unwrap_err();
    assert!(matches!(err, Error::Empty { .. }), "{err:?}");
    assert_eq!(err.to_string(), format!("{}: empty file", empty.display()));

    let missing = dir.path().join("gone.jpg");
    let err = decode_file(&missing, &opts()).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert!(
        err.to_string()
            .starts_with(&format!("{}: ", missing.display())),
        "{err}"
    );
}

#[test]
fn heic_and_avif_are_named_as_unsupported() {
    let heic = b"\0\0\0\x18ftypheic\0\0\0\0mif1heic\0\0\0\0meta";
    let err = decode_bytes(heic, &opts(), "IMG_0001.JPG").unwrap_err();
    assert_eq!(err.to_string(), "IMG_0001.JPG: unsupported format HEIC");
    let avif = b"\0\0\0\x1cftypavif\0\0\0\0avifmif1miaf";
    let err = decode_bytes(avif, &opts(), "a.png").unwrap_err();
    assert_eq!(err.to_string(), "a.png: unsupported format AVIF");
}

#[test]
fn truncated_jpeg_is_an_error_in_both_decoders() {
    let jpeg = encode_jpeg(&textured(640, 480, 1), 90);
    assert!(decode_bytes(&jpeg, &opts(), "whole.jpg").is_ok());
    for cut in [jpeg.len() / 2, jpeg.len() - 2, 400, 3] {
        let part = &jpeg[..cut];
        for o in [opts(), DecodeOptions::for_model(50)] {
            let err = decode_bytes(part, &o, "cut.jpg").unwrap_err();
            let msg = err.to_string();
            if cut >= 4 {
                assert!(
                    matches!(
                        err,
                        Error::Corrupt {
                            format: Format::Jpeg,
                            ..
                        }
                    ),
                    "cut {cut}: {err:?}"
                );
                assert!(
                    msg.starts_with("cut.jpg: truncated or corrupt JPEG"),
                    "{msg}"
                );
            } else {
                // Three bytes are not even a JPEG signature we trust.
                assert!(
                    matches!(err, Error::NotAnImage { .. } | Error::Corrupt { .. }),
                    "{err:?}"
                );
            }
        }
    }
}

#[test]
fn truncated_png_is_an_error() {
    let png = encode(&textured(300, 200, 2), ImageFormat::Png);
    for cut in [png.len() / 2, png.len() - 13, 40] {
        let err = decode_bytes(&png[..cut], &opts(), "cut.png").unwrap_err();
        assert!(
            matches!(
                err,
                Error::Corrupt {
                    format: Format::Png,
                    ..
                }
            ),
            "cut {cut}: {err:?}"
        );
        assert!(
            err.to_string()
                .starts_with("cut.png: truncated or corrupt PNG"),
            "{err}"
        );
    }
}

#[test]
fn garbage_after_a_valid_header_is_an_error() {
    let mut jpeg = encode_jpeg(&textured(128, 128, 3), 90);
    let n = jpeg.len();
    // Keep the headers and the EOI, scramble the entropy-coded middle.
    for (i, b) in jpeg[n / 2..n - 2].iter_mut().enumerate() {
        *b = if i % 7 == 0 { 0xFF } else { (i * 31) as u8 };
    }
    // Either an error or an image; never a panic.
    let _ = decode_bytes(&jpeg, &opts(), "garbled.jpg");
    let _ = decode_bytes(&jpeg, &DecodeOptions::for_model(10), "garbled.jpg");
}

#[test]
fn pixel_limit_is_configurable() {
    let png = encode(&quadrants(20, 20), ImageFormat::Png);
    let small = DecodeOptions {
        max_pixels: 399,
        ..opts()
    };
    let err = decode_bytes(&png, &small, "x.png").unwrap_err();
    assert_eq!(
        err.to_string(),
        "x.png: image is 20×20 = 400 pixels, over the limit of 399 (decompression bomb?)"
    );
    let exact = DecodeOptions {
        max_pixels: 400,
        ..opts()
    };
    assert!(decode_bytes(&png, &exact, "x.png").is_ok());
}

// ------------------------------------------------------------------ reduced-scale JPEG

#[test]
fn reduced_scale_jpeg_keeps_min_side() {
    let full_img = textured(1600, 1200, 4);
    let jpeg = encode_jpeg(&full_img, 92);
    let full = decode_bytes(&jpeg, &opts(), "big.jpg").unwrap();
    assert_eq!(full.image.dimensions(), (1600, 1200));

    // 1200/8 = 150 ≥ 150: an eighth, from the DC coefficients.
    let eighth = decode_bytes(&jpeg, &DecodeOptions::for_model(150), "big.jpg").unwrap();
    assert_eq!(eighth.image.dimensions(), (200, 150));
    assert_eq!((eighth.meta.width, eighth.meta.height), (1600, 1200));

    // 1200/8 = 150 < 151 but 1200/2 = 600 ≥ 2·151: a half, through the DCT. (A quarter
    // would need 1200/4 ≥ 2·side, which is when an eighth already qualifies.)
    let half = decode_bytes(&jpeg, &DecodeOptions::for_model(151), "big.jpg").unwrap();
    assert_eq!(half.image.dimensions(), (800, 600));

    // Halving would give 600 < 2·301: full size.
    let fullsize = decode_bytes(&jpeg, &DecodeOptions::for_model(301), "big.jpg").unwrap();
    assert_eq!(fullsize.image.dimensions(), (1600, 1200));

    // The reduced pixels are the full image, box-averaged: compare with n×n means.
    let f = to_rgb8(&full.image);
    for (reduced, n, bound) in [(&eighth, 8, 1.5), (&half, 2, 3.0)] {
        let r = to_rgb8(&reduced.image);
        let mut total = 0u64;
        for (x, y, p) in r.enumerate_pixels() {
            for c in 0..3 {
                let mut sum = 0u32;
                for dy in 0..n {
                    for dx in 0..n {
                        sum += f.get_pixel(n * x + dx, n * y + dy)[c] as u32;
                    }
                }
                total +=
                    ((sum as f64 / (n * n) as f64).round() as u32).abs_diff(p[c] as u32) as u64;
            }
        }
        let mean = total as f64 / (r.width() * r.height() * 3) as f64;
        assert!(
            mean < bound,
            "1/{n} decode differs from box-filtered full decode by {mean:.2} on average"
        );
    }
}

/// Mean absolute difference between `fine` (2·side) reduced by 2×2 means and `coarse`.
fn coarse_diff(fine: &image::RgbImage, coarse: &image::RgbImage) -> f64 {
    let mut diff = 0.0;
    for (x, y, px) in coarse.enumerate_pixels() {
        for c in 0..3 {
            let q: u32 = (0..4).map(|i| fine.get_pixel(2 * x + i % 2, 2 * y + i / 2)[c] as u32).sum();
            diff += (q as f64 / 4.0 - px[c] as f64).abs();
        }
    }
    diff / (coarse.width() * coarse.height() * 3) as f64
}

#[test]
fn eighth_scale_covers_what_the_dc_decoder_does_not() {
    // A CMYK JPEG has no DC-only path; it still reduces, through the DCT, keeping twice
    // the side. Progressive JPEGs take the DC path (their DC scans alone) as baseline
    // ones do.
    let img = textured(1024, 768, 6).to_rgb8();
    let mut progressive = Vec::new();
    let mut enc = jpeg_encoder::Encoder::new(&mut progressive, 90);
    enc.set_progressive(true);
    enc.encode(img.as_raw(), 1024, 768, jpeg_encoder::ColorType::Rgb)
        .unwrap();
    let cmyk_px: Vec<u8> = img.pixels().flat_map(|p| [255 - p[0], 255 - p[1], 255 - p[2], 0]).collect();
    let mut cmyk = Vec::new();
    jpeg_encoder::Encoder::new(&mut cmyk, 90).encode(&cmyk_px, 1024, 768, jpeg_encoder::ColorType::Cmyk).unwrap();
    let baseline = encode_jpeg(&DynamicImage::ImageRgb8(img), 90);
    let p = decode_bytes(&progressive, &DecodeOptions::for_model(96), "p.jpg").unwrap();
    let c = decode_bytes(&cmyk, &DecodeOptions::for_model(96), "c.jpg").unwrap();
    let b = decode_bytes(&baseline, &DecodeOptions::for_model(96), "b.jpg").unwrap();
    assert_eq!(p.image.dimensions(), (128, 96));
    assert_eq!(c.image.dimensions(), (256, 192));
    assert_eq!(b.image.dimensions(), (128, 96));
    // Same picture every way: the baseline eighth against the progressive eighth (its
    // chroma from whole-block means, the baseline's from half blocks) and against the
    // CMYK quarter's 2×2 means.
    let (p, c, b) = (to_rgb8(&p.image), to_rgb8(&c.image), to_rgb8(&b.image));
    let pd = p.pixels().zip(b.pixels()).map(|(x, y)| (0..3).map(|i| (x[i] as f64 - y[i] as f64).abs()).sum::<f64>()).sum::<f64>() / (128.0 * 96.0 * 3.0);
    let cd = coarse_diff(&c, &b);
    eprintln!("progressive vs baseline eighth: {pd:.2}; CMYK quarter vs baseline eighth: {cd:.2}");
    assert!(pd < 3.0 && cd < 3.0, "{pd} {cd}");
}

#[test]
fn reduced_scale_applies_orientation_and_reports_full_size() {
    let jpeg = encode_jpeg(&textured(1600, 1200, 5), 90);
    let tiff = exif_block(vec![short(TAG_ORIENTATION, 6)], vec![], vec![]);
    let jpeg = jpeg_with_app1(&jpeg, &tiff);
    let d = decode_bytes(&jpeg, &DecodeOptions::for_model(150), "rot.jpg").unwrap();
    assert_eq!(d.image.dimensions(), (150, 200));
    let d = decode_bytes(&jpeg, &DecodeOptions::for_model(151), "rot.jpg").unwrap();
    assert_eq!(d.image.dimensions(), (600, 800));
    assert_eq!((d.meta.width, d.meta.height), (1200, 1600));
    assert_eq!(d.meta.exif.orientation, Some(6));
}

#[test]
fn small_and_grey_jpegs_take_the_right_path() {
    // Grey JPEG, reduced: L8 stays one channel and replicates to RGB.
    // (image's encoder writes grey as three components; jpeg-encoder writes one.)
    let mut jpeg = Vec::new();
    jpeg_encoder::Encoder::new(&mut jpeg, 95)
        .encode(
            &vec![90u8; 800 * 800],
            800,
            800,
            jpeg_encoder::ColorType::Luma,
        )
        .unwrap();
    for o in [opts(), DecodeOptions::for_model(100)] {
        let d = decode_bytes(&jpeg, &o, "grey.jpg").unwrap();
        assert_eq!(d.image.color(), image::ColorType::L8);
        assert_near(
            to_rgb8(&d.image).get_pixel(10, 10).0,
            [90, 90, 90],
            2,
            "grey",
        );
    }
    for (side, dims) in [(100, (100, 100)), (101, (400, 400))] {
        assert_eq!(
            decode_bytes(&jpeg, &DecodeOptions::for_model(side), "g.jpg")
                .unwrap()
                .image
                .dimensions(),
            dims
        );
    }
}

// ------------------------------------------------------------------------- colour

#[test]
fn grey_rgba_and_16_bit_convert_to_rgb8() {
    let cases: Vec<(DynamicImage, [u8; 3], &str)> = vec![
        (
            DynamicImage::ImageLuma8(image::GrayImage::from_pixel(4, 4, image::Luma([77]))),
            [77, 77, 77],
            "L8",
        ),
        (
            DynamicImage::ImageLumaA8(image::GrayAlphaImage::from_pixel(
                4,
                4,
                image::LumaA([77, 0]),
            )),
            [77, 77, 77],
            "LA8",
        ),
        // Fully transparent: alpha is dropped, colour kept (no compositing), as PIL does.
        (
            DynamicImage::ImageRgba8(image::RgbaImage::from_pixel(4, 4, Rgba([10, 20, 30, 0]))),
            [10, 20, 30],
            "RGBA8",
        ),
        // 16-bit scales (v·255/65535, rounded): 0x8080 → 128, 1000 → 4 (PIL would clip
        // I;16 to 255 here), 65535 → 255.
        (
            DynamicImage::ImageLuma16(image::ImageBuffer::from_pixel(
                4,
                4,
                image::Luma([0x8080u16]),
            )),
            [128; 3],
            "L16",
        ),
        (
            DynamicImage::ImageLuma16(image::ImageBuffer::from_pixel(4, 4, image::Luma([1000u16]))),
            [4; 3],
            "L16 low",
        ),
        (
            DynamicImage::ImageRgb16(image::ImageBuffer::from_pixel(
                4,
                4,
                Rgb([65535u16, 0, 32768]),
            )),
            [255, 0, 128],
            "RGB16",
        ),
        (
            DynamicImage::ImageRgba16(image::ImageBuffer::from_pixel(
                4,
                4,
                Rgba([0u16, 65535, 257, 0]),
            )),
            [0, 255, 1],
            "RGBA16",
        ),
    ];
    for (img, want, what) in cases {
        // Through a real PNG file so that the decoder's colour type is exercised too.
        let png = encode(&img, ImageFormat::Png);
        let d = decode_bytes(&png, &opts(), "c.png").unwrap();
        assert_eq!(
            d.image.color(),
            img.color(),
            "{what}: PNG keeps the colour type"
        );
        assert_eq!(to_rgb8(&d.image).get_pixel(1, 1).0, want, "{what}");
    }
    // 16-bit TIFF too.
    let tiff16 = DynamicImage::ImageRgb16(image::ImageBuffer::from_pixel(
        4,
        4,
        Rgb([65535u16, 0, 32768]),
    ));
    let d = decode_bytes(&encode(&tiff16, ImageFormat::Tiff), &opts(), "c.tif").unwrap();
    assert_eq!(to_rgb8(&d.image).get_pixel(0, 0).0, [255, 0, 128]);
}

fn cmyk_jpeg(color: jpeg_encoder::ColorType, cmyk: [u8; 4], side: u16) -> Vec<u8> {
    let data: Vec<u8> = std::iter::repeat_n(cmyk, side as usize * side as usize)
        .flatten()
        .collect();
    let mut out = Vec::new();
    jpeg_encoder::Encoder::new(&mut out, 95)
        .encode(&data, side, side, color)
        .unwrap();
    out
}

#[test]
fn cmyk_jpeg_decodes_to_rgb_in_both_paths() {
    use jpeg_encoder::ColorType::{Cmyk, CmykAsYcck};
    // (C, M, Y, K) → (255−C)(255−K)/255 …
    let cases = [
        ([255, 0, 0, 0], [0, 255, 255]),
        ([0, 255, 0, 0], [255, 0, 255]),
        ([0, 0, 0, 128], [127, 127, 127]),
        ([0, 0, 0, 0], [255, 255, 255]),
    ];
    for color in [Cmyk, CmykAsYcck] {
        for (cmyk, want) in cases {
            let jpeg = cmyk_jpeg(color, cmyk, 512);
            let full = decode_bytes(&jpeg, &opts(), "cmyk.jpg").unwrap();
            assert_eq!(full.image.dimensions(), (512, 512));
            assert_near(
                to_rgb8(&full.image).get_pixel(100, 100).0,
                want,
                3,
                &format!("{color:?} {cmyk:?} full"),
            );
            let reduced = decode_bytes(&jpeg, &DecodeOptions::for_model(32), "cmyk.jpg").unwrap();
            assert_eq!(reduced.image.dimensions(), (64, 64));
            assert_near(
                to_rgb8(&reduced.image).get_pixel(10, 10).0,
                want,
                3,
                &format!("{color:?} {cmyk:?} reduced"),
            );
        }
    }
}

#[test]
fn animated_gif_gives_its_first_frame() {
    use image::codecs::gif::GifEncoder;
    use image::{Delay, Frame};
    let red = image::RgbaImage::from_pixel(16, 16, Rgba([255, 0, 0, 255]));
    let blue = image::RgbaImage::from_pixel(16, 16, Rgba([0, 0, 255, 255]));
    let mut gif = Vec::new();
    {
        let mut enc = GifEncoder::new(&mut gif);
        for f in [red, blue] {
            enc.encode_frame(Frame::from_parts(
                f,
                0,
                0,
                Delay::from_numer_denom_ms(100, 1),
            ))
            .unwrap();
        }
    }
    let d = decode_bytes(&gif, &opts(), "anim.gif").unwrap();
    assert_eq!(d.meta.format, Format::Gif);
    assert_eq!(to_rgb8(&d.image).get_pixel(8, 8).0, [255, 0, 0]);
}

#[test]
fn animated_webp_gives_its_first_frame() {
    let green = image::RgbaImage::from_pixel(16, 16, Rgba([0, 255, 0, 255]));
    let blue = image::RgbaImage::from_pixel(16, 16, Rgba([0, 0, 255, 255]));
    let webp = animated_webp(&[green, blue.clone()]);
    let d = decode_bytes(&webp, &opts(), "anim.webp").unwrap();
    assert_eq!(d.meta.format, Format::WebP);
    assert_eq!(d.image.dimensions(), (16, 16));
    assert_eq!(to_rgb8(&d.image).get_pixel(8, 8).0, [0, 255, 0]);
    // Sanity: the builder really puts the second frame second.
    let webp = animated_webp(&[
        blue,
        image::RgbaImage::from_pixel(16, 16, Rgba([9, 9, 9, 255])),
    ]);
    assert_eq!(
        to_rgb8(&decode_bytes(&webp, &opts(), "b.webp").unwrap().image)
            .get_pixel(8, 8)
            .0,
        [0, 0, 255]
    );
}

// ------------------------------------------------------------------------ thumbnail

#[test]
fn thumbnail_fits_max_side_and_is_a_jpeg() {
    let img = quadrants(800, 400);
    let jpeg = thumbnail(&img, 256).unwrap();
    let d = decode_bytes(&jpeg, &opts(), "thumb").unwrap();
    assert_eq!(d.meta.format, Format::Jpeg);
    assert_eq!(d.image.dimensions(), (256, 128));
    assert_quadrants(&d.image, 40, "thumbnail");

    // Never upscales.
    let small = thumbnail(&quadrants(100, 50), 256).unwrap();
    assert_eq!(
        decode_bytes(&small, &opts(), "t")
            .unwrap()
            .image
            .dimensions(),
        (100, 50)
    );

    // Transparent pixels come out white for people to look at.
    let clear = DynamicImage::ImageRgba8(image::RgbaImage::from_pixel(32, 32, Rgba([0, 0, 0, 0])));
    let t = decode_bytes(&thumbnail(&clear, 64).unwrap(), &opts(), "t").unwrap();
    assert_near(
        to_rgb8(&t.image).get_pixel(16, 16).0,
        [255, 255, 255],
        2,
        "transparent thumbnail",
    );
}

#[test]
fn meta_serialises_with_lowercase_format() {
    let webp = encode(&quadrants(8, 8), ImageFormat::WebP);
    let d = decode_bytes(&webp, &opts(), "x").unwrap();
    let json = serde_json::to_value(&d.meta).unwrap();
    assert_eq!(json["format"], "webp");
    assert_eq!(json["width"], 8);
    assert!(json["exif"]["taken_at"].is_null());
    let back: magpie_media::ImageMeta = serde_json::from_value(json).unwrap();
    assert_eq!(back, d.meta);
}

#[test]
fn errors_convert_to_core_errors_with_path() {
    let err = decode_bytes(b"", &opts(), "a/b.png").unwrap_err();
    match magpie_core::Error::from(err) {
        magpie_core::Error::WithPath { path, message } => {
            assert_eq!(path, std::path::Path::new("a/b.png"));
            assert_eq!(message, "empty file");
        }
        other => panic!("{other:?}"),
    }
}

/// Committed odd-format fixtures (`scripts/fixtures/make_odd.py`, Pillow).
fn odd(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/odd")
        .join(name)
}

#[test]
fn cmyk_jpeg_decodes_to_the_colours_pillow_gives() {
    // Left half C=0 M=255 Y=255 K=0, right half C=255 M=255 Y=0 K=0 (Adobe-inverted in the
    // file); Pillow's convert("RGB") gives (255, 0, 0) and (0, 0, 255).
    let d = decode_file(&odd("cmyk.jpg"), &opts()).unwrap();
    assert_eq!(d.meta.format, Format::Jpeg);
    let rgb = to_rgb8(&d.image);
    assert_eq!(rgb.dimensions(), (48, 32));
    assert_near(rgb.get_pixel(5, 16).0, [255, 0, 0], 6, "cmyk left");
    assert_near(rgb.get_pixel(42, 16).0, [0, 0, 255], 6, "cmyk right");
}

#[test]
fn animated_webp_uses_its_first_frame() {
    let d = decode_file(&odd("animated.webp"), &opts()).unwrap();
    assert_eq!(d.meta.format, Format::WebP);
    assert_eq!((d.meta.width, d.meta.height), (40, 24));
    assert_near(
        to_rgb8(&d.image).get_pixel(20, 12).0,
        [0, 200, 0],
        2,
        "first frame is green",
    );
}
