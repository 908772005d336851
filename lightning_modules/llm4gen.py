"""The LLM4GEN LightningModule: frozen VAE, UNet, CLIP and LLM; a trainable connector (LLM4GEN's Cross-Adapter
Module by default, or another of adapters/connectors.py by ``model.adapter.kind``).

The objective, per batch:

    z0      = VAE(image) * scaling          (or VAE moments precomputed in the batch)
    c, l    = CLIP(caption), LLM(caption)   (caption replaced by "" with p = caption_dropout)
    context = CAM(c, l) = [c, CAM_l(c, l)]  (batch, 77 + L, clip_dim)
              (other connectors: connector(c, l, t), e.g. ELLA's queries at timestep t, adapters/)
              (SDXL: c is both CLIP encoders' penultimate states, 2048 wide; the UNet also gets the
               pooled embedding and size/crop time ids, see encoders/sdxl.py)
    z_t     = sqrt(a_t) z0 + sqrt(1 - a_t) eps,  t ~ U{0..T-1}
    L_diffusion = w(t) || UNet(z_t, t, context) - target(z0, eps, t) ||^2
    L           = L_diffusion + lambda_entity * L_entity   (L_entity on the UNet's cross-attention maps,
                                                            losses/entity.py; compute_losses -> LossTerms)

Checkpoints hold only what trains (the CAM, any unfrozen UNet or LoRA weights), the EMA and the
optimizer; loading rebuilds the frozen parts from their configured sources.

Over 500 lines on purpose: one class, whose methods are the objective's steps in the order the paper writes
them; everything that is not the objective lives beside it (optimization.py, nonfinite.py, sharding.py,
checkpoint_files.py, callbacks.py, the pipeline for sampling).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping

import lightning as L
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.training_utils import EMAModel, cast_training_params
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn

from llm4gen.adapters.connectors import build_connector, load_connector
from llm4gen.adapters.cross_adapter import CrossAdapter
from llm4gen.adapters.gated_fusion import FUSION_FOLDER, GatedFusion
from llm4gen.adapters.layout import ContextLayout
from llm4gen.adapters.release import RELEASED_PROJECTOR, save_release
from llm4gen.configs.errors import ConfigError, UserError
from llm4gen.configs.schema import Config, ModelConfig, as_plain, model_config
from llm4gen.configs.setup_checks import check_context_width, check_full_unet_dtype, connector_widths_message
from llm4gen.datamodules.batch import Batch
from llm4gen.encoders.clip import ClipText, where_text
from llm4gen.encoders.llm import LLMEncoder, LLMFeatures
from llm4gen.encoders.stable_diffusion import load_base_model
from llm4gen.lightning_modules.nonfinite import (
    NonFiniteSteps,
    NonFiniteStepsError,
    drop_gradients,
    gradients_finite,
    nonfinite_tensors,
    nonfinite_terms,
)
from llm4gen.lightning_modules.optimization import (
    ADAPTER_GROUP,
    build_lr_scheduler,
    hold_back,
    parameter_groups,
)
from llm4gen.lightning_modules.performance import (
    apply_performance,
    build_optimizer,
)
from llm4gen.lightning_modules.run_checkpoints import CheckpointSaveError
from llm4gen.lightning_modules.sharding import shard_module
from llm4gen.losses.attention_capture import (
    cross_attention_layer_names,
    install_attention_capture,
)
from llm4gen.losses.diffusion import (
    diffusion_target,
    min_snr_weights,
    sample_noise,
    weighted_mse,
)
from llm4gen.losses.entity import (
    EntityTargets,
    drop_leading_tokens,
    entity_loss,
    keep_leading_tokens,
    only_rows,
)
from llm4gen.losses.terms import LossTerms
from llm4gen.pipelines.dtypes import sampling_dtypes
from llm4gen.pipelines.llm4gen_pipeline import (
    guided_context_mask,
    masks_padding,
    pipeline_from_module,
)


class CheckpointKeyError(UserError, KeyError):
    pass


def check_checkpoint_keys(expected: set[str], found: set[str]) -> None:
    """Trainable keys must match exactly: frozen weights are rebuilt from their source, never loaded."""
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        raise CheckpointKeyError(
            f"checkpoint does not match the model's trainable weights: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''} ({len(missing)}), unexpected {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)}). Was it written with another "
            f"model.unet_training, LoRA or adapter setting? The checkpoint's config is in its hyper_parameters.")


def step_generator(seed: int, step: int, micro_batch: int, rank: int, device: torch.device) -> torch.Generator:
    """The random stream of one training batch (noise, timesteps, caption dropout, posterior sample): a
    pure function of (seed, optimizer step, micro-batch, rank), so a resumed run draws exactly what an
    uninterrupted one would have, with no RNG state to save."""
    mixed = hash((seed, step, micro_batch, rank)) & 0x7FFF_FFFF_FFFF_FFFF
    return torch.Generator(device).manual_seed(mixed)


def save_unet_lora(unet, directory: str | os.PathLike) -> Path:
    """The UNet's LoRA in diffusers' format (``pipe.load_lora_weights(directory)`` reads it, into a stock
    ``StableDiffusionPipeline`` too)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict  # peft: only LoRA runs need it

    StableDiffusionPipeline.save_lora_weights(
        directory, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)))
    return Path(directory)


LLM_LORA_FILE = "llm_lora.safetensors"
NONFINITE_KEY = "nonfinite_steps"  # a checkpoint's count of skipped non-finite steps (nonfinite.py)


def save_llm_lora(model, directory: str | os.PathLike) -> Path:
    """The LLM's LoRA weights (``lora_`` parameters, named as in the LLM), safetensors."""

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items() if "lora_" in k},
              str(directory / LLM_LORA_FILE))
    return directory


def load_llm_lora(model, directory: str | os.PathLike) -> None:
    """Loads :func:`save_llm_lora`'s weights into an LLM that has the same LoRA layers; every one must fit."""

    weights = load_file(str(Path(directory) / LLM_LORA_FILE))
    expected = {k for k in model.state_dict() if "lora_" in k}
    if set(weights) != expected:
        raise CheckpointKeyError(f"{directory}: LLM LoRA weights {sorted(set(weights) ^ expected)[:4]} do not match "
                                 f"this LLM's LoRA layers (model.llm.lora_rank / lora_target_modules?)")
    model.load_state_dict(weights, strict=False)


def fused_unet(unet):
    """A copy of a LoRA-trained UNet with the LoRA merged into its weights and the LoRA layers gone: a plain
    UNet2DConditionModel any pipeline loads."""
    fused = copy.deepcopy(unet)
    fused.fuse_lora()
    fused.unload_lora()
    return fused


class LLM4GenModule(L.LightningModule):
    def __init__(self, model: ModelConfig | Mapping[str, Any] | DictConfig, seed: int = Config.seed):
        """``model``: the ``model`` section, typed (``OmegaConf.to_object(cfg.model)``) or as a mapping (a
        checkpoint's ``hyper_parameters.model``, checked against the schema and completed by its defaults)."""
        super().__init__()
        cfg = model_config(model, "the module's model config (a checkpoint's hyper_parameters.model?)")
        # plain containers in the checkpoint: it loads without this package's classes
        self.save_hyperparameters({"model": as_plain(cfg), "seed": seed})
        self.seed = seed
        self.cfg: ModelConfig = cfg
        base = load_base_model(cfg.base)
        self.vae, self.unet, self.clip = base.vae, base.unet, base.text
        self.noise_scheduler = base.noise_scheduler
        self.llm = LLMEncoder.from_config(dataclasses.replace(cfg.llm, lora_rank=0))  # its LoRA: below, seeded
        # load_config refuses this from the models' config files; here it guards a module built without a config
        check_context_width(self.unet.config.cross_attention_dim, self.clip.hidden_size)
        # What trains starts from a function of the seed alone, whatever loading the frozen parts drew
        # from the global RNG (building an embedded model on first use does).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.adapter = self._build_adapter(cfg.adapter)
            if not self.uses_cam:  # built (one checkpoint layout), never used or trained
                self.adapter.requires_grad_(False)
            self.fusion = self._build_fusion(cfg.adapter)  # None: the connector's tokens join CLIP's softmax
            self._setup_unet_training(cfg)
            if cfg.llm.lora_rank > 0:  # LaVi-Bridge's LoRA inside the LLM
                self.llm.add_lora(cfg.llm.lora_rank, cfg.llm.lora_alpha, list(cfg.llm.lora_target_modules))
                cast_training_params(self.llm.model, dtype=torch.float32)
        self.ema = (EMAModel(self.trainable_parameters(), decay=cfg.ema.decay,
                             update_after_step=cfg.ema.update_after_step) if cfg.ema.enabled else None)
        # The entity loss reads cross-attention maps; nothing is captured (and every layer keeps the fused
        # kernel) when its weight is 0.
        self.attention_store = None
        if cfg.objective.lambda_entity > 0:
            layers = cfg.objective.entity_layers
            resolutions = layers if layers in ("lowest", "all") else [int(x) for x in str(layers).split(",")]
            self.attention_store = install_attention_capture(
                self.unet, cross_attention_layer_names(self.unet, resolutions), enabled=False)
        self.nonfinite_steps = NonFiniteSteps()
        self._nonfinite_terms: list[str] = []  # this optimizer step's loss terms that were not finite
        self._skip_step = False
        self._null_text: tuple | None = None
        self.performance = cfg.performance  # fast paths: channels_last, checkpointing, compile, TF32
        apply_performance(self, self.performance)

    # ---- construction -------------------------------------------------------------------------
    def _build_adapter(self, acfg) -> nn.Module:
        if acfg.init_from:
            path = Path(acfg.init_from)
            if path.is_dir() and (path / RELEASED_PROJECTOR).is_file():  # a release-layout folder
                path = path / RELEASED_PROJECTOR
            if path.is_dir():
                adapter = load_connector(path)  # any kind, as saved (configs/checks.py: it matches adapter.kind)
                adapter.register_to_config(use_llm_mask=acfg.use_llm_mask)  # the run's reading of padding, not the folder's
            else:
                adapter = CrossAdapter.from_released(path, num_heads=acfg.num_heads, llm_scale=acfg.llm_scale,
                                                     use_llm_mask=acfg.use_llm_mask)
            found, needed = (adapter.config.clip_dim, adapter.config.llm_dim), (self.clip.hidden_size, self.llm.hidden_size)
            if found != needed:  # the preflight refuses it from the files; this guards a module built without one
                raise ConfigError(connector_widths_message(acfg.init_from, found, needed))
            return adapter
        return build_connector(acfg, clip_dim=self.clip.hidden_size, llm_dim=self.llm.hidden_size)

    def _build_fusion(self, acfg) -> GatedFusion | None:
        """The gated fusion's layers, installed in the UNet's cross-attention (``model.adapter.fusion=gated``):
        saved beside an exported connector (``adapter/fusion/``) and read back from ``init_from`` when there."""
        if not (self.uses_cam and acfg.fusion == "gated"):
            return None
        saved = Path(acfg.init_from) / FUSION_FOLDER if acfg.init_from else None
        if saved is not None and saved.is_dir():
            fusion = GatedFusion.from_pretrained(saved)
        else:
            fusion = GatedFusion.for_unet(self.unet, clip_tokens=self.clip.context_length)
        fusion.install(self.unet)
        return fusion

    def _setup_unet_training(self, cfg) -> None:
        if cfg.unet_training == "full":
            check_full_unet_dtype(cfg.unet_training, cfg.base.dtype)  # load_config refuses it first
            self.unet.requires_grad_(True)
        elif cfg.unet_training == "lora":
            from peft import LoraConfig

            self.unet.add_adapter(LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                             init_lora_weights="gaussian", target_modules=list(cfg.lora.target_modules)))
            cast_training_params(self.unet, dtype=torch.float32)

    @property
    def uses_cam(self) -> bool:
        """False with ``model.adapter.enabled=false`` (and inside :meth:`base_alone`): the UNet is conditioned on
        CLIP alone."""
        return self.cfg.adapter.enabled and not getattr(self, "_base_alone", False)

    @contextlib.contextmanager
    def base_alone(self):
        """Inside the block the module is its base: CLIP's context alone, no connector, no fusion (what a
        connector's cost at its initial weights is measured against)."""
        self._base_alone = True
        try:
            yield self
        finally:
            self._base_alone = False

    def frozen_modules(self) -> list[nn.Module]:
        frozen = [self.vae, self.clip, self.llm] + ([] if self.uses_cam else [self.adapter])
        return frozen + [self.unet] if self.cfg.unet_training == "frozen" else frozen

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state_keys(self) -> set[str]:
        return {name for name, p in self.named_parameters() if p.requires_grad}

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self.frozen_modules():  # dropout stays off in what does not train
            module.eval()
        if self.cfg.unet_training == "lora":
            self.unet.eval()  # base layers behave as at inference; LoRA dropout is configured off by default
        return self

    def configure_model(self) -> None:
        """Under ``trainer.strategy: fsdp2`` (Lightning's ModelParallelStrategy gives this module its device mesh):
        FSDP2 over what trains (lightning_modules/sharding.py), and the EMA rebuilt over the sharded weights.
        Under any other strategy, nothing."""
        mesh = getattr(self, "_device_mesh", None)
        if mesh is None or getattr(self, "_sharded", False):
            return
        precision = str(getattr(self.trainer, "precision", "32-true")) if self._trainer is not None else "32-true"
        param_dtype = torch.bfloat16 if precision.startswith("bf16") and self.device.type == "cuda" else None
        shard_module(self, mesh["data_parallel"], param_dtype)
        self._sharded = True
        if self.ema is not None:  # its shadow copies follow the weights' new (sharded) tensors; the values are the same
            self.ema = EMAModel(self.trainable_parameters(), decay=self.cfg.ema.decay,
                                update_after_step=self.cfg.ema.update_after_step)

    def setup(self, stage: str) -> None:
        # DDP then neither broadcasts nor buckets frozen weights: only what trains is wrapped.
        from torch.nn.parallel import DistributedDataParallel

        trainable = self.trainable_state_keys()
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            self, [n for n, _ in self.named_parameters() if n not in trainable] + [n for n, _ in self.named_buffers()])

    # ---- the objective ------------------------------------------------------------------------
    def null_text(self) -> tuple[ClipText, LLMFeatures]:
        """The empty prompt through both encoders (as ``encode_text`` runs them): the unconditional input
        of classifier-free guidance."""
        if self.llm.trains:  # a training LLM's features of "" change every step (and carry this step's graph)
            return self.encode_text([""])
        if self._null_text is None or self._null_text[0].hidden.device != self.device:
            self._null_text = self.encode_text([""])
        return self._null_text

    def encode_text(self, captions: list[str], llm_features: LLMFeatures | None = None,
                    clip_hidden: torch.Tensor | None = None, clip_pooled: torch.Tensor | None = None):
        """CLIP and LLM features of the captions; each encoder is skipped when its features are given."""
        clip = (ClipText(hidden=clip_hidden, pooled=clip_pooled) if clip_hidden is not None
                else self.clip(captions))  # hidden: (batch, 77, clip_dim)
        if llm_features is not None:
            llm = llm_features
        elif self.uses_cam:
            llm = self.llm(captions)
        else:  # CLIP alone: nothing reads LLM features, so the LLM is not run (all padding)
            llm = LLMFeatures(features=clip.hidden.new_zeros(len(captions), 0, self.llm.hidden_size),
                              mask=torch.zeros(len(captions), 0, dtype=torch.bool, device=clip.hidden.device))
        return clip, self.context_tokens(llm)

    @property
    def masks_padding(self) -> bool:
        """True when LLM padding leaves every attention (``model.adapter.use_llm_mask``, the default)."""
        return self.uses_cam and masks_padding(self.adapter)

    def context_tokens(self, llm: LLMFeatures) -> LLMFeatures:
        """The LLM positions the context holds: the batch's longest caption's real tokens when padding is
        masked (the rest would be masked anyway; cutting it makes every attention cheaper), else all
        ``model.llm.max_length`` of them, as the release ran."""
        length = self.cfg.llm.max_length
        if llm.features.shape[1] > length and llm.mask[:, length:].any():
            raise ValueError(f"LLM features have {llm.longest} tokens, more than model.llm.max_length={length}")
        return llm.trimmed() if self.masks_padding else llm.padded_to(length)

    def context_mask(self, clip_hidden: torch.Tensor, llm: LLMFeatures) -> torch.Tensor | None:
        """(batch, context tokens) bool, the UNet's ``encoder_attention_mask``: False at LLM padding; None when
        nothing is masked (CLIP alone, a query connector, ``use_llm_mask: false``)."""
        return guided_context_mask(self.adapter, clip_hidden, llm) if self.masks_padding else None

    @property
    def timestep_aware(self) -> bool:
        """True when the context depends on the denoising timestep (ELLA): it is computed per step."""
        return self.uses_cam and self.adapter.timestep_aware

    def fuse(self, clip_hidden: torch.Tensor, llm: LLMFeatures, timesteps: torch.Tensor | None = None) -> torch.Tensor:
        """The UNet's context: (batch, 77 + L, clip_dim) for the CAM; see adapters/layout.py for the others.
        ``timesteps`` ((batch,) or one for all) reach the connector; a timestep-aware one needs them."""
        if not self.uses_cam:
            return clip_hidden  # (batch, 77, clip_dim): CLIP alone
        dtype = next(self.adapter.parameters()).dtype
        return self.adapter(clip_hidden.to(dtype), llm.features.to(dtype), llm.mask, timestep=timesteps)

    def conditioning(self, batch: Batch, drop: torch.Tensor | None = None,
                     timesteps: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """UNet context and extra UNet inputs for a batch at ``timesteps``; rows where ``drop`` is True get the
        empty prompt's."""
        cached = LLMFeatures(batch.llm_features, batch.llm_mask) if batch.llm_features is not None else None
        clip, llm = self.encode_text(list(batch.captions), cached, batch.clip_features, batch.clip_pooled)
        if drop is not None and drop.any():
            null_clip, null_llm = self.null_text()
            clip = where_text(~drop, clip, null_clip)
            llm = self.context_tokens(llm.where(~drop, null_llm))
        unet_kwargs = self.clip.unet_kwargs(clip, self.image_size(batch), batch.original_size, batch.crop_top_left)
        mask = self.context_mask(clip.hidden, llm)
        if mask is not None:
            unet_kwargs["encoder_attention_mask"] = mask
        return self.fuse(clip.hidden, llm, timesteps), unet_kwargs

    def image_size(self, batch: Batch | None = None) -> tuple[int, int]:
        """(height, width) in pixels of the batch's images (SDXL's target size); the UNet's native size
        without a batch."""
        scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if batch is not None and batch.pixel_values is not None:
            return tuple(batch.pixel_values.shape[-2:])
        if batch is not None and batch.latent_moments is not None:
            return tuple(scale * s for s in batch.latent_moments.shape[-2:])
        return (scale * self.unet.config.sample_size,) * 2

    def latents(self, batch: Batch, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled VAE latents (batch, 4, h, w): the posterior's mean, or a sample (``objective.latents``)."""
        if batch.latent_moments is not None:  # (batch, 2 * 4, h, w): the VAE encoder's mean and log-variance
            moments = batch.latent_moments.to(self.vae.dtype)
        elif batch.pixel_values is None:
            raise ValueError("a training batch needs pixel_values (batch, 3, H, W) or cached latent_moments")
        else:
            with torch.no_grad():
                moments = self.vae.encode(batch.pixel_values.to(self.vae.dtype)).latent_dist.parameters
        posterior = DiagonalGaussianDistribution(moments.float())
        latents = posterior.mode() if self.cfg.objective.latents == "mean" else posterior.sample(generator)
        return latents * self.vae.config.scaling_factor

    def compute_losses(self, batch: Batch, noise: torch.Tensor | None = None, timesteps: torch.Tensor | None = None,
                       drop: torch.Tensor | None = None, generator: torch.Generator | None = None) -> LossTerms:
        """The objective's terms for one batch: L_diffusion, and L_entity when the entity loss is on and the
        batch carries its targets (the data side builds them). ``noise``, ``timesteps`` and ``drop`` are drawn when not given."""
        objective = self.cfg.objective
        latents = self.latents(batch, generator)                                # z0 (batch, 4, h, w)
        batch_size = latents.shape[0]
        if drop is None and self.training and objective.caption_dropout > 0:
            drop = torch.rand(batch_size, device=self.device, generator=generator) < objective.caption_dropout
        if noise is None:
            noise = sample_noise(latents, objective.noise_offset, generator)
        if timesteps is None:
            timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (batch_size,),
                                      device=self.device, generator=generator)
        context, unet_kwargs = self.conditioning(batch, drop, timesteps)        # (batch, 77 + L, clip_dim)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)       # z_t
        with_entity = self.attention_store is not None and batch.entity_targets is not None
        capture = self.attention_store.capturing() if with_entity else contextlib.nullcontext()
        with capture:
            prediction = self.unet(noisy.to(self.unet.dtype), timesteps, context.to(self.unet.dtype), **unet_kwargs).sample
        target = diffusion_target(self.noise_scheduler, latents, noise, timesteps)
        weights = (min_snr_weights(self.noise_scheduler, timesteps, objective.min_snr_gamma)
                   if objective.min_snr_gamma else None)
        diffusion = weighted_mse(prediction, target, weights)
        if not with_entity:
            return LossTerms.diffusion_only(diffusion)
        low, high = objective.entity_timesteps
        applies = (timesteps >= low) & (timesteps < high)
        if drop is not None:
            applies &= ~drop  # a dropped caption has no words to bind
        targets = self.entity_targets(batch, applies, context.shape[1])
        entity = entity_loss(self.attention_store.maps(), targets.to(self.device), objective.entity_negative_weight)
        return LossTerms(diffusion=diffusion, entity=entity.total, entity_parts=entity)

    def entity_targets(self, batch: Batch, applies: torch.Tensor, context_tokens: int) -> EntityTargets:
        """Word -> fused-sequence token positions and (attribute, entity) pairs for each caption, as the data
        worker built them (datamodules/entity_targets.py), fitted to this step's context; pairs of samples
        where the loss does not apply (timestep window, dropped caption) are masked out."""
        targets = batch.entity_targets
        expected = self.clip.tokenizer.model_max_length + self.cfg.llm.max_length
        if targets.num_tokens != expected:
            raise ValueError(f"the batch's entity targets index {targets.num_tokens} context tokens, this model's "
                             f"context has {expected} (77 CLIP + model.llm.max_length): were they cached with "
                             f"another model.llm.max_length?")
        targets = only_rows(targets, applies.to(targets.pair_mask.device))
        if self.adapter.layout.has_word_positions:  # a masked context ends at the batch's longest caption
            not_in_context = 0 if self.adapter.layout.starts_with_clip else self.clip.tokenizer.model_max_length
            targets = keep_leading_tokens(targets, not_in_context + context_tokens)
        if self.adapter.layout is ContextLayout.LLM:  # the connector replaced CLIP: words align to LLM tokens
            targets = drop_leading_tokens(targets, self.clip.tokenizer.model_max_length)
        elif not self.adapter.layout.has_word_positions:
            raise ValueError(f"the entity loss needs word positions in the context; a {type(self.adapter).__name__} "
                             f"context ({self.adapter.layout.value}) has none (configs/checks.py refuses this config)")
        return targets

    def objective(self, terms: LossTerms) -> torch.Tensor:
        """L = L_diffusion + lambda_entity * L_entity, the paper's objective, from ``compute_losses``' terms."""
        return terms.diffusion + self.cfg.objective.lambda_entity * terms.entity

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        accumulate = self.trainer.accumulate_grad_batches
        generator = step_generator(self.seed, self.global_step, batch_idx % accumulate, self.global_rank, self.device)
        terms = self.compute_losses(batch, generator=generator)
        loss = self.objective(terms)
        logs = {"train/loss": loss.detach(), **{f"train/{k}": v for k, v in terms.logs().items()}}
        self._nonfinite_terms += nonfinite_terms(logs)  # such a step is skipped before the optimizer (nonfinite.py)
        self.log_dict({k: v for k, v in logs.items() if k not in self._nonfinite_terms}, prog_bar=True, sync_dist=False)
        return loss

    # ---- optimisation, EMA, checkpoints -------------------------------------------------------
    def configure_optimizers(self):
        """AdamW over two parameter groups, the CAM's and the UNet's, each with its own learning rate, weight
        decay and start step (lightning_modules/optimization.py)."""
        optim = self.cfg.optim
        optimizer = build_optimizer(parameter_groups(self.named_parameters(), optim), optim, self.performance.optimizer)
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else int(self.trainer.estimated_stepping_batches)
        scheduler = build_lr_scheduler(optimizer, optim, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer) -> None:
        hold_back(optimizer, self.global_step)  # a group before its start step (the UNet's) neither moves nor clips
        self._skip_step = self._step_is_nonfinite()
        if self._skip_step:
            drop_gradients(self.trainable_parameters())  # the optimizer then changes nothing (nonfinite.py)

    def _step_is_nonfinite(self) -> bool:
        """Whether this optimizer step's loss or gradients are not finite on any rank; counts it, and stops the
        run after ``model.optim.max_nonfinite_steps`` such steps in a row."""
        local = bool(self._nonfinite_terms) or not gradients_finite(self.trainable_parameters())
        flag = torch.tensor(float(local), device=self.device)
        if self.trainer.world_size > 1:  # every rank skips the same step
            flag = self.trainer.strategy.reduce(flag, reduce_op="sum")
        terms, self._nonfinite_terms = sorted(set(self._nonfinite_terms)), []
        skip = bool(flag > 0)
        counts = self.nonfinite_steps
        counts.skipped, counts.in_a_row = counts.skipped + skip, counts.in_a_row + 1 if skip else 0
        self.log("train/skipped_nonfinite", float(counts.skipped), prog_bar=False)
        limit = self.cfg.optim.max_nonfinite_steps
        if skip and counts.in_a_row >= limit:
            callback = self.trainer.checkpoint_callback
            last = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
            raise NonFiniteStepsError(
                f"step {self.global_step}: {counts.in_a_row} steps in a row with a non-finite loss or gradient "
                f"(model.optim.max_nonfinite_steps={limit}); not finite here: "
                f"{', '.join(terms) or 'the gradients (the loss was finite on this rank)'}. Those steps changed no "
                f"weight; the last good checkpoint is {last or 'none yet (no checkpoint was written)'}. Lower "
                f"model.optim.lr or look for bad samples in the data, then run the same command to resume")
        return skip

    def on_fit_start(self) -> None:
        if self.ema is not None:
            self.ema.to(self.device)

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None and not self._skip_step:
            self.ema.step(self.trainable_parameters())

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        for group in self.trainer.optimizers[0].param_groups:  # train/lr: the CAM's; train/lr_unet: the UNet's
            name = group.get("name", ADAPTER_GROUP)
            self.log("train/lr" if name == ADAPTER_GROUP else f"train/lr_{name}", group["lr"], prog_bar=False)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = self.trainable_state_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()
        checkpoint[NONFINITE_KEY] = self.nonfinite_steps.state_dict()
        bad = nonfinite_tensors(checkpoint)  # of this rank's shards, when sharded: every rank must agree
        if self._trainer is not None and self.trainer.world_size > 1:
            count = torch.tensor(float(len(bad)), device=self.device)
            if float(self.trainer.strategy.reduce(count, reduce_op="sum")) > 0 and not bad:
                bad = ["(another rank's shard)"]
        if bad:
            raise CheckpointSaveError(f"step {checkpoint.get('global_step')}: not writing a checkpoint whose trained "
                                      f"state is not finite ({', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}); "
                                      f"the checkpoints already written are kept")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        bad = nonfinite_tensors(checkpoint)
        if bad:
            raise NonFiniteStepsError(f"the checkpoint's trained state is not finite ({', '.join(bad[:4])}"
                                      f"{' ...' if len(bad) > 4 else ''}): resume from an earlier checkpoint of the "
                                      f"run (resume=auto passes over such a one by itself)")
        saved = checkpoint.get("optimizer_states") or []
        groups = len(parameter_groups(self.named_parameters(), self.cfg.optim))
        if saved and len(saved[0]["param_groups"]) != groups:
            raise CheckpointKeyError(
                f"the checkpoint's optimizer has {len(saved[0]['param_groups'])} parameter group(s), this run has "
                f"{groups} (the CAM's and the UNet's, each with its own model.optim learning rate): it was written "
                f"before parameter groups existed. Its weights still load for generation and as init_from; to train "
                f"on, start a new run from it (resume=never) or finish it with the code that wrote it")
        if self.ema is not None:
            if "ema" not in checkpoint:
                raise CheckpointKeyError("model.ema.enabled is on but the checkpoint holds no EMA state")
            self.ema.load_state_dict(checkpoint["ema"])
        if NONFINITE_KEY in checkpoint:  # written before the count existed: none skipped
            self.nonfinite_steps.load_state_dict(checkpoint[NONFINITE_KEY])

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        check_checkpoint_keys(self.trainable_state_keys(), set(state_dict))
        return super().load_state_dict(state_dict, strict=False, assign=assign)

    @contextlib.contextmanager
    def ema_weights(self):
        """The EMA weights swapped in (no-op without EMA), the trained ones swapped back on exit."""
        if self.ema is None:
            yield self
            return
        params = self.trainable_parameters()
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield self
        finally:
            self.ema.restore(params)

    # ---- sampling and export ------------------------------------------------------------------
    def pipeline(self, scheduler: str = "DDIMScheduler"):
        """The family's diffusers pipeline (StableDiffusion or StableDiffusionXL) over this module's
        components (shares their weights)."""
        import diffusers

        scheduler_cls = getattr(diffusers, scheduler)
        pipe = self.clip.pipeline(self.vae, self.unet, scheduler_cls.from_config(self.noise_scheduler.config))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int], num_inference_steps: int = 30,
                 guidance_scale: float = 7.5, scheduler: str = "DDIMScheduler", negative_prompt: str = "",
                 output_type: str = "pil", llm_prompts: list[str] | None = None):
        """Images, one per prompt (PIL; ``output_type="np"``: float arrays in [0, 1]); each prompt's seed
        fixes its initial noise (CPU generator, so a seed gives the same image on any device). The negative
        prompt goes through CLIP, LLM and CAM. ``llm_prompts``: texts the LLM reads instead of the prompts
        (CLIP still reads the prompts), e.g. another prompt's, to ask what the LLM's features carry.

        Sampled by this module's own LLM4Gen pipeline (pipelines/llm4gen_pipeline.py, over these very components),
        the one an export saves, with the texts read by this module's encoders; without a connector, by the
        base's diffusers pipeline."""
        was_training = self.training
        self.eval()
        try:
            clip, llm = self.encode_text(list(prompts))
            if llm_prompts is not None:
                if len(llm_prompts) != len(prompts):
                    raise ValueError(f"{len(llm_prompts)} llm_prompts for {len(prompts)} prompts; give one each")
                llm = self.encode_text(list(llm_prompts))[1]
            neg_clip, neg_llm = self.encode_text([negative_prompt] * len(prompts))
            generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
            sampling = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                            generator=generators, output_type=output_type)
            if not self.uses_cam:  # the base alone: its context is CLIP's, float32 latents as the connector's
                pipe = self.pipeline(scheduler)
                with sampling_dtypes(pipe.unet, pipe.vae):
                    return pipe(prompt_embeds=clip.hidden.float(), negative_prompt_embeds=neg_clip.hidden.float(),
                                **self.clip.pipeline_inputs(clip, neg_clip), **sampling).images
            pipe = pipeline_from_module(self, scheduler, for_saving=False)
            pipe.set_progress_bar_config(disable=True)
            with pipe.texts_given(clip.hidden, neg_clip.hidden, llm, neg_llm, clip.pooled, neg_clip.pooled):
                return pipe(list(prompts), negative_prompt=[negative_prompt] * len(prompts), **sampling).images
        finally:
            self.train(was_training)

    def export_release(self, directory: str | os.PathLike, use_ema: bool = True) -> Path:
        """Writes the released LLM4GEN layout (adapters/release.py): ``projector.pth`` + ``unet/`` (the
        trained UNet, or the frozen one the CAM was trained against), loadable with ``model.adapter.init_from``
        and ``model.base.unet`` or by tools that read the release."""
        if not isinstance(self.adapter, CrossAdapter):
            raise ValueError(f"the released LLM4GEN layout holds a CAM; this run trained a {type(self.adapter).__name__} "
                             f"(model.adapter.kind={self.cfg.adapter.kind}): export it with export_pretrained")
        if self.fusion is not None:
            raise ValueError("the released LLM4GEN layout holds a CAM for the concatenated context; this run trained "
                             "a gated fusion (model.adapter.fusion=gated) besides it: export it with export_pretrained")
        if self.cfg.unet_training == "lora":
            raise ValueError("the release layout holds a full unet/; a LoRA run exports unet_lora/ with "
                             "export_pretrained (load it with pipe.load_lora_weights), or fuse it first")
        with (self.ema_weights() if use_ema else contextlib.nullcontext()):
            return save_release(directory, self.adapter, self.unet)

    def export_pretrained(self, directory: str | os.PathLike, use_ema: bool = True) -> Path:
        """Writes the trained parts in self-contained formats: ``adapter/`` (the connector's from_pretrained, or
        adapters.connectors.load_connector for any kind),
        ``unet_lora/`` (diffusers LoRA weights, ``pipe.load_lora_weights``) or ``unet/`` (full UNet)."""
        directory = Path(directory)
        with (self.ema_weights() if use_ema else contextlib.nullcontext()):
            self.adapter.save_pretrained(directory / "adapter")
            if self.fusion is not None:
                self.fusion.save_pretrained(directory / "adapter" / FUSION_FOLDER)
            if self.cfg.unet_training == "lora":
                save_unet_lora(self.unet, directory / "unet_lora")
            elif self.cfg.unet_training == "full":
                self.unet.save_pretrained(directory / "unet")
            if self.llm.trains:
                save_llm_lora(self.llm.model, directory / "llm_lora")
        OmegaConf.save(self.cfg, directory / "model_config.yaml")
        return directory
