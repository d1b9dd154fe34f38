"""``python -m bench.switch_worker SECONDS ARGS…``: ``meshserve ARGS…`` with the GIL's switch
interval set to SECONDS first (a benchmark probe, not a serving option).

A thread that wants the GIL back waits up to the switch interval (5 ms by default) for a
busy holder to yield it, and every torch call on an executor thread gives it up and takes it
back. bench.gpu_serving's ``--switch-interval`` uses this to test whether that wait is what
holds the GPU worker's batches back while the event loop is busy with requests.
"""

from __future__ import annotations

import runpy
import sys

if __name__ == "__main__":
    sys.setswitchinterval(float(sys.argv[1]))
    sys.argv = ["cli.main", *sys.argv[2:]]
    runpy.run_module("cli.main", run_name="__main__")
