"""bench/connectors.py: every kind builds at full size on the meta device, with the CAM at the release's size."""

import importlib.util
from pathlib import Path

import pytest

from llm4gen.adapters.cross_adapter import released_parameter_count

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "connectors.py"


@pytest.mark.slow
def test_the_connector_table_counts_every_kind_at_full_size(capsys):
    spec = importlib.util.spec_from_file_location("connectors_bench", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    tables = bench.main(["--llm-tokens", "16", "--resolution", "256"])
    rows = {row["kind"]: row for row in tables["connectors"]}
    assert set(rows) == {"cam", "mlp", "lavi_bridge", "ella"}
    assert rows["cam"]["params"] == released_parameter_count(768, 2048)  # 8.66 M, the released CAM
    assert {kind: row["context"] for kind, row in rows.items()} == {"cam": 77 + 16, "mlp": 77 + 16, "lavi_bridge": 16,
                                                                    "ella": 64}
    assert all(row["tflops_lora"] > row["tflops_frozen"] > 0 for row in rows.values())
    assert "| ella |" in capsys.readouterr().out
    # the shipped configs with their own LLMs, built on meta: Llama-2-7B's stack is 6.61 B parameters, and its
    # forward over 77 tokens is about 2 FLOPs per parameter and token
    configs = {row["config"]: row for row in tables["configs"]}
    llama = configs["lavi_bridge_sd15.yaml"]
    assert llama["llm_params"] == 6_607_343_616 and llama["tokens"] == 77
    assert llama["llm_tflops"] == pytest.approx(2 * 6.607e9 * 77 / 1e12, rel=0.03)
    assert configs["ella_sd15.yaml"]["llm_params"] == configs["sd15_t5xl.yaml"]["llm_params"]  # both T5-XL encoders
    assert configs["ella_sd15.yaml"]["trained"] == rows["ella"]["params"]
