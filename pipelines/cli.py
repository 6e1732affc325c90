"""The `fdm` command line: run a pipeline, inspect a past run's stages, re-run one round, sample a model;
submit a pipeline to a Ray cluster as a job, serve shared MLflow tracking, and run the benchmarks.

Exit codes: 0 ok, 2 bad usage, config or input data, or a failed preflight check (the field is named), 1 a
stage failed (the stage and its error are printed), 130 / 143 interrupted by SIGINT / SIGTERM (what finished
and how to resume is printed). Everything printed has credentials in URIs redacted.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
import traceback

from pydantic import ValidationError
from rich.console import Console

from infra import mlflow_server
from infra.ray_join import ClusterError
from infra.secrets import ScrubbedStream
from infra.store import StoreError
from pipelines import sample_cmd, submit
from pipelines.config import ConfigError, load_config
from pipelines.interrupt import Interrupted, as_interrupted, interruptible
from pipelines.plan import StageError
from pipelines.preflight import PreflightError
from tasks.stage import BadInputError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
# The modules of benchmarks/ that `fdm bench NAME` runs, each with a `main(argv)`.
ALLOW_LOCAL = (
    "on a cluster of several nodes, accept a local store.root or sqlite tracking.uri (the path is on a "
    "filesystem every node shares)"
)
BENCHMARKS = (
    "fdm_training",
    "fdm_sampling",
    "distillation",
    "picard",
    "pipeline",
    "loader_throughput",
    "prepare",
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fdm", description="Fast diffusion pipelines on Ray and MLflow.")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a full pipeline from a YAML config")
    run.add_argument("config", help="pipeline YAML (see pipelines/configs/)")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set train.steps=500 (repeatable)",
    )
    run.add_argument("--address", default=None, help="join this Ray cluster instead of starting one locally")
    run.add_argument("--allow-local", action="store_true", help=ALLOW_LOCAL)

    stages = sub.add_parser("stages", help="the stage table of a past pipeline run")
    stages.add_argument("run_id", help="the pipeline's (parent) MLflow run id, as `fdm run` prints it")
    stages.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="MLflow tracking URI")

    rerun = sub.add_parser(
        "rerun",
        help="re-run one stage of a past run from its stored upstream outputs, as a new run (fdm.rerun_of)",
    )
    rerun.add_argument("run_id", help="the pipeline's (parent) MLflow run id, as `fdm run` prints it")
    rerun.add_argument("--stage", required=True, help="a stage, as `fdm stages` names it, e.g. distill_2to1")
    rerun.add_argument("--downstream", action="store_true", help="also re-run everything that depends on it")
    rerun.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change a setting of the past run's config for this re-run, e.g. --set distill.rounds.3.lr=1e-3 "
        "(repeatable); stages whose key it changes are recomputed",
    )
    rerun.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="MLflow tracking URI")
    rerun.add_argument(
        "--address", default=None, help="join this Ray cluster instead of starting one locally"
    )
    rerun.add_argument("--allow-local", action="store_true", help=ALLOW_LOCAL)

    bench = sub.add_parser(
        "bench",
        help="run a benchmark (as python -m benchmarks.NAME); its report goes to benchmarks/results/",
    )
    bench.add_argument("name", choices=BENCHMARKS, metavar="NAME", help=f"one of {', '.join(BENCHMARKS)}")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own options, e.g. --quick")

    sample_cmd.add_parser(sub)
    submit.add_parser(sub)
    mlflow_server.add_parser(sub)
    return p


def _bench(name: str, argv: list[str]) -> int:
    """Run benchmarks.<name>.main(argv): 1 if it fails (its traceback printed); bad options exit 2 there."""
    module = importlib.import_module(f"benchmarks.{name}")
    # The benchmark's argparse names itself after argv[0] in its usage and error lines.
    saved, sys.argv = sys.argv, [f"fdm bench {name}", *argv]
    try:
        module.main(argv)
    except Exception as err:
        traceback.print_exc()
        print(f"fdm bench {name}: failed: {err}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        sys.argv = saved
    return EXIT_OK


def _exit_code(run) -> int:
    if not run.failed:
        return EXIT_OK
    if all(isinstance(o.cause, (BadInputError, ConfigError, ValidationError)) for o in run.failed):
        return EXIT_USAGE
    return EXIT_FAILED


def _interrupted_line(stop: Interrupted, args: argparse.Namespace) -> str:
    """One line: the signal, what finished, and the command that resumes."""
    if args.command in ("submit", "status"):
        return (
            f"interrupted by {stop.signal_name}: stopped following; a submitted job goes on running on the "
            "cluster (`fdm status JOB_ID --address ...` shows it)"
        )
    done = ", ".join(stop.finished) if stop.finished else "none"
    if args.command == "run":
        again = "run the same `fdm run` command again"
    elif args.command == "rerun":
        again = f"run `fdm rerun {args.run_id} --stage {args.stage}` again"
    else:
        again = "run it again"
    return (
        f"interrupted by {stop.signal_name}: {len(stop.finished)} of {stop.total} stages finished ({done}); "
        f"running stages were cancelled and their MLflow runs marked KILLED. To resume, {again}: finished "
        "stages are served from the store and training resumes from its last checkpoint."
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Logs and pipes get the full table instead of rich's 80-column default.
    out = ScrubbedStream(sys.stdout)
    console = Console(file=out) if sys.stdout.isatty() else Console(file=out, width=160)
    try:
        if args.command == "sample":
            return sample_cmd.run(args)
        if args.command in ("submit", "status", "logs"):
            with interruptible():
                return submit.run(args)
        if args.command == "tracking-server":
            return mlflow_server.run(args)
        if args.command == "bench":
            return _bench(args.name, args.args)
        if args.command == "run":
            from pipelines.runner import run_pipeline

            cfg = load_config(args.config, args.overrides)
            command = shlex.join(["fdm", *(argv if argv is not None else sys.argv[1:])])
            with interruptible():
                return _exit_code(run_pipeline(cfg, args.address, console, command, args.allow_local))
        if args.command == "stages":
            from pipelines.stages_cmd import past_stages

            console.print(past_stages(args.tracking_uri, args.run_id))
            return EXIT_OK
        if args.command == "rerun":
            from pipelines.rerun import rerun_stage

            with interruptible():
                return _exit_code(
                    rerun_stage(
                        args.tracking_uri,
                        args.run_id,
                        args.stage,
                        args.downstream,
                        args.address,
                        console,
                        args.overrides,
                        args.allow_local,
                    )
                )
    except ConfigError as err:
        sep = "\n" if "\n" in str(err) else " "
        console.print(f"[red]config error:[/red]{sep}{err}", highlight=False, soft_wrap=True)
        return EXIT_USAGE
    except PreflightError as err:
        console.print(f"[red]cannot start:[/red] {err}", highlight=False, soft_wrap=True)
        return EXIT_USAGE
    except StoreError as err:
        console.print(f"[red]store error:[/red] {err}", highlight=False, soft_wrap=True)
        return EXIT_FAILED
    except KeyboardInterrupt as err:  # SIGINT or SIGTERM (Interrupted), or a Ctrl-C outside a run
        stop = as_interrupted(err)
        console.print(_interrupted_line(stop, args), highlight=False, soft_wrap=True)
        return stop.exit_code
    except (LookupError, StageError) as err:
        console.print(f"[red]error:[/red] {err.args[0]}", highlight=False)
        return EXIT_USAGE
    except ClusterError as err:  # a Ray cluster that cannot be joined: one line, no traceback
        console.print(f"[red]error:[/red] {err}", highlight=False, soft_wrap=True)
        return EXIT_USAGE
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
