"""Triton integer kernels (installed as ``p4q_engine.kernels``). See the GPU-kernel issue for their scope."""
