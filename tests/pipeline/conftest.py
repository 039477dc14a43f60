"""A tiny random pipeline in the release layout, shared by the pipeline tests of one module."""

import pytest

from motif_video import MotifVideoPipeline
from motif_video.testing import save_tiny_pipeline


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "model", shift=15.0, guidance_scale=4.0)


@pytest.fixture(scope="module")
def pipe(model_dir):
    return MotifVideoPipeline.from_pretrained(model_dir, device="cpu")
