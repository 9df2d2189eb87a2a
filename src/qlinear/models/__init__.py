"""NumPy model runners used by ``qlinear eval`` and the accuracy benchmarks.

Encoders: ``load_minilm()`` gives all-MiniLM-L6-v2 as a :class:`BertModel`;
``model.encode(texts)`` returns its unit-norm float32 sentence embeddings,
``model.with_linears({...})`` swaps linear layers (for example for ``QuantizedLinear``),
and ``encode(..., capture={})`` records every linear layer's input activations.
``sentences("calib" | "heldout" | "all")`` are the English sentences shipped with qlinear.

Decoders: ``load_causal_lm(dir)`` gives a llama-family LLM (llama, mistral, qwen2, qwen3,
mixtral, qwen2_moe, qwen3_moe, olmoe) as a :class:`CausalLM`: ``model(ids)`` returns
float32 logits, ``model.forward(ids, cache=model.new_cache())`` decodes incrementally.
See docs/models.md.
"""

from .bert import BertModel
from .causal_lm import CausalLM
from .config import BertConfig
from .decoder_config import SUPPORTED_MODEL_TYPES, DecoderConfig, RopeConfig
from .decoder_layer import DecoderLayer
from .decoder_loading import load_causal_lm, read_config
from .kv_cache import KVCache
from .loading import DEFAULT_MODEL_PACKAGE, default_model_dir, load_bert, load_minilm
from .ops import FloatLinear, LinearLike, gelu
from .sentences import sentences
from .tokenizer import Tokenizer

__all__ = [
    "DEFAULT_MODEL_PACKAGE",
    "SUPPORTED_MODEL_TYPES",
    "BertConfig",
    "BertModel",
    "CausalLM",
    "DecoderConfig",
    "DecoderLayer",
    "FloatLinear",
    "KVCache",
    "LinearLike",
    "RopeConfig",
    "Tokenizer",
    "default_model_dir",
    "gelu",
    "load_bert",
    "load_causal_lm",
    "load_minilm",
    "read_config",
    "sentences",
]
