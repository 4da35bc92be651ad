"""Generated gRPC stubs for the fovea.v1 API (see proto/fovea/v1/). Do not edit."""
