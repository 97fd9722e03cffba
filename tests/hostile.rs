//! A folder holding every kind of hostile or odd file next to good photos, indexed as a
//! new user would with `magpie index`: every good image is indexed, every bad file is
//! reported with its reason, nothing else is affected, and a second run changes nothing.

use magpie_media::image::codecs::gif::{GifEncoder, Repeat};
use magpie_media::image::{Delay, Frame, Rgba, RgbaImage};
use serde_json::Value;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn magpie_json(data: &Path, args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_magpie"))
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .arg("--json")
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "magpie {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A PNG whose header declares `w` × `h` pixels, with a tiny (invalid for that size)
/// image data chunk: a decompression bomb's opening.
fn bomb_png(w: u32, h: u32) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut crc_input = kind.to_vec();
        crc_input.extend_from_slice(data);
        out.extend_from_slice(&crc_input);
        out.extend_from_slice(&crc32(&crc_input).to_be_bytes());
    }
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        for &b in bytes {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
    chunk(&mut out, b"IEND", &[]);
    out
}

fn animated_gif() -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut enc = GifEncoder::new(&mut out);
        enc.set_repeat(Repeat::Infinite).unwrap();
        for colour in [[200u8, 30, 30, 255], [30, 30, 200, 255]] {
            let img = RgbaImage::from_pixel(48, 32, Rgba(colour));
            enc.encode_frame(Frame::from_parts(img, 0, 0, Delay::from_numer_denom_ms(100, 1))).unwrap();
        }
    }
    out
}

#[test]
fn every_hostile_file_is_reported_and_the_rest_indexed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let fixtures = root().join("tests/fixtures/photos");
    // Good photos (RGB, RGBA, 16-bit grey, EXIF-turned JPEG, tiny, wide).
    let mut good = 0;
    for e in std::fs::read_dir(&fixtures).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "png" || x == "jpg") {
            std::fs::copy(&p, d.join(p.file_name().unwrap())).unwrap();
            good += 1;
        }
    }
    let rocket = std::fs::read(fixtures.join("rocket.jpg")).unwrap();
    let chelsea = std::fs::read(fixtures.join("chelsea.png")).unwrap();
    // Odd but good: indexed.
    std::fs::write(d.join("really-a-png.gif"), &chelsea).unwrap(); // wrong extension
    std::fs::write(d.join("animated.gif"), animated_gif()).unwrap(); // first frame
    std::fs::write(d.join(OsStr::from_bytes(b"caf\xe9-latin1.png")), &chelsea).unwrap(); // not UTF-8
    let mut deep = d.to_path_buf();
    for i in 0..5 {
        deep.push(format!("{i}{}", "x".repeat(200)));
    }
    std::fs::create_dir_all(&deep).unwrap();
    std::fs::write(deep.join("deep.jpg"), &rocket).unwrap(); // a path over 1,000 bytes
    let odd = root().join("tests/fixtures/odd");
    std::fs::copy(odd.join("cmyk.jpg"), d.join("cmyk.jpg")).unwrap(); // CMYK JPEG
    std::fs::copy(odd.join("animated.webp"), d.join("animated.webp")).unwrap(); // first frame
    good += 6;
    // Bad: each must be reported with a reason that says what is wrong.
    let bad: Vec<(&str, &str)> = vec![
        ("zero.jpg", "empty"),
        ("truncated.jpg", "truncated"),
        ("truncated.png", ""),
        ("bomb.png", "pixels"),
        ("letter.jpg", "not an image"),
        ("phone.heic", "heic"),
    ];
    std::fs::write(d.join("zero.jpg"), b"").unwrap();
    std::fs::write(d.join("truncated.jpg"), &rocket[..rocket.len() / 3]).unwrap();
    std::fs::write(d.join("truncated.png"), &chelsea[..chelsea.len() / 3]).unwrap();
    std::fs::write(d.join("bomb.png"), bomb_png(100_000, 100_000)).unwrap();
    std::fs::write(d.join("letter.jpg"), "Dear Sir, this is not a photograph.").unwrap();
    std::fs::write(d.join("phone.heic"), b"\0\0\0\x18ftypheic\0\0\0\0mif1heic\0\0\0\0").unwrap();
    // A symlink loop and a dangling link.
    std::fs::create_dir(d.join("sub")).unwrap();
    std::os::unix::fs::symlink(d, d.join("sub/loop")).unwrap();
    std::os::unix::fs::symlink(d.join("nowhere.jpg"), d.join("dangling.jpg")).unwrap();
    // Unreadable file and folder (root reads them anyway: then they are just indexed).
    let as_root = unsafe { libc::geteuid() } == 0;
    std::fs::write(d.join("locked.jpg"), &rocket).unwrap();
    std::fs::set_permissions(d.join("locked.jpg"), std::fs::Permissions::from_mode(0o000)).unwrap();
    std::fs::create_dir(d.join("closed")).unwrap();
    std::fs::write(d.join("closed/inside.png"), &chelsea).unwrap();
    std::fs::set_permissions(d.join("closed"), std::fs::Permissions::from_mode(0o000)).unwrap();
    if as_root {
        good += 2;
    }
    std::fs::write(d.join("README.txt"), "holiday photos").unwrap(); // not an image: ignored

    let data = tempfile::tempdir().unwrap();
    let model = root().join("tests/fixtures/clip/tiny-a");
    let m = model.to_str().unwrap();
    let report = magpie_json(data.path(), &["--model", m, "index", d.to_str().unwrap()]);
    let failed: Vec<(String, String)> = report["failed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f[0].as_str().unwrap().to_string(), f[1].as_str().unwrap().to_lowercase()))
        .collect();
    let reason = |name: &str| -> &str {
        &failed.iter().find(|(p, _)| p.ends_with(name)).unwrap_or_else(|| panic!("{name} not reported: {failed:#?}")).1
    };
    for (name, needle) in &bad {
        let why = reason(name);
        assert!(why.contains(needle), "{name}: `{why}` should say `{needle}`");
    }
    assert!(reason("sub/loop").contains("loop"), "{}", reason("sub/loop"));
    reason("dangling.jpg");
    if !as_root {
        assert!(reason("locked.jpg").contains("permission"), "{}", reason("locked.jpg"));
        assert!(reason("closed").contains("permission"), "{}", reason("closed"));
    }
    assert_eq!(report["added"].as_u64(), Some(good), "{report:#}");
    assert_eq!(report["ignored"], 1, "{report:#}");
    let status = magpie_json(data.path(), &["status"]);
    assert_eq!(status["counts"]["indexed"].as_u64(), Some(good));
    // The wrong-extension PNG and the animated GIF are found by content.
    let hits = magpie_json(data.path(), &["--model", m, "search", "x", "-k", "100"]);
    let formats: Vec<(String, String)> = hits
        .as_array()
        .unwrap()
        .iter()
        .map(|h| (h["path"].as_str().unwrap().rsplit('/').next().unwrap().to_string(), h["format"].as_str().unwrap_or("").to_string()))
        .collect();
    assert!(formats.contains(&("really-a-png.gif".into(), "png".into())), "{formats:?}");
    assert!(formats.contains(&("animated.gif".into(), "gif".into())), "{formats:?}");
    assert!(formats.iter().any(|(n, _)| n == "deep.jpg"));
    assert!(formats.contains(&("cmyk.jpg".into(), "jpeg".into())), "{formats:?}");
    assert!(formats.contains(&("animated.webp".into(), "webp".into())), "{formats:?}");

    // A second run changes nothing.
    let again = magpie_json(data.path(), &["--model", m, "index", d.to_str().unwrap()]);
    assert_eq!((again["added"].as_u64(), again["updated"].as_u64(), again["deleted"].as_u64()), (Some(0), Some(0), Some(0)), "{again:#}");
    let status2 = magpie_json(data.path(), &["status"]);
    assert_eq!(status2["counts"], status["counts"]);
    std::fs::set_permissions(d.join("closed"), std::fs::Permissions::from_mode(0o755)).unwrap();
}
