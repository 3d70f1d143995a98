"""Distributed setup: the device, the Accelerator and its DeepSpeed settings, the upstream workarounds
they need (each names the release it was seen in and where upstream), and the multi-node check that
``output.dir`` is one shared directory.

    build_accelerator(cfg)        CUDA device of model.device, Accelerator, DeepSpeed config from the run
                                  config, CPU DeepSpeed rank fix -> (accelerator, workarounds)
    check_shared_output           every node sees every other node's marker in output.dir
    fill_deepspeed_buckets,       just before accelerator.prepare (korcpt.train.engine.build_engine)
    cast_for_deepspeed
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import torch

from korcpt.config import RunConfig
from korcpt.errors import TrainingError
from korcpt.model.load import resolve_dtype
from korcpt.model.lora import unwrap_base
from korcpt.model.zero3 import is_partitioned

NODE_MARKS = ".korcpt-nodes"  # output.dir/.korcpt-nodes/<nonce>/: the shared-directory check's markers
# How long a node looks for the other nodes' markers: network filesystems may show a file created on
# another node a moment later; node-local disks never show it, and the refusal waits this long.
SHARED_WAIT_S = 5.0


def visible_devices_for(device: str, env: dict) -> str | None:
    """The ``CUDA_VISIBLE_DEVICES`` that makes ``model.device: cuda:N`` the one GPU of this process.

    ``N`` counts the GPUs this process can see, as torch numbers them: with ``CUDA_VISIBLE_DEVICES=2,3``
    already set (SLURM does), ``cuda:1`` is physical GPU 3. Returns None for any other device. Under a
    multi-process launcher (accelerate launch, torchrun, srun) each rank's GPU is the launcher's
    choice (``LOCAL_RANK``), so ``cuda:N`` is refused there rather than ignored.
    """
    if not device.startswith("cuda:"):
        return None
    index = int(device.split(":", 1)[1])
    if int(env.get("WORLD_SIZE", "1")) > 1:
        raise TrainingError(f"model.device {device} picks the GPU of a single process, but this is rank "
                            f"{env.get('RANK', '?')} of {env['WORLD_SIZE']}: the launcher assigns each rank its GPU "
                            "(LOCAL_RANK); drop --device, or narrow CUDA_VISIBLE_DEVICES for the whole launch")
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()] or None
    if visible is None:
        return str(index)
    if index >= len(visible):
        raise TrainingError(f"model.device {device}: CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']} "
                            f"shows {len(visible)} GPU(s), numbered from cuda:0")
    return visible[index].strip()


def _select_cuda_device(device: str) -> None:
    visible = visible_devices_for(device, dict(os.environ))
    if visible is not None:
        if torch.cuda.is_initialized() and os.environ.get("CUDA_VISIBLE_DEVICES") != visible:
            raise TrainingError(f"model.device {device}: CUDA is already initialised in this process; "
                                f"set CUDA_VISIBLE_DEVICES={visible} before it starts instead")
        os.environ["CUDA_VISIBLE_DEVICES"] = visible  # read when CUDA initialises: that GPU is then "cuda"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"model.device {device}: no CUDA device is available here")


def build_accelerator(cfg: RunConfig):
    """An Accelerator whose DeepSpeed settings that depend on the run come from the run config, and
    the names of the upstream workarounds it needed (for ``training_info.json``)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    _select_cuda_device(cfg.model.device)
    # Without a GPU, DDP needs cpu=True to use gloo; DeepSpeed must not get it (it would be dropped).
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    kwargs = {"cpu": True} if cfg.model.device == "cpu" or (not torch.cuda.is_available() and not deepspeed) else {}
    if deepspeed:  # DeepSpeed's bf16 mode (bf16 weights, float32 masters in its optimizer) follows model.dtype
        kwargs["mixed_precision"] = deepspeed_precision(cfg)
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.train.grad_accum,
        # the schedule counts optimizer steps; by default Accelerate would step it once per process
        step_scheduler_with_optimizer=False,
        project_config=ProjectConfiguration(project_dir=cfg.output.dir, automatic_checkpoint_naming=False),
        **kwargs,
    )
    workarounds = ["accelerate_cpu_deepspeed_ranks"] if _record_cpu_deepspeed_ranks(accelerator) else []
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:  # one source of truth: batch, accumulation and clipping come from the run config
        ds = plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = cfg.train.micro_batch_size
        ds["gradient_accumulation_steps"] = cfg.train.grad_accum
        ds.pop("train_batch_size", None)  # DeepSpeed derives it from the two above and the world size
        ds["gradient_clipping"] = cfg.train.grad_clip
        for key in ("bf16", "fp16"):
            found, wanted = _ds_enabled(ds, key), kwargs.get("mixed_precision") == key
            if found != wanted:
                raise TrainingError(f"the DeepSpeed config sets {key}.enabled={found} but model.dtype "
                                    f"{cfg.model.dtype!r} needs {wanted}: set it to \"auto\" (derived from model.dtype)")
    return accelerator, workarounds


def fill_deepspeed_buckets(accelerator, model) -> None:
    """Resolve the ZeRO bucket sizes left "auto" from the language model's hidden size, with
    Accelerate's own formulas. Accelerate reads ``model.config.hidden_size`` (or ``hidden_sizes``),
    which a multimodal config (MedGemma 4B's Gemma3Config) does not have: prepare() then fails on the
    shipped configs. Seen with accelerate 1.15 and 1.16 (``Accelerator._prepare_deepspeed`` in
    accelerate/accelerator.py); the "auto" rule is documented upstream in huggingface/accelerate#2296."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    hidden = unwrap_base(model).config.get_text_config().hidden_size
    zero = plugin.deepspeed_config.get("zero_optimization", {})
    for key, value in (("reduce_bucket_size", hidden * hidden),
                       ("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden)),
                       ("stage3_param_persistence_threshold", 10 * hidden)):
        if zero.get(key) == "auto":
            zero[key] = value


def cast_for_deepspeed(accelerator, model) -> None:
    """Under DeepSpeed's bf16 mode, give the parameters created after ``zero.Init`` (LoRA, new rows:
    float32 masters in :mod:`korcpt.model.lora`) the bfloat16 dtype of the partitioned ones. The
    engine keeps the float32 masters itself, and casts a model that was not partitioned at load the
    same way; a partitioned one it leaves as it is, and ZeRO-3 then fails on mixed dtypes
    (``assert len(set(t.dtype for t in tensors)) == 1`` in ``defragment``, deepspeed/runtime/zero/utils.py).
    Seen with DeepSpeed 0.19.8; deepspeedai/DeepSpeed#8113 lets fp32 adapters share bf16 communication
    in later releases."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or not _ds_enabled(plugin.deepspeed_config, "bf16"):
        return
    for param in model.parameters():
        if param.is_floating_point() and not is_partitioned(param):
            param.data = param.data.to(torch.bfloat16)


def _ds_enabled(ds: dict, key: str) -> bool:
    """Whether a DeepSpeed config turns ``bf16`` or ``fp16`` on (True, "true" or "True")."""
    return str(ds.get(key, {}).get("enabled", False)).lower() == "true"


def deepspeed_precision(cfg: RunConfig) -> str:
    """Accelerate's mixed_precision for a DeepSpeed run: its bf16 (or fp16) mode when the model trains in it."""
    dtype = resolve_dtype(cfg.model, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")


# Accelerate releases whose rank bookkeeping is wrong under DeepSpeed without a GPU (see below):
# measured on 1.15 and 1.16 (PartialState.__init__ in accelerate/state.py: "No backend == no distributed
# training" records 1 process of rank 0); a newer major release is assumed fixed until measured otherwise.
_CPU_DEEPSPEED_RANKS_BROKEN = ("1.",)


def _record_cpu_deepspeed_ranks(accelerator) -> bool:
    """Make Accelerate's rank bookkeeping match DeepSpeed's process group on CPU; True if it had to.

    Accelerate 1.x lets DeepSpeed initialise a gloo process group when there is no GPU but, finding no
    device backend, records one process of rank 0 in every process: every rank then believes it is
    the main one (all write the same files) and would read the same data. Measured here with
    `accelerate launch --config_file configs/accelerate/cpu_zero3.yaml`: both processes reported
    process_index 0 and num_processes 1 while torch.distributed had world size 2.

    This writes Accelerate's private shared state, so it is fenced: it runs only on the releases in
    :data:`_CPU_DEEPSPEED_RANKS_BROKEN`, the ranks are checked afterwards, and a release outside them
    that still shows the mismatch is refused in one line. ``training_info.json`` lists the workaround
    under ``workarounds`` when it ran; tests/test_distributed.py fails once it is no longer needed.
    """
    import accelerate
    import torch.distributed as dist
    from accelerate.state import AcceleratorState, PartialState

    if accelerator.state.deepspeed_plugin is None or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return False
    if not dist.is_initialized():  # ZeRO-1/2 on CPU: Accelerate left it to deepspeed.initialize
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    if accelerator.num_processes == dist.get_world_size() and accelerator.process_index == dist.get_rank():
        return False
    found = f"Accelerate {accelerate.__version__} reports rank {accelerator.process_index} of {accelerator.num_processes}"
    if not accelerate.__version__.startswith(_CPU_DEEPSPEED_RANKS_BROKEN):
        raise TrainingError(f"{found}, torch.distributed rank {dist.get_rank()} of {dist.get_world_size()}: "
                            "korcpt's CPU DeepSpeed rank fix is untested on this release; use accelerate 1.x")
    for shared in (PartialState._shared_state, AcceleratorState._shared_state):
        shared["num_processes"] = dist.get_world_size()
        shared["process_index"] = dist.get_rank()
        shared["local_process_index"] = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    if accelerator.num_processes != dist.get_world_size() or accelerator.process_index != dist.get_rank():
        raise TrainingError(f"{found} after korcpt's CPU DeepSpeed rank fix, expected rank {dist.get_rank()} of "
                            f"{dist.get_world_size()} (torch.distributed)")
    return True


def check_shared_output(accelerator, out_dir: str | Path) -> None:
    """Refuse, in one line, an ``out_dir`` that the nodes of a multi-node run do not share (all ranks call).

    A checkpoint is one ``.tmp-`` folder that every rank writes into and rank 0 renames when all have
    finished (:func:`korcpt.train.checkpoint.save_checkpoint`). On node-local disks rank 0 would
    rename a folder without the other nodes' ZeRO partitions and RNG states, and theirs would stay in a ``.tmp-`` folder nobody
    renames: a checkpoint that cannot be resumed. So the first process of each node writes a marker
    named after its rank into ``out_dir/.korcpt-nodes/<nonce>/`` (the nonce comes from rank 0, so an
    earlier run's markers never count), and after a barrier looks for every node's marker by name.
    One node or one process: nothing to check.

    Raises:
        TrainingError: some node does not see another node's marker, or cannot write its own.
    """
    import torch.distributed as dist

    world = accelerator.num_processes
    if world < 2 or not dist.is_initialized():
        return
    nonce = [uuid.uuid4().hex if accelerator.is_main_process else None]
    dist.broadcast_object_list(nonce, src=0)
    marks = Path(out_dir) / NODE_MARKS / nonce[0]
    writer = accelerator.local_process_index == 0
    failed = _write_mark(marks, accelerator.process_index) if writer else None
    firsts = [None] * world
    dist.all_gather_object(firsts, accelerator.process_index if writer else None)  # every marker is written
    nodes = [r for r in firsts if r is not None]
    missing = _missing_marks(marks, nodes) if writer and failed is None else []
    seen = [None] * world
    dist.all_gather_object(seen, (accelerator.process_index, failed, missing))  # every node has looked
    if writer and failed is None:
        (marks / _mark_name(accelerator.process_index)).unlink(missing_ok=True)
    dist.barrier()
    if writer:  # each node cleans up what it sees (on a shared directory the first rmdir wins)
        for path in (marks, marks.parent):
            try:
                path.rmdir()
            except OSError:
                pass
    where = f"output.dir {Path(out_dir).resolve()} (as rank {accelerator.process_index} sees it)"
    for rank, error, absent in (s for s in seen if s[1] or s[2]):
        node = nodes.index(rank)
        problem = (f"node {node} cannot write its marker there ({error})" if error else
                   f"node {node} (first rank {rank}) does not see the marker(s) of node(s) "
                   f"{', '.join(str(nodes.index(r)) for r in absent)} in {NODE_MARKS}/ after {SHARED_WAIT_S:g} s")
        raise TrainingError(f"{where} is not one directory shared by the {len(nodes)} nodes of this run: "
                            f"{problem}; put output.dir on a filesystem that every node mounts at the same "
                            "path (every rank writes its part of each checkpoint there)")


def _mark_name(rank: int) -> str:
    return f"rank{rank:05d}"


def _write_mark(marks: Path, rank: int) -> str | None:
    """Write this node's marker; the reason it could not, or None."""
    try:
        marks.mkdir(parents=True, exist_ok=True)
        (marks / _mark_name(rank)).touch()
    except OSError as exc:  # reported through the collective: a rank that raised here would hang the others
        return exc.strerror or type(exc).__name__
    return None


def _missing_marks(marks: Path, nodes: list[int]) -> list[int]:
    """The nodes (by first rank) whose marker this node cannot see, looked up by name until SHARED_WAIT_S."""
    deadline = time.monotonic() + SHARED_WAIT_S
    while True:
        missing = [r for r in nodes if not (marks / _mark_name(r)).exists()]
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(0.25)
