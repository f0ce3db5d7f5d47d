"""``diffgen <command> --num-gpus N``: start N workers with torch's elastic launcher.

The parent starts the workers (``torch.distributed.launcher.api.elastic_launch``, a standalone
c10d rendezvous on this host, no restarts) and each runs the same command line with RANK,
WORLD_SIZE and LOCAL_RANK set, exactly as under ``torchrun``. Only rank 0 speaks; the others'
stderr goes to /dev/null. A worker that fails writes its one-line error to a file in a directory
the parent made; the parent prints the line of the lowest failing rank, so the user sees one line
whichever rank failed, not N tracebacks.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import uuid
from pathlib import Path

HANDLED_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT") if hasattr(signal, n))
_error_dir: str | None = None  # in a launched worker: where it writes its one-line error


def launch(main, argv: list[str], num_processes: int) -> int:
    """Run ``main(argv)`` (``diffgen.cli.main``) in ``num_processes`` workers; the exit status of the run."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # The launcher's own lines (rendezvous, "Terminating process ... via signal SIGTERM" when one rank
    # failed) say nothing the one error line does not.
    for name in ("torch.distributed.elastic", "torch.multiprocessing"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="diffgen-ranks-") as errors:
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=num_processes, run_id=uuid.uuid4().hex,
                              rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0,
                              monitor_interval=0.1, start_method="spawn")
        # The elastic agent installs its own SIGTERM/SIGINT/SIGHUP/SIGQUIT handlers in this process and
        # leaves them there; a caller that goes on (a notebook, a test run) gets its own back.
        saved = {sig: signal.getsignal(sig) for sig in HANDLED_SIGNALS}
        try:
            statuses = elastic_launch(config, _worker)(main, list(argv), errors)
        except ChildFailedError:
            statuses = None
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)
        lines = sorted(Path(errors).glob("rank-*.txt"), key=lambda p: int(p.stem.split("-")[1]))
        if lines:
            status, _, line = lines[0].read_text().partition(" ")
            print(line.rstrip("\n"), file=sys.stderr)
            return int(status)
        if statuses is None:
            print(f"diffgen: error: a worker of the {num_processes} stopped without saying why (killed, or out of "
                  "memory); run with torchrun to see each rank's output", file=sys.stderr)
            return 1
        return max(int(s or 0) for s in statuses.values())


def _worker(main, argv: list[str], errors: str) -> int:
    """One rank: the ordinary command line, speaking only on rank 0."""
    global _error_dir
    _error_dir = errors
    if os.environ.get("RANK", "0") != "0":
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.dup2(devnull, 1)
    status = main(argv)
    if status:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)  # a failed rank ends now, so the launcher stops the others instead of letting them wait
    return status


def report_error(status: int, line: str) -> bool:
    """In a launched worker, keep the error line for the parent (True); elsewhere False (print it)."""
    if _error_dir is None:
        return False
    Path(_error_dir, f"rank-{os.environ.get('RANK', '0')}.txt").write_text(f"{status} {line}\n")
    return True
