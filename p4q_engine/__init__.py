"""p4q-engine: P4Q low-bit CLIP - fake-quant PTQ reference, P4Q training, packed artifacts and integer kernels."""

__version__ = "0.1.0"
