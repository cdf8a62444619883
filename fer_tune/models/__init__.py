"""Models: the built-in FER architectures and any timm model (`timm/<name>`), from one registry.

    from fer_tune.models import create_model
    model = create_model("mini_resnet", num_classes=7, in_chans=1, dropout=0.3)
"""

from fer_tune.models.registry import (create_model, describe_models, list_models, model_arguments, model_info,
                                      register_model)
from fer_tune.models import cnn  # noqa: F401  (registers the built-ins)

__all__ = ["create_model", "describe_models", "list_models", "model_arguments", "model_info", "register_model"]
