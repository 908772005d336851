"""What an evaluation samples from: a training checkpoint, an exported adapter folder on a base model,
or the base model alone (the baseline), behind one ``generate(prompts, seeds)``.

The LLM4GEN paths reuse ``LLM4GenModule.generate`` (the function ``generate.py`` and the validation
grids call), so evaluated images are the images a user gets. The baseline is diffusers'
``StableDiffusionPipeline`` on the same base folder with the same scheduler, guidance and CPU seeds.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf

from llm4gen.configs.schema import as_plain, model_config
from llm4gen.encoders.sources import load_pretrained
from llm4gen.lightning_modules.checkpoint_files import is_sharded_checkpoint
from llm4gen.lightning_modules.llm4gen import LLM4GenModule, load_llm_lora
from llm4gen.lightning_modules.safe_loading import load_torch_file
from llm4gen.lightning_modules.sharding import consolidated_checkpoint
from llm4gen.pipelines.bases import check_export_base, check_model_base, load_pipeline_on_base, pipeline_on_base
from llm4gen.pipelines.llm4gen_pipeline import load_pipeline, pipeline_from_module
from llm4gen.pipelines.single_file import is_single_file

DEFAULT_BASE = "embedded:tiny-sd"


@dataclass
class SamplingSettings:
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    scheduler: str = "DDIMScheduler"
    negative_prompt: str = ""

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def load_checkpoint_module(checkpoint: str | Path, device: str = "cpu"):
    """An ``LLM4GenModule`` from a training checkpoint (frozen parts rebuilt from their sources); a sharded run's
    checkpoint folder is consolidated in this process first (lightning_modules/sharding.py). The file is read
    without running code (lightning_modules/safe_loading.py), then built as ``load_from_checkpoint`` builds it."""
    if is_sharded_checkpoint(checkpoint):
        contents = consolidated_checkpoint(checkpoint)
    elif not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {str(checkpoint)!r} is not a file; give a training checkpoint "
                                f"such as runs/tiny/checkpoints/last.ckpt")
    else:
        contents = load_torch_file(checkpoint, f"checkpoint {str(checkpoint)!r}")
    return module_from_checkpoint(contents).to(device)


def module_from_checkpoint(checkpoint: dict) -> LLM4GenModule:
    """What Lightning's ``load_from_checkpoint`` does with a checkpoint's contents (whose own ``torch.load`` this
    replaces): the module of its hyper-parameters, its ``on_load_checkpoint``, then its trained weights."""
    hyper = checkpoint["hyper_parameters"]
    module = LLM4GenModule(hyper["model"], **({"seed": hyper["seed"]} if "seed" in hyper else {}))
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])
    return module


def load_exported_module(export_dir: str | Path, base: str | None = None, device: str = "cpu"):
    """An ``LLM4GenModule`` from ``export_pretrained``'s folder (``model_config.yaml``, ``adapter/``, and
    ``unet/`` or ``unet_lora/`` when the UNet trained); ``base`` replaces the recorded base model."""
    export_dir = Path(export_dir)
    if not (export_dir / "model_config.yaml").is_file() or not (export_dir / "adapter").is_dir():
        raise FileNotFoundError(f"{str(export_dir)!r} is not an exported run: expected model_config.yaml and "
                                f"adapter/ in it (train.py writes them to <run>/export)")
    cfg = OmegaConf.load(export_dir / "model_config.yaml")
    if base:
        cfg.base.pretrained = base
    cfg.adapter.init_from = str(export_dir / "adapter")
    cfg.unet_training = "frozen"  # trained UNet weights are loaded below, from their own export
    cfg.ema.enabled = False
    cfg.objective.lambda_entity = 0.0
    module = LLM4GenModule(model_config(cfg, f"{export_dir / 'model_config.yaml'}")).to(device)
    if (export_dir / "unet").is_dir():
        from diffusers import UNet2DConditionModel

        module.unet = UNet2DConditionModel.from_pretrained(export_dir / "unet", use_safetensors=True).to(device).eval()
    elif (export_dir / "unet_lora").is_dir():
        module.pipeline().load_lora_weights(str(export_dir / "unet_lora"), use_safetensors=True)  # into module.unet, shared
    if (export_dir / "llm_lora").is_dir():  # the config built the LLM's LoRA layers; their trained weights
        load_llm_lora(module.llm.model, export_dir / "llm_lora")
    return module


@dataclass
class Sampler:
    """``generate(prompts, seeds) -> PIL images``; ``description`` goes into the run's record."""

    description: dict
    settings: SamplingSettings = field(default_factory=SamplingSettings)
    module: object = None
    pipeline: object = None
    use_ema: bool = True

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int]):
        s = self.settings
        with (self.module.ema_weights() if self.module is not None and self.use_ema else contextlib.nullcontext()):
            if self.pipeline is None:
                return self.module.generate(prompts, seeds, s.num_inference_steps, s.guidance_scale, s.scheduler,
                                            s.negative_prompt)
            generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
            return self.pipeline(prompt=list(prompts), negative_prompt=[s.negative_prompt] * len(prompts),
                                 num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale,
                                 generator=generators, output_type="pil").images


def initial_sampler(config: str | Path, settings: SamplingSettings | None = None, device: str = "cpu") -> Sampler:
    """A run at its initial weights (step 0), from its resolved ``config.yaml``: what trains starts from a function
    of the run's seed alone (LLM4GenModule), so this is exactly the model its first step trained."""
    cfg = OmegaConf.load(config)
    module = LLM4GenModule(model_config(cfg.model, str(config)), seed=int(cfg.seed)).to(device)
    return Sampler({"kind": "initial", "config": str(config)}, settings or SamplingSettings(), module=module,
                   use_ema=False)


def load_base_pipeline(base: str, scheduler: str, device: str = "cpu"):
    import diffusers


    pipe = load_pretrained(diffusers.StableDiffusionPipeline.from_pretrained, base, "--base",
                           safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_pipeline_folder(folder: str, scheduler: str, device: str = "cpu", base: str | None = None,
                         base_config: str | None = None):
    """An exported LLM4GenPipeline folder (export.py), with ``scheduler`` built from its own scheduler's config; on
    another ``base`` of its family when given (a folder or a single file read with ``base_config``'s configs)."""
    pipe = load_pipeline_on_base(folder, base, base_config) if base else load_pipeline(folder)
    return ready(pipe, scheduler, device)


def ready(pipe, scheduler: str, device: str):
    import diffusers

    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def check_another_base(base: str, base_config: str | None = None, checkpoint_model: dict | None = None,
                       pipeline: str | None = None, adapter: str | None = None) -> None:
    """``base`` checked against what the connector of a checkpoint (its ``model`` config), a pipeline folder or an
    export folder was trained on, before any weights load (pipelines/bases.py); raises BaseMismatch."""
    if pipeline:
        check_export_base(pipeline, base, base_config)
    elif checkpoint_model is not None:
        check_model_base(checkpoint_model, base, base_config)
    elif adapter:
        if is_single_file(base):
            raise ValueError(f"--adapter with a single-file --base {base!r}: export the run as a pipeline "
                             f"(export.py) and give --pipeline with --base")
        check_model_base(OmegaConf.to_container(OmegaConf.load(Path(adapter) / "model_config.yaml")), base,
                         base_config, unet_moves=False)  # a trained UNet of the export is loaded over the base


def describe(checkpoint: str | None = None, adapter: str | None = None, base: str | None = None,
             use_ema: bool = True, pipeline: str | None = None) -> dict:
    """What is sampled from, as recorded in the run's run.json."""
    on_base = {"base": base} if base else {}
    if pipeline:
        return {"kind": "pipeline", "pipeline": str(pipeline), **on_base}
    if checkpoint:
        return {"kind": "checkpoint", "checkpoint": str(checkpoint), "ema": use_ema, **on_base}
    if adapter:
        return {"kind": "adapter", "adapter": str(adapter), "base": base or "as exported"}
    return {"kind": "base", "base": base}


def load_sampler(checkpoint: str | None = None, adapter: str | None = None, base: str | None = None,
                 settings: SamplingSettings | None = None, device: str = "cpu", use_ema: bool = True,
                 pipeline: str | None = None, base_config: str | None = None) -> Sampler:
    """Exactly one of: ``checkpoint``; ``pipeline`` (an exported pipeline folder); ``adapter`` (an export folder);
    ``base`` alone (the baseline). With one of the first three, ``base`` is another base of the connector's family
    to sample on (checked first: :func:`check_another_base`); a single file reads ``base_config``'s configs.
    A pipeline is sampled as the base is: one CPU generator per prompt."""
    settings = settings or SamplingSettings()
    if sum(bool(x) for x in (checkpoint, adapter, pipeline)) > 1:
        raise ValueError("give one of --checkpoint, --pipeline or --adapter")
    if pipeline:
        return Sampler(describe(pipeline=pipeline, base=base), settings,
                       pipeline=load_pipeline_folder(pipeline, settings.scheduler, device, base, base_config))
    if checkpoint:
        module = load_checkpoint_module(checkpoint, device)
        if not base:
            return Sampler(describe(checkpoint, use_ema=use_ema), settings, module=module, use_ema=use_ema)
        check_model_base(as_plain(module.cfg), base, base_config)
        pipe = pipeline_on_base(pipeline_from_module(module), base, base_config or module.cfg.base.pretrained,
                                trained_name=module.cfg.base.pretrained)
        return Sampler(describe(checkpoint, base=base, use_ema=use_ema), settings, module=module,
                       pipeline=ready(pipe, settings.scheduler, device), use_ema=use_ema)
    if adapter:
        module = load_exported_module(adapter, base, device)
        return Sampler(describe(adapter=adapter, base=base), settings, module=module, use_ema=False)
    if not base:
        raise ValueError("nothing to evaluate: give --checkpoint, --adapter (an export folder) or --base (baseline)")
    return Sampler(describe(base=base), settings, pipeline=load_base_pipeline(base, settings.scheduler, device))
