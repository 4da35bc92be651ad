"""fovea.devtools: what runs fovea from the outside, for `fovea demo`, the benchmarks and the tests.

Not part of what a caller of the service needs: it starts `fovea serve` and `fovea train` in
subprocesses and reads /metrics with prometheus-client, so it needs the server and trainer extras.
"""

import importlib.util

if any(importlib.util.find_spec(m) is None for m in ("tensorflow", "tf_keras", "prometheus_client")):
    raise ImportError(
        "fovea.devtools needs the server and trainer extras: pip install 'fovea[server,trainer]'"
    )
