"""The shared tool convention: one-line errors, exit codes, and no process group left open at exit."""

from __future__ import annotations

import torch.distributed as dist

from korcpt.cli import EXIT_USER_ERROR, run_tool
from korcpt.errors import KorcptError


def _init_gloo(tmp_path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    assert dist.is_initialized()


def test_a_user_error_is_one_line_exit_2_and_closes_the_process_group(tmp_path, capsys):
    def main(argv):
        _init_gloo(tmp_path)
        raise KorcptError("shard 3 is damaged")

    assert run_tool(main, []) == EXIT_USER_ERROR
    assert capsys.readouterr().err == "error: shard 3 is damaged\n"
    # left open, a gloo group can abort the process at interpreter shutdown (SIGABRT instead of exit 2)
    assert not dist.is_initialized()


def test_success_returns_the_main_code_and_closes_the_process_group(tmp_path):
    def main(argv):
        _init_gloo(tmp_path)
        return 0

    assert run_tool(main, []) == 0 and not dist.is_initialized()
    assert run_tool(lambda argv: None, []) == 0 and run_tool(lambda argv: 3, []) == 3
