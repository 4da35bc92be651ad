"""Generated gRPC stubs for the KServe v2 / Open Inference Protocol, Triton's superset (see
proto/inference/). Do not edit the *_pb2* files: scripts/gen_protos.py writes them.

They live in a private descriptor pool (`_pool.POOL`), so they coexist with tritonclient's copies of
the same `inference.*` messages in one process.
"""
