"""The program a Slurm job runs: ``python -m mihd_resources.slurm_worker CALL RESULT``.

Loads the step's compute function (cloudpickle, written by ``StepExecutor``), opens Dagster
Pipes from the environment the step exported (context and message files on the shared
filesystem), calls the function with the Pipes logger so its lines stream into the Dagster
run, and writes the returned value to ``RESULT`` atomically. An exception prints its
traceback to stderr (the step shows the tail) and exits non-zero.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m mihd_resources.slurm_worker CALL.pkl RESULT.pkl", file=sys.stderr)
        return 2
    call, result = Path(argv[0]), Path(argv[1])
    import cloudpickle
    from dagster_pipes import open_dagster_pipes

    with open_dagster_pipes() as pipes:
        job = os.environ.get("SLURM_JOB_ID", "?")
        pipes.log.info(
            f"Slurm job {job} on {socket.gethostname()}: CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}, cpus {os.environ.get('SLURM_CPUS_PER_TASK', '?')}"
        )
        fn = cloudpickle.loads(call.read_bytes())
        started = time.perf_counter()
        value = fn(pipes.log)
        tmp = result.with_name(result.name + ".tmp")
        tmp.write_bytes(cloudpickle.dumps(value))
        os.replace(tmp, result)
        pipes.log.info(f"Slurm job {job}: compute finished in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
