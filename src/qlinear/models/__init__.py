"""NumPy model runners used by ``qlinear eval`` and the accuracy benchmarks.

``load_minilm()`` gives all-MiniLM-L6-v2 as a :class:`BertModel`; ``model.encode(texts)``
returns its unit-norm float32 sentence embeddings, ``model.with_linears({...})`` swaps
linear layers (for example for ``QuantizedLinear``), and ``encode(..., capture={})``
records every linear layer's input activations (for GPTQ calibration and per-layer error).
``sentences("calib" | "heldout" | "all")`` are the English sentences shipped with qlinear.
"""

from .bert import BertModel
from .config import BertConfig
from .loading import DEFAULT_MODEL_PACKAGE, default_model_dir, load_bert, load_minilm
from .ops import FloatLinear, LinearLike, gelu
from .sentences import sentences

__all__ = [
    "DEFAULT_MODEL_PACKAGE",
    "BertConfig",
    "BertModel",
    "FloatLinear",
    "LinearLike",
    "default_model_dir",
    "gelu",
    "load_bert",
    "load_minilm",
    "sentences",
]
