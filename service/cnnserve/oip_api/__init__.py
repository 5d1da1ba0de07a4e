"""Generated gRPC stubs (protos/generate.py). Do not edit."""
