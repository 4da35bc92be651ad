"""fovea.server: serve published fovea models over gRPC with dynamic batching."""

import importlib.util

if importlib.util.find_spec("tensorflow") is None or importlib.util.find_spec("prometheus_client") is None:
    raise ImportError("fovea.server needs the server extra: pip install 'fovea[server]'")
