"""The application builder: ``ServeConfig`` in, a bound Serve application (ingress -> generator [-> scorer]) out.

``serve run jobs.serve.app:build_app model=tiny-meissonic max_batch_size=8`` and a Serve config file's
``import_path: jobs.serve.app:build_app`` call :func:`build_app` with their ``args``; ``maskray serve`` calls
:func:`build_application` with a config it parsed itself. Builders only build: starting Ray and Serve is the
caller's job.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from ray.serve import Application
from ray.serve.config import AutoscalingConfig, BackpressureConfig

from jobs.serve.config import ServeConfig
from jobs.serve.deployments import ImageGenerator, ImageScorer
from jobs.serve.ingress import ImagesAPI
from mgt.validation import describe_validation_error


def parse_config(args: dict[str, Any]) -> ServeConfig:
    """``args`` (flat ``key=value`` strings from ``serve run``, or a mapping from a config file) as a config.

    Raises:
        ValueError: naming each bad key, the problem and the value given.
    """
    try:
        return ServeConfig.model_validate(args)
    except ValidationError as error:
        raise ValueError(f"invalid serve args: {describe_validation_error(error)}") from None


def build_application(config: ServeConfig) -> Application:
    """The endpoint for ``config``: ``ImagesAPI`` in front of ``ImageGenerator`` and, if configured, ``ImageScorer``.

    The queue bound sits on the generator (``max_queued_requests`` per caller), so a full queue raises
    ``BackPressureError`` inside the ingress, which answers with JSON; the ingress's own bound, reached only if
    the front door itself is swamped, uses Serve's plain-text answer with the same status and ``Retry-After``.
    """
    backpressure = BackpressureConfig(status_code=config.backpressure_status, retry_after_s=config.retry_after_s)
    generator = ImageGenerator.options(
        max_ongoing_requests=config.max_ongoing_requests,
        max_queued_requests=config.max_queued_requests,
        backpressure_config=backpressure,
        autoscaling_config=AutoscalingConfig(min_replicas=config.min_replicas, max_replicas=config.max_replicas,
                                             target_ongoing_requests=config.target_ongoing_requests,
                                             upscale_delay_s=config.upscale_delay_s,
                                             downscale_delay_s=config.downscale_delay_s,
                                             look_back_period_s=config.look_back_period_s),
        graceful_shutdown_timeout_s=config.graceful_shutdown_timeout_s,
        ray_actor_options={"num_cpus": config.num_cpus, "num_gpus": config.num_gpus},
    ).bind(config)
    scorer = None
    if config.scorer is not None:
        scorer = ImageScorer.options(
            ray_actor_options={"num_cpus": 0.5, "num_gpus": config.scorer_num_gpus}).bind(config.scorer)
    return ImagesAPI.options(backpressure_config=backpressure).bind(config, generator, scorer)


def build_app(args: dict[str, Any]) -> Application:
    """Entry point of ``serve run jobs.serve.app:build_app key=value ...`` and of ``infra/serve_config.yaml``."""
    return build_application(parse_config(args))
