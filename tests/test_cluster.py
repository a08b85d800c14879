"""The [cluster] table and --cluster: every key checked, jobqueue arguments too; no worker ends a run."""

from __future__ import annotations

import importlib.resources
import logging
import re
import tomllib

import dask
import pytest
from conftest import random_stack, write_params, write_slices
from distributed import LocalCluster

from pystack3d_dask.cli import main
from pystack3d_dask.cluster import ClusterConfig, cluster_config, lifetime_args, scheduler, walltime_seconds
from pystack3d_dask.engine import Project
from pystack3d_dask.errors import ConfigError, WorkersLost
from pystack3d_dask.store import STORE_NAME

pytest.importorskip("dask_jobqueue")

SLURM = {"type": "slurm", "interface": "lo"}


@pytest.mark.parametrize(("table", "message"), [
    ({"intreface": "lo"}, r"unknown key 'intreface' \(did you mean 'interface'\?\)"),
    ({"log_dir": "x"}, r"unknown key 'log_dir' \(did you mean 'log_directory'\?\)"),
    ({"walltme": "01:00:00"}, r"unknown key 'walltme' \(did you mean 'walltime'\?\)"),
    ({"job_script_prolog": []}, r"unknown key 'job_script_prolog' \(did you mean 'job_script_prologue'\?\)"),
    ({"pyhton": "python3"}, r"unknown key 'pyhton' \(did you mean 'python'\?\)"),
    ({"local_dir": "/tmp"}, r"unknown key 'local_dir' \(did you mean 'local_directory'\?\)"),
    ({"minimum_job": 1}, r"unknown key 'minimum_job' \(did you mean 'minimum_jobs'\?\)"),
    ({"maximum_job": 2}, r"unknown key 'maximum_job' \(did you mean 'maximum_jobs'\?\)"),
    ({"no_worker_timout": 5}, r"unknown key 'no_worker_timout' \(did you mean 'no_worker_timeout'\?\)"),
    ({"job_extra": {"job_extra_directive": []}},
     r"job_extra key 'job_extra_directive' is unknown to dask-jobqueue's SLURMCluster "
     r"\(did you mean 'job_extra_directives'\?\)"),
    ({"job_extra": {"walltime": "01:00:00"}}, r"job_extra key 'walltime': set it as \[cluster\] walltime"),
    ({"job_extra": {"memory": "1GiB"}}, r"job_extra key 'memory': set it as \[cluster\] memory_limit"),
    ({"walltime": "1:00"}, r"walltime = '1:00' is invalid: expected \[D-\]HH:MM:SS"),
    ({"minimum_jobs": 3, "maximum_jobs": 2}, r"maximum_jobs = 2 is invalid: expected >= minimum_jobs \(3\)"),
    ({"n_workers": 2, "maximum_jobs": 2}, r"n_workers = 2 is invalid: give either n_workers"),
    ({"no_worker_timeout": 0}, r"no_worker_timeout = 0(\.0)? is invalid"),
    ({"job_script_prologue": "module load x"}, r"job_script_prologue = 'module load x' is invalid: expected a list"),
])
def test_a_bad_key_is_named_with_what_is_allowed(table, message):
    with pytest.raises(ConfigError, match=message):
        cluster_config({**SLURM, **table})


def test_jobqueue_keys_are_refused_for_local_schedulers():
    with pytest.raises(ConfigError, match=r'\[cluster\] walltime = .01:00:00. is invalid: only for a batch system'):
        cluster_config({"type": "local", "walltime": "01:00:00"})


def test_walltime_and_worker_lifetime():
    assert walltime_seconds("1-02:03:04") == 93784
    assert walltime_seconds("02:30", "lsf") == 9000
    # retire between 52.5 and 57.5 minutes into a 1-hour job, 37.5 and 52.5 s into a 1-minute one
    # (a margin of 15 s at least), 12.5 and 17.5 s into a 20-second one (at most a quarter)
    assert lifetime_args("01:00:00", "slurm") == ["--lifetime", "3300s", "--lifetime-stagger", "150s"]
    assert lifetime_args("00:01:00", "slurm") == ["--lifetime", "45s", "--lifetime-stagger", "7s"]
    assert lifetime_args("00:00:20", "pbs") == ["--lifetime", "15s", "--lifetime-stagger", "2s"]


def test_cluster_option_takes_the_table_of_its_type():
    table = cluster_config({**SLURM, "maximum_jobs": 4})
    assert cluster_config("slurm", table) is table
    assert cluster_config("pbs", table) == ClusterConfig(type="pbs")
    assert cluster_config("tcp://10.0.0.5:8786", table).address == "tcp://10.0.0.5:8786"
    assert table.job_range == (1, 4) and ClusterConfig(type="slurm", n_workers=3).job_range == (3, 3)


def test_cluster_option_typo_is_one_line(tmp_path, capsys):
    write_slices(tmp_path, random_stack((2, 16, 16)))
    write_params(tmp_path, 'process_steps = ["cropping"]\n[cropping]\narea = [0, 8, 0, 8]\n')
    assert main(["run", str(tmp_path), "--cluster", "slrum"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: cluster = 'slrum' is invalid: expected one of threads, local, address, slurm, pbs, "
                   "sge, lsf, oar, htcondor (did you mean 'slurm'?) or a scheduler address like tcp://host:8786."]
    assert not (tmp_path / STORE_NAME).exists()


def test_the_packaged_examples_load():
    text = importlib.resources.files("pystack3d_dask").joinpath("configs/cluster_examples.toml").read_text()
    blocks = re.findall(r"^#? ?\[cluster\]\n(?:#? ?\w.*\n?)+", text, flags=re.M)
    assert len(blocks) == 3
    for block in blocks:
        table = tomllib.loads(re.sub(r"^# ?", "", block, flags=re.M))["cluster"]
        assert cluster_config(table).type == table["type"]


def test_quiet_run_on_a_local_cluster_prints_nothing(tmp_path, capfd):
    write_slices(tmp_path, random_stack((4, 16, 16)))
    write_params(tmp_path, 'process_steps = ["cropping"]\n[cropping]\narea = [0, 8, 0, 8]\n')
    assert main(["-q", "run", "--no-plots", str(tmp_path), "--cluster", "local"]) == 0
    assert capfd.readouterr().err == ""


def test_a_local_cluster_s_teardown_prints_nothing(capfd):
    """Workers closed one by one log the heartbeats and transfers the teardown breaks (tracebacks
    after the run's last line, seen on a loaded 2-core machine): a worker that logs an error
    while it closes stands for them."""
    from distributed import WorkerPlugin, get_client

    class LogsAsItCloses(WorkerPlugin):
        def teardown(self, worker):
            logging.getLogger("distributed.worker").error("broken by the teardown")

    level = logging.getLogger("distributed").level
    with scheduler(ClusterConfig(type="local", n_workers=1)):
        get_client().register_plugin(LogsAsItCloses())
    assert "broken by the teardown" not in capfd.readouterr().err
    assert logging.getLogger("distributed").level == level, "this process's level is restored"


def test_a_run_with_nothing_to_do_starts_no_cluster(tmp_path):
    """A no-op run (a resumed project already complete) must not submit batch jobs: here the
    scheduler's address is closed, so connecting to it would fail the run."""
    write_slices(tmp_path, random_stack((4, 16, 16)))
    write_params(tmp_path, 'process_steps = ["cropping"]\n[cropping]\narea = [0, 8, 0, 8]\n')
    Project(tmp_path, quiet=True).run()
    with LocalCluster(n_workers=0, dashboard_address=":0") as gone:
        closed = {"type": "address", "address": gone.scheduler_address}
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        report = Project(tmp_path, quiet=True, cluster=closed).run()
        assert report.skipped == ["input", "cropping"] and not report.computed
        with pytest.raises(OSError, match="Timed out"):  # the same run with work to do connects
            Project(tmp_path, quiet=True, cluster=closed).run(force=["cropping"])


def test_no_worker_stops_the_run_and_keeps_the_shards(tmp_path):
    write_slices(tmp_path, random_stack((6, 16, 16)))
    write_params(tmp_path, 'process_steps = ["cropping"]\n[cropping]\narea = [0, 8, 0, 8]\n')
    with LocalCluster(n_workers=0, dashboard_address=":0") as empty:
        cluster = {"type": "address", "address": empty.scheduler_address, "no_worker_timeout": 2}
        with pytest.raises(WorkersLost, match=r"^no worker left; 0 of 3 shards of ingest written; run again "
                                              r"to resume \(no worker for 2 s: \[cluster\] no_worker_timeout\)$"):
            Project(tmp_path, quiet=True, chunk_slices=1, shard_chunks=2, cluster=cluster).run()
    assert (tmp_path / STORE_NAME).exists(), "a stopped run is not an error: its store stays"
