"""Wall time of the rounding itself: one process vs two gloo ranks, same total work.

A small CNN (3 conv + 1 linear), 512 calibration samples, 2,000 iterations per layer,
batch 32 (one process) = 2 x 16 rows per step on average (two ranks). Times are taken
inside the call (process start, imports and the process-group set-up excluded), after a
warm-up run in each process. Usage: ``python benchmarks/ddp_timing.py [minibatch|moments]``.
"""

from __future__ import annotations

import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lightning_adaround import AdaRoundConfig, adaround
from lightning_adaround.distributed import distributed_adaround, shard_calibration

FORM = sys.argv[1] if len(sys.argv) > 1 else "minibatch"
ITERATIONS = int(os.environ.get("ITERATIONS", 2000))
WIDTH = int(os.environ.get("WIDTH", 16))  # channels of the first conv (then 2x, 2x)
SIZE = int(os.environ.get("SIZE", 32))  # input height = width


def make():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, WIDTH, 3, padding=1), nn.ReLU(), nn.Conv2d(WIDTH, 2 * WIDTH, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(2 * WIDTH, 2 * WIDTH, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(2 * WIDTH, 10),
    )
    x = torch.randn(512, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    return net, [x[i:i + 64] for i in range(0, 512, 64)]


def config(iterations: int) -> AdaRoundConfig:
    return AdaRoundConfig(iterations=iterations, batch_size=32, loss_form=FORM)


def worker(rank: int, world: int, port: int, queue) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    net, batches = make()
    distributed_adaround(net, shard_calibration(batches, rank, world), config(20))  # warm-up
    net, batches = make()
    dist.barrier()
    start = time.perf_counter()
    result = distributed_adaround(net, shard_calibration(batches, rank, world), config(ITERATIONS))
    seconds = time.perf_counter() - start
    if rank == 0:
        queue.put((seconds, {n: r.integer_weight.numpy() for n, r in result.layers.items()},
                   {n: r.adaround_mse for n, r in result.layers.items()}))
    dist.barrier()
    dist.destroy_process_group()


def single(threads: int):
    torch.set_num_threads(threads)
    net, batches = make()
    adaround(net, batches, config(20))  # warm-up
    net, batches = make()
    start = time.perf_counter()
    result = adaround(net, batches, config(ITERATIONS))
    return (time.perf_counter() - start, {n: r.integer_weight for n, r in result.layers.items()},
            {n: r.adaround_mse for n, r in result.layers.items()})


if __name__ == "__main__":
    print(f"form={FORM}, iterations/layer={ITERATIONS}, width={WIDTH}, size={SIZE}, load before: {os.getloadavg()}")
    one, ints, mses = single(1)
    print(f"1 process, 1 thread : {one:.1f} s")
    two_threads, _, _ = single(2)
    print(f"1 process, 2 threads: {two_threads:.1f} s")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(worker, args=(2, port, queue), nprocs=2, start_method="spawn")
    ddp, ddp_ints, ddp_mses = queue.get()
    ddp_ints = {n: torch.from_numpy(v) for n, v in ddp_ints.items()}
    print(f"2 ranks x 1 thread  : {ddp:.1f} s  (speed-up: {one / ddp:.2f}x vs 1 thread, "
          f"{two_threads / ddp:.2f}x vs 2 threads)")
    agree = sum(int((ddp_ints[n] == ints[n]).sum()) for n in ints) / sum(ints[n].numel() for n in ints)
    worst = max(abs(ddp_mses[n] / mses[n] - 1) for n in mses)
    print(f"integer weights equal to 1 process: {agree:.4%}; largest relative held-out MSE difference: {worst:.2e}")
    print(f"load average after: {os.getloadavg()}")
