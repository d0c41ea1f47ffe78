"""A zoo of image files as they turn up in real folders: broken ones and odd-but-valid ones.

`write_broken(folder)` writes files no decoder can use; each must be skipped with a reason.
`write_odd(folder)` writes files that look wrong but hold a usable picture; each must be
extracted like any other image. Both return {file name: a word expected in the reason}
(for odd files, the mode PIL opens them in).
"""

from __future__ import annotations

import gzip
import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

FORMATS = {"jpg": "JPEG", "png": "PNG", "gif": "GIF", "bmp": "BMP", "tiff": "TIFF", "webp": "WEBP"}


def picture(size: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width × height pixels: a decompression bomb's first bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk
            + struct.pack(">I", zlib.crc32(chunk)) + b"\0\0\0\0IEND\xaeB`\x82")


def write_broken(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, bytes] = {}
    reasons: dict[str, str] = {}
    for ext in FORMATS:  # 6 empty files, 6 of random bytes, 6 cut to a third
        files[f"empty.{ext}"] = b""
        files[f"noise.{ext}"] = np.random.default_rng(len(ext)).bytes(2000)
        files[f"cut-third.{ext}"] = encoded(picture(), FORMATS[ext])[:200]
    for frac in (0.5, 0.9):  # truncated late: the header reads, the pixels do not
        for ext in ("jpg", "png"):
            whole = encoded(picture(96, 1), FORMATS[ext])
            files[f"cut-{int(frac * 100)}.{ext}"] = whole[: int(len(whole) * frac)]
    files["text.jpg"] = b"not an image at all\n"
    files["text.png"] = b"x,y\n1,2\n"
    files["page.png"] = b"<!DOCTYPE html><html><body>404 Not Found</body></html>"
    files["doc.jpg"] = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj <<>> endobj\n"
    files["zipped.png"] = gzip.compress(encoded(picture(), "PNG"))
    files["drawing.png"] = b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"/>'
    files["notes.txt"] = b"a stray file in a class folder"
    files[".jpg"] = b""  # hidden: never listed, so never reported either
    png = bytearray(encoded(picture(), "PNG"))
    png[60:70] = b"\xff" * 10  # inside IDAT: the checksum no longer matches
    files["bad-crc.png"] = bytes(png)
    jpeg = encoded(picture(), "JPEG")
    files["markers-only.jpg"] = jpeg[:20]
    files["header-only.png"] = png_header_only(64, 64)
    files["bomb-header.png"] = png_header_only(100_000, 100_000)
    files["zero-size.png"] = png_header_only(0, 0)
    for i, (w, h) in enumerate([(1, 1), (1, 200), (200, 2), (7, 7)]):
        files[f"tiny-{i}.png"] = encoded(Image.new("RGB", (w, h), "red"), "PNG")
    files["tiny.jpg"] = encoded(Image.new("RGB", (1, 1), "red"), "JPEG")
    files["tiny.gif"] = encoded(Image.new("P", (2, 2)), "GIF")
    files["bomb.png"] = encoded(Image.new("1", (12000, 12000)), "PNG")
    files["bomb.gif"] = encoded(Image.new("P", (10000, 10000)), "GIF")
    grey16 = np.random.default_rng(5).integers(0, 65535, (64, 64), dtype=np.uint16)
    files["cut-16bit.png"] = encoded(Image.fromarray(grey16), "PNG")[:2000]
    files["signature-only.png"] = b"\x89PNG\r\n\x1a\n"
    files["header-only.gif"] = b"GIF89a"
    files["riff-only.webp"] = b"RIFF\0\0\0\0WEBP"
    files["soi-then-noise.jpg"] = b"\xff\xd8\xff" + np.random.default_rng(9).bytes(5000)
    files["cut-cmyk.jpg"] = encoded(picture().convert("CMYK"), "JPEG")[:300]
    files["cut-anim.gif"] = encoded(picture(), "GIF", save_all=True,
                                    append_images=[picture(64, 2)], duration=100, loop=0)[:400]
    for name, content in files.items():
        (folder / name).write_bytes(content)
    reasons = {name: "" for name in files if not name.startswith(".")}
    reasons |= {"tiny-0.png": "below", "tiny-3.png": "below", "bomb.png": "Decompression",
                "bomb-header.png": "Decompression", "text.jpg": "cannot identify"}
    os.symlink(folder / "loop.png", folder / "loop.png")
    os.symlink(folder / "gone.png", folder / "dangling.png")
    os.mkfifo(folder / "pipe.png")  # opening it for reading would wait for a writer forever
    reasons |= {"loop.png": "", "dangling.png": "", "pipe.png": "not a regular file"}
    if os.geteuid() != 0:  # root reads any file: there, write_odd makes the unreadable one
        (folder / "locked.png").write_bytes(encoded(picture(), "PNG"))
        os.chmod(folder / "locked.png", 0)
        reasons["locked.png"] = "Permission"
    return reasons


def write_odd(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    pic = picture(80, 3)
    odd = {
        "grey16.png": Image.fromarray(np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)),
        "cmyk.jpg": pic.convert("CMYK"),
        "palette-transparent.png": pic.convert("P"),
        "grey.jpg": pic.convert("L"),
        "grey-alpha.png": pic.convert("LA"),
        "rgba.webp": pic.convert("RGBA"),
        "one-bit.png": pic.convert("1"),
        "float.tiff": pic.convert("F"),
        "small-9px.png": pic.resize((9, 9)),
        "strip.png": pic.resize((8, 600)),
    }
    modes = {}
    for name, img in odd.items():
        kw = {"transparency": 0} if name == "palette-transparent.png" else {}
        img.save(folder / name, **kw)
        modes[name] = img.mode
    (folder / "png-named.jpg").write_bytes(encoded(pic, "PNG"))
    (folder / "jpeg-named.png").write_bytes(encoded(pic, "JPEG"))
    (folder / "jpeg-named.gif").write_bytes(encoded(pic, "JPEG", progressive=True))
    pic.save(folder / "animated.gif", save_all=True, append_images=[picture(80, 4)], duration=100, loop=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: must come out upright
    pic.save(folder / "rotated.jpg", exif=exif.tobytes())
    jpeg = encoded(pic, "JPEG")
    broken_exif = b"\xff\xe1" + struct.pack(">H", 20) + b"Exif\0\0MM\0\x2a\0\0\0\x08\xff\xff\xff\xff"
    (folder / "broken-exif.jpg").write_bytes(jpeg[:2] + broken_exif + jpeg[2:])
    if os.geteuid() == 0:  # without read permission, which does not stop root
        pic.save(folder / "locked.png")
        os.chmod(folder / "locked.png", 0)
        modes["locked.png"] = "RGB"
    modes |= {"png-named.jpg": "RGB", "jpeg-named.png": "RGB", "jpeg-named.gif": "RGB", "animated.gif": "P",
              "rotated.jpg": "RGB", "broken-exif.jpg": "RGB"}
    return modes
