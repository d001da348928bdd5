"""How many threads TVM's CPU thread pool runs compiled kernels on.

TVM sizes its pool when the first parallel kernel runs: ``TVM_NUM_THREADS`` if set, else the hardware
thread count, which TVM halves on x86 on the assumption that half are hyper-threads. On a 2-core x86 VM
that is one thread, so every parallel loop the schedule rules made would run serially. Loading an
artifact therefore sets ``TVM_NUM_THREADS`` to the core count its target spec names (``compute.cores``;
the host spec resolves it from the CPUs this process may use), unless the user set it.
"""

from __future__ import annotations

import os
from typing import Any


def use_target_cores(manifest: dict[str, Any]) -> int | None:
    """Set ``TVM_NUM_THREADS`` from the manifest's target cores when unset; returns the value now in force.

    Has no effect once TVM's pool has started in this process (the first parallel kernel call).
    """
    if "TVM_NUM_THREADS" not in os.environ:
        cores = manifest.get("target", {}).get("compute", {}).get("cores")
        if isinstance(cores, int) and cores > 0:
            os.environ["TVM_NUM_THREADS"] = str(cores)
    value = os.environ.get("TVM_NUM_THREADS", "")
    return int(value) if value.isdigit() else None
