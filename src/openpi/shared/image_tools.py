"""Resize-with-pad, as openpi does it: scale to fit keeping the aspect ratio, then pad, centered.

Two flavours with the same geometry:

* `resize_with_pad`: numpy uint8 images through PIL (bilinear by default), padding with 0 (black). This is what the
  LIBERO client and the `ResizeImages` transform use.
* `resize_with_pad_jax`: jax float images in [-1, 1] (padding with -1, i.e. black) or uint8 (padding with 0), for
  `preprocess_observation` inside jitted code.

Both are no-ops when the images already have the target size, so 224x224 inputs pass through bit-exactly.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, UInt8
from PIL import Image


def _fit_size(cur_height: int, cur_width: int, height: int, width: int) -> tuple[int, int]:
    """Largest size with the input's aspect ratio that fits in (height, width); truncated like openpi's client."""
    ratio = max(cur_width / width, cur_height / height)
    return int(cur_height / ratio), int(cur_width / ratio)


def resize_with_pad(
    images: UInt8[np.ndarray, "*b h w c"], height: int, width: int, method: Image.Resampling = Image.Resampling.BILINEAR
) -> UInt8[np.ndarray, "*b {height} {width} c"]:
    """Resizes uint8 images [..., h, w, c] to [..., height, width, c] with PIL, padding with zeros."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(
            f"resize_with_pad expects uint8 images, got {images.dtype}. Convert with (255 * x).astype(np.uint8) "
            "(x in [0, 1]) or use resize_with_pad_jax for float images in [-1, 1]."
        )
    if images.ndim < 3:
        raise ValueError(f"resize_with_pad expects images [..., h, w, c], got shape {images.shape}.")
    if images.shape[-3:-1] == (height, width):
        return images

    batch_shape, (cur_h, cur_w, c) = images.shape[:-3], images.shape[-3:]
    new_h, new_w = _fit_size(cur_h, cur_w, height, width)
    top, left = (height - new_h) // 2, (width - new_w) // 2

    flat = images.reshape(-1, cur_h, cur_w, c)
    out = np.zeros((flat.shape[0], height, width, c), dtype=np.uint8)
    for i, image in enumerate(flat):
        # PIL wants 2-D arrays for single-channel images.
        pil = Image.fromarray(image[..., 0] if c == 1 else image)
        resized = np.asarray(pil.resize((new_w, new_h), resample=method)).reshape(new_h, new_w, c)
        out[i, top : top + new_h, left : left + new_w] = resized
    return out.reshape(*batch_shape, height, width, c)


def resize_with_pad_jax(
    images: Float[Array, "*b h w c"] | UInt8[Array, "*b h w c"], height: int, width: int, method: str = "linear"
) -> Float[Array, "*b {height} {width} c"] | UInt8[Array, "*b {height} {width} c"]:
    """jax resize-with-pad. Float images are taken to be in [-1, 1] and padded with -1; uint8 padded with 0."""
    if images.ndim < 3:
        raise ValueError(f"resize_with_pad_jax expects images [..., h, w, c], got shape {images.shape}.")
    if images.shape[-3:-1] == (height, width):
        return images

    batch_shape, (cur_h, cur_w, c) = images.shape[:-3], images.shape[-3:]
    new_h, new_w = _fit_size(cur_h, cur_w, height, width)
    is_uint8 = images.dtype == jnp.uint8
    x = images.astype(jnp.float32) if is_uint8 else images
    x = jax.image.resize(x, (*batch_shape, new_h, new_w, c), method=method)
    if is_uint8:
        x = jnp.clip(jnp.round(x), 0, 255).astype(jnp.uint8)

    top, left = (height - new_h) // 2, (width - new_w) // 2
    pad = [(0, 0)] * len(batch_shape) + [(top, height - new_h - top), (left, width - new_w - left), (0, 0)]
    return jnp.pad(x, pad, constant_values=0 if is_uint8 else -1)
