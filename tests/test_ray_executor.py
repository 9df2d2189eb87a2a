"""qlinear.distributed.ray_executor on a real local Ray cluster (127.0.0.1, 2 CPUs).

One cluster for the whole module, started by ``ray.init`` in this process (so it is
ours alone and stops with ``ray.shutdown``); a CLI child connects to it by address."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

# Before Ray is imported: keep every Ray address on the loopback interface (Ray's own
# switch; without it Ray replaces 127.0.0.1 by the machine's outward address).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
ray = pytest.importorskip("ray")

import qlinear  # noqa: E402
from qlinear import FormatError, quantize_checkpoint  # noqa: E402
from qlinear.cli import main  # noqa: E402
from qlinear.distributed.ray_executor import RayExecutor  # noqa: E402
from test_distributed import make_checkpoint, tree_bytes  # noqa: E402

SRC_DIR = Path(qlinear.__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cluster():
    """The GCS address of a 2-CPU Ray cluster bound to 127.0.0.1."""
    if ray.is_initialized():
        ray.shutdown()
    ctx = ray.init(
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        yield ctx.address_info["gcs_address"]
    finally:
        ray.shutdown()


def test_cli_ray_address_is_byte_identical_to_serial(cluster, tmp_path, rng):
    assert cluster.startswith("127.0.0.1:")
    src = make_checkpoint(tmp_path / "src", rng)
    flags = ["--bits", "4", "--group-size", "16", "--no-progress"]
    assert main(["quantize", str(src), "-o", str(tmp_path / "serial"), *flags]) == 0
    env = {**os.environ, "PYTHONPATH": str(SRC_DIR), "RAY_ADDRESS": ""}
    cmd = [sys.executable, "-m", "qlinear", "quantize", str(src), "-o", str(tmp_path / "ray")]
    cmd += [*flags, "--ray", cluster, "--report", str(tmp_path / "r.json")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert tree_bytes(tmp_path / "ray") == tree_bytes(tmp_path / "serial")
    report = json.loads((tmp_path / "r.json").read_text())
    quantized = {t["name"] for t in report["tensors"] if t["rel_error"] is not None}
    assert len(quantized) == 9
    assert {t["tensor"] for t in report["tasks"]} == quantized
    nodes = {t["node"] for t in report["tasks"]}
    assert len(nodes) == 1 and len(next(iter(nodes))) > 8  # Ray's node id (hex)
    assert all(t["pid"] != done.returncode and t["pid"] > 0 for t in report["tasks"])


def test_cli_ray_without_address_uses_the_running_cluster(cluster, tmp_path, rng):
    src = make_checkpoint(tmp_path / "src", rng, n_layers=1)
    cfg = ["--method", "mse", "--granularity", "tensor", "--no-progress"]
    assert main(["quantize", str(src), "-o", str(tmp_path / "serial"), *cfg]) == 0
    assert main(["quantize", str(src), "-o", str(tmp_path / "ray"), *cfg, "--ray"]) == 0
    assert ray.is_initialized()  # not ours to stop: the executor found it running
    assert tree_bytes(tmp_path / "ray") == tree_bytes(tmp_path / "serial")


def test_row_block_tasks_are_byte_identical(cluster, tmp_path, rng):
    src = make_checkpoint(tmp_path / "src", rng, n_layers=1)
    cfg = {"qtype": "int8", "granularity": "per_channel", "method": "percentile"}
    quantize_checkpoint(src, tmp_path / "serial", cfg, progress=False)
    ex = RayExecutor(task_bytes=8 * 32 * 7)
    rep = quantize_checkpoint(src, tmp_path / "ray", cfg, progress=False, executor=ex)
    assert tree_bytes(tmp_path / "ray") == tree_bytes(tmp_path / "serial")
    gate = [t["rows"] for t in rep.tasks if t["tensor"].endswith("gate_proj.weight")]
    assert sorted(gate) == [[a, min(72, a + 7)] for a in range(0, 72, 7)]


def test_a_killed_worker_is_retried_and_the_output_is_unchanged(cluster, tmp_path, rng):
    src = make_checkpoint(tmp_path / "src", rng)
    cfg = {"qtype": "int8", "granularity": "per_channel"}
    quantize_checkpoint(src, tmp_path / "serial", cfg, progress=False)
    hook = tmp_path / "hook"
    hook.mkdir()
    victim = "model.layers.1.mlp.gate_proj.weight"
    ex = RayExecutor(_stall=(victim, str(hook)))
    import threading

    result: dict = {}

    def run():
        try:
            result["report"] = quantize_checkpoint(
                src, tmp_path / "ray", cfg, progress=False, executor=ex
            )
        except BaseException as exc:  # reported by the assertion below
            result["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    pid_file = hook / "stalled.pid"
    deadline = time.monotonic() + 60
    while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = int(pid_file.read_text())
    assert pid != os.getpid()
    os.kill(pid, signal.SIGKILL)  # the worker process running the victim's first attempt
    t.join(timeout=90)
    assert not t.is_alive() and "error" not in result, result.get("error")
    assert tree_bytes(tmp_path / "ray") == tree_bytes(tmp_path / "serial")
    victim_tasks = [r for r in result["report"].tasks if r["tensor"] == victim]
    assert len(victim_tasks) == 1 and victim_tasks[0]["pid"] != pid  # the retry's worker
    assert [p.name for p in tmp_path.iterdir() if "parts" in p.name] == []


def test_an_input_error_in_a_task_is_raised_as_itself(cluster, tmp_path, rng):
    import safetensors.numpy as stnp

    src = make_checkpoint(tmp_path / "src", rng, n_layers=1)
    shard = src / "model-00001.safetensors"
    t = stnp.load_file(str(shard))
    t["model.layers.0.mlp.gate_proj.weight"][0, 0] = np.inf
    stnp.save_file(t, str(shard))
    with pytest.raises(FormatError, match="gate_proj"):
        quantize_checkpoint(
            src, tmp_path / "dst", {"qtype": "int8"}, progress=False, executor=RayExecutor()
        )
    assert not (tmp_path / "dst" / "model-00001.safetensors").exists()


@pytest.mark.parametrize(("model_type", "n_linears"), [("llama", 14), ("mixtral", 32)])
def test_cli_ray_gptq_matches_the_serial_perplexity(cluster, tmp_path, model_type, n_linears):
    pytest.importorskip("tokenizers")
    from _tiny_lm import build_tiny
    from qlinear.models import load_causal_lm
    from qlinear.models.perplexity import text_perplexity

    src = build_tiny(tmp_path / "tiny", model_type)
    flags = ["--gptq", "--bits", "4", "--group-size", "16", "--no-progress"]
    flags += ["--calib-samples", "8", "--calib-seqlen", "64"]
    assert main(["quantize", str(src), "-o", str(tmp_path / "serial"), *flags]) == 0
    assert main(["quantize", str(src), "-o", str(tmp_path / "ray"), *flags, "--ray"]) == 0
    ppl = {
        d: text_perplexity(load_causal_lm(tmp_path / d), ctx=64, max_tokens=1024).perplexity
        for d in ("tiny", "serial", "ray")
    }
    assert abs(ppl["ray"] / ppl["serial"] - 1) < 0.005, ppl
    assert ppl["serial"] != ppl["tiny"]  # GPTQ changed the model: the comparison means something
    q = qlinear.load(tmp_path / "ray")
    assert sum(isinstance(v, qlinear.QuantizedLinear) for v in q.values()) == n_linears


def test_a_killed_gptq_worker_is_replaced_and_the_output_is_unchanged(cluster, tmp_path):
    """SIGKILL of a worker actor (it holds hidden states) after layer 0: a new actor
    replays layer 0 and layer 1 runs again; the files equal those of an undisturbed run."""
    pytest.importorskip("tokenizers")
    from _tiny_lm import build_tiny
    from qlinear.models.gptq_checkpoint import GPTQOptions, gptq_quantize_checkpoint

    src = build_tiny(tmp_path / "tiny", "llama", layers=3)
    cfg = {"qtype": "int4", "granularity": "per_group", "group_size": 16}
    opts = GPTQOptions(samples=8, seqlen=64)

    def run(dst: str, on_layer=None):
        ex = RayExecutor(gptq_workers=2)
        rep = gptq_quantize_checkpoint(
            src, tmp_path / dst, cfg, options=opts, progress=False, executor=ex, on_layer=on_layer
        )
        return ex, rep

    run("calm")
    killed: list[int] = []
    ex_box: list[RayExecutor] = []

    def kill_after_layer_0(i: int, seconds: float) -> None:
        if i == 0:
            pids = sorted({r["pid"] for r in ex_box[0].records() if r["task"] == "propagate 0"})
            assert len(pids) == 2 and os.getpid() not in pids
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    ex = RayExecutor(gptq_workers=2)
    ex_box.append(ex)
    rep = gptq_quantize_checkpoint(
        src,
        tmp_path / "killed",
        cfg,
        options=opts,
        progress=False,
        executor=ex,
        on_layer=kill_after_layer_0,
    )
    assert killed
    assert tree_bytes(tmp_path / "killed") == tree_bytes(tmp_path / "calm")
    recovered = [t for t in rep.tasks if t["task"].startswith("recover worker")]
    assert len(recovered) == 1 and recovered[0]["pid"] not in killed
    assert len([t for t in rep.tasks if t["task"] == "propagate 1"]) == 2  # layer 1 once, in full
    assert json.loads(rep.to_json())["tasks"]


def test_a_quantized_linear_travels_through_ray(cluster, rng):
    """Made in one worker, used in another and in the driver: pickled by name (cloudpickle
    copied a classmethod by value before, with a private token that no longer matched)."""
    w = rng.standard_normal((6, 40))
    x = rng.standard_normal((3, 40))

    @ray.remote
    def make(w):
        return qlinear.QuantizedLinear.from_fp(w, qlinear.calibrate_linear(w, "int4"))

    @ray.remote
    def use(q, x):
        return q(x)

    ref = make.remote(w)
    here = qlinear.QuantizedLinear.from_fp(w, qlinear.calibrate_linear(w, "int4"))
    np.testing.assert_array_equal(ray.get(ref).qweight, here.qweight)
    np.testing.assert_array_equal(ray.get(use.remote(ref, x)), here(x))
