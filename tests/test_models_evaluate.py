"""qlinear.models.evaluate: argument checks (the MiniLM runs are in test_models and test_cli)."""

import pytest

from qlinear.errors import InvalidInputError, InvalidParamsError
from qlinear.models.evaluate import evaluate_model


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"repeats": 0}, InvalidParamsError, "repeats"),  # was AttributeError on None
        ({"repeats": 1.5}, InvalidParamsError, "repeats"),
        ({"sentences": []}, InvalidInputError, "empty"),  # was a NumPy warning/ValueError
        ({"sentences": "one sentence"}, InvalidInputError, "list of strings"),  # per char
        ({"sentences": ["ok", None]}, InvalidInputError, "list of strings"),
    ],
)
def test_bad_arguments_fail_before_any_work(tmp_path, kwargs, error, match):
    # tmp_path holds no model: the arguments are checked before the model is loaded
    with pytest.raises(error, match=match):
        evaluate_model({}, tmp_path, **kwargs)


def test_eval_on_a_decoder_llm_reports_perplexity_sizes_and_speed(tmp_path, capsys):
    import json

    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from _tiny_lm import build_tiny
    from qlinear.cli import main

    src = build_tiny(tmp_path / "llama")
    argv = ["eval", "--model", str(src), "--bits", "4", "--group-size", "32"]
    assert main([*argv, "--eval-tokens", "200", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["tokens"] == 200 - 4  # windows of 64 (the model's context): 64, 64, 64, 8
    assert r["perplexity_float"] > 1 and r["perplexity_quantized"] != r["perplexity_float"]
    assert r["n_layers"] == 15  # 7 per layer + untied lm_head
    assert r["bytes_float"] / r["bytes_quantized"] > 4
    assert r["decode_tokens_per_s_float"] > 0 and r["prefill_tokens_per_s_quantized"] > 0
    assert main([*argv, "--eval-tokens", "100"]) == 0
    out = capsys.readouterr().out
    assert "perplexity: float32" in out and "decode:" in out
