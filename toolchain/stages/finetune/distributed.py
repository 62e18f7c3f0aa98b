"""`toolchain finetune --launcher deepspeed --nproc N --zero 2|3`: the same fine-tune in N ranks under DeepSpeed.

launch() hands the ranks to torch's own elastic launcher (`python -m torch.distributed.run`), which starts N copies
of toolchain/stages/finetune/worker.py on this node with the torch.distributed environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT). Each runs the same fine-tune, which asks this module for its rank, wraps the model in
a DeepSpeed engine and saves through it. On a CPU host the ranks use DeepSpeed's CPU accelerator with the gloo
backend; on a CUDA host, NCCL and one GPU per rank. The ZeRO configs live in recipes/deepspeed/; the batch sizes,
learning rate and clipping come from the recipe.

One node: a standalone rendezvous (the launcher's own TCP store binds a free port itself: no port race). Several
nodes: the same command on every node with --nnodes, --node-rank and --rdzv-endpoint HOST:PORT of node 0 (torch's
c10d rendezvous); rank 0, on node 0, writes the output. A rank that fails ends the job (no restarts): the launcher
stops the others, and the error names the failed rank with the tail of its log.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

from toolchain.config.catalog import RECIPES_DIR
from toolchain.config.schema import Launch
from toolchain.runtime.errors import ToolchainError

WORKER_ENV = "TOOLCHAIN_DS_WORKER"
WORKER = "toolchain.stages.finetune.worker"
LOG_TAIL = 20  # lines of a failed rank's log in the error


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


def launcher_args(nproc: int, nnodes: int = 1, node_rank: int = 0, rdzv_endpoint: Optional[str] = None,
                  log_dir: Optional[Path] = None) -> list[str]:
    """The torch.distributed.run command line for `nproc` ranks per node on `nnodes` nodes."""
    args = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--max-restarts=0"]
    if nnodes == 1:
        args.append("--standalone")
    else:
        if not rdzv_endpoint:
            raise ToolchainError(f"--nnodes {nnodes}: give --rdzv-endpoint HOST:PORT (node 0's address, the same on "
                                 "every node)")
        args += [f"--nnodes={nnodes}", f"--node-rank={node_rank}", "--rdzv-backend=c10d",
                 f"--rdzv-endpoint={rdzv_endpoint}", "--rdzv-id=toolchain-finetune"]
    if log_dir is not None:  # every rank's stdout and stderr to a file, and still to this console
        args += [f"--log-dir={log_dir}", "--redirects=3", "--tee=3"]
    return args


def launch(src, rec, rec_file: Path, out: Path, *, evaluate: bool, launch: Launch) -> dict:
    """Run the fine-tune in launch.nproc DeepSpeed ranks on each of launch.nnodes nodes; returns rank 0's metrics
    (on node 0). The ranks get the resolved model and recipe as JSON: they train exactly what the caller holds."""
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise ToolchainError("--launcher deepspeed needs DeepSpeed: pip install -e '.[deepspeed]' (or make setup)") from None
    if launch.nproc < 1:
        raise ToolchainError(f"--nproc {launch.nproc}: give at least 1 rank")
    zero_config(launch.zero)  # fail fast, before any rank starts: an unknown stage, a batch that does not split
    from toolchain.stages.finetune.batching import micro_batches

    spec = rec.train
    micro_batches(list(range(spec.batch_size)), 0, launch.nproc * launch.nnodes, spec.grad_accum)
    threads = max(1, (os.cpu_count() or 1) // launch.nproc)
    env = {**os.environ, WORKER_ENV: "1", "OMP_NUM_THREADS": str(threads)}
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="toolchain-ranks-") as work:
        args_file = Path(work) / "args.json"
        args_file.write_text(json.dumps({
            "card": src.card.model_dump(), "path": str(src.path), "trust_remote_code": src.trust_remote_code,
            "recipe": rec.model_dump(), "recipe_file": str(Path(rec_file).resolve()), "out": str(out),
            "evaluate": evaluate, "launch": launch.model_dump()}))
        cmd = launcher_args(launch.nproc, launch.nnodes, launch.node_rank, launch.rdzv_endpoint, Path(work) / "logs")
        code, launcher_tail = _run_teed([*cmd, "-m", WORKER, str(args_file)], env)
        if code:
            raise ToolchainError(f"DeepSpeed ranks failed (launcher exit {code}); nothing written to {out}."
                                 + failed_rank_logs(Path(work) / "logs")
                                 + f"\n--- torch.distributed.run (last lines) ---\n{launcher_tail}")
    if launch.node_rank != 0:
        return {}
    return json.loads((out / "metrics.json").read_text())


def _run_teed(cmd: list[str], env: dict, keep: int = 4096) -> tuple[int, str]:
    """Run the launcher with its stderr passed through to ours as it comes (progress bars included), keeping the last
    `keep` bytes: its failure summary names the rank that failed and how (exit code or signal)."""
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
    tail = b""
    while chunk := os.read(proc.stderr.fileno(), 65536):
        sys.stderr.buffer.write(chunk)
        sys.stderr.flush()
        tail = (tail + chunk)[-keep:]
    code = proc.wait()
    lines = [x for x in tail.decode(errors="replace").replace("\r", "\n").splitlines() if x.strip()]
    return code, "\n".join(lines[-12:])


def failed_rank_logs(log_dir: Path, n: int = LOG_TAIL) -> str:
    """The last lines of every rank's stderr that has any, named by rank: what a user needs to see the cause."""
    parts = []
    for f in sorted(log_dir.glob("**/stderr.log")):
        lines = [x for x in f.read_text(errors="replace").splitlines() if x.strip()]
        if lines:
            parts.append(f"\n--- local rank {f.parent.name} (last {min(n, len(lines))} lines of {f.name}) ---\n"
                         + "\n".join(lines[-n:]))
    return "".join(parts)


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
