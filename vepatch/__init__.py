"""vepatch: few-shot, guarded, versioned patches for the vision encoder of CLIP-style models."""

import os as _os

# Offline unless asked otherwise: set before huggingface_hub/transformers/datasets are imported.
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    _os.environ.setdefault(_var, "1")
_os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

__version__ = "0.1.0"
