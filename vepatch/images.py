"""Reading one image file, whatever operators drop: 8-bit RGB out, or BadImage with the reason
(empty, truncated, not an image, a decompression bomb). Greyscale, CMYK, 16-bit, float,
palette and alpha images are converted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
MAX_PIXELS = 64_000_000  # larger images are refused as decompression bombs
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is skipped, never half-read


class BadImage(Exception):
    """A file that cannot be read as an image; the message is the reason."""


def read_image(path: Path) -> Image.Image:
    """Decode a file to 8-bit RGB, converting what can be converted; BadImage otherwise."""
    try:
        if path.stat().st_size == 0:
            raise BadImage("empty file (0 bytes)")
        with Image.open(path) as img:
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise BadImage(f"decompression bomb ({w}x{h} pixels, limit {MAX_PIXELS})")
            img.load()
            return to_rgb(img)
    except BadImage:
        raise
    except Image.DecompressionBombError:
        raise BadImage("decompression bomb (too many pixels)") from None
    except UnidentifiedImageError:
        raise BadImage("not an image PIL can read") from None
    except OSError as exc:
        raise BadImage(f"unreadable image ({str(exc).strip() or type(exc).__name__})") from None
    except (ValueError, SyntaxError) as exc:
        raise BadImage(f"corrupt image ({exc})") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: 16-bit and float scaled to 8 bits, alpha over white, CMYK converted."""
    img = ImageOps.exif_transpose(img) or img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or (arr.max(initial=0) > 255 and img.mode == "I") else 255.0
        if img.mode == "F":
            lo, hi = float(arr.min(initial=0)), float(arr.max(initial=1))
            arr, top = arr - lo, max(hi - lo, 1e-12)
        arr = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")
