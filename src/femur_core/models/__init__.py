"""Networks and the one registry that the CLI and the GUI list."""

from .registry import MODELS, ModelConfig, ModelKind, ModelSpec, Sampling, build_model, default_config, model_names
from .unet import UNet2D, UNet3D, valid_input_size, valid_output_size

__all__ = ["MODELS", "ModelConfig", "ModelKind", "ModelSpec", "Sampling", "build_model", "default_config", "model_names", "UNet2D", "UNet3D",
           "valid_input_size", "valid_output_size"]
