"""`toolchain finetune --launcher deepspeed --nproc N --zero 2|3`: the same fine-tune in N ranks under DeepSpeed.

launch() starts N copies of this module (`python -m toolchain.distributed`) with the torch.distributed
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); each runs finetune.finetune(), which asks this
module for its rank, wraps the model in a DeepSpeed engine and saves through it. On a CPU host the ranks use
DeepSpeed's CPU accelerator with the gloo backend; on a CUDA host, NCCL and one GPU per rank. The ZeRO configs
live in recipes/deepspeed/; the batch sizes, learning rate and clipping come from the recipe.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from .catalog import RECIPES_DIR
from .errors import ToolchainError

WORKER_ENV = "TOOLCHAIN_DS_WORKER"


def in_worker() -> bool:
    return os.environ.get(WORKER_ENV) == "1"


def rank_world() -> tuple[int, int]:
    if not in_worker():
        return 0, 1
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def zero_config(zero: int) -> dict:
    f = RECIPES_DIR / "deepspeed" / f"zero{zero}.json"
    if not f.is_file():
        raise ToolchainError(f"--zero {zero}: no {f}; ZeRO stages with a config here: 2, 3")
    return json.loads(f.read_text())


def launch(nproc: int, zero: int, **kwargs) -> dict:
    """Run finetune() in `nproc` DeepSpeed ranks; returns rank 0's metrics."""
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise ToolchainError("--launcher deepspeed needs DeepSpeed: pip install -e '.[deepspeed]' (or make setup)") from None
    if nproc < 1:
        raise ToolchainError(f"--nproc {nproc}: give at least 1 rank")
    zero_config(zero)  # fail fast, before any rank starts: an unknown stage, a batch that does not split
    from .catalog import load_recipe
    from .finetune import micro_batches

    spec = load_recipe(kwargs["recipe"])[0].train
    micro_batches(list(range(spec.batch_size)), 0, nproc, spec.grad_accum)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cuda = torch.cuda.is_available()
    threads = max(1, (os.cpu_count() or 1) // nproc)
    args = json.dumps({**kwargs, "zero": zero, "out": str(kwargs["out"]),
                       "data": str(kwargs["data"]) if kwargs.get("data") else None})
    procs = []
    for rank in range(nproc):
        env = {**os.environ, WORKER_ENV: "1", "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": str(threads)}
        if not cuda:
            env["DS_ACCELERATOR"] = "cpu"
        procs.append(subprocess.Popen([sys.executable, "-m", "toolchain.distributed", args], env=env))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise ToolchainError(f"DeepSpeed ranks exited with codes {codes}; see the output above. Nothing written to {kwargs['out']}")
    return json.loads((Path(kwargs["out"]) / "metrics.json").read_text())


def wrap(net, spec, zero: int):
    """The DeepSpeed engine for this rank: ZeRO-`zero` config, the recipe's batch split, torch's AdamW."""
    import deepspeed

    world = int(os.environ["WORLD_SIZE"])
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    cfg = zero_config(zero)
    cfg.update({"train_batch_size": spec.batch_size, "gradient_accumulation_steps": spec.grad_accum,
                "train_micro_batch_size_per_gpu": spec.batch_size // (world * spec.grad_accum),
                "gradient_clipping": 1.0, "steps_per_print": 10**9,
                # torch's AdamW: DeepSpeed's own CPU Adam would be JIT-compiled on first use
                "optimizer": {"type": "AdamW", "params": {"lr": spec.lr, "weight_decay": spec.weight_decay, "torch_adam": True}}})
    params = [p for p in net.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=net, model_parameters=params, config=cfg)
    return engine


def backward(engine, loss, world: int, accum: int) -> None:
    """DeepSpeed divides the loss by the accumulation steps and averages gradients over ranks; the loss here is
    already a share of the whole step's token loss, so undo both. step() only steps at the step's last micro-batch."""
    engine.backward(loss * world * accum)
    engine.step()


def all_sum(x: float) -> float:
    import torch.distributed as dist

    t = torch.tensor([float(x)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


def barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def trained_state(engine) -> dict:
    """Every rank calls this: the trained weights, whole (ZeRO-3 partitions gathered), by parameter name."""
    import deepspeed

    named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    ctx = deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None) \
        if engine.zero_optimization_stage() == 3 else contextlib.nullcontext()
    with ctx:
        return {n: p.detach().clone().float() for n, p in named}


def main() -> None:
    from .finetune import finetune

    kwargs = json.loads(sys.argv[1])
    try:
        finetune(launcher="deepspeed", **kwargs)
    except ToolchainError as e:
        print(f"error (rank {os.environ.get('RANK')}): {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
