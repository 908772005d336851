"""The paper's recipe as configs: each loads through the schema, prints through --print-config with the
documented values, and every value in the file says where it comes from."""

import re
from pathlib import Path

import pytest

from llm4gen.cli import train
from llm4gen.configs.schema import load_config

ROOT = Path(__file__).resolve().parents[2]
PAPER_CONFIGS = {
    "configs/llm4gen_sd15.yaml": {"model.unet_training": "full", "model.base.dtype": "float32", "model.optim.lr": 1e-5},
    "configs/llm4gen_sd15_adapter_only.yaml": {"model.unet_training": "frozen", "model.base.dtype": "bfloat16",
                                               "model.optim.lr": 1e-4},
}
RELEASE_VALUES = {  # what the release fixes, the same in both
    "model.llm.pretrained": "kalpeshk2011/rankgen-t5-xl-all", "model.llm.tokenizer": "google/t5-v1_1-xl",
    "model.llm.kind": "encoder-decoder", "model.llm.max_length": 256, "model.llm.prefix": "pre ",
    "model.llm.zero_padding": False, "model.adapter.num_heads": 8, "model.adapter.num_blocks": 1,
    "model.adapter.llm_scale": 1.0, "data.resolution": 512,
    "model.adapter.use_llm_mask": True,  # ours: LLM padding out of every attention (configs/sd15_t5xl.yaml: the release's)
}
SOURCE = re.compile(r"#.*\[(paper|release|ours)\]")


@pytest.mark.parametrize("path", sorted(PAPER_CONFIGS))
def test_paper_config_loads_with_the_documented_values(path, capsys):
    from omegaconf import OmegaConf

    cfg = load_config(ROOT / path)
    for key, value in {**RELEASE_VALUES, **PAPER_CONFIGS[path]}.items():
        assert OmegaConf.select(cfg, key) == value, key
    assert cfg.model.objective.lambda_entity > 0  # the entity loss is part of the method
    assert train.main(["--config", str(ROOT / path), "--print-config"]) == 0
    printed = OmegaConf.create(capsys.readouterr().out)
    assert printed == cfg


@pytest.mark.parametrize("path", sorted(PAPER_CONFIGS))
def test_every_value_says_where_it_comes_from(path):
    """Each `key: value` line (and each list opened by a key) carries [paper], [release] or [ours]."""
    unsourced = []
    for number, line in enumerate((ROOT / path).read_text().splitlines(), 1):
        stripped = line.split("#", 1)[0].strip()
        if not stripped or stripped.startswith("- "):
            continue  # comments, blank lines, items of a list whose key line is checked
        key, _, value = stripped.partition(":")
        is_section = not value.strip() and not SOURCE.search(line)
        next_lines = (ROOT / path).read_text().splitlines()[number:number + 1]
        opens_list = bool(next_lines) and next_lines[0].strip().startswith("- ")
        if is_section and not opens_list:
            continue  # a section header (model:, base:) holds no value
        if not SOURCE.search(line):
            unsourced.append(f"{path}:{number}: {line.strip()}")
    assert not unsourced, "values without a [paper]/[release]/[ours] source:\n" + "\n".join(unsourced)
