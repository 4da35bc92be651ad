"""fovea's private descriptor pool for the vendored `inference.*` protos.

tritonclient, MLServer and kserve register Triton's grpc_service.proto and model_config.proto (package
`inference`) in protobuf's default pool; registering them a second time, or a slightly different copy,
fails with "duplicate symbol 'inference.DataType'" (MLServer #1730, kserve #3099). Stubs loaded here
never meet those, so fovea imports into the same process as any of them, in either order.
"""

from __future__ import annotations

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
