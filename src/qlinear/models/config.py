"""BertConfig: the sizes of a BERT encoder, read from Hugging Face's ``config.json``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import FormatError

__all__ = ["BertConfig"]


@dataclass(frozen=True)
class BertConfig:
    """The sizes of a BERT encoder (the fields of Hugging Face's ``config.json`` it uses)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "config.json") -> BertConfig:
        """Read and validate a ``config.json`` dictionary; raise FormatError naming ``source``
        and the field when a field is missing or has an unsupported value."""
        if not isinstance(d, Mapping):
            raise FormatError(f"{source}: expected a JSON object; got {type(d).__name__}")
        ints = {}
        for field in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
        ):
            v = d.get(field)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise FormatError(f"{source}: {field} must be a positive integer; got {v!r}")
            ints[field] = v
        tv = d.get("type_vocab_size", 2)
        if isinstance(tv, bool) or not isinstance(tv, int) or tv <= 0:
            raise FormatError(f"{source}: type_vocab_size must be a positive integer; got {tv!r}")
        eps = d.get("layer_norm_eps", 1e-12)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise FormatError(f"{source}: layer_norm_eps must be a positive number; got {eps!r}")
        act = d.get("hidden_act", "gelu")
        if act != "gelu":
            raise FormatError(
                f"{source}: hidden_act {act!r} is not supported; expected 'gelu' (erf GELU)"
            )
        pos = d.get("position_embedding_type", "absolute")
        if pos != "absolute":
            raise FormatError(
                f"{source}: position_embedding_type {pos!r} is not supported; expected 'absolute'"
            )
        if ints["hidden_size"] % ints["num_attention_heads"]:
            raise FormatError(
                f"{source}: hidden_size {ints['hidden_size']} is not a multiple of "
                f"num_attention_heads {ints['num_attention_heads']}"
            )
        return cls(type_vocab_size=tv, layer_norm_eps=float(eps), **ints)

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """The name and shape of every tensor the encoder needs (Hugging Face names)."""
        h, f = self.hidden_size, self.intermediate_size
        shapes: dict[str, tuple[int, ...]] = {
            "embeddings.word_embeddings.weight": (self.vocab_size, h),
            "embeddings.position_embeddings.weight": (self.max_position_embeddings, h),
            "embeddings.token_type_embeddings.weight": (self.type_vocab_size, h),
            "embeddings.LayerNorm.weight": (h,),
            "embeddings.LayerNorm.bias": (h,),
        }
        io = {
            "attention.self.query": (h, h),
            "attention.self.key": (h, h),
            "attention.self.value": (h, h),
            "attention.output.dense": (h, h),
            "intermediate.dense": (f, h),
            "output.dense": (h, f),
        }
        for i in range(self.num_hidden_layers):
            p = f"encoder.layer.{i}."
            for lin, shape in io.items():
                shapes[f"{p}{lin}.weight"] = shape
                shapes[f"{p}{lin}.bias"] = (shape[0],)
            for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
                shapes[f"{p}{ln}.weight"] = (h,)
                shapes[f"{p}{ln}.bias"] = (h,)
        return shapes
