"""Split a list of images into PredictRequests that each fit the message-size and image-count limits."""

from __future__ import annotations

from collections.abc import Sequence

from fovea.client._errors import invalid_argument

# Bytes kept free under the message limit, for safety against framing we do not count.
HEADROOM_BYTES = 4096


def _varint_len(n: int) -> int:
    length = 1
    while n >= 0x80:
        n >>= 7
        length += 1
    return length


def field_cost(message_size: int) -> int:
    """Bytes one length-delimited field of `message_size` bytes adds to its parent (tag + length + body)."""
    return 1 + _varint_len(message_size) + message_size


def budget(max_message_bytes: int) -> int:
    return max_message_bytes - min(HEADROOM_BYTES, max_message_bytes // 8)


def split(
    image_sizes: Sequence[int],
    sources: Sequence[str],
    *,
    base_size: int,
    max_message_bytes: int,
    max_images: int,
) -> list[range]:
    """Consecutive index ranges, in order, whose requests each stay under the limits.

    `image_sizes` are the serialized sizes of the Image messages, `base_size` the size of the request
    without images. A single image that cannot fit raises INVALID_ARGUMENT before anything is sent.
    """
    limit = budget(max_message_bytes) - base_size
    chunks: list[range] = []
    start, used = 0, 0
    for i, size in enumerate(image_sizes):
        cost = field_cost(size)
        if cost > limit:
            raise invalid_argument(
                f"{sources[i]}: the image takes {size} bytes, more than the {limit} bytes one request "
                f"may carry (max message size {max_message_bytes} bytes); send it resized or encoded "
                "(JPEG/PNG), or raise the message limit of both client and server"
            )
        if i > start and (used + cost > limit or i - start >= max_images):
            chunks.append(range(start, i))
            start, used = i, 0
        used += cost
    chunks.append(range(start, len(image_sizes)))
    return chunks
