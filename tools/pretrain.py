"""Pretrains the embedded tiny base on the shapes world, reproducibly from a seed, on a CPU.

Three stages, each on training-split scenes only (no held-out colour-shape combination is ever seen):

1. ``vae``: the tiny ``AutoencoderKL`` (``embedded.tiny.TINY_VAE``) trained for reconstruction (MSE +
   a small KL term); its ``scaling_factor`` is then set to 1 / std of the latents, as SD does.
2. ``clip``: a CLIP-style model, the tiny text encoder (``TINY_CLIP``, CLIP's real BPE tokenizer) and a
   tiny ViT image tower, trained with CLIP's symmetric contrastive loss over in-batch negatives. Only
   the objective decides what the text encoder learns to encode (in-batch negatives rarely differ by
   binding alone, which is how CLIP ends up weak at binding); the image tower is discarded. The log
   records ``binding_probe_swapped_colours``: how often it prefers an image's caption over the same
   caption with colours swapped (0.5: blind to binding).
3. ``unet``, then ``unet_refine``: the SD-shaped tiny UNet (``SHAPES_UNET``) trained with the epsilon objective on the frozen
   VAE's latents (posterior samples, as SD is trained), conditioned on the frozen text encoder's last hidden state, captions dropped to ""
   with probability ``caption_dropout`` (so classifier-free guidance works). The refine stage continues
   from the first stage's EMA weights with a fresh, lower learning-rate schedule and min-SNR-gamma loss
   weights, which spend the gradient on the noisy timesteps where a small object's shape is decided.

The result is a diffusers Stable Diffusion folder (``model_index.json``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``unet/``, ``scheduler/``) that ``from_pretrained`` loads like the random tiny one, plus
``pretrain_log.json`` (settings, per-stage loss curves, steps/s, wall time) and, with ``--eval-prompts``,
the analyzer's score of the base's samples on single-object prompts. Finished stages are kept under
``OUTPUT/stages/`` and reused when the command is run again (an interrupted run resumes at the stage).
Each stage draws its random initialisation and its data order from a seed of its own (``stage_seed``), so
a stage comes out the same whether the stages before it were trained in this process or reused.

    nice -n 19 python -m llm4gen.cli.pretrain --output runs/pretrain --seed 0 [--install-to DIR]
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from llm4gen.embedded.registry import CLIP_TOKENIZER_DIR, SD15_SCHEDULER, SHAPES_UNET, TINY_CLIP, TINY_VAE
from llm4gen.embedded.tiny import save_sd15_folder
from llm4gen.evaluation import aggregate, prompt_set, score
from llm4gen.evaluation.grids import captioned_grid
from llm4gen.lightning_modules.safe_loading import load_torch_file
from llm4gen.shapes.world import (
    Scene,
    caption,
    random_scene,
    render_scene,
    sample_scene,
)

TINY_VISION = dict(image_size=32, patch_size=4, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4)


@dataclass
class PretrainConfig:
    output: str = "runs/pretrain"
    seed: int = 0
    resolution: int = 32
    num_scenes: int = 20000          # the fixed training set: rendered once from the seed
    threads: int = 2
    vae_steps: int = 1500
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    clip_steps: int = 3000
    clip_batch: int = 128
    clip_lr: float = 5e-4
    unet_steps: int = 5000
    unet_ema_decay: float = 0.999    # the saved UNet is the EMA of its weights
    unet_batch: int = 32
    unet_checkpoint_every: int = 500  # steps between resumable saves of the UNet stage (sessions end)
    unet_lr: float = 5e-4
    unet_refine_steps: int = 5000     # a second UNet stage from the first's EMA weights, min-SNR weighted; 0: none
    unet_refine_lr: float = 2e-4
    unet_snr_gamma: float = 5.0       # min-SNR-gamma loss weights of the refine stage (Hang et al. 2023)
    warmup_steps: int = 200
    caption_dropout: float = 0.1
    log_every: int = 50
    eval_prompts: int = 30           # single-object prompts (seen_1) sampled and scored at the end; 0: none
    eval_steps: int = 25
    eval_guidance: float = 5.0
    max_minutes: Optional[float] = None  # stop each stage after this long (feasibility runs); None: all steps
    install_to: Optional[str] = None     # also copy the base, its log and sample grid here (a folder to ship)


# ---------------------------------------------------------------- data

def make_dataset(num_scenes: int, resolution: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """(images (N, 3, R, R) uint8, captions) of ``num_scenes`` training-split scenes."""
    rng = random.Random(f"pretrain/{seed}")
    images = np.empty((num_scenes, resolution, resolution, 3), dtype=np.uint8)
    captions = []
    for i in range(num_scenes):
        record = random_scene(rng, resolution)
        images[i] = np.asarray(render_scene(Scene.from_dict(record), resolution))
        captions.append(record["caption"])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), captions


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, R, R) -> float in [-1, 1]."""
    return images.float() / 127.5 - 1.0


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """(N, 77) CLIP token ids, padded with the end token as CLIP does."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warmup, then cosine decay to a tenth of the peak at ``total`` steps."""
    def factor(step: int) -> float:
        progress = min(1.0, step / max(1, total))
        return min(1.0, (step + 1) / max(1, warmup)) * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))
    return factor


class StageLog:
    """Loss curve and timing of one stage; ``done`` says whether to stop (steps or minutes)."""

    def __init__(self, name: str, steps: int, log_every: int, max_minutes: Optional[float]):
        self.name, self.steps, self.log_every, self.max_minutes = name, steps, log_every, max_minutes
        self.curve: list[tuple[int, float]] = []
        self.window: list[float] = []
        self.start = time.perf_counter()
        self.cpu_start = time.process_time()
        self.steps_done = 0

    def record(self, step: int, loss: float) -> None:
        self.window.append(loss)
        self.steps_done = step + 1
        if (step + 1) % self.log_every == 0 or step + 1 == self.steps:
            mean = float(np.mean(self.window))
            self.curve.append((step + 1, round(mean, 6)))
            self.window = []
            print(f"[{self.name}] step {step + 1}/{self.steps} loss {mean:.5f} "
                  f"({self.steps_per_second():.2f} steps/s)", flush=True)

    def out_of_time(self) -> bool:
        return self.max_minutes is not None and time.perf_counter() - self.start > 60 * self.max_minutes

    def steps_per_second(self) -> float:
        return self.steps_done / max(1e-9, time.perf_counter() - self.start)

    def summary(self) -> dict:
        wall = time.perf_counter() - self.start
        cpu = time.process_time() - self.cpu_start  # all threads: on a shared machine wall time overstates
        return {"steps": self.steps_done, "planned_steps": self.steps, "wall_s": round(wall, 1),
                "cpu_s": round(cpu, 1), "steps_per_s": round(self.steps_per_second(), 3),
                "cpu_s_per_step": round(cpu / max(1, self.steps_done), 4),
                "projected_full_wall_s": round(self.steps / max(1e-9, self.steps_per_second()), 1),
                "projected_full_cpu_s": round(self.steps * cpu / max(1, self.steps_done), 1),
                "loss_curve": self.curve}


# ---------------------------------------------------------------- stages

def train_vae(images: torch.Tensor, cfg: PretrainConfig, generator: torch.Generator):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**{**TINY_VAE, "sample_size": cfg.resolution})
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_steps, cfg.vae_steps))
    log = StageLog("vae", cfg.vae_steps, cfg.log_every, cfg.max_minutes)
    vae.train()
    for step in range(cfg.vae_steps):
        index = torch.randint(0, len(images), (cfg.vae_batch,), generator=generator)
        pixels = to_pixels(images[index])                                   # (B, 3, R, R)
        posterior = vae.encode(pixels).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(latents).sample
        loss = F.mse_loss(reconstruction, pixels) + cfg.vae_kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        log.record(step, loss.item())
        if log.out_of_time():
            break
    summary = log.summary()
    vae.eval()
    with torch.no_grad():
        sample = to_pixels(images[:512])
        std = vae.encode(sample).latent_dist.mean.std().item()
        reconstruction_mse = F.mse_loss(vae.decode(vae.encode(sample).latent_dist.mean).sample, sample).item()
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    return vae, {**summary, "latent_std": round(std, 5), "reconstruction_mse": round(reconstruction_mse, 6)}


def binding_probe(clip, tokenizer, resolution: int, n: int = 200, seed: int = 0) -> float:
    """How often the CLIP model prefers an image's own caption to the same caption with the two
    objects' colours swapped ("a small red circle and a large blue square" vs "... blue circle ...
    red square"), on fresh two-object training-split scenes with distinct shapes. A bag-of-words
    encoder cannot tell the two apart (a tie is not a preference: 0; with noise, 0.5 on average)."""
    rng = random.Random(f"binding-probe/{seed}")
    scenes = []
    while len(scenes) < n:
        scene = sample_scene(rng, "train", 2)
        if scene.objects[0].shape != scene.objects[1].shape:
            scenes.append(scene)
    swapped = [Scene((dataclasses.replace(s.objects[0], color=s.objects[1].color),
                      dataclasses.replace(s.objects[1], color=s.objects[0].color))) for s in scenes]
    pixels = to_pixels(torch.stack([torch.from_numpy(np.asarray(render_scene(s, resolution))).permute(2, 0, 1)
                                    for s in scenes]))
    ids = tokenize(tokenizer, [caption(s, "list") for s in scenes] + [caption(s, "list") for s in swapped])
    with torch.no_grad():
        logits = clip(input_ids=ids, pixel_values=pixels).logits_per_image   # (n images, 2n captions)
    own, other = logits[torch.arange(n), torch.arange(n)], logits[torch.arange(n), torch.arange(n) + n]
    return (own > other).float().mean().item()


def train_clip(images: torch.Tensor, token_ids: torch.Tensor, cfg: PretrainConfig, generator: torch.Generator,
               tokenizer=None):
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel

    clip = CLIPModel(CLIPConfig(text_config=TINY_CLIP, vision_config={**TINY_VISION, "image_size": cfg.resolution},
                                projection_dim=TINY_CLIP["hidden_size"]))
    optimizer = torch.optim.AdamW(clip.parameters(), lr=cfg.clip_lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_steps, cfg.clip_steps))
    log = StageLog("clip", cfg.clip_steps, cfg.log_every, cfg.max_minutes)
    clip.train()
    for step in range(cfg.clip_steps):
        index = torch.randperm(len(images), generator=generator)[:cfg.clip_batch]
        out = clip(input_ids=token_ids[index], pixel_values=to_pixels(images[index]), return_loss=True)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        schedule.step()
        log.record(step, out.loss.item())
        if log.out_of_time():
            break
    summary = log.summary()
    clip.eval()
    with torch.no_grad():  # retrieval accuracy on held-back-free training samples: how well text finds its image
        index = torch.arange(min(256, len(images)))
        out = clip(input_ids=token_ids[index], pixel_values=to_pixels(images[index]))
        accuracy = (out.logits_per_text.argmax(1) == index).float().mean().item()
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_CLIP))
    text_encoder.load_state_dict(clip.text_model.state_dict())
    probe = {} if tokenizer is None else {
        "binding_probe_swapped_colours": round(binding_probe(clip, tokenizer, cfg.resolution, seed=cfg.seed), 4)}
    return text_encoder.eval(), {**summary, "text_to_image_top1_of_256": round(accuracy, 4), **probe}


def min_snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: Optional[float]) -> torch.Tensor:
    """Per-sample loss weights of min-SNR-gamma for the epsilon objective, min(SNR, gamma) / SNR:
    1 at noisy timesteps, smaller where the image is nearly clean (those steps dominate the gradient
    otherwise and slow convergence). ``gamma`` None: all ones. (B,) from timesteps (B,)."""
    if gamma is None:
        return torch.ones(timesteps.shape)
    snr = alphas_cumprod[timesteps] / (1 - alphas_cumprod[timesteps])
    return snr.clamp(max=gamma) / snr


def partial_name(partial: Path) -> str:
    return f"pretraining's partial stage {str(partial)!r}"


def train_unet(latent_moments: torch.Tensor, token_ids: torch.Tensor, empty_ids: torch.Tensor, text_encoder,
               scaling_factor: float, cfg: PretrainConfig, generator: torch.Generator, partial: Optional[Path] = None,
               *, name: str = "unet", steps: Optional[int] = None, lr: Optional[float] = None,
               snr_gamma: Optional[float] = None, init=None):
    """A UNet stage (``init``: start from these weights, else random); with ``partial``, saved there
    every ``unet_checkpoint_every`` steps (weights, EMA, optimizer, schedule, generator, loss curve) and
    continued from it when it exists: an interrupted stage resumes at its last save, to the same
    weights an uninterrupted run reaches."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from diffusers.training_utils import EMAModel

    steps = cfg.unet_steps if steps is None else steps
    unet = UNet2DConditionModel(**{**SHAPES_UNET, "sample_size": latent_moments.shape[-1]})
    if init is not None:
        unet.load_state_dict(init.state_dict())
    noise_scheduler = DDPMScheduler.from_config(SD15_SCHEDULER)  # as training reads SD
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr if lr is None else lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_steps, steps))
    log = StageLog(name, steps, cfg.log_every, cfg.max_minutes)
    ema = EMAModel(unet.parameters(), decay=cfg.unet_ema_decay)
    first = 0
    if partial is not None and partial.exists():
        state = load_torch_file(partial, partial_name(partial))
        unet.load_state_dict(state["unet"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        ema.load_state_dict(state["ema"])
        generator.set_state(state["generator"])
        log.curve, first = [tuple(p) for p in state["curve"]], state["step"]
        print(f"[{name}] resuming at step {first} from {partial}", flush=True)
    text_encoder.requires_grad_(False)
    unet.train()
    for step in range(first, steps):
        index = torch.randint(0, len(latent_moments), (cfg.unet_batch,), generator=generator)
        latents = DiagonalGaussianDistribution(latent_moments[index]).sample(generator) * scaling_factor  # (B, 4, h, w)
        ids = token_ids[index].clone()
        drop = torch.rand(cfg.unet_batch, generator=generator) < cfg.caption_dropout
        ids[drop] = empty_ids
        with torch.no_grad():
            context = text_encoder(ids).last_hidden_state                   # (B, 77, hidden)
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (cfg.unet_batch,), generator=generator)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        weights = min_snr_weights(noise_scheduler.alphas_cumprod, timesteps, snr_gamma)
        per_sample = F.mse_loss(unet(noisy, timesteps, context).sample, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (weights * per_sample).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        ema.step(unet.parameters())
        log.record(step, loss.item())
        if partial is not None and (step + 1) % cfg.unet_checkpoint_every == 0 and step + 1 < steps:
            torch.save({"unet": unet.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                        "ema": ema.state_dict(), "generator": generator.get_state(), "curve": log.curve,
                        "step": step + 1}, partial.with_suffix(".tmp"))
            os.replace(partial.with_suffix(".tmp"), partial)
        if log.out_of_time():
            break
    ema.copy_to(unet.parameters())
    return unet.eval(), log.summary()


# ---------------------------------------------------------------- assembling and checking the base

STAGES = ("vae", "clip", "unet", "unet_refine")


def stage_seed(seed: int, stage: str) -> int:
    """The seed of one stage's initial weights and data order: the run's seed and the stage alone."""
    return seed * 1000 + STAGES.index(stage)


def save_base(directory: str | os.PathLike, vae, text_encoder, unet) -> Path:
    """The diffusers folder; the UNet's weights stored in fp16, as SD's fp16 variant (diffusers loads them
    into fp32 unless asked otherwise), which keeps the base under 25 MB."""
    return save_sd15_folder(directory, vae, text_encoder, copy.deepcopy(unet).to(torch.float16))


def weights_bytes(directory: str | os.PathLike) -> int:
    return sum(p.stat().st_size for p in Path(directory).rglob("*.safetensors"))


def evaluate_base(directory: str | os.PathLike, n_prompts: int, steps: int, guidance: float,
                  resolution: int) -> tuple[dict, list]:
    """Samples the first ``n_prompts`` of ``seen_1`` with their fixed seeds and scores them:
    (aggregate, images)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline


    pipe = StableDiffusionPipeline.from_pretrained(str(directory), torch_dtype=torch.float32)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    records = prompt_set("seen_1", n_prompts)
    scores, images = [], []
    for record in records:
        image = pipe(record.text, height=resolution, width=resolution, num_inference_steps=steps,
                     guidance_scale=guidance, generator=torch.Generator().manual_seed(record.seed)).images[0]
        images.append(image)
        scores.append(score(image, record.scene))
    return {"prompts": n_prompts, **{k: v for k, v in aggregate(scores).items() if k != "by_n_objects"}}, images


def pretrain(cfg: PretrainConfig) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    output = Path(cfg.output)
    stages = output / "stages"
    for partial in sorted(stages.glob("*.partial.pt")):  # one that would run code is refused before any work
        load_torch_file(partial, partial_name(partial), mmap=True)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    stages.mkdir(parents=True, exist_ok=True)
    log_path = output / "pretrain_log.json"
    log = json.loads(log_path.read_text()) if log_path.exists() else {}
    log["config"] = asdict(cfg)
    started = time.perf_counter()

    images, captions = make_dataset(cfg.num_scenes, cfg.resolution, cfg.seed)
    tokenizer = CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR)
    token_ids = tokenize(tokenizer, captions)
    empty_ids = tokenize(tokenizer, [""])[0]
    log["data_s"] = round(time.perf_counter() - started, 1)

    def stage(name: str, build, load):
        folder = stages / name
        if (folder / "config.json").exists():
            print(f"[{name}] reusing {folder}")
            return load(folder)
        seed = stage_seed(cfg.seed, name)
        torch.manual_seed(seed)  # the model's initialisation draws from torch's global RNG
        model, summary = build(torch.Generator().manual_seed(seed))
        model.save_pretrained(folder)
        (stages / f"{name}.partial.pt").unlink(missing_ok=True)  # the finished stage replaces its last save
        log.setdefault("stages", {})[name] = summary
        log_path.write_text(json.dumps(log, indent=2))
        return model

    vae = stage("vae", lambda g: train_vae(images, cfg, g), AutoencoderKL.from_pretrained)
    text_encoder = stage("clip", lambda g: train_clip(images, token_ids, cfg, g, tokenizer), CLIPTextModel.from_pretrained)
    vae.requires_grad_(False)
    with torch.no_grad():
        latent_moments = torch.cat([vae.encode(to_pixels(images[i:i + 256])).latent_dist.parameters
                                    for i in range(0, len(images), 256)])  # (N, 8, h, w): mean, logvar
    unet = stage("unet", lambda g: train_unet(latent_moments, token_ids, empty_ids, text_encoder,
                                              vae.config.scaling_factor, cfg, g, stages / "unet.partial.pt"),
                 UNet2DConditionModel.from_pretrained)
    if cfg.unet_refine_steps:
        unet = stage("unet_refine", lambda g: train_unet(
            latent_moments, token_ids, empty_ids, text_encoder, vae.config.scaling_factor, cfg, g,
            stages / "unet_refine.partial.pt", name="unet_refine", steps=cfg.unet_refine_steps,
            lr=cfg.unet_refine_lr, snr_gamma=cfg.unet_snr_gamma, init=unet), UNet2DConditionModel.from_pretrained)

    base = save_base(output / "base", vae, text_encoder, unet)
    log["weights_mb"] = round(weights_bytes(base) / 1e6, 2)
    log["train_wall_s"] = round(time.perf_counter() - started, 1)
    if cfg.eval_prompts:
        evaluation, samples = evaluate_base(base, cfg.eval_prompts, cfg.eval_steps, cfg.eval_guidance, cfg.resolution)
        captioned_grid(samples, [r.text for r in prompt_set("seen_1", cfg.eval_prompts)], columns=10,
                       side=64).save(output / "samples_seen_1.png")
        log["eval_seen_1"] = evaluation
        print(f"single-object prompts: right colour and shape in {evaluation['color']:.1%} of "
              f"{cfg.eval_prompts} samples ({output / 'samples_seen_1.png'})")
    log_path.write_text(json.dumps(log, indent=2))
    print(f"base written to {base} ({log['weights_mb']} MB of weights); log {log_path}")
    if cfg.install_to:
        install(output, Path(cfg.install_to))
        print(f"installed into {cfg.install_to}")
    return log


def install(output: Path, target: Path) -> None:
    """Replaces ``target`` with the base folder plus ``pretrain_log.json`` and the sample grid."""
    staging = target.with_name(target.name + ".new")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(output / "base", staging)
    for extra in ("pretrain_log.json", "samples_seen_1.png"):
        if (output / extra).exists():
            shutil.copy2(output / extra, staging / extra)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
