import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the hub
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_model_config():
    """The embedded tiny default's model section, as a plain dict, over the random-weight tiny SD
    (embedded:tiny-sd): the tests' expectations (a near-uniform attention at initialisation, losses
    near 1) are those of random weights, not of the pretrained shapes base the default now uses."""
    from omegaconf import OmegaConf

    from llm4gen.configs.schema import load_config

    return OmegaConf.to_container(load_config(overrides=["model.base.pretrained=embedded:tiny-sd"]).model, resolve=True)
