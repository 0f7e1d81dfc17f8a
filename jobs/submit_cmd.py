"""``maskray submit generate|evaluate ...``: run a job on an existing Ray cluster through the Ray Jobs API.

    maskray submit --address http://ray-head:8265 generate --prompts s3://b/prompts/ --out s3://b/runs/r1 \\
        --model MeissonFlow/Meissonic --dtype fp16 --generator-gpus 1

This repository is uploaded as the job's ``working_dir`` (``.gitignore`` and the excludes below are honoured;
the upload must stay under Ray's 100 MiB limit), the job runs ``python -m jobs.cli <command> <args>`` on the
cluster, and its logs stream here until it ends. Output paths are resolved on the cluster, so ``--out`` must
be an object-store URI or an absolute path on storage the cluster shares; a rerun with the same ``--out``
resumes the run.

Credentials are not sent: the job's environment variables are shown by the Ray dashboard and ``ray job list``
to anyone who can reach them, so the job uses the cluster's own (the KubeRay manifests mount a Secret). Only
the settings in ``FORWARDED_ENV`` are forwarded; ``--forward-env NAME`` forwards another variable, with a warning.

On an autoscaling cluster whose head does not already say its node types, set
``MASKRAY_AUTOSCALING_CONFIG`` here (a local autoscaler-config file is sent as its text) so the job's pools
are sized from what the cluster can grow to (``pipeline.capacity``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import subprocess
import time
from pathlib import Path

from pipeline.capacity import ENV as CAPACITY_ENV

MAX_UPLOAD_BYTES = 100 * 1024 * 1024  # Ray's dashboard upload limit
EXCLUDES = [".git", ".ci", "tests", "out", "samples", "eval", "bench-results", "**/__pycache__", "*.egg-info",
            ".pytest_cache"]
FORWARDED_ENV = ("HF_HUB_OFFLINE", "MASKRAY_CACHE", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION",  # settings, no secrets
                 CAPACITY_ENV)

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265",
                        help="Ray dashboard address of the cluster (default: $RAY_ADDRESS or "
                        "http://127.0.0.1:8265).")
    parser.add_argument("--submission-id", help="Job id to use (default: maskray-<command>-<time>).")
    parser.add_argument("--no-wait", action="store_true", help="Return after submitting instead of streaming logs.")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="Extra environment variable for the job; repeatable. Set here: "
                        + ", ".join(FORWARDED_ENV) + " are forwarded.")
    parser.add_argument("--forward-env", action="append", default=[], metavar="NAME",
                        help="Also forward this variable from here (e.g. HF_TOKEN); repeatable. Its value is then "
                        "visible in the Ray dashboard and `ray job list`: prefer the cluster's own credentials.")
    parser.add_argument("--entrypoint-num-gpus", type=float, default=0, help="GPUs reserved for the driver.")
    parser.add_argument("--working-dir", default=str(Path(__file__).resolve().parents[1]),
                        help="Folder uploaded as the job's working_dir (default: this repository).")
    parser.add_argument("command", choices=["generate", "evaluate"], help="The job to run.")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="Arguments of `maskray COMMAND` (see its --help).")


def check_out_path(args: list[str]) -> str | None:
    """The job's ``--out`` value; a relative local path is refused (it would land in the job's temp copy)."""
    out = None
    for i, arg in enumerate(args):
        if arg == "--out" and i + 1 < len(args):
            out = args[i + 1]
        elif arg.startswith("--out="):
            out = arg.split("=", 1)[1]
    if out is not None and "://" not in out and not os.path.isabs(out):
        raise ValueError(f"--out {out!r} is relative: on the cluster it would land in the job's temporary "
                         "working directory; use an s3:// / gs:// URI or an absolute path on shared storage")
    return out


def upload_size(folder: Path) -> int:
    """Bytes Ray will upload: git's tracked and untracked-unignored files, minus the excludes."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=folder,
                                capture_output=True, text=True, check=True).stdout.splitlines()
        files = [folder / f for f in listed]
    except (OSError, subprocess.CalledProcessError):
        files = [p for p in folder.rglob("*") if p.is_file()]
    top_excludes = {e for e in EXCLUDES if "*" not in e}
    return sum(f.stat().st_size for f in files
               if f.is_file() and f.relative_to(folder).parts[0] not in top_excludes and "__pycache__" not in f.parts)


def run(args: argparse.Namespace) -> int:
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobStatus, JobSubmissionClient

    job_args = [a for a in args.args if a != "--"]
    out = check_out_path(job_args)
    folder = Path(args.working_dir)
    size = upload_size(folder)
    if size > MAX_UPLOAD_BYTES:
        raise ValueError(f"working_dir {folder} is {size / 2**20:.0f} MiB, over Ray's 100 MiB upload limit; "
                         "remove large untracked files or bake the code into the image (infra/Dockerfile)")
    env = job_env(os.environ, args.env, args.forward_env)
    submission_id = args.submission_id or f"maskray-{args.command}-{time.strftime('%Y%m%d-%H%M%S')}"
    entrypoint = shlex.join(["python", "-m", "jobs.cli", args.command, *job_args])
    try:
        client = JobSubmissionClient(args.address)
    except AuthenticationError:
        raise ValueError(f"the Ray cluster at {args.address} requires a token: run with RAY_AUTH_MODE=token and the "
                         "cluster's token in RAY_AUTH_TOKEN or ~/.ray/auth_token (`ray get-auth-token` on the "
                         "head prints it)") from None
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise ValueError(f"cannot reach the Ray cluster at {args.address}: {error}; check --address / RAY_ADDRESS "
                         "(the dashboard port, usually 8265)") from None
    job_id = _submit(client, entrypoint=entrypoint, submission_id=submission_id,
                     entrypoint_num_gpus=args.entrypoint_num_gpus or None,
                     runtime_env={"working_dir": str(folder), "excludes": EXCLUDES, "env_vars": env},
                     metadata={"maskray_command": args.command, "maskray_out": out or ""})
    print(f"submitted {job_id} to {args.address} ({size / 2**20:.1f} MiB working_dir); output: {out or 'see args'}")
    print(f"  logs:   ray job logs --address {args.address} -f {job_id}")
    print(f"  stop:   ray job stop --address {args.address} {job_id}")
    if args.no_wait:
        return 0
    asyncio.run(_stream_logs(client, job_id))
    status = client.get_job_status(job_id)
    while status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        time.sleep(1)
        status = client.get_job_status(job_id)
    print(f"job {job_id} {status.value}; output: {out or 'see args'}")
    return 0 if status == JobStatus.SUCCEEDED else 1


def job_env(environ: dict[str, str], pairs: list[str], forward: list[str]) -> dict[str, str]:
    """The job's environment variables: the ``FORWARDED_ENV`` settings set here, ``--env KEY=VALUE`` pairs and the
    ``--forward-env`` names, warning (by name, never by value) about those the Ray dashboard will show. A
    ``MASKRAY_AUTOSCALING_CONFIG`` naming a local file is sent as the file's text: the job cannot read it.

    Raises:
        ValueError: a pair without ``=``, or a forwarded name that is not set here.
    """
    env = {k: environ[k] for k in FORWARDED_ENV if k in environ}
    for item in pairs:
        if "=" not in item:
            raise ValueError(f"--env {item!r} must be KEY=VALUE")
        key, value = item.split("=", 1)
        env[key] = value
    for name in forward:
        if name not in environ:
            raise ValueError(f"--forward-env {name}: {name} is not set in this environment")
        env[name] = environ[name]
    if CAPACITY_ENV in env and Path(env[CAPACITY_ENV]).expanduser().is_file():  # the job cannot read our files
        env[CAPACITY_ENV] = Path(env[CAPACITY_ENV]).expanduser().read_text()
    if forward:
        logger.warning(f"forwarding {', '.join(forward)} to the job: anyone who can reach the Ray dashboard or run "
                       "`ray job list` on this cluster can read the value(s); prefer the cluster's own credentials")
    return env


async def _stream_logs(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def _submit(client, retry_seconds: float = 90, **job) -> str:
    """``client.submit_job`` retried while a just-started head has no job agent yet (a transient 500)."""
    deadline = time.monotonic() + retry_seconds
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as error:
            if "No available agent" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(2)
