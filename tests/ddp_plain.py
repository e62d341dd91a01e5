"""Plain ``torch.distributed`` scenarios for tests/test_ddp.py: two gloo processes, no Lightning.

Usage: ``python ddp_plain.py '<json options>'``; each rank writes ``plain{rank}.json``.
The scenarios run one after another in one process group: an AdaRoundDistributedError is
raised by every rank at the same collective, so the group stays usable.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lightning_adaround import AdaRoundConfig, adaround
from lightning_adaround.distributed import AdaRoundDistributedError, distributed_adaround, shard_calibration


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))


def conv_model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def compare(ddp, single) -> dict:
    """What the 2-rank result shares with the single-process one."""
    names = list(single.layers)
    return {
        "layers": names == list(ddp.layers),
        "forms": [ddp.layers[n].loss_form for n in names],
        "integer_weights_equal": all(
            torch.equal(ddp.layers[n].integer_weight, single.layers[n].integer_weight) for n in names
        ),
        "counts_equal": all(
            getattr(ddp.layers[n], k) == getattr(single.layers[n], k) for n in names for k in ("num_samples", "eval_samples")
        ),
        "mse_rel_diff": max(
            abs(getattr(ddp.layers[n], k) - getattr(single.layers[n], k)) / max(getattr(single.layers[n], k), 1e-30)
            for n in names for k in ("nearest_mse", "adaround_mse")
        ),
    }


def data(seed: int, n: int = 48) -> list[torch.Tensor]:
    x = torch.randn(n, 6, generator=torch.Generator().manual_seed(seed))
    return [x[i:i + 16] for i in range(0, n, 16)]


def expect_error(run) -> str:
    try:
        run()
    except AdaRoundDistributedError as err:
        return str(err)
    return "no error"


def worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    config = AdaRoundConfig(iterations=40, batch_size=16, loss_form="auto")
    errors = {}
    one = data(0)[0][:1]
    errors["one_sample"] = expect_error(
        lambda: distributed_adaround(model(), shard_calibration([one], rank, world), config)
    )
    errors["different_seed"] = expect_error(
        lambda: distributed_adaround(model(), data(rank), AdaRoundConfig(iterations=40, seed=rank))
    )
    poisoned = data(rank)
    if rank == 1:
        poisoned[1][3, 2] = float("nan")
    errors["nan_on_rank1"] = expect_error(lambda: distributed_adaround(model(), poisoned, config))
    errors["different_data"] = expect_error(
        lambda: distributed_adaround(model(), shard_calibration(data(rank), rank, world), config)
    )
    huge = data(rank)
    if rank == 1:
        huge = [b * 1e30 for b in huge]  # finite inputs, but the squared error overflows float32
    errors["huge_on_rank1"] = expect_error(
        lambda: distributed_adaround(model(), huge, AdaRoundConfig(iterations=40, batch_size=16, loss_form="minibatch"))
    )
    report = {"errors": errors}
    report["bias_correction"] = bias_correction(rank, errors)  # before the scenarios that end the run
    # Each rank passes its own batches; the global set is rank 0's batches, then rank 1's.
    report["own_batches"] = compare(
        distributed_adaround(model(), data(10 + rank), config), adaround(model(), data(10) + data(11), config)
    )
    # Every rank reads the same global conv batches and keeps its block (a batch is cut in two).
    conv_config = AdaRoundConfig(iterations=60, batch_size=16, loss_form="moments")
    x = torch.randn(40, 2, 6, 6, generator=torch.Generator().manual_seed(5))
    batches = [x[i:i + 16] for i in range(0, 40, 16)]
    # Moments form: the collectives per run do not grow with the iterations (none per step).
    calls = {"n": 0}
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(*args, **kwargs):
        calls["n"] += 1
        return real_all_reduce(*args, **kwargs)

    dist.all_reduce = counting_all_reduce
    counts = {}
    for iterations in (30, 90):
        calls["n"] = 0
        moments_config = AdaRoundConfig(iterations=iterations, batch_size=16, loss_form="moments")
        result = distributed_adaround(conv_model(), shard_calibration(batches, rank, world), moments_config)
        counts[iterations] = calls["n"]
    dist.all_reduce = real_all_reduce
    report["collectives"] = {"per_run": counts, "layers": len(result.layers)}
    report["shard_moments"] = compare(
        distributed_adaround(conv_model(), shard_calibration(batches, rank, world), conv_config),
        adaround(conv_model(), batches, conv_config),
    )
    report["shard_moments_synced"] = compare(
        distributed_adaround(conv_model(), shard_calibration(batches, rank, world), conv_config, sync_every_step=True),
        adaround(conv_model(), batches, conv_config),
    )
    Path(out, f"plain{rank}.json").write_text(json.dumps(report))
    dist.barrier()  # both ranks done before either tears the group down (gloo aborts otherwise, rarely)
    dist.destroy_process_group()


def bias_correction(rank: int, errors: dict) -> dict:
    """Biases corrected from per-rank batches equal one process's on all of them; a failure restores them."""
    import lightning_adaround.model.bias_correction as correction

    config = AdaRoundConfig(iterations=40, batch_size=16, bias_correction=True)
    ddp_model, single_model = model(), model()
    ddp = distributed_adaround(ddp_model, data(10 + rank), config)
    single = adaround(single_model, data(10) + data(11), config)
    found = {
        "integer_weights_equal": compare(ddp, single)["integer_weights_equal"],
        "bias_rel_diff": max(
            float((ddp_model[i].bias - single_model[i].bias).detach().abs().max()
                  / single.layers[str(i)].bias_shift.abs().max())
            for i in (0, 2)
        ),
    }
    # "auto": held-out samples drawn over all ranks' samples, sums judged after the all-reduce
    auto = AdaRoundConfig(iterations=40, batch_size=16, bias_correction="auto", holdout_fraction=0.25)
    ddp_model, single_model = model(), model()
    ddp = distributed_adaround(ddp_model, data(10 + rank), auto)
    single = adaround(single_model, data(10) + data(11), auto)
    found["auto_integer_weights_equal"] = compare(ddp, single)["integer_weights_equal"]
    found["auto_bias_diff"] = max(float((ddp_model[i].bias - single_model[i].bias).abs().max()) for i in (0, 2))
    found["auto_kept"] = [ddp.layers[n].note.split("bias ")[-1].split(" (")[0] for n in ("0", "2")]
    found["auto_kept_single"] = [single.layers[n].note.split("bias ")[-1].split(" (")[0] for n in ("0", "2")]
    real = correction._output_sums

    def fails(*args):
        raise RuntimeError("no output error on this rank")

    if rank == 1:
        correction._output_sums = fails
    failing = model()
    before = {k: v.clone() for k, v in failing.state_dict().items()}
    errors["bias_correction_on_rank1"] = expect_error(lambda: distributed_adaround(failing, data(rank), config))
    correction._output_sums = real
    found["restored"] = all(torch.equal(v, before[k]) for k, v in failing.state_dict().items())
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    opts = json.loads(sys.argv[1])
    mp.spawn(worker, args=(2, free_port(), opts["out"]), nprocs=2)
