"""Per-format readers behind `mri_vqvae.data.io` (import from there, not from here).

Each format module exposes ``probe(path, max_voxels) -> Header`` (headers only: declared shape,
RAS affine, validated before any voxel is read) and ``load(path, header) -> (X, Y, Z) float32``.
"""
