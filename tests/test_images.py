"""MNIST's IDX files (plain and gzipped, and every way they can be wrong) and the standard-library PNG writer."""
import gzip
import struct
import zlib

import numpy as np
import pytest

import data
import images
import figures


def write_idx(path, array, gz=False, magic=None, extra=b"", cut=0):
    """array as an IDX file of unsigned bytes; magic, extra (trailing bytes) and cut (bytes dropped from
    the end) make broken ones."""
    array = np.asarray(array, np.uint8)
    head = magic if magic is not None else bytes([0, 0, 0x08, array.ndim])
    body = head + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes() + extra
    body = body[:len(body) - cut]
    path = str(path) + (".gz" if gz else "")
    with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
        f.write(body)
    return path


def mnist_pair(d, n=7, side=28, labels=None, split="train", gz=False):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, side, side), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8) if labels is None else np.asarray(labels, np.uint8)
    img, lab = data.MNIST_FILES[split]
    write_idx(d / img, images, gz)
    write_idx(d / lab, labels, gz)
    return images, labels


def one_line_error(fn, *args, names):
    with pytest.raises(ValueError) as e:
        fn(*args)
    msg = str(e.value)
    assert names in msg and data.MNIST_URL in msg and "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("split", ["train", "test"])
def test_mnist_pair_reads_back(tmp_path, gz, split):
    images, labels = mnist_pair(tmp_path, split=split, gz=gz)
    x, y = data.load_mnist(tmp_path, split)
    assert x.dtype == y.dtype == np.uint8 and x.shape == (7, 784) and y.shape == (7,)
    assert np.array_equal(x, images.reshape(7, 784)) and np.array_equal(y, labels)


def test_plain_file_is_preferred_to_gz(tmp_path):
    a, b = np.arange(5, dtype=np.uint8), np.arange(5, 10, dtype=np.uint8)
    write_idx(tmp_path / "f", a)
    write_idx(tmp_path / "f", b, gz=True)
    assert np.array_equal(data.read_idx(tmp_path / "f", 1), a)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("broken, what", [
    (dict(cut=1), "truncated"),
    (dict(extra=b"\0"), "trailing"),
    (dict(magic=bytes([0, 0, 8, 2])), "dimensions"),        # 0x00000802: a 2-d file where 1-d is wanted
    (dict(magic=bytes([0, 0, 9, 1])), "data type"),         # signed bytes
    (dict(magic=bytes([1, 0, 8, 1])), "not an IDX file"),
])
def test_broken_idx_files_are_one_line_errors(tmp_path, gz, broken, what):
    write_idx(tmp_path / "f", np.arange(10, dtype=np.uint8), gz, **broken)
    assert what in one_line_error(data.read_idx, tmp_path / "f", 1, names=str(tmp_path / "f"))


def test_missing_header_and_implausible_sizes(tmp_path):
    one_line_error(data.read_idx, tmp_path / "none", 1, names=f"{tmp_path / 'none'}: no such file (nor ")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8]))
    one_line_error(data.read_idx, tmp_path / "short", 1, names="short")
    (tmp_path / "head").write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">I", 2))
    one_line_error(data.read_idx, tmp_path / "head", 3, names="head")
    for name, shape in [("zero", (0, 28, 28)), ("huge", (100_000, 100_000, 1))]:
        # only the header exists: the sizes are refused before any data is read
        (tmp_path / name).write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">3I", *shape))
        assert "sizes" in one_line_error(data.read_idx, tmp_path / name, 3, names=name)


def test_corrupt_gz_is_one_line_error(tmp_path):
    good = gzip.compress(bytes([0, 0, 8, 1]) + struct.pack(">I", 1000) + bytes(1000))
    (tmp_path / "a.gz").write_bytes(b"not gzip at all")
    (tmp_path / "b.gz").write_bytes(good[:len(good) // 2])                  # stream ends early
    (tmp_path / "c.gz").write_bytes(good[:12] + bytes(len(good) - 12))      # deflate data zeroed
    for name in "abc":
        one_line_error(data.read_idx, tmp_path / name, 1, names=f"{name}.gz")


def test_mnist_consistency_errors_name_the_file(tmp_path):
    lab = data.MNIST_FILES["train"][1]
    (tmp_path / "count").mkdir()
    mnist_pair(tmp_path / "count", labels=[1] * 6)
    assert "6 labels for 7 images" in one_line_error(data.load_mnist, tmp_path / "count", "train", names=lab)
    (tmp_path / "ten").mkdir()
    mnist_pair(tmp_path / "ten", labels=[1, 2, 3, 10, 0, 0, 0])
    assert "label 10" in one_line_error(data.load_mnist, tmp_path / "ten", "train", names=lab)
    (tmp_path / "side").mkdir()
    mnist_pair(tmp_path / "side", side=27, gz=True)
    one_line_error(data.load_mnist, tmp_path / "side", "train", names=data.MNIST_FILES["train"][0] + ".gz")
    (tmp_path / "nolabels").mkdir()
    write_idx(tmp_path / "nolabels" / data.MNIST_FILES["test"][0], np.zeros((2, 28, 28)))
    one_line_error(data.load_mnist, tmp_path / "nolabels", "test", names=data.MNIST_FILES["test"][1])


def decode_png(blob):
    """(pixels, colour type) of an 8-bit, unfiltered, non-interlaced PNG, checking every chunk's CRC."""
    assert blob[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(blob):
        (n,), tag = struct.unpack(">I", blob[pos:pos + 4]), blob[pos + 4:pos + 8]
        body = blob[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", blob[pos + 8 + n:pos + 12 + n])
        assert crc == zlib.crc32(tag + body) & 0xFFFFFFFF, tag
        chunks.append((tag, body))
        pos += 12 + n
    assert pos == len(blob) and [t for t, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"] and chunks[2][1] == b""
    w, h, depth, colour, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, comp, filt, interlace) == (8, 0, 0, 0) and colour in (0, 2)
    channels = 1 if colour == 0 else 3
    rows = np.frombuffer(zlib.decompress(chunks[1][1]), np.uint8).reshape(h, 1 + w * channels)
    assert np.all(rows[:, 0] == 0)
    pixels = rows[:, 1:].reshape((h, w) if colour == 0 else (h, w, 3))
    return pixels, colour


@pytest.mark.parametrize("shape", [(5, 7), (7, 5), (1, 1), (28, 28), (5, 7, 3), (3, 2, 3)])
def test_png_decodes_to_its_pixels(shape):
    pixels = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    out, colour = decode_png(figures.png(pixels))
    assert colour == (0 if len(shape) == 2 else 2) and out.shape == shape and np.array_equal(out, pixels)


@pytest.mark.parametrize("bad", [np.zeros((4, 4)), np.zeros((4, 4, 4), np.uint8), np.zeros((0, 3), np.uint8)])
def test_png_refuses_what_it_cannot_write(bad):
    with pytest.raises(ValueError):
        figures.png(bad)


def test_image_grid_places_tiles_row_major():
    n, cols, h, w, pad = 5, 3, 4, 4, 1
    images = (np.arange(n, dtype=np.uint8)[:, None, None] * 10 + np.arange(h * w, dtype=np.uint8).reshape(h, w))
    g = figures.image_grid(images, cols, pad=pad, background=255)
    assert g.dtype == np.uint8 and g.shape == (pad + 2 * (h + pad), pad + cols * (w + pad)) == (11, 16)
    mask = np.ones(g.shape, bool)
    for k in range(n):
        y, x = pad + (k // cols) * (h + pad), pad + (k % cols) * (w + pad)
        assert np.array_equal(g[y:y + h, x:x + w], images[k])
        mask[y:y + h, x:x + w] = False
    assert np.all(g[mask] == 255)      # padding and the missing sixth tile
    assert figures.image_grid(images[:1], 1, pad=0).shape == (h, w)
    rgb = figures.image_grid(np.zeros((2, 3, 3, 3), np.uint8), 2, pad=1, background=7)
    assert rgb.shape == (5, 9, 3) and rgb[0, 0, 0] == 7 and rgb[1, 1, 0] == 0


def test_pieces_counts_8_connected_strokes():
    """images.pieces on drawn answers: a long winding stroke is one piece however far its ends are apart,
    a diagonal step joins, a gap of one pixel splits, specks under 3 pixels and faint pixels do not count."""
    side = 12
    canvas = lambda: np.zeros((side, side), np.uint8)
    snake = canvas()
    for r in range(0, side, 2):                      # a boustrophedon: its ends are ~70 steps apart
        snake[r, :] = 255
        snake[r + 1, side - 1 if r % 4 == 0 else 0] = 255
    diagonal = canvas()
    for k in range(8):
        diagonal[k, k] = 200                         # touching only at corners
    split = canvas()
    split[3, 0:5] = 255
    split[3, 6:11] = 255                             # one pixel apart
    specks = canvas()
    specks[1, 1:3] = 255                             # 2 pixels: too small
    specks[8, 2:9] = 255
    specks[5, 0:8] = 127                             # below the ink level
    empty = canvas()
    got = images.pieces(np.stack([snake, diagonal, split, specks, empty]).reshape(5, -1), side)
    assert got.tolist() == [1, 1, 2, 1, 0]


def test_strokes_shares():
    """images.strokes: one image whole, one in two pieces with a speck, one whole with a speck."""
    side = 8
    a = np.zeros((3, side, side), np.uint8)
    a[0, 2, 1:7] = 255
    a[1, 1, 0:3] = 255
    a[1, 5, 0:3] = 255
    a[1, 7, 7] = 255
    a[2, 3, 0:6] = 255
    a[2, 6, 6:8] = 255
    assert images.strokes(a.reshape(3, -1), side) == {"one_piece": 2 / 3, "specked": 2 / 3, "mean_pieces": 4 / 3}
