#!/usr/bin/env python3
"""Writes the seed corpus of the `decode_preprocess` fuzz target (fuzz/corpus/decode_preprocess).

Run by hand when the seeds should change (needs Pillow with WebP):

    python3 -m venv /tmp/venv && /tmp/venv/bin/pip install pillow
    /tmp/venv/bin/python fuzz/make_seeds.py

Every seed is tiny (a few hundred bytes to a few KB): libFuzzer mutates small inputs
best, and the committed corpus stays well under 1 MB. Regression inputs the fuzzer found
are written by hand (see fuzz/README.md) and are not produced here.
"""

import io
import struct
import zlib
from pathlib import Path

from PIL import Image

OUT = Path(__file__).resolve().parent / "corpus" / "decode_preprocess"


def gradient(mode, w, h):
    im = Image.new("RGB", (w, h))
    im.putdata([((x * 255) // max(w - 1, 1), (y * 255) // max(h - 1, 1), 128) for y in range(h) for x in range(w)])
    return im.convert(mode) if mode != "RGB" else im


def save(name, im, fmt, **kw):
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    (OUT / name).write_bytes(buf.getvalue())


def exif_orientation(o):
    ex = Image.Exif()
    ex[0x0112] = o
    ex[0x010F] = "FuzzCam"
    ex[0x0132] = "2021:07:04 18:30:05"
    return ex.tobytes()


def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    save("png_rgb.png", gradient("RGB", 16, 12), "PNG")
    rgba = gradient("RGB", 12, 9).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((12, 9)))
    save("png_rgba.png", rgba, "PNG")
    save("png_palette.png", gradient("RGB", 10, 10).convert("P", palette=Image.ADAPTIVE, colors=8), "PNG")
    save("png_gray.png", gradient("L", 9, 7), "PNG")
    save("png_gray16.png", gradient("L", 8, 6).point(lambda v: v * 257, "I").convert("I;16"), "PNG")
    save("png_exif8.png", gradient("RGB", 10, 6), "PNG", exif=exif_orientation(8))
    # 16-bit RGB needs raw chunks: Pillow does not write RGB;16 PNGs.
    w, h = 4, 3
    raw = b"".join(b"\0" + b"".join(struct.pack(">HHH", x * 16000, y * 20000, 65535) for x in range(w)) for y in range(h))
    (OUT / "png_rgb16.png").write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
        + png_chunk(b"IDAT", zlib.compress(raw))
        + png_chunk(b"IEND", b"")
    )
    # A header declaring 100000x100000 (a decompression bomb): refused before decoding.
    (OUT / "png_bomb_header.png").write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0))
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + png_chunk(b"IEND", b"")
    )

    save("jpeg_rgb.jpg", gradient("RGB", 16, 16), "JPEG", quality=60)
    save("jpeg_exif6.jpg", gradient("RGB", 24, 16), "JPEG", quality=60, exif=exif_orientation(6))
    save("jpeg_gray.jpg", gradient("L", 16, 8), "JPEG", quality=60)
    save("jpeg_progressive.jpg", gradient("RGB", 16, 16), "JPEG", quality=60, progressive=True)
    save("jpeg_cmyk.jpg", gradient("RGB", 8, 8).convert("CMYK"), "JPEG", quality=60)
    save("jpeg_420.jpg", gradient("RGB", 17, 13), "JPEG", quality=50, subsampling=2)
    # Big enough (short side >= 4*224) for the reduced-scale DCT path; solid, so small.
    save("jpeg_scaled_path.jpg", Image.new("RGB", (1000, 900), (40, 90, 200)), "JPEG", quality=30)

    save("gif_still.gif", gradient("RGB", 10, 8).convert("P", palette=Image.ADAPTIVE, colors=16), "GIF")
    frames = [Image.new("P", (6, 6), c) for c in (1, 2, 3)]
    frames[0].save(OUT / "gif_anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)

    save("webp_lossy.webp", gradient("RGB", 16, 12), "WEBP", quality=50)
    save("webp_lossless.webp", gradient("RGB", 12, 8), "WEBP", lossless=True)
    save("webp_alpha.webp", rgba, "WEBP", quality=50)
    save("webp_exif3.webp", gradient("RGB", 8, 8), "WEBP", quality=50, exif=exif_orientation(3))
    wf = [Image.new("RGB", (6, 6), c) for c in ((255, 0, 0), (0, 255, 0))]
    wf[0].save(OUT / "webp_anim.webp", save_all=True, append_images=wf[1:], duration=50, lossless=True)

    save("bmp_rgb.bmp", gradient("RGB", 7, 5), "BMP")
    save("bmp_palette.bmp", gradient("RGB", 8, 4).convert("P", palette=Image.ADAPTIVE, colors=4), "BMP")
    save("bmp_gray.bmp", gradient("L", 5, 5), "BMP")

    save("tiff_rgb.tif", gradient("RGB", 8, 6), "TIFF")
    save("tiff_lzw.tif", gradient("RGB", 8, 6), "TIFF", compression="tiff_lzw")
    save("tiff_deflate.tif", gradient("L", 8, 6), "TIFF", compression="tiff_adobe_deflate")
    save("tiff_packbits.tif", gradient("RGB", 8, 6), "TIFF", compression="packbits")
    save("tiff_float.tif", gradient("L", 6, 4).convert("F"), "TIFF")
    save("tiff_gray16.tif", gradient("L", 6, 4).point(lambda v: v * 257, "I").convert("I;16"), "TIFF")


if __name__ == "__main__":
    main()
