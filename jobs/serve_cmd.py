"""``maskray serve``: start Ray Serve with the OpenAI-compatible images endpoint and keep it up until stopped.

The model flags come from :class:`mgt.config.ModelConfig` and the serving flags from
:class:`jobs.serve.config.ServeConfig`, so ``--help`` shows the same defaults and text as the YAML keys.
Precedence: flag > ``--config`` file (the ServeConfig keys, ``model:`` as a mapping or a name) > default.

A non-loopback ``--host`` needs an API key (or ``--allow-unauthenticated``, warned about). On a cluster whose
Serve already runs, its proxy's live address is what serves: one other than ``--host``/``--port`` is refused unless
``--use-running-proxy`` is given, and then the key rule applies to that address. SIGTERM and Ctrl-C (SIGINT) delete
this command's application; Serve itself is shut down only if this command started it, so other applications of
a shared cluster keep running.
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
    server.add_argument("--app-name", default="maskray", help="Serve application name (deleted on exit).")
    server.add_argument("--use-running-proxy", action="store_true", help="On a cluster whose Serve proxy already "
                        "listens on another address than --host/--port, deploy onto it anyway (an API key is then "
                        "required unless that address is loopback).")
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


def proxy_url(live: Mapping) -> str:
    """The base URL of a proxy from its HTTP options (``host``, ``port``, ``root_path``, ``ssl_certfile``)."""
    scheme = "https" if live.get("ssl_certfile") else "http"
    return f"{scheme}://{live['host']}:{live['port']}{live.get('root_path') or ''}"


def check_running_proxy(host: str, port: int, live: Mapping, use_running_proxy: bool) -> str:
    """The host that will serve on a cluster whose Serve already runs with the HTTP options ``live``.

    ``serve.start`` keeps a running proxy's options whatever it is asked (Ray only logs "The new HTTP config is
    ignored"), so an endpoint asked for on loopback would answer on the live address, perhaps every interface.

    Raises:
        ValueError: the live proxy is not at ``host``:``port`` and ``use_running_proxy`` is off, or there is no
            proxy to deploy onto; the message names the live address.
    """
    if live["host"] is None:
        raise ValueError("this cluster's Serve runs no HTTP proxy (its http_options host is unset); start Serve with "
                         "one, or use another cluster")
    if (live["host"], live["port"]) == (host, port) or use_running_proxy:
        return live["host"]
    raise ValueError(f"this cluster's Serve proxy already listens on {proxy_url(live)}, not {host}:{port} as asked, "
                     "and a running proxy keeps its address; pass --host/--port of that address, or "
                     "--use-running-proxy to deploy onto it anyway (with an API key unless it is loopback)")


def running_http_options() -> dict | None:
    """The HTTP options of the Serve instance running on the connected cluster, or None if Serve is not running.

    Read from the Serve controller (``ServeControllerClient.http_config``, what ``serve.start`` compares new
    options against); Ray 2.60 has no public call for it, and ``serve.status()`` leaves it out.
    """
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    return None if client is None else client.http_config.model_dump()


def run(args: argparse.Namespace) -> int:
    requested = build_config(args)
    config = check_auth(requested, args.host, os.environ)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray import serve

    from jobs.serve.app import build_application

    # The replicas read the key from their own environment; on a cluster started elsewhere (`ray start`, KubeRay)
    # that is the node's, so this process's key travels in the job's runtime_env, which Serve gives the replicas.
    key = os.environ.get(config.api_key_env)
    ray.init(address=args.address, include_dashboard=False,
             runtime_env={"env_vars": {config.api_key_env: key}} if key else None)
    # After ray.init, SIGTERM went through Ray's C++ failure-signal handler, which aborted the process (exit 134)
    # a few seconds into the shutdown below and left Ray processes behind; now it stops the server as Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    started_serve = deployed = False
    try:
        live = running_http_options()
        if live is None:
            # The proxy's own timeout backs up the ingress's 504, a little later so the JSON answer wins.
            live = {"host": args.host, "port": args.port, "request_timeout_s": config.request_timeout_s + 30}
            serve.start(http_options=live)
            started_serve = True
        else:
            live_host = check_running_proxy(args.host, args.port, live, args.use_running_proxy)
            config = check_auth(requested, live_host, os.environ)
        deployed = True
        serve.run(build_application(config), name=args.app_name, route_prefix="/")
        base = proxy_url(live)
        print(f"serving {config.model_id} at {base}/v1/images/generations (docs {base}/docs); Ctrl-C or SIGTERM "
              "stops", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a repeated SIGTERM must not cut the shutdown short
        if started_serve:
            serve.shutdown()
        elif deployed:  # a shared Serve: its other applications stay
            serve.delete(args.app_name)
        ray.shutdown()
    return 0
