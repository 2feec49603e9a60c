"""The paper's figures as plain SVG, written without any plotting library: Figure 1 (the Swiss roll),
Figure 2 (the heartbeat's reverse trajectories) and §2.6's entropy bounds beside the learned kernel;
image samples as PNG, written with zlib and struct alone (image_grid, png)."""
import struct
import zlib

import numpy as np

import data
import dpm
import cpu_train
import gaussian
import binomial


BOX = 2.6      # the panels show [-BOX, BOX]² of standardised units
SIZE = 220     # pixels per panel


def _panel(ox, oy, title, points=(), arrows=()):
    px = lambda v: ox + (v[0] + BOX) / (2 * BOX) * SIZE
    py = lambda v: oy + (BOX - v[1]) / (2 * BOX) * SIZE
    out = [f'<rect x="{ox}" y="{oy}" width="{SIZE}" height="{SIZE}" fill="white" stroke="#888"/>',
           f'<text x="{ox + SIZE / 2}" y="{oy - 6}" text-anchor="middle" font-size="13">{title}</text>']
    for v in points:
        if abs(v[0]) < BOX and abs(v[1]) < BOX:
            out.append(f'<circle cx="{px(v):.1f}" cy="{py(v):.1f}" r="0.9" fill="#1f4e9e" fill-opacity="0.5"/>')
    for v, d in arrows:
        x1, y1, x2, y2 = px(v), py(v), px(v + d), py(v + d)
        out.append(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="#b22" '
                   f'stroke-width="1" marker-end="url(#a)"/>')
    return out


def swissroll(params, consts, x_data, rng, n=1000):
    """The paper's Figure 1: q(x⁽ᵗ⁾) at t = 0, T/2, T; p(x⁽ᵗ⁾) at t = T, T/2, 0; drift μ(x⁽ᵗ⁾, t) − x⁽ᵗ⁾."""
    T = consts.T
    beta, ab = consts.schedule(params)
    h = T // 2
    x0 = x_data[:n]
    q = {t: dpm.q_sample(x0, ab[t], rng.standard_normal(x0.shape)) if t else x0 for t in (0, h, T)}
    _, p = cpu_train.sample(params, consts, n, rng, keep=(T, h, 1))
    g = np.linspace(-BOX + 0.2, BOX - 0.2, 17)
    grid = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
    drift = {}
    for t in (T, h, 2):
        mu, _ = gaussian.reverse(params, consts, grid, np.full(len(grid), t), beta)
        d = mu - grid
        drift[t] = d * (0.25 / max(np.abs(d).max(), 1e-12))   # one scale per panel, as the paper does
    rows = [[("q(x⁽⁰⁾)", q[0]), (f"q(x⁽{h}⁾)", q[h]), (f"q(x⁽{T}⁾)", q[T])],
            [(f"p(x⁽{T}⁾)", p[T]), (f"p(x⁽{h}⁾)", p[h]), ("p(x⁽⁰⁾)", p[0])]]
    body = []
    for r, row in enumerate(rows):
        for c, (title, pts) in enumerate(row):
            body += _panel(20 + c * (SIZE + 20), 30 + r * (SIZE + 40), title, points=pts)
    for c, t in enumerate((T, h, 2)):
        body += _panel(20 + c * (SIZE + 20), 30 + 2 * (SIZE + 40), f"μ(x⁽{t}⁾, {t}) − x⁽{t}⁾",
                       arrows=list(zip(grid, drift[t])))
    w, hgt = 3 * SIZE + 80, 3 * (SIZE + 40) + 20
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{hgt}" font-family="sans-serif">'
            '<defs><marker id="a" markerWidth="6" markerHeight="6" refX="5" refY="3" orient="auto">'
            '<path d="M0,0 L6,3 L0,6 z" fill="#b22"/></marker></defs>')
    return "\n".join([head] + body + ["</svg>\n"])


def heartbeat(params, consts, x_data, rng, n=5, rows=50):
    """The paper's Figure 2 layout for the heartbeat: the 5 true sequences, then n samples' reverse
    trajectories, x⁽ᵗ⁾ from t = T (top) to t = 0 (bottom) on rows evenly spaced in t, bins left to right;
    a filled cell is a 1."""
    ts = sorted({int(round(v)) for v in np.linspace(consts.T, 0, rows)}, reverse=True)
    _, kept = binomial.sample(params, consts, n, rng, keep=ts)
    cell, gap, top = 7, 24, 40
    width = consts.D * cell
    out = []

    def grid(ox, oy, bits, title):
        out.append(f'<text x="{ox + width / 2}" y="{oy - 6}" text-anchor="middle" font-size="11">{title}</text>')
        out.append(f'<rect x="{ox}" y="{oy}" width="{width}" height="{len(bits) * cell}" fill="white" stroke="#888"/>')
        for r, row in enumerate(bits):
            for c in np.flatnonzero(row > 0.5):
                out.append(f'<rect x="{ox + c * cell}" y="{oy + r * cell}" width="{cell}" height="{cell}" fill="#222"/>')

    grid(20, top, data.heartbeat_sequences(), "the 5 true sequences")
    for j in range(n):
        traj = np.stack([kept[t][j] for t in ts])
        grid(20 + (j + 1) * (width + gap), top, traj, f"sample {j + 1}: t = {consts.T} → 0")
    W = 20 + (n + 1) * (width + gap)
    H = top + len(ts) * cell + 30
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif">'
            f'<text x="20" y="16" font-size="12">Reverse trajectories of binomial diffusion (Figure 2 layout): '
            f'rows are t = {ts[0]}, {ts[1]}, …, {ts[-1]}; columns are the {consts.D} bins</text>')
    return "\n".join([head] + out + ["</svg>\n"])


def entropy(lower, upper, learned, names=("lower bound H(β̃_t)", "upper bound H(β_t)")):
    """§2.6's bounds on H_q(X⁽ᵗ⁻¹⁾|X⁽ᵗ⁾) (Eq. 24) and the learned reverse kernel's entropy, against t, as SVG."""
    t = np.arange(2, len(upper))
    series = [(names[0], lower[t], "#1f4e9e"), (names[1], upper[t], "#b22"),
              ("learned E H(p(x⁽ᵗ⁻¹⁾|x⁽ᵗ⁾))", learned[t], "#222")]
    lo = min(v.min() for _, v, _ in series)
    hi = max(v.max() for _, v, _ in series)
    W, H, L, B = 560, 320, 60, 40
    px = lambda s: L + (s - t[0]) / max(t[-1] - t[0], 1) * (W - L - 20)
    py = lambda v: 20 + (hi - v) / max(hi - lo, 1e-12) * (H - 20 - B)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H + 60}" font-family="sans-serif">',
           f'<rect x="{L}" y="20" width="{W - L - 20}" height="{H - 20 - B}" fill="white" stroke="#888"/>',
           f'<text x="{W / 2}" y="{H + 5}" text-anchor="middle" font-size="12">t</text>',
           f'<text x="10" y="{H / 2}" font-size="12" transform="rotate(-90 10 {H / 2})">nats</text>']
    for v in np.linspace(lo, hi, 5):
        out.append(f'<text x="{L - 4}" y="{py(v) + 4:.1f}" text-anchor="end" font-size="10">{v:.1f}</text>')
    for s in (t[0], t[len(t) // 2], t[-1]):
        out.append(f'<text x="{px(s):.1f}" y="{H - B + 14}" text-anchor="middle" font-size="10">{s}</text>')
    for i, (name, v, colour) in enumerate(series):
        pts = " ".join(f"{px(s):.1f},{py(y):.1f}" for s, y in zip(t, v))
        out.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        out.append(f'<text x="{L + 10}" y="{H + 20 + 14 * i}" font-size="11" fill="{colour}">{name}</text>')
    return "\n".join(out + ["</svg>\n"])


def image_grid(images, cols, pad=2, background=255):
    """images (n, h, w) uint8 tiled row-major, cols to a row, pad pixels of background between and around
    the tiles; the last row's missing tiles stay background. Trailing axes (RGB) pass through."""
    images = np.asarray(images)
    n, h, w = images.shape[:3]
    rows = -(-n // cols)
    out = np.full((pad + rows * (h + pad), pad + cols * (w + pad)) + images.shape[3:], background, np.uint8)
    for k in range(n):
        y, x = pad + (k // cols) * (h + pad), pad + (k % cols) * (w + pad)
        out[y:y + h, x:x + w] = images[k]
    return out


def _chunk(tag, body):
    return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)


def png(pixels):
    """The bytes of an 8-bit PNG of pixels: (h, w) uint8 greyscale or (h, w, 3) uint8 RGB."""
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] == 3)) \
            or min(pixels.shape[:2]) < 1:
        raise ValueError(f"png: expected a non-empty (h, w) or (h, w, 3) uint8 array, got {pixels.dtype} "
                         f"{pixels.shape}")
    h, w = pixels.shape[:2]
    colour = 0 if pixels.ndim == 2 else 2
    # Each scanline starts with its filter type; 0 (none) keeps the writer trivial, and zlib still
    # compresses the flat backgrounds of sample grids well.
    rows = np.concatenate([np.zeros((h, 1), np.uint8), pixels.reshape(h, -1)], axis=1)
    return (b"\x89PNG\r\n\x1a\n"
            + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 9))
            + _chunk(b"IEND", b""))
