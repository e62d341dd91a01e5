"""Two gloo processes against one: every capability of a single process, data-parallel.

Usage: ``python ddp_parity.py '<json options>'``; each rank writes ``parity{rank}.json``. Each
scenario rounds the same model on the same global calibration data once with
``distributed_adaround`` (2 ranks, each holding its shard) and once with ``adaround`` (this
process alone, all of the data), and records what the two results share.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import lightning_adaround.engine.unit_loop as engine
from lightning_adaround import AdaRoundConfig, adaround
from lightning_adaround.distributed import AdaRoundDistributedError, distributed_adaround, shard_calibration
from ddp_plain import compare, free_port
from test_chain import Encoder, resnet, token_batches

FAST = dict(iterations=30, batch_size=8)


def images(n: int = 3) -> list[torch.Tensor]:
    return [torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(n)]


def mlp() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))


def sequences(length: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(5, length, 6, generator=g) for _ in range(2)]


def both(rank: int, world: int, make, batches, config, **options) -> dict:
    """The 2-rank rounding of the shards of ``batches`` against one process on all of them."""
    ddp = distributed_adaround(make(), shard_calibration(batches, rank, world), config, **options)
    return compare(ddp, adaround(make(), batches, config, **options))


class _FailOnRank1:
    """Rank 1 raises when it starts building unit ``name``: a fault part way through the run."""

    def __init__(self, rank: int, name: str) -> None:
        self.rank, self.name, self.real = rank, name, engine.build_objective

    def __call__(self, data, unit, *args):
        if self.rank == 1 and unit.name == self.name:
            raise RuntimeError(f"simulated fault at {self.name}")
        return self.real(data, unit, *args)


def worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    report = {}
    # Block reconstruction: residual blocks, batches of 6 cut between the ranks (9 samples each).
    report["block_resnet"] = both(rank, world, resnet, images(), AdaRoundConfig(bits=3, reconstruction="block", **FAST))
    # Transformer blocks with a per-sample mask keyword and the Fisher-weighted loss.
    task_loss = lambda output, batch: output.square().mean()  # noqa: E731
    report["block_encoder_fisher"] = both(
        rank, world, Encoder, token_batches(4),
        AdaRoundConfig(bits=3, reconstruction="block", block_loss="fisher", **FAST), task_loss=task_loss,
        forward_fn=lambda m, b: m(**b),
    )
    # Activations cached on disk in bfloat16.
    report["disk_cache_bfloat16"] = both(
        rank, world, resnet, images(),
        AdaRoundConfig(bits=3, loss_form="minibatch", cache_dtype=torch.bfloat16, device_cache_bytes=0,
                       host_cache_bytes=0, **FAST),
    )
    # Rank 0's sequences have 5 tokens, rank 1's 7: together a Linear stacks rows, as one process does.
    mine = sequences(5 if rank == 0 else 7, seed=rank)
    config = AdaRoundConfig(bits=3, loss_form="minibatch", **FAST)
    report["lengths_per_rank"] = compare(
        distributed_adaround(mlp(), mine, config), adaround(mlp(), sequences(5, 0) + sequences(7, 1), config),
    )
    # Learned scales (minibatch form, rows split): their gradients are averaged with V's, so the
    # ranks learn the same scales as one process.
    config = AdaRoundConfig(bits=3, loss_form="minibatch", learn_scale=True, scale_lr=1e-2, **FAST)
    ddp, single = distributed_adaround(resnet(), shard_calibration(images(), rank, world), config), adaround(resnet(), images(), config)
    same = compare(ddp, single)
    same["scale_rel_diff"] = max(
        float(((ddp.layers[n].scale - single.layers[n].scale).abs() / single.layers[n].scale).max()) for n in single.layers
    )
    same["learned"] = all("learned scale" in r.note for r in single.layers.values())
    report["learned_scale"] = same
    # A fault on rank 1 part way, then a resumed run from the checkpoint rank 0 wrote.
    folder = Path(out) / "checkpoint"
    config = AdaRoundConfig(bits=3, loss_form="minibatch", **FAST)
    shard = shard_calibration(images(), rank, world)
    engine.build_objective = _FailOnRank1(rank, "3.body.3")
    try:
        distributed_adaround(resnet(), shard, config, checkpoint_dir=folder)
        report["fault"] = "no error"
    except AdaRoundDistributedError as err:
        report["fault"] = str(err)
    engine.build_objective = engine.build_objective.real
    resumed = distributed_adaround(resnet(), shard, config, checkpoint_dir=folder)
    report["resumed"] = compare(resumed, adaround(resnet(), images(), config))
    report["restored"] = resumed.restored
    Path(out, f"parity{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    opts = json.loads(sys.argv[1])
    mp.spawn(worker, args=(2, free_port(), opts["out"]), nprocs=2)
