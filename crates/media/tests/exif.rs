mod common;

use common::*;
use magpie_media::image::{self, DynamicImage, GenericImageView, ImageEncoder, ImageFormat};
use magpie_media::{decode_bytes, to_rgb8, DecodeOptions, ExifInfo};

/// A 48×32 image of six 16×16 grey blocks, each a different level: every flip and
/// rotation of it is distinguishable, and flat 16×16 blocks survive JPEG.
const LEVELS: [[u8; 3]; 2] = [[0, 50, 100], [150, 200, 250]];
const BLOCK: u32 = 16;

fn blocks() -> DynamicImage {
    DynamicImage::ImageRgb8(image::RgbImage::from_fn(3 * BLOCK, 2 * BLOCK, |x, y| {
        let v = LEVELS[(y / BLOCK) as usize][(x / BLOCK) as usize];
        image::Rgb([v, v, v])
    }))
}

/// Where display pixel (x, y) comes from in the stored W×H image, per the EXIF spec
/// (written out independently of the crate under test).
fn source_of(orientation: u16, x: u32, y: u32, w: u32, h: u32) -> (u32, u32) {
    match orientation {
        1 => (x, y),
        2 => (w - 1 - x, y),
        3 => (w - 1 - x, h - 1 - y),
        4 => (x, h - 1 - y),
        5 => (y, x),
        6 => (y, h - 1 - x),
        7 => (w - 1 - y, h - 1 - x),
        8 => (w - 1 - y, x),
        _ => unreachable!(),
    }
}

fn check_orientation(bytes: &[u8], orientation: u16, tol: u8, what: &str) {
    let (w, h) = (3 * BLOCK, 2 * BLOCK);
    let d = decode_bytes(bytes, &DecodeOptions::default(), what).unwrap();
    assert_eq!(d.meta.exif.orientation, Some(orientation), "{what}");
    let (dw, dh) = if orientation >= 5 { (h, w) } else { (w, h) };
    assert_eq!(d.image.dimensions(), (dw, dh), "{what} o={orientation}");
    assert_eq!(
        (d.meta.width, d.meta.height),
        (dw, dh),
        "{what} o={orientation}"
    );
    let rgb = to_rgb8(&d.image);
    for by in 0..dh / BLOCK {
        for bx in 0..dw / BLOCK {
            let (x, y) = (bx * BLOCK + BLOCK / 2, by * BLOCK + BLOCK / 2);
            let (sx, sy) = source_of(orientation, x, y, w, h);
            let want = LEVELS[(sy / BLOCK) as usize][(sx / BLOCK) as usize];
            let got = rgb.get_pixel(x, y)[0];
            assert!(
                got.abs_diff(want) <= tol,
                "{what} orientation {orientation}: block ({bx},{by}) is {got}, want {want}"
            );
        }
    }
}

#[test]
fn all_eight_orientations_from_a_hand_made_jpeg_app1() {
    let jpeg = encode_jpeg(&blocks(), 95);
    for o in 1..=8u16 {
        let tiff = exif_block(vec![short(TAG_ORIENTATION, o)], vec![], vec![]);
        check_orientation(&jpeg_with_app1(&jpeg, &tiff), o, 12, "jpeg");
    }
}

#[test]
fn all_eight_orientations_from_png_exif_exactly() {
    let img = blocks();
    for o in 1..=8u16 {
        let mut png = Vec::new();
        let mut enc = image::codecs::png::PngEncoder::new(&mut png);
        enc.set_exif_metadata(exif_block(vec![short(TAG_ORIENTATION, o)], vec![], vec![]))
            .unwrap();
        enc.write_image(
            img.as_bytes(),
            img.width(),
            img.height(),
            image::ExtendedColorType::Rgb8,
        )
        .unwrap();
        check_orientation(&png, o, 0, "png");
    }
}

#[test]
fn webp_exif_is_read_and_applied() {
    let img = blocks();
    let mut webp = Vec::new();
    let mut enc = image::codecs::webp::WebPEncoder::new_lossless(&mut webp);
    enc.set_exif_metadata(exif_block(
        vec![short(TAG_ORIENTATION, 8), ascii(TAG_MAKE, "Pixel")],
        vec![],
        vec![],
    ))
    .unwrap();
    enc.write_image(
        img.as_bytes(),
        img.width(),
        img.height(),
        image::ExtendedColorType::Rgb8,
    )
    .unwrap();
    check_orientation(&webp, 8, 0, "webp");
    assert_eq!(
        ExifInfo::from_container(&webp).camera_make.as_deref(),
        Some("Pixel")
    );
}

fn full_exif() -> Vec<u8> {
    exif_block(
        vec![
            ascii(TAG_MAKE, "Canon"),
            ascii(TAG_MODEL, "Canon EOS 5D Mark IV  "),
            short(TAG_ORIENTATION, 1),
            ascii(TAG_DATETIME, "2022:01:01 00:00:00"),
        ],
        vec![
            ascii(TAG_DATETIME_ORIGINAL, "2021:07:04 18:30:05"),
            ascii(TAG_OFFSET_TIME_ORIGINAL, "+02:00"),
        ],
        vec![
            ascii(TAG_GPS_LAT_REF, "S"),
            rationals(TAG_GPS_LAT, &[(33, 1), (51, 1), (5436, 100)]),
            ascii(TAG_GPS_LON_REF, "E"),
            rationals(TAG_GPS_LON, &[(151, 1), (12, 1), (3024, 100)]),
        ],
    )
}

#[test]
fn camera_time_and_gps_from_constructed_exif() {
    let jpeg = jpeg_with_app1(&encode_jpeg(&blocks(), 90), &full_exif());
    let d = decode_bytes(&jpeg, &DecodeOptions::default(), "sydney.jpg").unwrap();
    let e = &d.meta.exif;
    assert_eq!(e.camera_make.as_deref(), Some("Canon"));
    assert_eq!(e.camera_model.as_deref(), Some("Canon EOS 5D Mark IV"));
    assert_eq!(e.taken_at.as_deref(), Some("2021-07-04T18:30:05+02:00"));
    assert_eq!(e.orientation, Some(1));
    let lat = e.gps_lat.unwrap();
    let lon = e.gps_lon.unwrap();
    assert!(
        (lat - -(33.0 + 51.0 / 60.0 + 54.36 / 3600.0)).abs() < 1e-9,
        "{lat}"
    );
    assert!(
        (lon - (151.0 + 12.0 / 60.0 + 30.24 / 3600.0)).abs() < 1e-9,
        "{lon}"
    );
    // Same block in PNG and as a whole TIFF-less container check.
    assert_eq!(ExifInfo::from_container(&jpeg), *e);
}

#[test]
fn datetime_falls_back_and_west_is_negative() {
    let tiff = exif_block(
        vec![ascii(TAG_DATETIME, "2019:12:31 23:59:59")],
        vec![],
        vec![
            ascii(TAG_GPS_LAT_REF, "N"),
            rationals(TAG_GPS_LAT, &[(40, 1), (42, 1), (4608, 100)]),
            ascii(TAG_GPS_LON_REF, "W"),
            rationals(TAG_GPS_LON, &[(74, 1), (0, 1), (2160, 100)]),
        ],
    );
    let jpeg = jpeg_with_app1(&encode_jpeg(&blocks(), 90), &tiff);
    let e = decode_bytes(&jpeg, &DecodeOptions::default(), "nyc.jpg")
        .unwrap()
        .meta
        .exif;
    assert_eq!(e.taken_at.as_deref(), Some("2019-12-31T23:59:59"));
    assert!((e.gps_lat.unwrap() - 40.7128).abs() < 1e-4);
    assert!((e.gps_lon.unwrap() - -74.006).abs() < 1e-4);
    assert_eq!(e.camera_make, None);
    assert_eq!(e.orientation, None);
}

#[test]
fn unset_clock_and_bad_values_are_dropped() {
    let tiff = exif_block(
        vec![
            ascii(TAG_DATETIME, "0000:00:00 00:00:00"),
            short(TAG_ORIENTATION, 9),
            ascii(TAG_MAKE, "   "),
        ],
        vec![],
        vec![
            ascii(TAG_GPS_LAT_REF, "N"),
            rationals(TAG_GPS_LAT, &[(40, 0), (0, 1), (0, 1)]), // zero denominator
            ascii(TAG_GPS_LON_REF, "E"),
            rationals(TAG_GPS_LON, &[(10, 1), (0, 1), (0, 1)]),
        ],
    );
    let jpeg = jpeg_with_app1(&encode_jpeg(&blocks(), 90), &tiff);
    let d = decode_bytes(&jpeg, &DecodeOptions::default(), "odd.jpg").unwrap();
    assert_eq!(d.meta.exif, ExifInfo::default());
    // Orientation 9 is ignored: the pixels are as stored.
    assert_eq!(d.image.dimensions(), (48, 32));
}

#[test]
fn broken_exif_never_fails_the_decode() {
    let jpeg = encode_jpeg(&blocks(), 90);
    let good = full_exif();
    let broken: Vec<Vec<u8>> = vec![
        b"II*\0\xff\xff\xff\x7f".to_vec(), // IFD offset far past the end
        b"XX*\0\x08\0\0\0\x01\0".to_vec(), // not a TIFF header
        good[..good.len() / 2].to_vec(),   // cut in half
        {
            let mut g = good.clone(); // entry count claims 65535 entries
            g[8] = 0xFF;
            g[9] = 0xFF;
            g
        },
        vec![],
        // IFD0 whose Exif-IFD pointer points back at IFD0: a cycle.
        exif_block(
            vec![
                short(TAG_ORIENTATION, 6),
                Entry(TAG_EXIF_IFD, 4, 1, 8u32.to_le_bytes().to_vec()),
            ],
            vec![],
            vec![],
        ),
    ];
    for (i, tiff) in broken.iter().enumerate() {
        let bytes = jpeg_with_app1(&jpeg, tiff);
        let d = decode_bytes(&bytes, &DecodeOptions::default(), "b.jpg")
            .unwrap_or_else(|e| panic!("case {i}: broken EXIF failed the decode: {e}"));
        // Cases 2 and 3 break the block after IFD0, whose fields still count (its
        // orientation is 1); the cycle's IFD0 says 6, which is then applied.
        let (want_o, want_dims) = match i {
            2 | 3 => (Some(1), (48, 32)),
            5 => (Some(6), (32, 48)),
            _ => (None, (48, 32)),
        };
        assert_eq!(d.image.dimensions(), want_dims, "case {i}");
        assert_eq!(d.meta.exif.orientation, want_o, "case {i}");
        if want_o.is_none() {
            assert_eq!(d.meta.exif, ExifInfo::default(), "case {i}");
        }
    }
    // An APP1 whose length field overruns the file is a broken file, but still no panic.
    let mut overrun = jpeg.clone();
    overrun.splice(2..2, [0xFF, 0xE1, 0xFF, 0xF0, b'E', b'x', b'i', b'f', 0, 0]);
    let _ = decode_bytes(&overrun, &DecodeOptions::default(), "o.jpg");
}

#[test]
fn real_photo_exif_is_read() {
    // Shared sample photo (Photoshop-written EXIF, no camera); skipped where absent.
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data/photos/hubble_deep_field.jpg");
    let Ok(bytes) = std::fs::read(&path) else {
        eprintln!("skipping: {} not found", path.display());
        return;
    };
    let d = decode_bytes(&bytes, &DecodeOptions::default(), &path).unwrap();
    assert_eq!((d.meta.width, d.meta.height), (1000, 872));
    assert_eq!(d.meta.exif.orientation, Some(1));
    // Photoshop wrote DateTime in ISO form ("2012-09-17T15:53:45-04:00"), not EXIF's
    // "YYYY:MM:DD HH:MM:SS"; we accept both.
    assert_eq!(
        d.meta.exif.taken_at.as_deref(),
        Some("2012-09-17T15:53:45-04:00")
    );
}

#[test]
fn png_from_encode_helper_has_no_exif() {
    let png = encode(&blocks(), ImageFormat::Png);
    assert_eq!(ExifInfo::from_container(&png), ExifInfo::default());
}
