"""The paper's model configurations, the one place they are written down; `configs/` imports them.

Each returns a plain dict with a `name` key that `lzn_jax.models.build` accepts as it is or wrapped in a ConfigDict.
Plain Python only, so a config file can import this module without JAX (docs/method.md, 'Models').
"""

from __future__ import annotations

from typing import Any

# Bottleneck blocks per stage of the ResNet family the reference ports (SimCLRv2 layout).
RESNET_STAGE_SIZES = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3), 200: (3, 24, 36, 3)}


def cifar10_encoder_config(latent_dim: int = 200) -> dict[str, Any]:
    """NCSN++ encoder of case studies 1 and 3 (32x32): 4 levels, 4 blocks, heads on all 21 maps, dropout 0.15."""
    return dict(
        name="ncsnpp_encoder", latent_dim=latent_dim, nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=4,
        attn_resolutions=(16,), dropout=0.15, fir=False, progressive_input="none", num_base_channels=20,
        num_base_units=200, num_latent_transformation_layers=2, latent_transformation_resolutions=None,
    )


def image256_encoder_config(latent_dim: int = 200) -> dict[str, Any]:
    """NCSN++ encoder of the 256x256 settings: 7 levels, 2 blocks, FIR, input skip, heads only at 64..4."""
    return dict(
        name="ncsnpp_encoder", latent_dim=latent_dim, nf=128, ch_mult=(1, 1, 2, 2, 2, 2, 2), num_res_blocks=2,
        attn_resolutions=(16,), dropout=0.0, fir=True, progressive_input="input_skip", num_base_channels=20,
        num_base_units=200, num_latent_transformation_layers=2, latent_transformation_resolutions=(64, 32, 16, 8, 4),
    )


def cifar10_decoder_config(latent_dim: int = 200, num_classes: int = 0) -> dict[str, Any]:
    """Rectified-flow NCSN++ of CIFAR10: positional time embedding, dropout 0.15. latent_dim=0: plain RF."""
    return dict(
        name="ncsnpp_decoder", latent_dim=latent_dim, num_classes=num_classes, nf=128, ch_mult=(1, 2, 2, 2),
        num_res_blocks=4, attn_resolutions=(16,), dropout=0.15, fir=False, embedding_type="positional",
        progressive="none", progressive_input="none", scale_by_sigma=False,
    )


def image256_decoder_config(latent_dim: int = 200, num_classes: int = 0) -> dict[str, Any]:
    """Rectified-flow NCSN++ of the 256x256 settings: Fourier time, FIR, output/input skip, scale_by_sigma."""
    return dict(
        name="ncsnpp_decoder", latent_dim=latent_dim, num_classes=num_classes, nf=128, ch_mult=(1, 1, 2, 2, 2, 2, 2),
        num_res_blocks=2, attn_resolutions=(16,), dropout=0.0, fir=True, embedding_type="fourier",
        fourier_scale=16.0, progressive="output_skip", progressive_input="input_skip", scale_by_sigma=True,
    )


def resnet50_gn_config(latent_dim: int = 256, head_num_layers: int = 2) -> dict[str, Any]:
    """ResNet-50-GN of case study 2 with the configured 2-layer head.

    `head_num_layers=1` reproduces the parameter count the paper reports (docs/differences.md, 'ResNet head').
    """
    return dict(
        name="resnet50_gn", latent_dim=latent_dim, stage_sizes=RESNET_STAGE_SIZES[50], width_multiplier=1,
        head_num_layers=head_num_layers,
    )


def label_anchors_config(num_classes: int = 10, latent_dim: int = 200) -> dict[str, Any]:
    """Label anchors of case study 3: 10 CIFAR10 classes in the 200-d latent space."""
    return dict(name="label_anchors", num_classes=num_classes, latent_dim=latent_dim)
