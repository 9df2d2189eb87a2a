"""qlinear.evaluate: argument checks (the MiniLM runs are in test_models and test_cli)."""

import pytest

from qlinear.errors import InvalidInputError, InvalidParamsError
from qlinear.evaluate import evaluate_model


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
