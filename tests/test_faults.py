"""A worker process killed in the middle of a step: the cluster reruns its tasks, the result is whole.

And only the tasks of its window: the workers keep no result of the writes finished before.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
from conftest import random_stack, write_params, write_slices
from distributed import Client, LocalCluster
from test_interrupt import done_shards

from pystack3d_dask.engine import Project
from pystack3d_dask.progress import WINDOW_PER_WORKER

PARAMS = """
process_steps = ["destriping"]
[destriping]
maxit = 40
filters = [{ name = "Gabor", noise_level = 20, sigma = [0.5, 20], theta = 0 }]
"""


def _kill_one_worker_when_busy(client: Client, stop: threading.Event, killed: list, project: Path) -> None:
    pids = client.run(os.getpid)
    while not stop.is_set():
        # a worker busy with the destriping step (not the ingest before it), half the shards written
        busy = [w for w, keys in client.processing().items() if any("destriping" in str(k) for k in keys)]
        if busy and done_shards(project, "destriping") >= 6:
            held = [k for keys in client.has_what().values() for k in keys if str(k).startswith("write-")]
            os.kill(pids[busy[0]], signal.SIGKILL)
            killed.append(held)
            return
        time.sleep(0.01)


def test_killed_worker_is_replaced_and_the_result_is_whole(tmp_path):
    stack = random_stack((24, 96, 96), "uint8")
    for name in ("cluster", "threads"):
        write_slices(tmp_path / name, stack)
        write_params(tmp_path / name, PARAMS)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        stop, killed = threading.Event(), []
        killer = threading.Thread(target=_kill_one_worker_when_busy, args=(client, stop, killed, tmp_path / "cluster"),
                                  daemon=True)
        killer.start()
        try:
            Project(tmp_path / "cluster", quiet=True, chunk_slices=2, shard_chunks=1,
                    cluster=cluster.scheduler_address).run()
        finally:
            stop.set()
            killer.join()
    assert killed, "no worker was killed: the test proved nothing"
    # the workers keep no more finished writes than the run's window: a result kept dies with
    # its worker, and the scheduler runs that write again
    (held,) = killed
    assert len(held) <= WINDOW_PER_WORKER * 2, held
    reference = Project(tmp_path / "threads", quiet=True, chunk_slices=2)
    reference.run()
    np.testing.assert_array_equal(Project(tmp_path / "cluster").result("destriping").compute(),
                                  reference.result("destriping").compute())
