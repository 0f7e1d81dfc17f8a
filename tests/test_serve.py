"""The Ray Serve endpoint for real: Serve on 127.0.0.1 on a free port, the tiny model on CPU, HTTP calls.

One Ray instance and one application serve the whole module (starting them dominates the run time). The
application has small queues, a short request timeout, a bearer token and the tiny HPS scorer, so every
limit can be hit quickly.
"""

import base64
import io
import json
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
import yaml
from loopback import free_port

from jobs.serve.config import ServeConfig

REPO = Path(__file__).resolve().parents[1]
HPS_TINY = REPO / "tests" / "fixtures" / "hps-tiny"
API_KEY = "test-key-4f2a"
KEY_ENV = "MASKRAY_TEST_SERVE_API_KEY"  # not MASKRAY_API_KEY: other tests' servers must stay open
APP = "maskray-test"
SMALL = {"size": "32x32", "steps": 4}  # tiny model: 4x4 tokens after the down block, a few ms per step
MAX_BODY = 65536  # the app's max_request_bytes: small, so over-limit bodies are quick to send
MAX_EDIT_BODY = 262144  # its max_edit_request_bytes: room for small images, little to send over it



@pytest.fixture(scope="module")
def server():
    """Base URL of a running app (ingress -> generator + scorer) on loopback; torn down after the module."""
    os.environ[KEY_ENV] = API_KEY  # before ray.init: the replicas inherit the driver's environment
    import ray
    from ray import serve

    from jobs.serve.app import build_app

    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        scorer = {"name": "hps-v2", "checkpoint": str(HPS_TINY / "hps_tiny_checkpoint.pt"),
                  "model": str(HPS_TINY / "model_config.json"), "device": "cpu"}
        serve.run(build_app({"model": "tiny-meissonic", "scorer": scorer, "max_batch_size": 4,
                             "batch_wait_timeout_s": 0.3, "max_ongoing_requests": 4, "max_queued_requests": 6,
                             "request_timeout_s": 10, "retry_after_s": 3, "api_key_env": KEY_ENV,
                             "max_request_bytes": MAX_BODY, "max_edit_request_bytes": MAX_EDIT_BODY}),
                  name=APP, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        os.environ.pop(KEY_ENV, None)


def _post(url: str, body: dict, key: str | None = API_KEY) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(f"{url}/v1/images/generations", json=body, headers=headers, timeout=60)


def _stats() -> dict:
    from ray import serve

    return serve.get_deployment_handle("ImageGenerator", app_name=APP).stats.remote().result()


def test_openai_client_gets_decodable_pngs_with_scores(server):
    from openai import OpenAI
    from PIL import Image

    from actors.scoring.registry import ScorerConfig, build_scorer_from_config

    client = OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)
    result = client.images.generate(model="tiny-meissonic", prompt="a red circle", n=2, size="32x32",
                                    response_format="b64_json", extra_body={"seed": 11, "steps": 4})
    assert result.size == "32x32" and result.output_format == "png"
    images = [Image.open(io.BytesIO(base64.b64decode(item.b64_json))) for item in result.data]
    assert [(image.format, image.size, image.mode) for image in images] == [("PNG", (32, 32), "RGB")] * 2
    assert [item.model_extra["seed"] for item in result.data] == [11, 12]
    assert result.model_extra["scorer"] == "hps-v2"
    local = build_scorer_from_config(ScorerConfig(name="hps-v2", checkpoint=str(HPS_TINY / "hps_tiny_checkpoint.pt"),
                                                  model=str(HPS_TINY / "model_config.json"), device="cpu"))
    expected = local.score(images, ["a red circle"] * 2)
    assert [item.model_extra["score"] for item in result.data] == pytest.approx(expected, abs=1e-5)
    assert [card.id for card in client.models.list().data] == ["tiny-meissonic"]


def test_same_seed_same_bytes(server):
    body = {"prompt": "a green triangle", "seed": 5, **SMALL}
    first, second = _post(server, body).json(), _post(server, body).json()
    other = _post(server, {**body, "seed": 6}).json()
    assert first["data"][0]["b64_json"] == second["data"][0]["b64_json"]
    assert first["data"][0]["b64_json"] != other["data"][0]["b64_json"]


def test_concurrent_batched_requests_equal_sequential_ones(server):
    bodies = [
        {"prompt": "a red circle", "seed": 1, **SMALL},
        {"prompt": "a blue square", "seed": 2, "n": 2, "negative_prompt": "blurry", **SMALL},
        {"prompt": "a cat", "seed": 3, "guidance": 3.0, "sampler": {"mask_schedule": "linear"}, **SMALL},
        {"prompt": "a dog", "seed": 4, "guidance": 3.0, "sampler": {"mask_schedule": "linear"}, **SMALL},
    ]
    before = _stats()
    with ThreadPoolExecutor(len(bodies)) as pool:
        concurrent = list(pool.map(lambda body: _post(server, body), bodies))
    during = _stats()
    sequential = [_post(server, body) for body in bodies]
    assert [r.status_code for r in concurrent + sequential] == [200] * 8
    # 5 images in 2 settings groups: batching must have put several requests' images into one batch
    assert during["images"] - before["images"] == 5
    assert during["batches"] - before["batches"] < 4
    assert during["generate_calls"] - before["generate_calls"] < 5
    for together, alone in zip(concurrent, sequential):
        assert [d["b64_json"] for d in together.json()["data"]] == [d["b64_json"] for d in alone.json()["data"]]


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": 11}, "n"),
    ({"prompt": "x" * 2001}, "prompt"),
    ({"prompt": "x", "size": "large"}, "size"),
    ({"prompt": "x", "size": "4096x4096"}, "size"),
    ({"prompt": "x", "size": "36x32"}, "size"),  # the tiny model needs multiples of 8
    ({"prompt": "x", "response_format": "url"}, "response_format"),
    ({"prompt": "x", "steps": 0}, "steps"),
    ({"prompt": "x", "sampler": "no-such-sampler"}, "sampler"),
    ({"prompt": "x", "sampler": {"mask_schedule": "square"}}, "sampler.mask_schedule"),
    ({"prompt": "x", "quality": "hd"}, "quality"),
    ({"n": 1}, "prompt"),
])
def test_invalid_bodies_get_422_naming_the_field(server, body, param):
    response = _post(server, body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == param and param.split(".")[0] in error["message"]


def test_unknown_model_and_non_json_body(server):
    response = _post(server, {"prompt": "x", "model": "dall-e-3"})
    assert response.status_code == 404 and response.json()["error"]["param"] == "model"
    raw = requests.post(f"{server}/v1/images/generations", data="not json", timeout=10,
                        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert raw.status_code == 422 and "error" in raw.json()


def test_auth_is_enforced(server):
    assert _post(server, {"prompt": "x", **SMALL}, key=None).status_code == 401
    wrong = _post(server, {"prompt": "x", **SMALL}, key="wrong")
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert requests.get(f"{server}/v1/models", timeout=10).status_code == 401
    assert requests.get(f"{server}/healthz", timeout=10).status_code == 200
    assert "/v1/images/generations" in requests.get(f"{server}/openapi.json", timeout=10).json()["paths"]


def _status_of_unsent_body(url: str, headers: dict[str, str]) -> int:
    """Status of a POST whose headers announce a 60 MB body that is never sent: an answer within the socket's
    timeout means the server decided without reading the body."""
    address = urlsplit(url)
    lines = ["POST /v1/images/generations HTTP/1.1", f"Host: {address.netloc}", "Content-Type: application/json",
             "Content-Length: 60000000", *(f"{name}: {value}" for name, value in headers.items())]
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        status_line = sock.makefile("rb").readline()
    return int(status_line.split()[1])


def test_key_is_checked_and_body_capped_before_the_body_is_read(server):
    assert _status_of_unsent_body(server, {}) == 401
    assert _status_of_unsent_body(server, {"Authorization": "Bearer wrong"}) == 401
    assert _status_of_unsent_body(server, {"Authorization": f"Bearer {API_KEY}"}) == 413
    # no Content-Length: a chunked body is counted as it arrives and refused once past the cap
    chunks = (b"x" * 16384 for _ in range(2 * MAX_BODY // 16384))
    response = requests.post(f"{server}/v1/images/generations", data=chunks, timeout=30,
                             headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    assert str(MAX_BODY) in response.json()["error"]["message"]


def test_errors_quote_only_a_prefix_of_the_input(server):
    long_prompt = _post(server, {"prompt": "p" * 50_000, **SMALL})
    assert long_prompt.status_code == 422 and long_prompt.json()["error"]["param"] == "prompt"
    unknown_model = _post(server, {"prompt": "x", "model": "m" * 50_000, **SMALL})
    assert unknown_model.status_code == 404 and unknown_model.json()["error"]["param"] == "model"
    for response in (long_prompt, unknown_model):
        message = response.json()["error"]["message"]
        assert len(message) < 400 and "(50002 characters)" in message, message


def assert_openai_error(response: requests.Response, status: int) -> dict:
    """The ``error`` of ``response``, checked to be OpenAI's shape with ``status``."""
    assert response.status_code == status, response.text[:500]
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def echoes(message: str, value: str, longest: int = 80) -> bool:
    """True if ``message`` holds more than ``longest`` consecutive characters of ``value``."""
    return any(value[i:i + longest + 1] in message for i in range(len(value) - longest))


@pytest.mark.parametrize("field, value", [
    ("size", "9" * 60_000),
    ("size", "64x" + "6 " * 30_000),
    ("sampler", "z" * 60_000),
    ("sampler", "zsampling:" + "zsampling.num_steps=1 " * 2_000),
    ("sampler", "noise:noise.amplitude=" + "1" * 900),
    ("sampler", {"zsampling": {"num_steps": int("9" * 1000)}}),
    ("k" * 60_000, 1),
])
def test_errors_quote_at_most_80_characters_of_any_input(server, field, value):
    response = _post(server, {"prompt": "x", **SMALL, field: value})
    error = assert_openai_error(response, 422)
    text = value if isinstance(value, str) else json.dumps(value)
    assert len(response.content) < 1500 and not echoes(response.text, text) and not echoes(response.text, field)
    assert error["param"] is None or error["param"].startswith(field[:80])  # None: the engine refused the sampler


def test_unknown_routes_and_methods_get_openai_errors(server):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    missing = assert_openai_error(requests.get(f"{server}/v1/nowhere/" + "x" * 5000, headers=headers, timeout=10), 404)
    assert missing["code"] == "not_found" and "/v1/images/generations" in missing["message"]
    assert not echoes(missing["message"], "x" * 5000)
    wrong_method = requests.get(f"{server}/v1/images/generations", headers=headers, timeout=10)
    error = assert_openai_error(wrong_method, 405)
    assert error["code"] == "method_not_allowed" and "POST" in error["message"]
    assert wrong_method.headers["Allow"] == "POST"


def test_settings_the_engine_refuses_get_a_json_422(server):
    from openai import OpenAI, UnprocessableEntityError

    client = OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(UnprocessableEntityError) as refused:  # zigzag on 50 steps of a 4-step generation
        client.images.generate(prompt="x", size="32x32", response_format="b64_json",
                               extra_body={"steps": 4, "sampler": "zsampling:zsampling.num_steps=50"})
    error = refused.value.response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert "zsampling.num_steps=50" in error["message"] and "Traceback" not in error["message"]
    assert _post(server, {"prompt": "x", "sampler": "zsampling", **SMALL}).status_code == 200


def test_compute_budget_refuses_costly_requests_naming_the_limit(server):
    from openai import OpenAI, UnprocessableEntityError

    client = OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(UnprocessableEntityError) as refused:
        client.images.generate(prompt="x", n=10, size="2048x2048", response_format="b64_json",
                               extra_body={"steps": 256})
    error = refused.value.response.json()["error"]
    assert error["code"] == "over_budget"
    assert "max_pixel_steps" in error["message"] and f"{10 * 2048 * 2048 * 256:,}" in error["message"]
    # the default still allows n=10 at the tiny model's default size and steps, and Meissonic's README request
    budget = ServeConfig().max_pixel_steps
    assert 10 * 64 * 64 * 16 <= budget and 4 * 1024 * 1024 * 64 <= budget
    assert _post(server, {"prompt": "x", "n": 10, "size": "64x64", "steps": 16}).status_code == 200


def test_the_budget_counts_model_calls_of_the_sampler_asked_for(server):
    # 3 x 2048 x 2048 x 8 steps is within the budget, but Masked Z-Sampling makes 3T-2 = 22 calls of 8 steps
    response = _post(server, {"prompt": "x", "n": 3, "size": "2048x2048", "steps": 8, "sampler": "zsampling"})
    error = assert_openai_error(response, 422)
    assert 3 * 2048 * 2048 * 8 <= ServeConfig().max_pixel_steps < 3 * 2048 * 2048 * 22
    assert error["code"] == "over_budget" and f"3 x 2048 x 2048 x 22 = {3 * 2048 * 2048 * 22:,}" in error["message"]


@pytest.mark.parametrize("sampler, strength, calls", [
    ("vanilla", None, 8),
    ("zsampling", None, 22),  # T + 2 lambda, lambda = T - 1
    ("zsampling:zsampling.num_steps=3", None, 14),
    ("zsampling+noise", 0.5, 10),  # steps 4..7 run, zigzag on 4..6
    ("zsampling:zsampling.num_steps=3", 0.75, 8),  # steps 2..7 run, zigzag on 2 only
])
def test_model_calls_are_the_nfe_the_engine_counts(tiny_meissonic, one_torch_thread, sampler, strength, calls):
    from PIL import Image

    from jobs.serve.budget import model_calls
    from mgt.config import GenerationSettings
    from mgt.editing import Edit

    settings = GenerationSettings(steps=8, width=32, height=32, sampler=sampler)
    edit = None if strength is None else Edit(Image.new("RGB", (32, 32), (90, 20, 200)), None, strength)
    output = settings.generate(tiny_meissonic, ["a red circle"], [0], edits=None if edit is None else [edit])
    start_step = 0 if edit is None else edit.start_step(settings.steps)
    assert model_calls(settings, start_step) == output.nfe == calls


def test_burst_beyond_the_queue_gets_429_not_500_and_server_recovers(server):
    body = {"prompt": "burst", "seed": 0, "size": "64x64", "steps": 8}
    # 4 held + 6 queued; Serve may turn away a few more than that when requests arrive together
    with ThreadPoolExecutor(24) as pool:
        responses = list(pool.map(lambda i: _post(server, {**body, "seed": i}), range(24)))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429} and codes.count(429) >= 1 and codes.count(200) >= 1, codes
    rejected = next(r for r in responses if r.status_code == 429)
    assert rejected.headers["Retry-After"] == "3"
    assert rejected.json()["error"]["code"] == "queue_full"
    assert requests.get(f"{server}/healthz", timeout=10).json()["status"] == "ok"
    assert _post(server, {"prompt": "after the burst", **SMALL}).status_code == 200


def test_timeout_gives_504_and_frees_the_generator(server):
    before = _stats()
    started = time.perf_counter()
    # 512x512 x 256 steps takes minutes on this CPU (~0.3-1 s a step), far past the 10 s request_timeout_s
    response = _post(server, {"prompt": "slow", "size": "512x512", "steps": 256, "guidance": 9.0})
    assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
    assert time.perf_counter() - started < 30
    # the abandoned generate call stops at its next step, so the next request is not stuck behind it
    started = time.perf_counter()
    assert _post(server, {"prompt": "quick", **SMALL}).status_code == 200
    assert time.perf_counter() - started < 8
    assert _stats()["cancelled_calls"] == before["cancelled_calls"] + 1


def test_serve_config_yaml_validates_against_ray_schema():
    from ray.serve.schema import ServeDeploySchema

    from jobs.serve import app as app_module

    document = yaml.safe_load((REPO / "infra" / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(document)
    (application,) = schema.applications
    module, _, attribute = application.import_path.partition(":")
    assert module == app_module.__name__ and getattr(app_module, attribute) is app_module.build_app
    config = app_module.parse_config(application.args)
    assert config.scorer is not None and config.model.device == "cuda"
    assert document["http_options"]["host"] == "0.0.0.0" and not config.allow_unauthenticated  # a key is required
    names = {deployment.name for deployment in application.deployments}
    assert names == {"ImagesAPI", "ImageGenerator", "ImageScorer"}
    generator = next(d for d in application.deployments if d.name == "ImageGenerator")
    assert generator.ray_actor_options.num_gpus == 1 and generator.max_queued_requests > 0


def test_serve_args_errors_name_the_key():
    from jobs.serve.app import parse_config

    with pytest.raises(ValueError, match=r"max_batch_size.*got '0'"):
        parse_config({"max_batch_size": "0"})
    with pytest.raises(ValueError, match="min_replicas"):
        parse_config({"min_replicas": 3, "max_replicas": 2})
    assert parse_config({"model": "tiny-amused", "max_batch_size": "2"}).model.model == "tiny-amused"


def test_serve_command_flags_and_config_file(tmp_path):
    import argparse

    from jobs import cli, serve_cmd

    assert cli.COMMANDS["serve"][0] == "jobs.serve_cmd"
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({"model": {"model": "tiny-amused", "dtype": "fp32"}, "max_batch_size": 2,
                                    "max_queued_requests": 5}))
    parser = argparse.ArgumentParser()
    serve_cmd.add_arguments(parser)
    args = parser.parse_args(["--config", str(path), "--max-batch-size", "6", "--port", "8123",
                              "--scorer", json.dumps({"name": "hps-v2", "checkpoint": "/x.pt"})])
    config = serve_cmd.build_config(args)
    assert isinstance(config, ServeConfig) and config.model.model == "tiny-amused"
    assert (config.max_batch_size, config.max_queued_requests) == (6, 5)
    assert config.scorer.name == "hps-v2" and config.scorer.checkpoint == "/x.pt"
    with pytest.raises(ValueError, match="--max-batch-size"):
        serve_cmd.build_config(parser.parse_args(["--max-batch-size", "0"]))


def test_autoscaling_and_shutdown_fields_reach_the_generator_deployment():
    import argparse

    from ray.serve._private.build_app import build_app as build_deployments  # what serve.run builds

    from jobs import serve_cmd
    from jobs.serve.app import build_application

    parser = argparse.ArgumentParser()
    serve_cmd.add_arguments(parser)
    config = serve_cmd.build_config(parser.parse_args(
        ["--min-replicas", "1", "--max-replicas", "3", "--target-ongoing-requests", "2", "--upscale-delay-s", "3",
         "--downscale-delay-s", "15", "--look-back-period-s", "12", "--graceful-shutdown-timeout-s", "40"]))
    built = build_deployments(build_application(config), name="x")
    generator = next(d for d in built.deployments if d.name == "ImageGenerator")
    scaling = generator._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (1, 3, 2)
    assert (scaling.upscale_delay_s, scaling.downscale_delay_s, scaling.look_back_period_s) == (3, 15, 12)
    assert generator._deployment_config.graceful_shutdown_timeout_s == 40
    default = next(d for d in build_deployments(build_application(ServeConfig()), name="y").deployments
                   if d.name == "ImageGenerator")._deployment_config  # unset, the fields are Serve's defaults
    assert (default.autoscaling_config.upscale_delay_s, default.autoscaling_config.downscale_delay_s,
            default.graceful_shutdown_timeout_s) == (30, 600, 20)


def test_front_door_without_a_generator_answers_503_with_retry_after(server):
    """A generator that cannot be placed (it asks for a GPU this cluster lacks, as one waiting for a GPU node from
    the autoscaler does) leaves the front door up: it answers 503 + Retry-After in OpenAI's shape, never hangs."""
    from ray import serve
    from ray.serve.api import RunTarget

    from jobs.serve.app import build_app

    app = build_app({"model": "tiny-meissonic", "num_gpus": 1, "startup_wait_s": 1, "retry_after_s": 7,
                     "graceful_shutdown_timeout_s": 1,  # the unplaced replica is stopped at once on delete
                     "api_key_env": KEY_ENV})
    serve.run_many([RunTarget(app, name="maskray-cold", route_prefix="/cold")], wait_for_applications_running=False)
    try:
        deadline = time.time() + 60
        while serve.status().applications["maskray-cold"].deployments.get("ImagesAPI") is None or \
                serve.status().applications["maskray-cold"].deployments["ImagesAPI"].status != "HEALTHY":
            assert time.time() < deadline, "the cold app's front door did not come up within 60 s"
            time.sleep(0.5)
        started = time.perf_counter()
        response = _post(f"{server}/cold", {"prompt": "a red circle", **SMALL})
        assert 1 <= time.perf_counter() - started < 10  # it waited startup_wait_s for a replica, then answered
        assert response.status_code == 503 and response.headers["Retry-After"] == "7"
        error = response.json()["error"]
        assert error["code"] == "model_starting" and error["type"] == "service_unavailable"
        assert "startup_wait_s=1" in error["message"]
        models = requests.get(f"{server}/cold/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
        assert models.status_code == 503 and models.headers["Retry-After"] == "7"
    finally:
        serve.delete("maskray-cold")


def _serve_load():
    """tests/benchmarks/serve_load.py as a module (benchmarks are scripts, not a package)."""
    import importlib.util
    import sys

    if "serve_load" not in sys.modules:
        spec = importlib.util.spec_from_file_location("serve_load", REPO / "tests" / "benchmarks" / "serve_load.py")
        sys.modules["serve_load"] = importlib.util.module_from_spec(spec)  # dataclasses look their module up there
        spec.loader.exec_module(sys.modules["serve_load"])
    return sys.modules["serve_load"]


def test_load_summary_counts_refusals_errors_and_lost_requests():
    load = _serve_load()
    outcomes = [load.Outcome("load", float(i), 0.1 * (i + 1), 200) for i in range(10)]
    outcomes += [load.Outcome("load", 1, 0.01, 429, "1"), load.Outcome("load", 2, 0.01, 429, None),
                 load.Outcome("load", 3, 0.01, 503, "5"), load.Outcome("load", 4, 0.2, 500),
                 load.Outcome("load", 5, 60, None), load.Outcome("quiet", 6, 0.3, 200)]
    row = load.summarize(outcomes, "load", seconds=5)
    assert (row["requests"], row["ok"], row["images_per_s"]) == (15, 10, 2)
    assert (row["p50_ms"], row["p95_ms"], row["p99_ms"]) == (550, 955, 991)  # of the 200s only
    assert (row["429"], row["503"], row["refused_with_retry_after"]) == (2, 1, 2)
    assert row["share_429"] == pytest.approx(2 / 15) and (row["5xx_other"], row["lost"]) == (1, 1)
    assert load.summarize(outcomes, "quiet", seconds=1)["p99_ms"] == 300
    text = load.table([row])
    assert "| load " in text and "2 (13.3%)" in text and "2/3" in text
    samples = [{"t_s": 0, "running": 1}, {"t_s": 1.5, "running": 2}]  # a sample applies from its time on
    assert load.by_replicas(outcomes, samples, "load") == {1: {"requests": 3, "429": 1}, 2: {"requests": 12, "429": 1}}


def test_load_clients_against_the_server_answer_every_request(server):
    """serve_load.py's core, briefly: 2 openai clients for 3 s and the replica sampler, on this module's app."""
    load = _serve_load()
    start = time.monotonic()
    sampler = load.ReplicaSampler(start, app=APP, period_s=0.5)
    sampler.start()
    clients = load.Clients(server, start, {"size": "32x32", "extra": {"steps": 4}}, timeout_s=30, api_key=API_KEY)
    clients.run_phase("load", clients=2, seconds=3)
    clients.finish()
    sampler.stopped.set()
    sampler.join(5)
    row = load.summarize(clients.outcomes, "load", seconds=3)
    assert row["requests"] >= 4 and row["ok"] + row["429"] == row["requests"], row
    assert row["lost"] == row["5xx_other"] == 0 and row["p50_ms"] > 0
    assert len(sampler.samples) >= 3 and all(s["running"] == 1 for s in sampler.samples)
