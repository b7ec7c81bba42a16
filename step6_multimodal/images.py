"""Images: the generated scenes the model learns to see, and image files turned into the same tensors.

A scene is a black IMAGE_SIZE x IMAGE_SIZE canvas with zero to five shapes on it. Every shape has
its own colour (two shapes never share one, so "the red one" always names a single shape), a
kind (circle, square, triangle), a size and a position. The scene is data -- a list of Shape --
and the picture is drawn from it, so every question about the picture has a known answer.

    rng = np.random.default_rng(0)
    scene = random_scene(rng, n_shapes=3)
    pixels = draw(scene)                      # (IMAGE_SIZE, IMAGE_SIZE, 3) uint8
    x = to_tensor(pixels)                     # (3, IMAGE_SIZE, IMAGE_SIZE) float, what the encoder reads
    x = load_image("photo.jpg")               # any file: converted and resized the same way

Files of any kind are converted the way training images look (documented in the README):
grayscale and palette images become RGB, transparent pixels are laid on the black background,
and any size is resized to IMAGE_SIZE x IMAGE_SIZE (huge files are first shrunk while decoding).
"""
from dataclasses import dataclass

import numpy as np
import torch

from common.cli import UserError

IMAGE_SIZE = 32
COLOURS = {  # name -> RGB; saturated and far apart, so a colour survives JPEG and resizing
    "red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 245),
    "yellow": (240, 220, 40), "purple": (170, 60, 220), "white": (235, 235, 235),
}
KINDS = ("circle", "square", "triangle")
MAX_SHAPES = 5
SIZES = (7, 11)        # smallest and largest side of a shape's box, in pixels
MIN_APART = 3          # centres of two shapes differ by at least this much in x and in y
MAX_PIXELS = 50_000_000  # a file with more pixels than this is refused (a "decompression bomb")


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    x: int      # left edge of its box
    y: int      # top edge
    size: int   # side of its box

    @property
    def centre(self) -> tuple[float, float]:
        return self.x + self.size / 2, self.y + self.size / 2

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"


def random_scene(rng: np.random.Generator, n_shapes: int) -> list[Shape]:
    """n_shapes shapes with distinct colours, boxes that do not touch, centres at least MIN_APART
    apart in both directions (so "left of" and "above" always have an answer)."""
    colours = rng.choice(list(COLOURS), size=n_shapes, replace=False)
    while True:  # rejection sampling: five shapes fit easily, a few tries are enough
        scene = []
        for colour in colours:
            for _ in range(50):
                size = int(rng.integers(SIZES[0], SIZES[1] + 1))
                x, y = (int(v) for v in rng.integers(0, IMAGE_SIZE - size + 1, size=2))
                shape = Shape(str(rng.choice(KINDS)), str(colour), x, y, size)
                if all(_fits_beside(shape, other) for other in scene):
                    scene.append(shape)
                    break
        if len(scene) == n_shapes:
            return scene


def _fits_beside(a: Shape, b: Shape) -> bool:
    apart = (a.x + a.size < b.x or b.x + b.size < a.x or a.y + a.size < b.y or b.y + b.size < a.y)
    (ax, ay), (bx, by) = a.centre, b.centre
    return apart and abs(ax - bx) >= MIN_APART and abs(ay - by) >= MIN_APART


def shape_mask(shape: Shape) -> np.ndarray:
    """(IMAGE_SIZE, IMAGE_SIZE) bool: the pixels the shape covers."""
    ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] + 0.5  # pixel centres
    u, v = (xs - shape.x) / shape.size, (ys - shape.y) / shape.size  # 0..1 inside the box
    inside = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    if shape.kind == "square":
        return inside
    if shape.kind == "circle":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    return inside & (np.abs(u - 0.5) <= v / 2)  # triangle: apex at the top, base at the bottom


def draw(scene: list[Shape]) -> np.ndarray:
    """The scene as an (IMAGE_SIZE, IMAGE_SIZE, 3) uint8 RGB picture on black."""
    pixels = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for shape in scene:
        pixels[shape_mask(shape)] = COLOURS[shape.colour]
    return pixels


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float in [-1, 1]: the encoder's input."""
    return torch.from_numpy(pixels).permute(2, 0, 1).float().div(127.5).sub(1.0)


def blank_image() -> torch.Tensor:
    """The empty black canvas as a tensor: the blank-image baseline shows the model this."""
    return to_tensor(np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8))


# ----------------------------------------------------------------------------- image files

def load_pixels(path) -> np.ndarray:
    """Read a PNG/JPEG/... file into (IMAGE_SIZE, IMAGE_SIZE, 3) uint8, or raise a one-line UserError.

    Conversions: palette, grayscale and CMYK become RGB; an alpha channel is laid over black
    (our background); any size is resized with a box filter (huge JPEGs are decoded at a reduced
    size first, so a big photo never needs its full-size pixels in memory)."""
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with Image.open(path) as image:
            image.draft("RGB", (IMAGE_SIZE * 4, IMAGE_SIZE * 4))  # JPEG only: decode at 1/2..1/8 size
            image.load()
            if image.mode in ("P", "LA", "PA") or "transparency" in image.info:
                image = image.convert("RGBA")
            if image.mode == "RGBA":  # lay it on the black background the model knows
                background = Image.new("RGBA", image.size, (0, 0, 0, 255))
                image = Image.alpha_composite(background, image)
            image = image.convert("RGB")
            if image.size != (IMAGE_SIZE, IMAGE_SIZE):
                image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
            return np.asarray(image, dtype=np.uint8).copy()
    except FileNotFoundError:
        raise UserError(f"{path}: image file not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not an image file") from None
    except UnidentifiedImageError:
        raise UserError(f"{path}: not an image file Pillow can read (PNG, JPEG, GIF, BMP, WebP, ...)") from None
    except Image.DecompressionBombError:
        raise UserError(f"{path}: more than {MAX_PIXELS:,} pixels; shrink it before use") from None
    except (OSError, SyntaxError, ValueError) as err:  # truncated or damaged data
        raise UserError(f"{path}: the image file is damaged or truncated ({err})") from None


def load_image(path) -> torch.Tensor:
    """An image file as the encoder's (3, IMAGE_SIZE, IMAGE_SIZE) input."""
    return to_tensor(load_pixels(path))


def save_png(pixels: np.ndarray, path) -> None:
    from PIL import Image

    from common.checkpoint import _atomic_write

    _atomic_write(path, lambda f: Image.fromarray(pixels).save(f, format="PNG"))
