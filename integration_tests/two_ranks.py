"""The harness of the 2-process gloo tests: a test file runs itself as a script that spawns
``WORLD`` workers; each worker writes ``rank{r}.json`` (its results, or its error and
traceback) so a failing rank is reported instead of hanging its peer.

A test file defines ``worker(rank, port, case, outdir)`` whose body runs inside
``with reporting(rank, outdir) as res:``, ends with ``if __name__ == "__main__": main(worker)``,
and calls ``run(__file__, case, tmp_path)`` from its tests.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import traceback
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
#: The only time limit of the integration tests: a hang guard, never a speed check. Far above
#: any correct run, even on a 2-core machine whose cores another job keeps busy (the slowest
#: correct run seen there took about 60 s), so only a real hang reaches it. Subprocesses get
#: HANG_GUARD_S, process groups half of it (a lost peer is then reported by the survivor before
#: the subprocess is killed), pytest-timeout (pyproject.toml) more than both.
#: ``RECD_TEST_HANG_GUARD_S`` overrides it.
HANG_GUARD_S = float(os.environ.get("RECD_TEST_HANG_GUARD_S", "1200"))
PG_TIMEOUT = timedelta(seconds=HANG_GUARD_S / 2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def reporting(rank: int, outdir: str) -> Iterator[Dict[str, Any]]:
    """Yields the result dict; marks it ok if the body returns, records the error if not,
    writes it, and tears the process group down either way."""
    import torch.distributed as dist

    res: Dict[str, Any] = {"rank": rank, "ok": False}
    try:
        yield res
        res["ok"] = True
    except BaseException as e:  # report, never hang the peer silently
        res["error"] = f"{type(e).__name__}: {e}"
        res["traceback"] = traceback.format_exc()[-3000:]
    Path(outdir, f"rank{rank}.json").write_text(json.dumps(res, default=str))
    try:
        dist.destroy_process_group()
    except Exception:
        pass


def run(script: str, case: dict, tmp_path: Path, require_ok: bool = True) -> List[dict]:
    """Run ``script`` (a test file) as the job for ``case`` (``case["world"]`` ranks, default
    ``WORLD``); every rank's result."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(Path(script).resolve()), json.dumps(case), str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    results = []
    for r in range(case.get("world", WORLD)):
        path = tmp_path / f"rank{r}.json"
        assert path.exists(), f"rank {r} wrote no result (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
        res = json.loads(path.read_text())
        if require_ok:
            assert res["ok"], f"rank {r}: {res.get('error')}\n{res.get('traceback', '')}"
        results.append(res)
    return results


def main(worker: Callable[[int, int, dict, str], None]) -> None:
    """The script side: ``python test_file.py CASE_JSON OUTDIR`` spawns the workers."""
    import torch.multiprocessing as mp

    case = json.loads(sys.argv[1])
    mp.spawn(worker, args=(free_port(), case, sys.argv[2]), nprocs=case.get("world", WORLD), join=True)
