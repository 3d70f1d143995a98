"""Two "nodes" x 1 process on 127.0.0.1, for real: two launchers (``accelerate launch`` for node 0,
plain ``torchrun`` with Accelerate's DeepSpeed variables for node 1, the two recipes of the README),
gloo, DeepSpeed ZeRO-3 on CPU. The per-step losses and the saved adapter equal those of one process
with the same global batch (1 x 1 x 2 against 2 x 1 x 1); the checkpoints hold both nodes' files and
no temporary folder. Node-local output directories are refused at the start in one line.

Tolerance: as tests/test_distributed.py (losses rel 1e-5, adapters rtol 1e-5 / atol 5e-5).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tinyrun import ROOT, free_port, run_config, trained_ids

# The shipped 2 x 8 GPU file, with the overrides a CPU machine needs: 2 processes (one a node), the CPU
# DeepSpeed file, and this machine as the rendezvous host.
TWO_NODES = ROOT / "configs/accelerate/zero3_2nodes.yaml"
# What `accelerate launch` hands its ranks under DeepSpeed, for a rank started by plain torchrun
# (korcpt.train.distributed.build_accelerator reads ACCELERATE_USE_DEEPSPEED; Accelerate the rest).
DEEPSPEED_ENV = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO3_INIT": "true",
                 "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ROOT / "configs/deepspeed/cpu_zero3.json")}
TIMEOUT = 600


def node_command(node: int, port: int, cfg: Path, accelerate: bool) -> list[str]:
    """The launch command of ``node`` (of 2, one process each), as the README writes it."""
    if accelerate:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(TWO_NODES),
                    "--deepspeed_config_file", DEEPSPEED_ENV["ACCELERATE_DEEPSPEED_CONFIG_FILE"],
                    "--num_processes", "2", "--machine_rank", str(node),
                    "--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                    "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port)]
    return [*launcher, str(ROOT / "launch/train.py"), "--config", str(cfg)]


def run_nodes(tmp_path: Path, cfg: Path, cwds: tuple[Path, Path]) -> list[tuple[int, str]]:
    """Start both nodes' launchers at once (node k in ``cwds[k]``); (exit code, output) of each."""
    port, procs = free_port(), []
    env = {**os.environ, "KORCPT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for node, cwd in enumerate(cwds):
        cwd.mkdir(parents=True, exist_ok=True)
        log = open(tmp_path / f"node{node}.log", "w")  # files, not pipes: neither launcher may block on output
        node_env = env if node == 0 else {**env, **DEEPSPEED_ENV}
        procs.append((subprocess.Popen(node_command(node, port, cfg, accelerate=node == 0), cwd=cwd, env=node_env,
                                       stdout=log, stderr=subprocess.STDOUT, start_new_session=True), log))
    results = []
    for proc, log in procs:
        try:
            code = proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:  # the ranks are the launcher's children: end its whole session
            for p, _ in procs:
                os.killpg(p.pid, 9)
            raise
        log.close()
        results.append((code, Path(log.name).read_text()))
    return results


def tiny_run(tmp_path: Path, data, model_dir: Path, name: str, grad_accum: int, out: str) -> Path:
    tok, shards = data
    # the same global batch (2 sequences): 1 x 2 on one process, 1 x 1 on each of two nodes
    return run_config(tmp_path / f"{name}.yaml", tok, shards, Path(out),
                      model={"name": str(model_dir), "random_init": False, "tokenizer": ""},
                      lora={"embeddings": "full"},
                      train={"max_steps": 3, "micro_batch_size": 1, "grad_accum": grad_accum, "warmup_steps": 0,
                             "save_steps": 2, "keep_last": 2, "loss_chunk_tokens": 16},
                      eval={"steps": 0, "max_val_sequences": 8, "batch_size": 2})


@pytest.mark.slow
def test_two_nodes_zero3_equal_one_process(tmp_path, tiny_data, pretrained_tiny):
    one_out, nodes_out = tmp_path / "one", tmp_path / "nodes"
    one_cfg = tiny_run(tmp_path, tiny_data, pretrained_tiny, "one", 2, str(one_out))
    proc = subprocess.run([sys.executable, "launch/train.py", "--config", str(one_cfg)], cwd=ROOT, timeout=TIMEOUT,
                          env={**os.environ, "KORCPT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    nodes_cfg = tiny_run(tmp_path, tiny_data, pretrained_tiny, "nodes", 1, str(nodes_out))
    for code, log in run_nodes(tmp_path, nodes_cfg, (tmp_path / "node0", tmp_path / "node1")):
        assert code == 0, log[-3000:]

    one, two = (json.loads((out / "training_info.json").read_text()) for out in (one_out, nodes_out))
    assert two["world_size"] == 2 and two["workarounds"] == ["accelerate_cpu_deepspeed_ranks"]
    ref, got = [x["loss"] for x in one["losses"]], [x["loss"] for x in two["losses"]]
    print(f"[multinode] losses {got} vs {ref}: max rel {max(abs(a / b - 1) for a, b in zip(got, ref)):.1e}")
    assert len(ref) == 3 and got == pytest.approx(ref, rel=1e-5)
    assert two["val_loss_final"] == pytest.approx(one["val_loss_final"], rel=1e-5)
    ref_adapter, adapter = (load_file(str(out / "adapter_model.safetensors")) for out in (one_out, nodes_out))
    assert adapter.keys() == ref_adapter.keys() and any("trainable_tokens_delta" in k for k in adapter)
    for key, value in ref_adapter.items():
        assert adapter[key].shape == value.shape and adapter[key].numel() > 0, key
        torch.testing.assert_close(adapter[key], value, rtol=1e-5, atol=5e-5, msg=key)
    print(f"[multinode] adapter: {len(adapter)} tensors, max abs difference "
          f"{max((adapter[k] - v).abs().max().item() for k, v in ref_adapter.items()):.1e}")
    assert sorted(trained_ids(nodes_out)) == sorted(trained_ids(one_out)) and len(set(trained_ids(nodes_out))) == 6

    # every rank's part of each checkpoint is in it, renamed from .tmp- once all had written
    checkpoints = nodes_out / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000002", "step-00000003"]
    for ckpt in checkpoints.iterdir():
        names = [p.name for p in ckpt.rglob("*") if p.is_file()]
        assert {"trainer_state.json", "random_states_0.pkl", "random_states_1.pkl"} <= set(names), ckpt
        for rank in (0, 1):
            assert any(n.startswith(f"zero_pp_rank_{rank}_") and n.endswith("optim_states.pt") for n in names), ckpt
    assert not (nodes_out / ".korcpt-nodes").exists()  # the shared-directory check leaves nothing behind


@pytest.mark.slow
def test_node_local_output_dirs_are_refused_in_one_line(tmp_path, tiny_data, pretrained_tiny):
    """Node-local disks, simulated: one relative output.dir, each launcher in its own working directory,
    so the same configured path names another directory on each "node", as /scratch/run does on two
    machines with local disks. Both nodes refuse at the start; nothing is trained or left behind."""
    cfg = tiny_run(tmp_path, tiny_data, pretrained_tiny, "local", 1, "out")
    results = run_nodes(tmp_path, cfg, (tmp_path / "node0", tmp_path / "node1"))
    for rank, (code, log) in enumerate(results):
        assert code != 0, log[-3000:]
        expected = (f"error: output.dir {tmp_path / f'node{rank}' / 'out'} (as rank {rank} sees it) is not one "
                    "directory shared by the 2 nodes of this run: node 0 (first rank 0) does not see the marker(s) "
                    "of node(s) 1 in .korcpt-nodes/ after 5 s; put output.dir on a filesystem that every node "
                    "mounts at the same path (every rank writes its part of each checkpoint there)")
        assert expected in log.splitlines(), log[-3000:]
        assert [p.name for p in (tmp_path / f"node{rank}" / "out").iterdir()] == []  # markers removed, nothing written


def test_the_slurm_script_starts_one_accelerate_launcher_per_node(tmp_path):
    """launch/slurm.sh under stand-ins for srun (one task per node, SLURM_NODEID 0 and 1), scontrol and
    accelerate (which records its arguments): each node gets its machine rank, the first node as
    rendezvous host, all 16 ranks counted, and the run config and options as given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fakes = {
        "srun": 'while [[ $1 == --* ]]; do shift; done\n'
                'for n in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$n "$@" || exit; done',
        # one line at a time, as a long node list comes: a reader that stops early breaks the pipe
        "scontrol": 'test "$*" = "show hostnames gpu-[07-08]" && echo gpu-07 && sleep 0.2 && echo gpu-08',
        "accelerate": f'printf "%s\\n" "$@" > {tmp_path}/node$SLURM_NODEID.args',
    }
    for name, body in fakes.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_NNODES": "2", "SLURM_JOB_ID": "1234",
           "SLURM_JOB_NODELIST": "gpu-[07-08]", "SLURM_SUBMIT_DIR": str(ROOT)}
    proc = subprocess.run(["bash", str(ROOT / "launch/slurm.sh"), "configs/27b_zero3.yaml", "--set",
                           "train.grad_accum=1", "--resume", "auto"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for node in (0, 1):
        assert (tmp_path / f"node{node}.args").read_text().splitlines() == [
            "launch", "--config_file", "configs/accelerate/zero3_2nodes.yaml", "--num_machines", "2",
            "--num_processes", "16", "--machine_rank", str(node), "--main_process_ip", "gpu-07",
            "--main_process_port", "21234", "launch/train.py", "--config", "configs/27b_zero3.yaml",
            "--set", "train.grad_accum=1", "--resume", "auto"]
