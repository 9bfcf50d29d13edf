"""Images for vision-language models (Qwen2-VL): reading an image from what a request gives (a PIL image,
a local path, a data: URL, bytes; http(s) only from allowed domains), checked against the limits; the
model's own image processor (transformers' AutoImageProcessor) for resizing and normalisation; the
prompt's image token expanded to one token per merged patch; M-RoPE positions for the prompt; and an
encoder cache so an image seen before is not encoded again.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import InvalidParameterError


@dataclass
class ImageLimits:
    max_images: int  # per request
    max_pixels: int  # width * height of one image as given
    max_bytes: int  # encoded size of one image
    allowed_domains: tuple[str, ...] = ()  # http(s) hosts images may be fetched from; empty: none


@dataclass
class ImageInput:
    digest: str  # sha256 of the decoded pixels, size and mode: the encoder-cache and prefix-cache key
    pixel_values: torch.Tensor  # [patches, C * temporal * patch * patch], from the model's image processor
    grid_thw: tuple[int, int, int]  # patches along time, height, width
    offset: int = 0  # first of its tokens in the expanded prompt
    num_tokens: int = 0
    embeds: torch.Tensor | None = None  # [num_tokens, hidden] once encoded


@dataclass
class MultiModalData:
    images: list[ImageInput]
    positions: np.ndarray  # [3, prompt length] M-RoPE positions of the prompt
    delta: int  # a generated token at index i has position i + delta in all three rows
    digests: tuple[str, ...] = field(default=())


def read_image(item, limits: ImageLimits, where: str):
    """A PIL image from what a request gave; InvalidParameterError naming `where` otherwise."""
    from PIL import Image
    if isinstance(item, Image.Image):
        image = item
    else:
        data = _image_bytes(item, limits, where)
        if len(data) > limits.max_bytes:
            raise InvalidParameterError(where, f"the image has {len(data)} bytes, more than the limit {limits.max_bytes}")
        try:
            image = Image.open(io.BytesIO(data))  # reads the header only: the size is checked before decoding
            if image.width * image.height > limits.max_pixels:
                raise InvalidParameterError(where, f"the image has {image.width}x{image.height} pixels, more than "
                                            f"the limit {limits.max_pixels}")
            image.load()
        except InvalidParameterError:
            raise
        except Exception as exc:
            raise InvalidParameterError(where, f"not a readable image ({type(exc).__name__}: {exc})") from None
    if image.width * image.height > limits.max_pixels:
        raise InvalidParameterError(where, f"the image has {image.width}x{image.height} pixels, more than the limit "
                                    f"{limits.max_pixels}")
    return image.convert("RGB")


def _image_bytes(item, limits: ImageLimits, where: str) -> bytes:
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, dict):  # OpenAI's {"url": ...}
        item = item.get("url")
    if not isinstance(item, (str, Path)):
        raise InvalidParameterError(where, f"must be a PIL image, a path, a data: URL or bytes, got {type(item).__name__}")
    text = str(item)
    if text.startswith("data:"):
        header, sep, payload = text.partition(",")
        if not sep or ";base64" not in header:
            raise InvalidParameterError(where, "a data: URL must be base64 (data:image/png;base64,...)")
        if len(payload) > limits.max_bytes * 4 // 3 + 4:
            raise InvalidParameterError(where, f"the image is larger than the limit of {limits.max_bytes} bytes")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidParameterError(where, "the data: URL is not valid base64") from None
    if text.startswith(("http://", "https://")):
        from urllib.parse import urlparse
        host = urlparse(text).hostname or ""
        if host not in limits.allowed_domains:
            raise InvalidParameterError(where, f"remote image URLs are refused (host {host!r} is not in "
                                        f"allowed_image_domains); send the image inline as a data: URL")
        import urllib.request
        with urllib.request.urlopen(text, timeout=10) as response:  # noqa: S310 (an operator-allowed host)
            data = response.read(limits.max_bytes + 1)
        return data
    if text.startswith("file://"):
        text = text[len("file://"):]
    path = Path(text)
    if not path.is_file():
        raise InvalidParameterError(where, f"no image file at {text!r}")
    if path.stat().st_size > limits.max_bytes:
        raise InvalidParameterError(where, f"the image has {path.stat().st_size} bytes, more than the limit "
                                    f"{limits.max_bytes}")
    return path.read_bytes()


def image_digest(image) -> str:
    h = hashlib.sha256()
    h.update(f"{image.mode}:{image.width}x{image.height}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()


class ImageProcessor:
    """One engine's image handling: the model's image processor, its image token and merge size."""

    def __init__(self, model_dir: Path, image_token_id: int, merge_size: int, limits: ImageLimits):
        from transformers import AutoImageProcessor
        self.processor = AutoImageProcessor.from_pretrained(str(model_dir))
        self.image_token_id = image_token_id
        self.merge_size = merge_size
        self.limits = limits

    def prepare(self, token_ids: list[int], images: list, where: str = "images") -> tuple[list[int], MultiModalData]:
        """Read and process each image, expand the prompt's image tokens (one per image, in order) to
        one per merged patch, and compute the prompt's M-RoPE positions."""
        if len(images) > self.limits.max_images:
            raise InvalidParameterError(where, f"at most {self.limits.max_images} images per request, got {len(images)}")
        slots = [i for i, t in enumerate(token_ids) if t == self.image_token_id]
        if len(slots) != len(images):
            raise InvalidParameterError(where, f"the prompt has {len(slots)} image placeholders for {len(images)} "
                                        f"images")
        inputs = []
        for i, item in enumerate(images):
            image = read_image(item, self.limits, f"{where}[{i}]")
            out = self.processor(images=[image], return_tensors="pt")
            t, h, w = (int(v) for v in out["image_grid_thw"][0])
            inputs.append(ImageInput(image_digest(image), out["pixel_values"], (t, h, w),
                                     num_tokens=t * h * w // self.merge_size ** 2))
        expanded: list[int] = []
        last = 0
        for slot, image in zip(slots, inputs):
            expanded += token_ids[last:slot]
            image.offset = len(expanded)
            expanded += [self.image_token_id] * image.num_tokens
            last = slot + 1
        expanded += token_ids[last:]
        positions = self.mrope_positions(len(expanded), inputs)
        delta = int(positions.max()) + 1 - len(expanded)
        return expanded, MultiModalData(inputs, positions, delta, tuple(img.digest for img in inputs))

    def mrope_positions(self, length: int, images: list[ImageInput]) -> np.ndarray:
        """Text tokens count up in all three rows; an image's tokens take (t, row, column) of its merged
        grid from where the text left off, and the text after it continues past its larger side."""
        rows = np.zeros((3, length), dtype=np.int64)
        index, current = 0, 0
        for image in images + [None]:
            end = image.offset if image is not None else length
            rows[:, index:end] = np.arange(end - index) + current
            current += end - index
            if image is None:
                break
            t, h, w = image.grid_thw[0], image.grid_thw[1] // self.merge_size, image.grid_thw[2] // self.merge_size
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
            rows[:, image.offset:image.offset + image.num_tokens] = np.stack([tt, hh, ww]).reshape(3, -1) + current
            current += max(h, w)
            index = image.offset + image.num_tokens
        return rows


class EncoderCache:
    """Image embeddings by image digest, least recently used dropped past `capacity` images."""

    def __init__(self, capacity: int = 64):
        self.capacity = capacity
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0

    def encode(self, model, images: list[ImageInput]) -> None:
        for image in images:
            cached = self.entries.get(image.digest)
            if cached is None:
                self.misses += 1
                cached = model.encode_images(image.pixel_values, torch.tensor([image.grid_thw]))
                self.entries[image.digest] = cached
                while len(self.entries) > self.capacity:
                    self.entries.popitem(last=False)
            else:
                self.hits += 1
                self.entries.move_to_end(image.digest)
            image.embeds = cached
