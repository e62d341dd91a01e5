"""Data-parallel rounding: real two-process runs on CPU with gloo, each in its own subprocess.

Several process groups in one pytest process would collide on ports, so every multi-process
case runs ``tests/ddp_case.py`` (Lightning) or ``tests/ddp_plain.py`` (plain torch.distributed)
with a timeout: a hang fails the test instead of blocking the suite.

Tolerance (what these tests hold the 2-rank run to against one process on the same global
calibration data and seed): identical integer weights, and held-out MSEs equal to 1e-6
relative, for both loss forms. The ranks differ from one process only in float summation
order (gradient of a minibatch split in two, moments summed per rank); see ``distributed.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
TIMEOUT = 150


def run_case(script: str, tmp_path: Path, **opts) -> subprocess.CompletedProcess:
    out = tmp_path / "out"
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR", "LOCAL_RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen(
        [sys.executable, str(HERE / script), json.dumps({"out": str(out), **opts})],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # one process group: a timeout kills the relaunched ranks too
    )
    try:
        output, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{script} {opts} hung for {TIMEOUT} s (a rank waited forever?):\n{output[-4000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, output, "")


def load(out: Path, rank: int) -> dict:
    return torch.load(out / f"rank{rank}.pt", weights_only=False)


def logged(out: Path, rank: int) -> list[dict]:
    path = out / f"log{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ------------------------------------------------------------------------------ Lightning


@pytest.fixture(scope="module")
def ddp_fit(tmp_path_factory):
    """``Trainer(devices=2, strategy="ddp").fit`` with rounding at fit end, from a shuffling loader."""
    tmp = tmp_path_factory.mktemp("ddp_fit")
    proc = run_case("ddp_case.py", tmp, devices=2, strategy="ddp", iterations=60)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return tmp / "out"


def test_ddp_ranks_hold_identical_integer_weights(ddp_fit):
    r0, r1 = load(ddp_fit, 0), load(ddp_fit, 1)
    assert set(r0["result"]["layers"]) == {"net.0", "net.2", "net.5"}
    for name, layer in r0["result"]["layers"].items():
        other = r1["result"]["layers"][name]
        assert torch.equal(layer["integer_weight"], other["integer_weight"]), name
        assert layer["adaround_mse"] == other["adaround_mse"], name  # reduced across ranks
        assert layer["num_samples"] + layer["eval_samples"] == 160  # the global set, not a shard
        weight = r0["weights"][f"{name}.weight"]
        grid = (layer["integer_weight"].float() - layer["zero_point"]) * layer["scale"]
        assert torch.equal(weight, grid), f"{name} is not on its grid"
    for key, value in r0["weights"].items():
        assert torch.equal(value, r1["weights"][key]), key


def test_ddp_logs_from_rank_zero_only_with_reduced_values(ddp_fit):
    rank0 = [row for row in logged(ddp_fit, 0) if any(k.startswith("adaround/") for k in row)]
    rank1 = [row for row in logged(ddp_fit, 1) if any(k.startswith("adaround/") for k in row)]
    assert rank0 and not rank1, "AdaRound metrics must be logged by rank 0 only"
    csvs = list(ddp_fit.rglob("metrics.csv"))
    assert len(csvs) == 1
    assert "adaround/net.2/recon_loss" in csvs[0].read_text()
    result = load(ddp_fit, 0)["result"]["layers"]
    other = load(ddp_fit, 1)["result"]["layers"]
    for name, layer in result.items():
        mse = [row[f"adaround/{name}/adaround_mse"] for row in rank0 if f"adaround/{name}/adaround_mse" in row]
        assert mse == [pytest.approx(layer["adaround_mse"], rel=1e-6)]
        recon = [row[f"adaround/{name}/recon_loss"] for row in rank0 if f"adaround/{name}/recon_loss" in row]
        # the logged loss is the global one: the same history every rank keeps in its result
        assert recon == pytest.approx([h[1] for h in layer["history"]], rel=1e-6)
        assert layer["history"] == other[name]["history"]


@pytest.mark.parametrize("mode", ["layer", "block_with_checkpoint"])
def test_two_ranks_match_one_process(tmp_path, mode):
    """Same global calibration data (batches of 40: one is cut between the ranks) and seed; in block
    mode with a checkpoint_dir, which rank 0 writes and a second run restores on every rank."""
    opts = dict(run_on="validate", explicit_data=True, iterations=150, loss_form="minibatch")
    if mode != "layer":
        opts.update(block=True)
    single = run_case("ddp_case.py", tmp_path / "one", devices=1, **opts)
    assert single.returncode == 0, single.stdout[-4000:]
    if mode != "layer":
        opts.update(checkpoint_dir=str(tmp_path / "ckpt"))
    double = run_case("ddp_case.py", tmp_path / "two", devices=2, strategy="ddp", **opts)
    assert double.returncode == 0, double.stdout[-4000:]
    one = load(tmp_path / "one" / "out", 0)["result"]["layers"]
    runs = [tmp_path / "two"]
    if mode != "layer":
        manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
        assert [entry["name"] for entry in manifest["layers"]] == list(one)
        again = run_case("ddp_case.py", tmp_path / "again", devices=2, strategy="ddp", **opts)
        assert again.returncode == 0, again.stdout[-4000:]
        runs.append(tmp_path / "again")
    for run in runs:
        for rank in (0, 1):
            two = load(run / "out", rank)["result"]
            assert set(two["layers"]) == set(one)
            if run.name == "again":
                assert two["restored"] == list(one), rank
            for name, layer in one.items():
                assert torch.equal(two["layers"][name]["integer_weight"], layer["integer_weight"]), (rank, name)
                assert two["layers"][name]["loss_form"] == layer["loss_form"]
                for key in ("num_samples", "eval_samples"):
                    assert two["layers"][name][key] == layer[key], (rank, name, key)
                for key in ("nearest_mse", "adaround_mse"):
                    assert two["layers"][name][key] == pytest.approx(layer[key], rel=1e-6), (rank, name, key)
    if mode != "layer":
        assert {layer["loss_form"] for layer in one.values()} == {"block", "minibatch"}


def test_a_rank_whose_forward_fails_stops_every_rank(tmp_path):
    proc = run_case("ddp_case.py", tmp_path, devices=2, strategy="ddp_spawn", raise_on_rank1=True)
    out = tmp_path / "out"
    assert proc.returncode != 0
    errors = [(out / f"error{rank}.txt").read_text() for rank in (0, 1)]
    assert errors[0] == errors[1], errors
    assert errors[0].startswith("AdaRoundDistributedError: AdaRound stopped on all 2 ranks")
    assert "rank 1: RuntimeError while capturing layer 'net.2': simulated failure in rank 1's forward" in errors[0]
    assert not (out / "rank0.pt").exists() and not (out / "rank1.pt").exists()


# ------------------------------------------------------------------------------ plain torch.distributed


def test_plain_torch_distributed_cases(tmp_path):
    """Scenarios run one after another in one process group (an error leaves it usable)."""
    proc = run_case("ddp_plain.py", tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:]
    report = [json.loads((tmp_path / "out" / f"plain{rank}.json").read_text()) for rank in (0, 1)]
    assert report[0] == report[1]  # every rank raised the same errors and found the same rounding
    errors = report[0]["errors"]
    assert "the calibration data has 1 sample(s) for 2 ranks" in errors["one_sample"]
    assert "AdaRoundConfig) differ across ranks" in errors["different_seed"]
    assert "rank 1: ValueError while capturing layer '0'" in errors["nan_on_rank1"]
    assert "NaN or Inf" in errors["nan_on_rank1"]
    assert "the calibration data read on each rank differs" in errors["different_data"]
    assert "rank 1: non-finite reconstruction loss or gradient at step 0 of layer '0'" in errors["huge_on_rank1"]
    # Moments form, from per-rank batches and from a CalibrationShard with a cut batch.
    for case in ("own_batches", "shard_moments", "shard_moments_synced"):
        same = report[0][case]
        assert same["layers"] and same["forms"] and set(same["forms"]) == {"moments"}, (case, same)
        assert same["integer_weights_equal"] and same["counts_equal"], (case, same)
        assert same["mse_rel_diff"] < 1e-6, (case, same)
    # Moments form: a fixed handful of collectives per layer (status, the one moments sum,
    # errors, the checksum), none per step: 30 and 90 iterations make the same number.
    collectives = report[0]["collectives"]
    assert collectives["per_run"]["30"] == collectives["per_run"]["90"], collectives
    assert collectives["per_run"]["30"] <= 8 * collectives["layers"], collectives
    # Bias correction: the per-channel means are summed over ranks; a rank failing there stops both.
    corrected = report[0]["bias_correction"]
    assert corrected["integer_weights_equal"] and corrected["bias_rel_diff"] < 1e-5, corrected
    assert corrected["restored"], corrected
    assert corrected["auto_integer_weights_equal"] and corrected["auto_bias_diff"] < 1e-6, corrected
    assert corrected["auto_kept"] == corrected["auto_kept_single"], corrected
    assert all(k.startswith(("corrected on", "left alone")) for k in corrected["auto_kept"]), corrected
    assert "rank 1: RuntimeError while correcting the bias of layer '0': no output error" in (
        errors["bias_correction_on_rank1"])


# ------------------------------------------------------------------------------ no processes


def test_shard_calibration_splits_contiguously_and_cuts_batches():
    from lightning_adaround.distributed import shard_calibration

    x = torch.arange(10.0).reshape(10, 1)
    batches = [(x[:4], x[:4].long()), (x[4:8], x[4:8].long()), (x[8:], x[8:].long())]
    shards = [shard_calibration(batches, r, 3) for r in range(3)]
    got = [torch.cat([b[0] for b in s.batches]).flatten().tolist() for s in shards]
    assert got == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]  # 10 = 4 + 3 + 3, in order
    assert shards[2].pieces == [(1, 3, 1), (2, 0, 2)]  # sample 7 is cut out of the second batch
    assert shards[2].batches[0][1].tolist() == [[7]]  # every per-sample tensor is cut alike
    assert all(s.global_sizes == [4, 4, 2] and s.fingerprint == shards[0].fingerprint for s in shards)
    dicts = shard_calibration([{"x": x, "name": "all"}], 1, 2)
    assert dicts.batches[0]["x"].flatten().tolist() == [5, 6, 7, 8, 9] and dicts.batches[0]["name"] == "all"
    assert shard_calibration([x[:1]], 1, 2).batches == []  # 1 sample, 2 ranks: the run then fails clearly


def test_fingerprint_sees_order_and_is_sharded_loader():
    from torch.utils.data import DataLoader, TensorDataset
    from torch.utils.data.distributed import DistributedSampler

    from lightning_adaround.distributed import is_sharded_loader, shard_calibration

    x = torch.randn(8, 3)
    assert shard_calibration([x], 0, 2).fingerprint != shard_calibration([x.flip(0)], 0, 2).fingerprint
    data = TensorDataset(x)
    assert not is_sharded_loader(DataLoader(data, batch_size=2, shuffle=True))
    assert is_sharded_loader(DataLoader(data, batch_size=2, sampler=DistributedSampler(data, num_replicas=2, rank=0)))


def test_distributed_adaround_needs_a_process_group():
    from torch import nn

    from lightning_adaround.distributed import distributed_adaround

    with pytest.raises(RuntimeError, match="process group"):
        distributed_adaround(nn.Linear(2, 2), [torch.randn(4, 2)])


def test_two_ranks_match_one_process_in_every_mode(tmp_path):
    """Block reconstruction (with the Fisher loss), a disk cache in bfloat16, sequences of other
    lengths per rank, and a resumed run after a fault on one rank: the same integer weights as one
    process on all of the data."""
    proc = run_case("ddp_parity.py", tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:]
    report = [json.loads((tmp_path / "out" / f"parity{rank}.json").read_text()) for rank in (0, 1)]
    assert report[0] == report[1]
    found = report[0]
    for case in ("block_resnet", "block_encoder_fisher", "disk_cache_bfloat16", "lengths_per_rank", "resumed", "learned_scale"):
        same = found[case]
        assert same["layers"] and same["integer_weights_equal"] and same["counts_equal"], (case, same)
        assert same["mse_rel_diff"] < 1e-5, (case, same)
    assert found["learned_scale"]["learned"] and found["learned_scale"]["scale_rel_diff"] < 1e-5, found["learned_scale"]
    assert found["block_resnet"]["forms"].count("block") >= 4  # the stem layer is a unit of one
    assert "rank 1: RuntimeError while " in found["fault"] and "simulated fault at 3.body.3" in found["fault"]
    assert found["restored"] == ["0", "3.body.0"], found["restored"]
