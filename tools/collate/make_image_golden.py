"""Golden data for ops/data/src/image.rs: what PIL does to images before the Gemma 3 processor.

Run by hand (not by CI):  /work/venv/bin/python tools/collate/make_image_golden.py
Writes ops/tests/golden/images/: encoded inputs, and for each case the RGB bytes of
`Image.open(f).convert("RGB")` and of `.resize((w, h), Image.BILINEAR)` (what transformers' PIL
backend of Gemma3ImageProcessor does), plus manifest.json. Pillow version recorded.
"""
import io, json, os, sys
import numpy as np
import PIL
from PIL import Image

out = os.path.join(os.path.dirname(__file__), "..", "..", "ops", "tests", "golden", "images")
os.makedirs(out, exist_ok=True)
rng = np.random.default_rng(1234)


def natural(w, h, channels=3):
    # Smooth gradients + blobs + noise: JPEG-like content with edges and texture.
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    planes = []
    for c in range(channels):
        f = rng.uniform(0.02, 0.2, size=2)
        p = 127 + 90 * np.sin(x * f[0] + c) * np.cos(y * f[1] - c)
        p += rng.normal(0, 18, size=(h, w))
        p[(x // 7 + y // 5) % 4 == 0] += 40
        planes.append(np.clip(p, 0, 255).astype(np.uint8))
    return np.stack(planes, -1) if channels > 1 else planes[0]


cases = []


def add(name, img, fmt, save_kw, sizes):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save_kw)
    data = buf.getvalue()
    fname = f"{name}.{fmt.lower()}"
    with open(os.path.join(out, fname), "wb") as f:
        f.write(data)
    rgb = Image.open(io.BytesIO(data)).convert("RGB")
    with open(os.path.join(out, f"{name}.rgb"), "wb") as f:
        f.write(np.asarray(rgb).tobytes())
    resized = []
    for (w, h) in sizes:
        r = rgb.resize((w, h), Image.BILINEAR)
        rname = f"{name}.{w}x{h}.rgb"
        with open(os.path.join(out, rname), "wb") as f:
            f.write(np.asarray(r).tobytes())
        resized.append({"width": w, "height": h, "file": rname})
    cases.append({"name": name, "file": fname, "mode": Image.open(io.BytesIO(data)).mode,
                  "width": rgb.width, "height": rgb.height, "rgb": f"{name}.rgb", "resized": resized})


sizes = [(32, 32), (29, 17), (150, 97), (61, 61)]
add("jpeg420", Image.fromarray(natural(123, 77)), "JPEG", {"quality": 90}, sizes)
add("jpeg444", Image.fromarray(natural(97, 131)), "JPEG", {"quality": 95, "subsampling": 0}, sizes)
add("jpeg422_odd", Image.fromarray(natural(45, 33)), "JPEG", {"quality": 80, "subsampling": 1}, sizes)
add("jpeg_progressive", Image.fromarray(natural(88, 64)), "JPEG", {"quality": 85, "progressive": True}, sizes)
add("jpeg_gray", Image.fromarray(natural(70, 50, 1), "L"), "JPEG", {"quality": 90}, sizes)
add("jpeg_cmyk", Image.fromarray(natural(40, 30, 4), "CMYK"), "JPEG", {"quality": 92}, sizes)
rgba = np.concatenate([natural(66, 40), rng.integers(0, 256, (40, 66, 1), dtype=np.uint8)], -1)
add("png_rgba", Image.fromarray(rgba, "RGBA"), "PNG", {}, sizes)
add("png_gray", Image.fromarray(natural(33, 70, 1), "L"), "PNG", {}, sizes)
add("png_palette", Image.fromarray(natural(50, 40)).convert("P", palette=Image.ADAPTIVE, colors=40), "PNG", {}, sizes)
# A large downscale like the real data (photo -> 896) at small scale: 400x300 -> 112x112.
add("jpeg_big", Image.fromarray(natural(400, 300)), "JPEG", {"quality": 90}, [(112, 112), (64, 250)])

with open(os.path.join(out, "manifest.json"), "w") as f:
    json.dump({"pillow": PIL.__version__, "generator": "tools/collate/make_image_golden.py", "cases": cases}, f, indent=1)
print("wrote", len(cases), "cases to", out)
