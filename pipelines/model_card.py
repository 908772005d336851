"""The model card (``README.md``) of an exported pipeline folder, in the Hugging Face hub's format: YAML front
matter (``base_model``, ``library_name``, ``tags``, ``license``) and a page saying what was trained, on what,
how far, how it scored, and how to use it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import yaml

# Licences of the base models the configs name (the hub's licence ids); anything else is left for the owner.
KNOWN_LICENSES = {"stable-diffusion-v1-5/stable-diffusion-v1-5": "creativeml-openrail-m",
                  "runwayml/stable-diffusion-v1-5": "creativeml-openrail-m",
                  "stabilityai/stable-diffusion-xl-base-1.0": "openrail++"}
CONNECTOR_NAMES = {"cam": "LLM4GEN's Cross-Adapter Module", "mlp": "an MLP connector",
                   "lavi_bridge": "LaVi-Bridge's adapter", "ella": "ELLA's timestep-aware connector"}


def card_metadata(model: dict) -> dict[str, Any]:
    base = model["base"]["pretrained"]
    kind = model["adapter"].get("kind", "cam")
    return {"base_model": base, "library_name": "diffusers", "license": KNOWN_LICENSES.get(base, "other"),
            "tags": ["text-to-image", "stable-diffusion", "llm4gen", f"connector-{kind}"]}


def run_scores(run_dir: Optional[Path]) -> dict[str, float]:
    """The run's final metrics (train.py's final_metrics.json), when the export comes from a run folder."""
    if run_dir is None or not (run_dir / "final_metrics.json").is_file():
        return {}
    metrics = json.loads((run_dir / "final_metrics.json").read_text())
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def model_card(model: dict, steps: Optional[int], scores: dict[str, float], references: dict[str, str],
               bases: Optional[list[tuple[str, str]]] = None) -> str:
    """The card's text for a run's resolved ``model`` config section; ``bases``: (base, how it was checked) of each
    base the connector was checked with (default: the one it trained on)."""
    meta = card_metadata(model)
    kind = model["adapter"].get("kind", "cam")
    llm = model["llm"]
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
             f"# {CONNECTOR_NAMES.get(kind, kind)} on {meta['base_model']}", "",
             f"Trained with llm4gen (LLM4GEN, Liu, Ma et al., AAAI 2025): the base model's "
             f"CLIP conditioning{' enriched' if kind in ('cam', 'mlp') else ' replaced'} by the token features of a "
             f"frozen LLM through a trained connector.", "",
             f"- base model: `{meta['base_model']}`; UNet {model['unet_training']}",
             f"- LLM: `{llm['pretrained']}`, layer {llm['layer']}, {llm['max_length']} tokens, prefix {llm['prefix']!r}",
             f"- connector: `{kind}`" + (f", {steps} optimizer steps" if steps is not None else ""),
             f"- entity-guided loss weight: {model['objective']['lambda_entity']}"]
    if references:
        lines += ["- frozen parts not copied, loaded from: " + ", ".join(f"`{k}` = `{v}`" for k, v in references.items())]
    bases = bases or [(meta["base_model"], "trained on")]
    lines += ["", "## Bases checked with", "",
              "A connector conditions any base of its family whose shapes are those it trained on "
              "(llm4gen.pipelines.bases: `load_pipeline_on_base(folder, base)`, `generate.py --pipeline folder "
              "--base ...`); a base of another shape is refused before its weights load.", "",
              "| base | checked |", "|---|---|", *[f"| `{name}` | {how} |" for name, how in bases]]
    if scores:
        lines += ["", "## Scores of the run", "", "| metric | value |", "|---|---|",
                  *[f"| {k} | {v:.4g} |" for k, v in sorted(scores.items())]]
    lines += ["", "## Use", "", "```python", "import torch", "from llm4gen.pipelines import LLM4GenPipeline", "",
              'pipe = LLM4GenPipeline.from_pretrained("path/to/this/folder")',
              'image = pipe("a red circle and a blue square", generator=torch.Generator().manual_seed(0)).images[0]',
              "```", "", "## Training config (the model section)", "", "```yaml",
              yaml.safe_dump(model, sort_keys=False).strip(), "```", ""]
    return "\n".join(lines)


def read_card_metadata(path: Path) -> dict[str, Any]:
    """The YAML front matter of a card, as the hub reads it."""
    text = Path(path).read_text()
    if not text.startswith("---\n"):
        raise ValueError(f"{path} has no YAML front matter")
    return yaml.safe_load(text.split("---\n", 2)[1])
