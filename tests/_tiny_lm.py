"""A tiny random llama-family checkpoint with a small byte-level BPE tokenizer trained on
the calibration corpus (no download), for perplexity / generate / GPTQ tests."""

from __future__ import annotations

from pathlib import Path

from _decoder_models import MOE, SIZES, build

VOCAB = 320


def train_tokenizer(out: Path) -> Path:
    """A byte-level BPE of VOCAB ids trained on the corpus; writes out/tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from qlinear.models.corpus import corpus_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([corpus_text("calib")[:100_000]], trainer)
    tok.save(str(out / "tokenizer.json"))
    return out


def build_tiny(out: Path, model_type: str = "llama", layers: int = 2, **extra) -> Path:
    sizes = {**SIZES, "vocab_size": VOCAB, "num_hidden_layers": layers, "eos_token_id": 0}
    if model_type in ("qwen2_moe", "qwen3_moe", "olmoe", "mixtral"):
        if model_type == "mixtral":
            sizes.update(num_local_experts=4, num_experts_per_tok=2)
        else:
            sizes.update(num_experts=4, **MOE)
        if model_type == "qwen2_moe":
            sizes.update(shared_expert_intermediate_size=48)
    sizes.update(extra)
    build(model_type, sizes, out)
    return train_tokenizer(out)
