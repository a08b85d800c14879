"""The ``pystack3d-dask`` command: thin wrappers around the public API.

::

    pystack3d-dask run PATH [--steps S ...] [--force S ...] [--cluster TYPE|ADDRESS] [--output DIR]
    pystack3d-dask demo [DIR] [--shape N,H,W]
    pystack3d-dask info PATH
    pystack3d-dask verify PATH
    pystack3d-dask report PATH [--out DIR]
    pystack3d-dask preview PATH --step S [--slices N] [--set KEY=V1,V2,... ...] [--channel C] [--out DIR]
    pystack3d-dask export PATH --step S [--channel C] [--format tiff|ome-zarr|ome-zarr-0.4] OUT
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import warnings

from pystack3d_dask.errors import Interrupted, PyStack3DError, Stopped, WorkersLost


def _shape(text: str) -> tuple[int, int, int]:
    try:
        n, h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape {text!r}: expected N,H,W, e.g. 120,256,256") from None
    if min(n, h, w) < 16:
        raise argparse.ArgumentTypeError(f"--shape {text!r}: every size must be >= 16")
    return n, h, w


def _slices(text: str) -> int | list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--slices {text!r}: expected a count (5) or slice indices (16,50)") from None
    return values[0] if len(values) == 1 and "," not in text else values


def _project_command(sub, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand on an existing project: its path, and where the store is if not beside it."""
    command = sub.add_parser(name, help=help)
    command.add_argument("path")
    command.add_argument("--output", help="folder holding the store, if not the project folder")
    return command


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pystack3d-dask", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a PyStack3D params.toml (a file or its folder)")
    run.add_argument("path")
    run.add_argument("--steps", nargs="+", metavar="STEP", help="run only up to these steps")
    run.add_argument("--force", nargs="+", default=[], metavar="STEP",
                     help='redo these steps (and those after); "input" ingests changed input images again')
    run.add_argument("--cluster", help='threads, local, slurm, pbs, sge, lsf, oar, htcondor or a scheduler '
                     'address (overrides [cluster]; a batch system takes the [cluster] table of its type)')
    run.add_argument("--output", help="folder for the store (default: the project folder)")
    run.add_argument("--chunk-mib", type=float, default=32.0, help="target chunk size (MiB)")
    run.add_argument("--shard-mib", type=float, help="target shard size (MiB): whole chunks in one file, "
                     "written and resumed as one (default 512 for a new store, else the store's; 0: one "
                     "file per chunk)")
    run.add_argument("--compression", choices=["none", "lz4", "zstd"], default="none",
                     help="chunk compression (off: noisy slices hardly compress, and it costs speed)")
    run.add_argument("--keep", choices=["all", "last"], default="all",
                     help="last: delete each step's images once the next step has read them (saves disk)")
    run.add_argument("--no-plots", action="store_true", help="write no report page (figures)")

    demo = sub.add_parser("demo", help="run the chain on a built-in synthetic stack with ground truth")
    demo.add_argument("dir", nargs="?", default="pystack3d_dask_demo")
    demo.add_argument("--shape", type=_shape, default=(120, 256, 256), help="N,H,W of the ground truth")
    demo.add_argument("--cluster", help='"threads" (default), "local" or a scheduler address')

    _project_command(sub, "info", "steps done, shapes, chunks, dtype, statistics")
    _project_command(sub, "verify", "read every stored chunk through its checksum; name what is damaged")

    report = _project_command(sub, "report", "write the report page (figures of every complete step)")
    report.add_argument("--out", help="folder for the page (default: pystack3d_dask_report beside the store)")

    preview = _project_command(sub, "preview", "try parameter values on a few slices (nothing stored)")
    preview.add_argument("--step", required=True)
    preview.add_argument("--slices", type=_slices, default=5,
                         help="how many evenly spaced slices (default 5), or which: e.g. 16,50")
    preview.add_argument("--set", action="append", default=[], metavar="KEY=V1,V2,...", dest="settings",
                         help="values to try for a key of the step's table, e.g. filters[0].noise_level=50,100,200 "
                              "(repeat for a grid)")
    preview.add_argument("--channel")
    preview.add_argument("--out", help="folder for the contact sheet (default: the report folder)")

    export = _project_command(sub, "export", "write a step's result as an OME-Zarr image or a TIFF folder")
    export.add_argument("--step", required=True)
    export.add_argument("--channel", help="one channel only (default: every channel; tiff: the first)")
    export.add_argument("--format", default="tiff",
                        help="tiff (a folder of slices), ome-zarr (OME-Zarr 0.5, napari / neuroglancer) or "
                             "ome-zarr-0.4 (Zarr v2, Fiji / BigDataViewer)")
    export.add_argument("out")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s")
    if not args.verbose:
        _quiet_dask()
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
    try:
        return _COMMANDS[args.command](args)
    except PyStack3DError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Stopped as exc:  # SIGINT or SIGTERM during a run, no worker left
        print(exc, file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # Ctrl-C outside a run (discovery, export...)
        print(Interrupted(signal.SIGINT), file=sys.stderr)
        return Interrupted(signal.SIGINT).exit_code


def _quiet_dask() -> None:
    """Warnings only from distributed and dask-jobqueue (their INFO lines with -v): they log at INFO."""
    import dask

    dask.config.set({"logging.distributed": "warning", "logging.dask_jobqueue": "warning"})
    for name in ("distributed", "dask_jobqueue"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _run(args) -> int:
    from pystack3d_dask.engine import Project

    project = Project(args.path, output_dir=args.output, chunk_mib=args.chunk_mib, shard_mib=args.shard_mib,
                      cluster=args.cluster, compression=args.compression, keep=args.keep, quiet=args.quiet)
    report = project.run(args.steps, force=args.force, plots=not args.no_plots)
    for message in report.messages:
        print(message)
    if report.skipped:
        print(f"already complete: {', '.join(report.skipped)}")
    done = [f"{name} ({report.seconds.get(name, 0):.1f} s)" for name in report.done]
    print(f"computed: {', '.join(done) or 'nothing'}")
    print(f"store: {project.store_path}")
    if not args.no_plots:
        from pystack3d_dask.report import PAGE, REPORT_DIR

        print(f"report: {project.store_path.parent / REPORT_DIR / PAGE}")
    return 0


def _demo(args) -> int:
    from pystack3d_dask.demo import run_demo

    run_demo(args.dir, shape=args.shape, cluster=args.cluster, quiet=args.quiet)
    return 0


def _info(args) -> int:
    from pystack3d_dask.engine import Project

    print(json.dumps(Project(args.path, output_dir=args.output).info(), indent=2, default=str))
    return 0


def _verify(args) -> int:
    from pystack3d_dask.engine import Project

    project = Project(args.path, output_dir=args.output)
    damaged = project.verify()
    for step, channels in damaged.items():
        for channel, problems in channels.items():
            for problem in problems:
                print(f"damaged: {step} [{channel}] {problem}")
    if damaged:
        print(f"{project.store_path}: damaged shards (chunks when unsharded) are marked undone; "
              "`pystack3d-dask run` recomputes them.")
        return 1
    print(f"{project.store_path}: every stored chunk matches its checksum and completion record.")
    return 0


def _report(args) -> int:
    from pystack3d_dask.engine import Project
    from pystack3d_dask.report import write_report

    path = write_report(Project(args.path, output_dir=args.output), folder=args.out)
    if path is None:
        print("error: the report could not be written (see the warning above)", file=sys.stderr)
        return 1
    print(path)
    return 0


def _preview(args) -> int:
    from pystack3d_dask.engine import Project
    from pystack3d_dask.preview import preview

    result = preview(Project(args.path, output_dir=args.output), args.step, slices=args.slices,
                     settings=args.settings, channel=args.channel, folder=args.out)
    for label, values in result.measures.items():
        print(f"{label}: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
    print(f"contact sheet: {result.page} ({len(result.slices)} slices, {result.seconds:.1f} s)")
    return 0


def _export(args) -> int:
    from pystack3d_dask.engine import Project

    project = Project(args.path, output_dir=args.output, quiet=args.quiet)
    folder = project.export(args.step, args.out, channel=args.channel, format=args.format)
    print(f"wrote {folder}")
    return 0


#: exit statuses of a stopped run (Ctrl-C, SIGTERM, no worker left)
_STOPPED_CODES = {128 + signal.SIGINT, 128 + signal.SIGTERM, WorkersLost.exit_code}

_COMMANDS = {"run": _run, "demo": _demo, "info": _info, "verify": _verify, "report": _report, "preview": _preview,
             "export": _export}

def entry() -> None:
    """The console script: :func:`main`, then the process ends with its status.

    After an interruption the run has already closed its workers, pools and
    clusters; the process then ends at once rather than joining the threads
    that libraries leave behind: a signal that arrives while such a thread is
    being started can leave it waiting for ever, and the interpreter with it.
    """
    code = main()
    if code in _STOPPED_CODES:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
