"""Training-time augmentation as batch functions of TensorFlow ops (they run inside tf.data):
random crops, small rotations and zooms with the mirror image in one resampling, JPEG re-encoding
and blur. Each takes uint8 (B, H, W, 3); the augmenter returns float32 0-255.

TensorFlow is imported inside functions: importing this module is cheap.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from facetrace.tasks.training import AugmentConfig


def make_cropper(crop: int, seed: int):
    """A batch function uint8 (B, H, W, 3) -> (B, crop, crop, 3): an independent random square per image."""
    import tensorflow as tf

    generator = tf.random.Generator.from_seed(seed + 7919)

    def random_crops(batch):
        shape = tf.shape(batch)
        count, height, width = shape[0], shape[1], shape[2]
        top = generator.uniform((count,), 0, height - crop + 1, dtype=tf.int32)
        left = generator.uniform((count,), 0, width - crop + 1, dtype=tf.int32)
        return tf.map_fn(lambda args: tf.slice(args[0], tf.stack([args[1], args[2], 0]), [crop, crop, 3]),
                         (batch, top, left), fn_output_signature=tf.TensorSpec((crop, crop, 3), tf.uint8))

    return random_crops


def make_augmenter(config: AugmentConfig, size: int, seed: int):
    """A batch function uint8 (B, H, W, 3) -> augmented float32 0-255, built from TF ops only."""
    import tensorflow as tf

    generator = tf.random.Generator.from_seed(seed)
    lo_q, hi_q = config.jpeg_quality_range

    def random_jpeg(image):
        quality = generator.uniform((), lo_q, hi_q + 1, dtype=tf.int32)
        return tf.image.adjust_jpeg_quality(image, quality)

    def gaussian_kernel(sigma):
        radius = 2
        x = tf.range(-radius, radius + 1, dtype=tf.float32)
        g = tf.exp(-(x**2) / (2.0 * sigma**2))
        g = g / tf.reduce_sum(g)
        kernel = g[:, None] * g[None, :]
        return tf.tile(kernel[:, :, None, None], (1, 1, 3, 1))

    def augment(batch):
        batch_size = tf.shape(batch)[0]
        if config.jpeg_probability > 0:
            # Encode only the images drawn for it (a cond per image), not the whole batch.
            pick = generator.uniform((batch_size,)) < config.jpeg_probability
            batch = tf.map_fn(lambda pair: tf.cond(pair[1], lambda: random_jpeg(pair[0]), lambda: pair[0]),
                              (batch, pick), fn_output_signature=tf.uint8)
        x = tf.cast(batch, tf.float32)
        if config.rotation_degrees or config.zoom:
            # The mirror image, when drawn, is part of the same resampling (one pass over the pixels).
            x = _random_affine(x, generator, config.rotation_degrees, config.zoom, size, flip=config.flip)
        elif config.flip:
            flip = generator.uniform((batch_size, 1, 1, 1)) < 0.5
            x = tf.where(flip, tf.reverse(x, axis=[2]), x)
        if config.blur_probability > 0:
            # Blur only the images drawn for it, not the whole batch.
            sigma = generator.uniform((), 0.3, max(0.31, config.blur_sigma))
            picked = tf.where(generator.uniform((batch_size,)) < config.blur_probability)

            def blur(images):
                blurred = tf.nn.depthwise_conv2d(
                    tf.pad(tf.gather_nd(images, picked), [[0, 0], [2, 2], [2, 2], [0, 0]], mode="SYMMETRIC"),
                    gaussian_kernel(sigma), strides=[1, 1, 1, 1], padding="VALID")
                return tf.tensor_scatter_nd_update(images, picked, blurred)

            # (a convolution of an empty batch returns the padded shape: none drawn, nothing to do)
            unblurred = x
            x = tf.cond(tf.shape(picked)[0] > 0, lambda: blur(unblurred), lambda: unblurred)
        return tf.clip_by_value(x, 0.0, 255.0)

    return augment


def _random_affine(x, generator, degrees: float, zoom: float, size: int, *, flip: bool = False):
    """Per-image small rotation and zoom-in (a random crop resized back), and with ``flip`` a left-right
    mirror image for half of them, in one resampling; corners take the nearest edge."""
    import tensorflow as tf

    batch_size = tf.shape(x)[0]
    angle = generator.uniform((batch_size,), -1.0, 1.0) * (degrees * math.pi / 180.0)
    scale = 1.0 - generator.uniform((batch_size,), 0.0, zoom)  # < 1: sample a smaller window = zoom in
    shift = generator.uniform((batch_size, 2), -1.0, 1.0) * (1.0 - scale)[:, None] * (size / 2.0)
    mirrored = generator.uniform((batch_size,)) < 0.5 if flip else None
    return affine_resample(x, angle, scale, shift, size, mirrored)


def affine_resample(x, angle, scale, shift, size: int, mirrored=None):
    """Resample each image of ``x`` rotated by ``angle`` (radians), zoomed in by 1/``scale``, moved by
    ``shift`` (pixels) and, where ``mirrored``, mirrored left-right; one value or tensor per image."""
    import tensorflow as tf

    centre = (size - 1) / 2.0
    cos, sin = tf.cos(angle) * scale, tf.sin(angle) * scale
    # Output pixel (x, y) samples input at A @ (x - c, y - c) + c + shift.
    a0, a1 = cos, -sin
    b0, b1 = sin, cos
    a2 = centre - a0 * centre - a1 * centre + shift[:, 0]
    b2 = centre - b0 * centre - b1 * centre + shift[:, 1]
    if mirrored is not None:  # sample the mirror image: input column u becomes (size - 1) - u
        a0, a1, a2 = (tf.where(mirrored, -a0, a0), tf.where(mirrored, -a1, a1),
                      tf.where(mirrored, 2.0 * centre - a2, a2))
    zeros = tf.zeros_like(a0)
    transforms = tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=x, transforms=transforms, output_shape=tf.constant([size, size]), fill_value=0.0,
        interpolation="BILINEAR", fill_mode="NEAREST")  # REFLECT costs 2-4x more on CPU
