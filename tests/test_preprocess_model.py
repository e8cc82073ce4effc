"""edje_preprocess's model.py in-process, against transformers' SiglipImageProcessor."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from tests.images import bad_images, encode, good_images, noise
from tests.triton_stub import InferenceRequest, load_model

# Both sides decode with Pillow and resize with Pillow's bilinear filter; only float rounding
# of the normalisation may differ.
MAX_ABS_DIFF = 1e-5


@pytest.fixture(scope="module")
def preprocess(repo_dir):
    model, _ = load_model(repo_dir / "edje_preprocess")
    return model


def _request(*payloads: bytes) -> InferenceRequest:
    return InferenceRequest(IMAGE=np.array([[p] for p in payloads], dtype=object))


def _reference(tiny_source, payload: bytes) -> np.ndarray:
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(payload)))
    if image.mode.startswith("I;16"):
        return None  # transformers clips 16-bit input; ours rescales (checked separately)
    return tiny_source.image_processor()(images=image, return_tensors="np")["pixel_values"][0]


@pytest.mark.parametrize("name", sorted(good_images()))
def test_matches_siglip_image_processor(preprocess, tiny_source, name):
    payload = good_images()[name]
    (response,) = preprocess.execute([_request(payload)])
    assert not response.has_error(), response.error.message()
    pixels = response.output("PIXEL_VALUES")
    assert pixels.shape == (1, 3, 32, 32) and pixels.dtype == np.float32
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    reference = _reference(tiny_source, payload)
    if reference is not None:
        assert np.abs(pixels[0] - reference).max() <= MAX_ABS_DIFF


def test_exif_orientation_is_applied(preprocess):
    upright = noise(20, 40, seed=5)  # what a viewer shows for the rotated test image
    rotated = upright.transpose(Image.Transpose.ROTATE_90)
    exif = rotated.getexif()
    exif[0x0112] = 6
    a = preprocess.execute([_request(encode(rotated, "PNG", exif=exif))])[0].output("PIXEL_VALUES")
    b = preprocess.execute([_request(encode(upright))])[0].output("PIXEL_VALUES")
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_sixteen_bit_is_rescaled_not_clipped(preprocess):
    ramp = (np.linspace(0, 65535, 32 * 32).reshape(32, 32)).astype(np.uint16)
    pixels = preprocess.execute([_request(encode(Image.fromarray(ramp)))])[0]
    values = pixels.output("PIXEL_VALUES")[0, 0]
    assert values.min() < -0.95 and values.max() > 0.95  # full range, not saturated at 255
    assert np.all(np.diff(values.ravel()[:: 32 + 1]) >= 0)  # the ramp stays monotone


@pytest.mark.parametrize("name", sorted(bad_images()))
def test_bad_image_fails_only_its_request(preprocess, name):
    payload, fragment = bad_images()[name]
    good = good_images()["rgb_png"]
    responses = preprocess.execute([_request(good), _request(payload), _request(good, good)])
    assert [r.has_error() for r in responses] == [False, True, False]
    assert responses[1].error.code() == "INVALID_ARG"
    assert fragment in responses[1].error.message()
    assert responses[2].output("PIXEL_VALUES").shape == (2, 3, 32, 32)
    np.testing.assert_array_equal(
        responses[0].output("PIXEL_VALUES")[0], responses[2].output("PIXEL_VALUES")[1]
    )


def test_bad_item_in_a_multi_image_request_is_named(preprocess):
    good = good_images()["rgb_png"]
    (response,) = preprocess.execute([_request(good, b"", good)])
    assert response.error.code() == "INVALID_ARG"
    assert response.error.message().startswith("image 1 of 3: empty")


def test_pixel_limit_is_configurable(repo_dir):
    model, _ = load_model(repo_dir / "edje_preprocess", max_image_pixels="1000")
    (response,) = model.execute([_request(encode(noise(40, 30)))])
    assert "1200 pixels exceeds the limit of 1000" in response.error.message()


def test_parameters_are_typed_and_an_unfilled_one_takes_its_default(repo_dir):
    with pytest.raises(ValueError, match=r"edje_preprocess: parameter 'decode_threads' = 'x'"):
        load_model(repo_dir / "edje_preprocess", decode_threads="x")
    model, _ = load_model(repo_dir / "edje_preprocess", max_image_pixels="${max_image_pixels}")
    assert model.settings.max_pixels == 50_000_000
