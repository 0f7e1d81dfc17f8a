"""The Serve endpoint on the MaskGIT family: the class is the prompt, edits run on its token grid, and a prompt that
is no class (or a negative prompt) gets a 422 naming the fix. One Ray instance and app for the module."""

import base64
import io

import numpy as np
import pytest
import requests
from loopback import free_port
from PIL import Image


@pytest.fixture(scope="module")
def server():
    import ray
    from ray import serve

    from jobs.serve.app import build_app

    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"model": "tiny-maskgit", "max_batch_size": 2, "request_timeout_s": 60,
                             "allow_unauthenticated": True}),
                  name="maskray-maskgit-test", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _decoded(item: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))))


def test_generations_take_the_class_as_the_prompt(server):
    body = {"prompt": "golden retriever", "n": 2, "seed": 3, "response_format": "b64_json"}
    response = requests.post(f"{server}/v1/images/generations", json=body, timeout=120)
    assert response.status_code == 200, response.text
    images = [_decoded(item) for item in response.json()["data"]]
    assert images[0].shape == (64, 64, 3) and not np.array_equal(images[0], images[1])
    same = requests.post(f"{server}/v1/images/generations", json={**body, "prompt": "207"}, timeout=120)
    assert [_decoded(item) for item in same.json()["data"]][0].tobytes() == images[0].tobytes()


@pytest.mark.parametrize("body, message", [({"prompt": "golden retreiver"}, "closest: 'golden retriever'"),
                                           ({"prompt": "tench", "negative_prompt": "blurry"}, "takes none")])
def test_a_prompt_that_is_no_class_gets_a_422(server, body, message):
    response = requests.post(f"{server}/v1/images/generations", json=body, timeout=120)
    assert response.status_code == 422 and message in response.json()["error"]["message"], response.text


def test_edits_inpaint_on_the_token_grid(server):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 16, 48, 48))  # transparent = redraw (the Images API's convention)
    response = requests.post(f"{server}/v1/images/edits", timeout=120,
                             files={"image": ("init.png", _png(image), "image/png"),
                                    "mask": ("mask.png", _png(mask), "image/png")},
                             data={"prompt": "tench", "seed": "1", "response_format": "b64_json"})
    assert response.status_code == 200, response.text
    assert _decoded(response.json()["data"][0]).shape == (64, 64, 3)
