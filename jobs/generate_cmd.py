"""``maskray generate``: turn Parquet prompt shards into a scored image dataset with Ray Data, resumably.

    maskray generate --prompts examples/prompts.parquet --out out
    maskray generate --prompts s3://bucket/prompts/ --out s3://bucket/run1 --model MeissonFlow/Meissonic \\
        --dtype fp16 --generator-gpus 1 --batch-size 8 --scorer hps-v2.1 --scorer-gpus 0.25

Ray: ``RAY_ADDRESS`` when set (an existing cluster), else a local Ray on this machine, on loopback.
Rerunning the same command after a crash generates only the missing and the failed samples; the same
``--out`` with other output-changing settings is refused, and so is an ``--out`` another live run holds.

Exit codes: 0 every sample generated; 1 a crash (traceback; the attempt is recorded as failed in the run's
manifest); 2 a usage error, refused before Ray starts (one line); 3 the run finished but some samples failed or
are missing (their errors are in the run's metrics table).
"""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

from jobs.cli_args import add_model_arguments, build_model, load_config_file
from mgt.config import GenerationSettings, ModelConfig
from mgt.validation import describe_validation_error
from pipeline.config import GenerateConfig, JobOptions
from pipeline.redact import redact
from pipeline.result import RunResult

EXIT_FAILED_SAMPLES = 3  # finished, but some samples failed: distinct from a crash (1) and a usage error (2)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with any of the options below, keyed by flag name "
                        "(flags override it).")
    parser.add_argument("--print-config", action="store_true", help="Print the resolved configuration as YAML "
                        "and exit.")
    add_model_arguments(parser, JobOptions, "job", skip=("storage_options",))
    add_model_arguments(parser, ModelConfig, "model")
    add_model_arguments(parser, GenerationSettings, "generation")


def resolve_config(args: argparse.Namespace) -> GenerateConfig:
    """The job config from defaults < ``--config`` file < flags."""
    file_values = load_config_file(args.config, JobOptions, ModelConfig, GenerationSettings)
    parts = {"job": build_model(JobOptions, file_values, args),
             "model": build_model(ModelConfig, file_values, args),
             "generation": build_model(GenerationSettings, file_values, args)}
    try:
        return GenerateConfig.model_validate({k: v.model_dump() for k, v in parts.items()})
    except ValidationError as error:  # cross-model checks, e.g. an unknown --scorer
        raise ValueError(f"invalid options: {describe_validation_error(error)}") from None


def run(args: argparse.Namespace) -> int:
    config = resolve_config(args)
    if args.print_config:
        import yaml

        dump = redact(config.model_dump(mode="json"))
        print(yaml.safe_dump({**dump["job"], **dump["model"], **dump["generation"]}, sort_keys=False))
        return 0
    from jobs.ray_session import ray_session

    with ray_session() as connect:
        from pipeline.generate import run_generate  # imports Ray: after ray_session() set its environment

        result = run_generate(config, connect=connect)
    if config.job.report and result.kept:
        from jobs.run_report import write_run_report

        write_run_report(config.job.out, config.job.storage_options)
        print(f"maskray generate: report in {config.job.out.rstrip('/')}/report/ (report.html)")
    return outcome(result)


def outcome(result: RunResult) -> int:
    """The exit code of a finished run: 0 when every sample is there without error, else ``EXIT_FAILED_SAMPLES``
    after a line on stderr saying how many failed and where their errors are."""
    if result.complete:
        return 0
    metrics = result.metrics_uri
    print(f"maskray generate: {result.errors} of {result.expected} samples failed"
          + (f" and {result.missing} are missing" if result.missing else "")
          + f"; their errors are in {metrics} (rows whose `error` is not null, e.g. "
          f"pyarrow.dataset.dataset('{metrics}').to_table(filter=pyarrow.compute.field('error').is_valid())); "
          f"rerun the same command to retry them (--keep-failed keeps them)", file=sys.stderr)
    return EXIT_FAILED_SAMPLES
