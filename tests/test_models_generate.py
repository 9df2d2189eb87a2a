"""qlinear.models.generate and ``qlinear generate``: sampling properties on synthetic
logits, greedy decoding against transformers on SmolLM2, streaming text."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from qlinear.cli import main
from qlinear.errors import InvalidInputError, InvalidParamsError
from qlinear.models.generate import (
    SamplingOptions,
    StreamDecoder,
    generate_tokens,
    sample_next,
    sampling_distribution,
)

PROMPT = "The quick brown fox jumps over the lazy dog. In Python, a dictionary"


def test_greedy_is_argmax_with_ties_to_the_lowest_id():
    lg = np.array([0.0, 2.0, 2.0, -1.0])
    assert sample_next(lg, SamplingOptions()) == 1


def test_top_k_1_is_greedy(rng):
    for _ in range(20):
        lg = rng.standard_normal(50)
        opts = SamplingOptions(temperature=1.3, top_k=1)
        assert sample_next(lg, opts, np.random.default_rng(3)) == int(np.argmax(lg))


def test_top_k_keeps_the_k_most_likely_and_renormalises(rng):
    lg = rng.standard_normal(40)
    p = sampling_distribution(lg, SamplingOptions(temperature=0.7, top_k=5))
    top5 = set(np.argsort(-lg)[:5])
    assert set(np.flatnonzero(p)) == top5
    assert p.sum() == pytest.approx(1.0, abs=1e-12)
    full = np.exp(lg / 0.7 - np.max(lg / 0.7))
    full /= full.sum()
    idx = sorted(top5)
    assert np.allclose(p[idx], full[idx] / full[idx].sum(), rtol=1e-12)


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = np.array([0.05, 0.5, 0.2, 0.15, 0.1])
    lg = np.log(probs)
    p = sampling_distribution(lg, SamplingOptions(temperature=1.0, top_p=0.8))
    assert set(np.flatnonzero(p)) == {1, 2, 3}  # 0.5 + 0.2 < 0.8 <= 0.5 + 0.2 + 0.15
    assert np.allclose(p[[1, 2, 3]], probs[[1, 2, 3]] / 0.85)
    p_tiny = sampling_distribution(lg, SamplingOptions(temperature=1.0, top_p=0.01))
    assert np.flatnonzero(p_tiny).tolist() == [1]  # always at least the most likely


def test_sampling_follows_the_distribution_and_is_seeded(rng):
    lg = np.log(np.array([0.6, 0.3, 0.1]))
    opts = SamplingOptions(temperature=1.0)
    g = np.random.default_rng(0)
    draws = np.array([sample_next(lg, opts, g) for _ in range(4000)])
    freq = np.bincount(draws, minlength=3) / draws.size
    assert np.allclose(freq, [0.6, 0.3, 0.1], atol=0.03)
    a = [sample_next(lg, opts, np.random.default_rng(5)) for _ in range(5)]
    b = [sample_next(lg, opts, np.random.default_rng(5)) for _ in range(5)]
    assert a == b


def test_bad_options_and_logits():
    for kw in ({"temperature": -1}, {"top_k": 0}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(InvalidParamsError):
            SamplingOptions(**kw)
    with pytest.raises(InvalidInputError, match="NaN"):
        sample_next(np.array([0.0, np.nan]), SamplingOptions())
    with pytest.raises(InvalidParamsError, match="rng"):
        sample_next(np.zeros(3), SamplingOptions(temperature=1.0))


class _ByteTok:
    """Token i is byte i: a multi-byte character spans several tokens."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def test_stream_decoder_never_splits_a_character():
    text = "añ€😀b"
    dec = StreamDecoder(_ByteTok())
    pieces = [dec.push(b) for b in text.encode("utf-8")]
    pieces.append(dec.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from qlinear.models import load_causal_lm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return load_causal_lm(smollm2_dir), ref


def test_greedy_generation_equals_transformers_on_smollm2(smollm2):
    import torch

    model, ref = smollm2
    ids = model.tokenizer.encode(PROMPT)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = ref.generate(
            torch.tensor([ids]),
            max_new_tokens=12,
            do_sample=False,
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        )[0, len(ids) :].tolist()
    got = list(generate_tokens(model, ids, max_new_tokens=12))
    assert got == want
    top1 = SamplingOptions(temperature=0.8, top_k=1)
    assert list(generate_tokens(model, ids, max_new_tokens=12, options=top1, seed=1)) == want


def test_cli_generate_streams_and_reports(smollm2_dir, smollm2, capsys):
    model, _ = smollm2
    ids = model.tokenizer.encode(PROMPT)
    want = model.tokenizer.decode(list(generate_tokens(model, ids, max_new_tokens=8)))
    assert main(["generate", str(smollm2_dir), PROMPT, "-n", "8"]) == 0
    out = capsys.readouterr()
    assert out.out == want + "\n"
    assert "tokens/s" in out.err
    assert main(["generate", str(smollm2_dir), PROMPT, "-n", "8", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["text"] == want and r["prompt_tokens"] == len(ids) and r["generated_tokens"] == 8
    assert r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0
    argv = ["generate", str(smollm2_dir), PROMPT, "-n", "6", "--temperature", "1", "--json"]
    runs = []
    for _ in range(2):
        assert main([*argv, "--seed", "11", "--top-p", "0.9"]) == 0
        runs.append(json.loads(capsys.readouterr().out)["text"])
    assert runs[0] == runs[1]


def test_cli_generate_with_int8_activations(tmp_path, capsys):
    """``qlinear generate --activations int8`` decodes greedily what the int8-activation
    model's own greedy loop gives."""
    pytest.importorskip("tokenizers")
    pytest.importorskip("transformers")
    from _tiny_lm import build_tiny
    from qlinear.models import load_causal_lm

    src, q = build_tiny(tmp_path / "tiny"), tmp_path / "w8"
    assert main(["quantize", str(src), "-o", str(q), "--bits", "8", "--no-progress"]) == 0
    capsys.readouterr()
    model = load_causal_lm(q, activations="int8")
    ids = model.tokenizer.encode("def f(x): return")
    want = model.tokenizer.decode(list(generate_tokens(model, ids, max_new_tokens=6)))
    argv = ["generate", str(q), "def f(x): return", "-n", "6", "--json", "--activations", "int8"]
    assert main(argv) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["text"] == want and r["generated_tokens"] == 6
