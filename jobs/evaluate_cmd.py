"""``maskray evaluate``: HPS v2 win rates of candidate samplers against a baseline, on Ray.

    maskray evaluate --prompts examples/eval_prompts.jsonl --model tiny-meissonic --baseline vanilla \\
        --candidates noise,differential --scorer hps-v2.1 --out eval

Every (prompt, seed) is generated for the baseline and each candidate with the same seed through the
``maskray generate`` pipeline; generations already under ``--out`` are reused. Exit codes as ``maskray
generate``'s: 3 when a sampler's run finished with failed samples (the report covers the others).
"""

from __future__ import annotations

import argparse
import sys

from jobs.cli_args import add_model_arguments, build_model, load_config_file
from jobs.generate_cmd import EXIT_FAILED_SAMPLES
from mgt.config import GenerationSettings, ModelConfig
from pipeline.config import JobOptions

# JobOptions fields the evaluation sets itself for every sampler run.
OWNED_JOB_FIELDS = ("prompts", "out", "seed", "num_images", "storage_options")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from jobs.evaluation.run import EvaluateOptions

    parser.add_argument("--config", help="YAML file with any of the options below, keyed by flag name "
                        "(flags override it; `candidates` may be a list).")
    add_model_arguments(parser, EvaluateOptions, "evaluation")
    add_model_arguments(parser, JobOptions, "job", skip=OWNED_JOB_FIELDS)
    add_model_arguments(parser, ModelConfig, "model")
    add_model_arguments(parser, GenerationSettings, "generation", skip=("sampler",))


def run(args: argparse.Namespace) -> int:
    from jobs.evaluation.run import EvaluateOptions, run_evaluate

    file_values = load_config_file(args.config, EvaluateOptions, JobOptions, ModelConfig, GenerationSettings)
    options = build_model(EvaluateOptions, file_values, args)
    job_values = {k: v for k, v in file_values.items() if k not in OWNED_JOB_FIELDS or k == "storage_options"}
    job = build_model(JobOptions, job_values, argparse.Namespace(**{k: v for k, v in vars(args).items()
                                                                     if k not in OWNED_JOB_FIELDS}))
    model = build_model(ModelConfig, file_values, args)
    generation = build_model(GenerationSettings, file_values, args)
    if "sampler" in file_values:
        raise ValueError("`sampler` is not an evaluate option: use `baseline` and `candidates`")
    from jobs.ray_session import ray_session

    with ray_session() as connect:
        summary = run_evaluate(options, job, model, generation, connect=connect)
    for name, failed in summary["failed_samples"].items():
        print(f"maskray evaluate: sampler {name}: {failed['errors']} sample(s) failed"
              + (f" and {failed['missing']} are missing" if failed["missing"] else "")
              + f"; their errors are in {failed['metrics']} (rows whose `error` is not null); rerun to retry them",
              file=sys.stderr)
    return EXIT_FAILED_SAMPLES if summary["failed_samples"] else 0
