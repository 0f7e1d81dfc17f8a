"""``POST /v1/images/edits`` for real: the module's own Serve app on 127.0.0.1 (test_serve's fixture), called with
the ``openai`` client's ``images.edit`` and with raw multipart bodies, and compared with the engine run directly.

The tiny Meissonic takes sizes in multiples of 8 pixels and its VQ scale divides 8, so a mask drawn on 8-pixel
cells falls on whole tokens.
"""

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image
from test_serve import API_KEY, MAX_EDIT_BODY, assert_openai_error, server  # noqa: F401  (the module's Serve app)

from jobs.serve.deployments import load_model
from mgt.config import GenerationSettings, ModelConfig
from mgt.editing import Edit, image_tokens


def picture(width: int = 32, height: int = 32) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width] / 31.0
    return Image.fromarray((np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x * y)], -1) * 255).round().astype(np.uint8))


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def openai_mask(size=(32, 32), hole=(8, 8, 24, 16)) -> Image.Image:
    """An OpenAI mask: opaque everywhere but the ``hole`` (left, top, right, bottom), which is fully transparent."""
    alpha = np.full(size[::-1], 255, np.uint8)
    left, top, right, bottom = hole
    alpha[top:bottom, left:right] = 0
    rgba = np.dstack([np.zeros((*size[::-1], 3), np.uint8), alpha])
    return Image.fromarray(rgba)  # 4 uint8 channels: RGBA


def decoded(item) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item.b64_json))))


@pytest.fixture(scope="module")
def client(server):  # noqa: F811
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def engine():
    """The server's model, loaded the way the generator replica loads it, on one thread as the replica runs."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the replica has num_cpus=1, so Ray gives it one torch thread
    yield load_model(ModelConfig(model="tiny-meissonic"))
    torch.set_num_threads(threads)


def expected(engine, prompt: str, seeds: list[int], edit: Edit, steps: int = 4):
    """The engine's direct output for the request the server was sent (its default guidance, vanilla sampler)."""
    settings = GenerationSettings(steps=steps, width=edit.image.width, height=edit.image.height,
                                  guidance=engine.defaults.guidance)
    return settings.generate(engine, [prompt] * len(seeds), seeds, negative_prompts=[None] * len(seeds),
                             edits=[edit] * len(seeds))


def test_inpainting_keeps_the_opaque_tokens_and_equals_the_engine(client, engine):
    result = client.images.edit(image=("init.png", png(picture()), "image/png"),
                                mask=("mask.png", png(openai_mask()), "image/png"), prompt="a red circle", n=2,
                                size="32x32", response_format="b64_json", extra_body={"seed": 7, "steps": 4})
    assert result.size == "32x32" and [item.model_extra["seed"] for item in result.data] == [7, 8]
    white = Image.fromarray(255 - np.asarray(openai_mask().getchannel("A")))  # transparent = redraw
    local = expected(engine, "a red circle", [7, 8], Edit(picture(), white))
    np.testing.assert_array_equal(np.stack([decoded(item) for item in result.data]), local.images)
    # the tokens under the hole are redrawn, every other token is the image's
    scale = engine.vae_scale_factor
    kept = np.asarray(openai_mask().getchannel("A"))[::scale, ::scale] > 0
    assert 0 < kept.sum() < kept.size
    source = image_tokens(engine.vqvae, [picture()])[0].numpy()
    for tokens in local.tokens.numpy():
        np.testing.assert_array_equal(tokens[kept], source[kept])
    assert not np.array_equal(local.tokens[0].numpy(), local.tokens[1].numpy())  # seeds 7 and 8 differ


def test_img2img_follows_strength_and_equals_the_engine(client, engine):
    image = picture(48, 32)
    outputs = {}
    for strength in (0.25, 1.0):
        result = client.images.edit(image=("init.png", png(image), "image/png"), prompt="a blue square",
                                    response_format="b64_json",
                                    extra_body={"seed": 3, "steps": 4, "strength": strength})
        assert result.size == "48x32"  # an edit keeps the image's size
        outputs[strength] = decoded(result.data[0])
        local = expected(engine, "a blue square", [3], Edit(image, strength=strength))
        np.testing.assert_array_equal(outputs[strength], local.images[0])
    assert not np.array_equal(outputs[0.25], outputs[1.0])


def _edit(url: str, files: dict, fields: dict, key: str | None = API_KEY) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(f"{url}/v1/images/edits", files=files, data=fields, headers=headers, timeout=60)


def _stats() -> dict:
    from ray import serve

    return serve.get_deployment_handle("ImageGenerator", app_name="maskray-test").stats.remote().result()


def test_edits_batch_with_other_requests_yet_equal_their_lone_runs(server):  # noqa: F811
    image, other = png(picture()), png(picture().transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    small = {"steps": "4", "size": "32x32"}
    calls = [
        ({"image": image, "mask": png(openai_mask())}, {"prompt": "a red circle", "seed": "1", "n": "2", **small}),
        ({"image": other}, {"prompt": "a cat", "seed": "1", "strength": "0.5", **small}),
        ({"image": image}, {"prompt": "a cat", "seed": "2", "strength": "0.75", **small}),
        ({}, {"prompt": "a dog", "seed": 5, "steps": 4, "size": "32x32"}),  # a generation of the same settings
    ]

    def run(call) -> list[str]:
        files, fields = call
        if not files:
            response = requests.post(f"{server}/v1/images/generations", json=fields, timeout=60,
                                     headers={"Authorization": f"Bearer {API_KEY}"})
        else:
            response = _edit(server, files, fields)
        assert response.status_code == 200, response.text
        return [item["b64_json"] for item in response.json()["data"]]

    before = _stats()
    with ThreadPoolExecutor(len(calls)) as pool:
        together = list(pool.map(run, calls))
    during = _stats()
    alone = [run(call) for call in calls]
    assert together == alone
    assert during["images"] - before["images"] == 5
    assert during["generate_calls"] - before["generate_calls"] < len(calls)  # requests shared generate calls


def sixteen_bit() -> bytes:
    return png(Image.fromarray(np.full((32, 32), 40000, np.uint16)))


@pytest.mark.parametrize("files, fields, param, words", [
    ({"image": b"not an image"}, {}, "image", "not an image"),
    ({"image": sixteen_bit()}, {}, "image", "16-bit or float"),
    ({"image": png(picture(36, 32))}, {}, "image", "multiples of 8"),
    ({"image": png(picture()), "mask": png(picture())}, {}, "mask", "no alpha channel"),
    ({"image": png(picture()), "mask": png(openai_mask((16, 16), (0, 0, 8, 8)))}, {}, "mask", "16x16"),
    ({"image": png(picture()), "mask": b"GIF89a"}, {}, "mask", "not an image"),
    ({"image": png(picture())}, {"size": "64x64"}, "size", "image's size 32x32"),
    ({"image": png(picture())}, {"strength": "0"}, "strength", "greater than 0"),
    ({"image": png(picture())}, {"strength": "0.1"}, "strength", "nothing would change"),
    ({"image": png(picture())}, {"quality": "hd"}, "quality", "Extra inputs"),
    ({}, {}, "image", "Field required"),
])
def test_bad_edits_get_422_naming_the_field(server, files, fields, param, words):  # noqa: F811
    response = _edit(server, files, {"prompt": "x", "steps": "4", **fields})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_openai_client_sees_422_401_and_413(server, client):  # noqa: F811
    from openai import APIStatusError, AuthenticationError, OpenAI, UnprocessableEntityError

    with pytest.raises(UnprocessableEntityError) as refused:
        client.images.edit(image=("init.png", png(picture()), "image/png"),
                           mask=("mask.png", png(picture()), "image/png"), prompt="x")
    assert refused.value.response.json()["error"]["param"] == "mask"
    stranger = OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(AuthenticationError):
        stranger.images.edit(image=("init.png", png(picture()), "image/png"), prompt="x")
    assert _edit(server, {"image": png(picture())}, {"prompt": "x"}, key=None).status_code == 401
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (320, 320, 3), np.uint8))
    too_big = png(noise)  # random pixels do not compress: ~300 kB
    assert len(too_big) > MAX_EDIT_BODY
    with pytest.raises(APIStatusError) as capped:
        client.images.edit(image=("big.png", too_big, "image/png"), prompt="x")
    error = capped.value.response.json()["error"]
    assert capped.value.status_code == 413 and error["code"] == "request_too_large"
    assert "max_edit_request_bytes" in error["message"] and str(MAX_EDIT_BODY) in error["message"]


def test_unreadable_forms_get_openai_errors(server):  # noqa: F811
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "multipart/form-data; boundary=xyz"}
    broken = requests.post(f"{server}/v1/images/edits", data=b"--xyz\r\nnot a part header", headers=headers,
                           timeout=30)
    error = assert_openai_error(broken, 400)
    assert error["code"] == "invalid_multipart" and "multipart" in error["message"]
    long_field = _edit(server, {"image": png(picture())}, {"prompt": "p" * (MAX_EDIT_BODY // 2)})
    error = assert_openai_error(long_field, 400)
    assert error["code"] == "invalid_multipart" and "KB" in error["message"]


def test_the_budget_counts_the_steps_an_edit_runs(client):
    from openai import UnprocessableEntityError

    flat = png(Image.new("RGB", (512, 512), (200, 30, 30)))  # a few hundred bytes
    with pytest.raises(UnprocessableEntityError) as refused:
        client.images.edit(image=("flat.png", flat, "image/png"), prompt="x", n=10,
                           extra_body={"steps": 256, "strength": 0.5})
    error = refused.value.response.json()["error"]
    assert error["code"] == "over_budget" and "max_pixel_steps" in error["message"]
    assert f"{10 * 512 * 512 * 128:,}" in error["message"]  # int(256 x 0.5) steps run, not 256


def test_the_route_is_documented(server):  # noqa: F811
    schema = requests.get(f"{server}/openapi.json", timeout=10).json()
    (form,) = schema["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"].items()
    assert form[0] == "multipart/form-data"
    fields = schema["components"]["schemas"][form[1]["schema"]["$ref"].split("/")[-1]]["properties"]
    assert fields["image"]["contentMediaType"] == "application/octet-stream"
    assert {"mask", "prompt", "n", "size", "seed", "sampler", "steps", "guidance", "strength"} <= set(fields)
