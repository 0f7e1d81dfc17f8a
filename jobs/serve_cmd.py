"""``maskray serve``: start Ray Serve with the OpenAI-compatible images endpoint and keep it up until stopped.

The model flags come from :class:`mgt.config.ModelConfig` and the serving flags from
:class:`jobs.serve.config.ServeConfig`, so ``--help`` shows the same defaults and text as the YAML keys.
Precedence: flag > ``--config`` file (the ServeConfig keys, ``model:`` as a mapping or a name) > default.

A non-loopback ``--host`` needs an API key (or ``--allow-unauthenticated``, warned about); SIGTERM and Ctrl-C
(SIGINT) shut Serve and the Ray processes this command started down before it exits.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import time
from collections.abc import Mapping

from jobs.cli_args import add_model_arguments, build_model, load_config_file
from jobs.serve.config import ServeConfig
from mgt.config import ModelConfig

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="Address the HTTP proxy binds (0.0.0.0 exposes it).")
    server.add_argument("--port", type=int, default=8000, help="HTTP port.")
    server.add_argument("--address", default="local", help="Ray cluster to join: 'local' starts one in this "
                        "process, 'auto' joins the running one, or ray://HOST:PORT.")
    server.add_argument("--app-name", default="maskray", help="Serve application name.")
    server.add_argument("--config", help="YAML file with any ServeConfig key (flags override it).")
    add_model_arguments(parser, ModelConfig, "model")
    add_model_arguments(parser, ServeConfig, "serving", skip=("model", "backpressure_status"))


def build_config(args: argparse.Namespace) -> ServeConfig:
    """The ServeConfig of the parsed flags and ``--config`` file.

    Raises:
        ValueError: a flag or key is invalid; the message names it and the value given.
    """
    file_values = load_config_file(args.config)
    model_file = file_values.pop("model", {})
    model_file = {"model": model_file} if isinstance(model_file, str) else dict(model_file)
    model = build_model(ModelConfig, model_file, args, source="model options")
    serving = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "model"})
    return build_model(ServeConfig, {**file_values, "model": model}, serving, source="serving options")


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IPs (127.0.0.0/8, ::1); hostnames and 0.0.0.0 count as exposed."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_auth(config: ServeConfig, host: str, environ: Mapping[str, str]) -> ServeConfig:
    """The config to serve with ``host``: without an API key, loopback is served as is (only this machine reaches
    it), any other address only with ``allow_unauthenticated``, and then with a warning.

    Raises:
        ValueError: a non-loopback host, no key, and no ``--allow-unauthenticated``.
    """
    if environ.get(config.api_key_env):
        return config
    if is_loopback(host):
        return config.model_copy(update={"allow_unauthenticated": True})
    if not config.allow_unauthenticated:
        raise ValueError(f"refusing to serve on {host} without an API key: set {config.api_key_env} to the bearer "
                         "token clients must send, bind a loopback --host (127.0.0.1), or pass "
                         "--allow-unauthenticated to let anyone who reaches the port generate images")
    logger.warning(f"serving on {host} WITHOUT authentication (--allow-unauthenticated, {config.api_key_env} "
                   "unset): anyone who reaches the port can generate images")
    return config


def run(args: argparse.Namespace) -> int:
    config = check_auth(build_config(args), args.host, os.environ)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray import serve

    from jobs.serve.app import build_application

    ray.init(address=args.address, include_dashboard=False)
    # After ray.init, SIGTERM went through Ray's C++ failure-signal handler, which aborted the process (exit 134)
    # a few seconds into the shutdown below and left Ray processes behind; now it stops the server as Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        # The proxy's own timeout backs up the ingress's 504, a little later so the JSON answer wins.
        serve.start(http_options={"host": args.host, "port": args.port,
                                  "request_timeout_s": config.request_timeout_s + 30})
        serve.run(build_application(config), name=args.app_name, route_prefix="/")
        base = f"http://{args.host}:{args.port}"
        print(f"serving {config.model_id} at {base}/v1/images/generations (docs {base}/docs); Ctrl-C or SIGTERM "
              "stops", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a repeated SIGTERM must not cut the shutdown short
        serve.shutdown()
        ray.shutdown()
    return 0
