"""fovea.client: the thin client of a fovea image-classification server. No TensorFlow.

Blocking::

    from fovea.client import Client

    with Client("localhost:8500") as client:
        for p in client.predict(["cat.jpg", "photos/"], top_k=3):
            print(p.source, p.top[0].label, f"{p.top[0].score:.3f}")

asyncio::

    from fovea.client import AsyncClient

    async with AsyncClient("localhost:8500") as client:
        predictions = await client.predict(images)

Every call has a deadline (``timeout``, default 30 s), retries UNAVAILABLE and RESOURCE_EXHAUSTED
with exponential backoff and jitter within it, and raises `FoveaError` (with a gRPC status code) on
any failure.
"""

from fovea.client._aio import AsyncClient
from fovea.client._common import DEFAULT_MAX_MESSAGE_BYTES
from fovea.client._errors import FoveaError
from fovea.client._inputs import IMAGE_SUFFIXES
from fovea.client._results import Classification, ModelMetadata, ModelStatus, Prediction
from fovea.client._retry import DEFAULT_TIMEOUT, RetryPolicy
from fovea.client._sync import Client

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_TIMEOUT",
    "IMAGE_SUFFIXES",
    "AsyncClient",
    "Classification",
    "Client",
    "FoveaError",
    "ModelMetadata",
    "ModelStatus",
    "Prediction",
    "RetryPolicy",
]
