"""mri-vqvae: discrete latent models of 3D MRI (manifests, MONAI preprocessing, VQ-VAE, prior)."""

__version__ = "0.1.0"
