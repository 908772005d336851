"""The one preflight: everything a training run is checked for after its config loads and before any
weights do. ``train.py`` runs it, and so do ``submit.py`` and ``sweep.py`` for every run before anything
is queued, so a mistake fails in seconds on the login node instead of on a compute node after the wait.

``preflight(cfg)`` checks, in order: every model source exists (``check_sources``), the run's paths
(the shards exist and can be read, or the synthetic ones can be written there, and with ``epoch_batches``
there is one per rank and worker; ``output_dir`` can be written, ``model.adapter.init_from`` is a
CrossAdapter folder or a torch file of this config's widths, every local model folder holds readable weights
whose names fit its config: ``check_model_weights``), the LLM's model type and LoRA targets, the entity
parser's spaCy pipeline, ``model.performance`` (compile backend; on the machine that trains, what compile and
the optimizer need), the validation scheduler is a diffusers class, a feature cache was made with this run's
settings, and the checkpoint ``resume`` names (or finds) is one of this configuration in the layout its
strategy reads. It returns the checkpoint to resume from, read and checked once. (The config itself, its keys,
types, ranges and agreement with the models' config files, is ``llm4gen.configs.schema.load_config``'s job.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError, safe_open

from llm4gen.adapters.connectors import CONNECTORS
from llm4gen.adapters.cross_adapter import convert_released_state_dict
from llm4gen.adapters.gated_fusion import FUSION_FOLDER, GatedFusion
from llm4gen.adapters.release import RELEASED_PROJECTOR
from llm4gen.configs.checks import check_scheduler_name
from llm4gen.configs.choices import SHAPES_GRAMMAR
from llm4gen.configs.errors import ConfigError
from llm4gen.configs.model_files import model_json
from llm4gen.configs.setup_checks import (
    check_samples_per_rank,
    check_shard_slots,
    connector_widths_message,
    llm_model_type,
    lora_targets_of,
)
from llm4gen.datamodules.shard_counts import known_counts
from llm4gen.datamodules.shards import resolve_shards
from llm4gen.datamodules.synthetic import synthetic_shards_plan
from llm4gen.encoders.sources import check_source, is_local
from llm4gen.encoders.weight_files import WeightFileError, check_weights
from llm4gen.lightning_modules import run_checkpoints
from llm4gen.lightning_modules.checkpoint_files import check_resume_layout, is_sharded_checkpoint, load_checkpoint_checked
from llm4gen.lightning_modules.performance import check_compile_supported, check_optimizer_available
from llm4gen.lightning_modules.safe_loading import UntrustedCheckpointError, load_torch_file, trusted_checkpoints
from llm4gen.losses.entity_parser import spacy_model_missing_message, spacy_pipeline_installed
from llm4gen.tools.cache_key import check_cache_key

ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format is a zip archive
PICKLE_MAGIC = b"\x80"     # torch's legacy format starts with a pickle protocol byte


def is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


def check_shards(cfg: DictConfig) -> list[str]:
    """``data.shards`` names readable local shards (remote and pipe: shards are read as training goes); returns
    the shards training reads, the synthetic ones train.py is to write there included."""
    spec = cfg.data.shards
    if cfg.data.synthetic_if_missing and isinstance(spec, str):
        planned, to_write = synthetic_shards_plan(spec)  # what train.py's ensure_synthetic_shards would refuse
        if to_write:
            return planned  # train.py writes synthetic shards there
    try:
        urls = resolve_shards(spec if isinstance(spec, str) else list(spec))
    except FileNotFoundError as error:
        raise ConfigError(f"config key 'data.shards' is {spec!r}, which names no shards: {error}. Give a "
                          f"directory of .tar shards, a brace pattern, a manifest.json or a pipe: command "
                          f"(python prepare.py writes shards from images), or set data.synthetic_if_missing=true "
                          f"to write synthetic ones there.") from None
    except (ValueError, OSError) as error:
        raise ConfigError(f"config key 'data.shards' is {spec!r}, which cannot be read: {error}.") from None
    for url in [u for shard in urls for u in (shard, *getattr(shard, "companions", ()))]:  # with lockstep companions
        if is_remote(url):
            continue
        if not os.path.isfile(url):
            raise ConfigError(f"config key 'data.shards' is {spec!r}, which lists {url!r}: not a file. Every local "
                              f"shard must exist before training starts.")
        if not os.access(url, os.R_OK):
            raise ConfigError(f"config key 'data.shards' is {spec!r}, which lists {url!r}: not readable by this "
                              f"user (check its permissions).")
    return urls


def world_size(trainer: DictConfig) -> int | None:
    """The ranks a run trains on where ``trainer.devices`` and ``trainer.num_nodes`` fix them (a count or a list of
    devices); None for "auto", -1 or a device string, which only the machine that trains resolves."""
    devices, nodes = trainer.get("devices", "auto"), trainer.get("num_nodes", 1)
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        devices = len(devices)
    elif isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1 or not isinstance(nodes, int):
        return None
    return devices * nodes


def check_data_layout(cfg: DictConfig, shards: list[str]) -> None:
    """With ``data.epoch_batches``, every (rank, worker) of the run needs a shard of its own; without it, the
    shards need one batch per rank, checked here where their sample counts are recorded or cached (the
    datamodule's setup refuses both too, after the models have loaded and the shards have been counted)."""
    ranks = world_size(cfg.trainer)
    if ranks is None:
        return
    check_shard_slots(len(shards), ranks, cfg.data.num_workers, cfg.data.epoch_batches, cfg.data.resampled)
    if ranks > 1 and cfg.data.epoch_batches is None and not cfg.data.resampled:
        spec = cfg.data.shards if isinstance(cfg.data.shards, str) else list(cfg.data.shards)
        written = all(is_remote(url) or os.path.exists(url) for url in shards)  # not synthetic ones still to write
        counts = known_counts(spec, shards, str(cfg.output_dir)) if written else [None]
        if None not in counts:  # no count pass here: the datamodule counts the rest
            check_samples_per_rank(sum(counts), ranks, cfg.data.batch_size)


def check_output_dir(output_dir: str) -> None:
    """``output_dir`` is a folder, or can be made one, and this user may write there."""
    path = Path(output_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"config key 'output_dir' is {output_dir!r}, which is a file, not a folder; choose a "
                          f"folder for the run (e.g. runs/my-run).")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"config key 'output_dir' is {output_dir!r}, but {str(existing)!r} is a file, so the "
                          f"folder cannot be made; choose another output_dir.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"config key 'output_dir' is {output_dir!r}, but {str(existing)!r} is not writable by "
                          f"this user; choose a folder you can write to.")


def looks_like_torch_file(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError:
        return False
    return head == ZIP_MAGIC or head[:1] == PICKLE_MAGIC


def model_widths(cfg: DictConfig) -> tuple[int | None, int | None]:
    """(UNet context width, LLM width) from the models' config files, without weights; None where a model's
    config is not on this machine."""
    base, llm = cfg.model.base, cfg.model.llm
    unet = (model_json(base.unet, "config.json") if base.unet else None) \
        or model_json(base.pretrained, "unet/config.json", base.revision) or {}
    llm_config = model_json(llm.pretrained, "config.json", llm.revision) or {}
    context = unet.get("cross_attention_dim")
    width = llm_config.get("d_model") or llm_config.get("hidden_size")
    return (context if isinstance(context, int) else None), (width if isinstance(width, int) else None)


def _check_widths(init_from: str, found: tuple[int, int], widths: tuple[int | None, int | None]) -> None:
    expected = tuple(w if w is not None else f for w, f in zip(widths, found))
    if tuple(found) != expected:
        raise ConfigError(connector_widths_message(init_from, found, expected))


def read_model_folder(key: str, value: str, folder: Path, remedy: str) -> tuple[dict, Path]:
    """(config.json, the first weights file) of a ``save_pretrained`` folder named by config ``key``; a
    ConfigError naming the key when either is missing or the config does not parse."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"config key {key!r} is {value!r}, whose config.json cannot be read ({err}); "
                          f"{remedy}.") from None
    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not weights:
        raise ConfigError(f"config key {key!r} is {value!r}, which has a config.json but no weights file "
                          f"(diffusion_pytorch_model.safetensors); was the copy interrupted?")
    return config, weights[0]


def check_adapter_folder(init_from: str, path: Path, widths: tuple[int | None, int | None]) -> None:
    """A ``save_pretrained`` folder: its config.json parses, its weights file opens, its widths fit."""
    config, weights = read_model_folder("model.adapter.init_from", init_from, path,
                                        "write the folder again with save_pretrained (export.py)")
    if weights.suffix == ".safetensors":

        try:
            with safe_open(str(weights), "pt") as handle:
                handle.keys()
        except (SafetensorError, OSError, ValueError) as err:
            raise ConfigError(f"config key 'model.adapter.init_from' is {init_from!r}, whose {weights.name} is not "
                              f"a readable safetensors file ({str(err).splitlines()[0]}): truncated or corrupt? "
                              f"Copy or export it again.") from None
    if isinstance(config.get("clip_dim"), int) and isinstance(config.get("llm_dim"), int):
        _check_widths(init_from, (config["clip_dim"], config["llm_dim"]), widths)


def check_released_projector(init_from: str, path: Path, widths: tuple[int | None, int | None]) -> None:
    """A released-layout ``projector.pth``: it loads as a state dict of the release's CAM keys that fit."""
    try:
        with trusted_checkpoints(False):  # adapters/cross_adapter.py reads it with weights_only=True, whatever the flag
            state = load_torch_file(path, f"config key 'model.adapter.init_from' {init_from!r}")
    except UntrustedCheckpointError as err:
        raise ConfigError(f"config key 'model.adapter.init_from' is {init_from!r}, a torch file that holds more than "
                          f"tensors ({err.detail}): reading it would run code it names, so it was not read. The "
                          f"released projector.pth is a state dict of tensors alone; get it again from the "
                          f"release.") from None
    except Exception as err:  # the unpickler's and the zip reader's errors have no common class
        raise ConfigError(f"config key 'model.adapter.init_from' is {init_from!r}, which is not a readable torch "
                          f"file ({str(err).splitlines()[0].split('. ')[0] or type(err).__name__}): truncated or corrupt? Copy "
                          f"it again (the released projector.pth is about 35 MB).") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"config key 'model.adapter.init_from' is {init_from!r}, a torch file that holds "
                          f"{type(state).__name__}, not a state dict of tensors (the released projector.pth is one).")
    try:
        converted = convert_released_state_dict(state)
        clip_dim, llm_dim = converted["blocks.0.llm_proj.weight"].shape
    except (KeyError, ValueError) as err:
        message = err.args[0] if err.args else str(err)
        raise ConfigError(f"config key 'model.adapter.init_from' is {init_from!r}, a torch file in another layout "
                          f"than the released CAM's: {message}. A training checkpoint goes in resume=, a "
                          f"save_pretrained folder in init_from.") from None
    _check_widths(init_from, (int(clip_dim), int(llm_dim)), widths)


def check_init_from(init_from: str | None, widths: tuple[int | None, int | None] = (None, None)) -> None:
    """A connector ``save_pretrained`` folder (config.json beside the weights), a release-layout folder, or a
    torch file such as the released ``projector.pth``, read and checked against ``widths`` (the UNet's
    context width and the LLM's, :func:`model_widths`)."""
    if not init_from:
        return
    path = Path(init_from).expanduser()
    if not path.exists():
        raise ConfigError(f"config key 'model.adapter.init_from' is {init_from!r}, which does not exist; give a "
                          f"CrossAdapter save_pretrained folder (e.g. runs/x/export/adapter) or the released "
                          f"projector.pth.")
    if path.is_dir() and (path / RELEASED_PROJECTOR).is_file():  # a release-layout folder
        path = path / RELEASED_PROJECTOR
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"config key 'model.adapter.init_from' is {init_from!r}, a folder without config.json: "
                              f"not a CrossAdapter save_pretrained folder (e.g. runs/x/export/adapter).")
        check_adapter_folder(init_from, path, widths)
        return
    if not looks_like_torch_file(path):
        raise ConfigError(f"config key 'model.adapter.init_from' is {init_from!r}, which is not a torch file "
                          f"(the released projector.pth is one) nor a CrossAdapter save_pretrained folder.")
    check_released_projector(init_from, path, widths)


def check_base_unet(cfg: DictConfig) -> None:
    """``model.base.unet``: a diffusers UNet folder (config.json and weights) whose context width and
    latent channels are the base model's, so it can stand in for the base's UNet."""
    base = cfg.model.base
    if not base.unet or not Path(base.unet).expanduser().is_dir():
        return  # check_sources names a missing one; a hub id is checked when it loads
    config, _ = read_model_folder("model.base.unet", base.unet, Path(base.unet).expanduser(),
                                  "expected a diffusers UNet folder such as a release's unet/")
    reference = model_json(base.pretrained, "unet/config.json", base.revision) or {}
    for key in ("cross_attention_dim", "in_channels"):
        if key in reference and key in config and config[key] != reference[key]:
            raise ConfigError(f"config key 'model.base.unet' is {base.unet!r}, a UNet with {key}={config[key]}, but "
                              f"the base model {base.pretrained} has {key}={reference[key]}: it belongs to another "
                              f"model family (SD1.5 768, SDXL 2048 wide); set model.base.pretrained to its base.")


def check_run_paths(cfg: DictConfig) -> None:
    check_output_dir(str(cfg.output_dir))
    check_base_unet(cfg)
    check_init_from(cfg.model.adapter.init_from, model_widths(cfg))
    check_model_weights(cfg)  # after the folders' configs: a mismatch there says more than a missing file
    check_data_layout(cfg, check_shards(cfg))


def check_llm_config(cfg: DictConfig) -> None:
    """The LLM's config.json is of a model_type transformers can build (or T5-shaped, or trusted remote code),
    and a LoRA in it without target modules has default ones for that type (encoders/llm.py)."""
    # transformers' table of model types: imported here, where a check needs it (it imports torch, seconds)
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    llm = cfg.model.llm
    config = model_json(llm.pretrained, "config.json", llm.revision)
    if not config or "model_type" not in config:  # not on this machine, or a type transformers infers by name
        return
    model_type = llm_model_type(llm.pretrained, config, llm.trust_remote_code, CONFIG_MAPPING_NAMES)
    if llm.lora_rank > 0 and not llm.lora_target_modules:
        lora_targets_of(model_type)


def check_entity_parser(cfg: DictConfig) -> None:
    """The spaCy pipeline that parses captions for the entity loss in the data workers is installed."""
    objective = cfg.model.objective
    if objective.lambda_entity <= 0 or objective.entity_parser == SHAPES_GRAMMAR \
            or "entities" in cfg.data.precomputed_keys:
        return
    if not spacy_pipeline_installed(objective.entity_parser):
        raise ConfigError(f"model.objective.entity_parser={objective.entity_parser!r}: "
                          f"{spacy_model_missing_message(objective.entity_parser)}")


def check_performance(cfg: DictConfig, on_this_machine: bool) -> None:
    """``model.performance``: a torch.compile backend that exists and, where the run trains here, a Python and a
    compiler that can run it, and the optimizer's package (a cluster node is checked by train.py in the job)."""
    perf = cfg.model.performance
    if perf.compile:
        check_compile_supported(perf.compile_backend, on_this_machine)
    if on_this_machine:
        check_optimizer_available(perf.optimizer)


def check_sources(cfg: DictConfig) -> None:
    """Every configured model source must exist before the first one loads."""
    check_source(cfg.model.base.pretrained, "model.base.pretrained")
    check_source(cfg.model.llm.pretrained, "model.llm.pretrained")
    if cfg.model.base.unet:
        check_source(cfg.model.base.unet, "model.base.unet")
    if cfg.model.llm.tokenizer:
        check_source(cfg.model.llm.tokenizer, "model.llm.tokenizer")
    if "clip_score" in cfg.validation.metrics and cfg.validation.every_n_steps > 0:  # loaded at the first grid
        check_source(cfg.validation.clip_model, "validation.clip_model")


def local_folder(source: str | None) -> Path | None:
    """A configured source that is a folder on this machine (not a hub id, not an embedded model, built here)."""
    if not source or source.startswith("embedded:") or not is_local(source):
        return None
    path = Path(source).expanduser()
    return path if path.is_dir() else None


def check_model_weights(cfg: DictConfig) -> None:
    """Each local model folder the config names holds readable weights, read without loading them
    (encoders/weight_files.py): the base's parts (the UNet's and VAE's tensor names against their configs),
    ``model.base.unet``, the LLM, and an ``init_from`` connector folder (and its gated fusion)."""
    base = cfg.model.base
    checks: list[tuple[str, str, Path, bool, dict | None]] = []  # (key, value, folder, names?, classes)
    folder = local_folder(base.pretrained)
    if folder is not None:
        parts = ["vae", "text_encoder"] + ([] if base.unet else ["unet"])
        parts += ["text_encoder_2"] if base.family == "sdxl" else []
        for part in parts:
            if not (folder / part / "config.json").is_file():
                raise ConfigError(f"config key 'model.base.pretrained' is {base.pretrained!r}, which has no {part}/ "
                                  f"folder with a config.json: not a complete Stable Diffusion folder (was the copy "
                                  f"interrupted?)")
            checks.append(("model.base.pretrained", base.pretrained, folder / part, part in ("unet", "vae"), None))
    if local_folder(base.unet) is not None:
        checks.append(("model.base.unet", base.unet, local_folder(base.unet), True, None))
    if local_folder(cfg.model.llm.pretrained) is not None:
        checks.append(("model.llm.pretrained", cfg.model.llm.pretrained, local_folder(cfg.model.llm.pretrained),
                       False, None))
    init_from = local_folder(cfg.model.adapter.init_from)
    if init_from is not None and (init_from / "config.json").is_file():
        classes = {cls.__name__: cls for cls in (*CONNECTORS.values(), GatedFusion)}
        checks.append(("model.adapter.init_from", cfg.model.adapter.init_from, init_from, True, classes))
        if (init_from / FUSION_FOLDER / "config.json").is_file():
            checks.append(("model.adapter.init_from", cfg.model.adapter.init_from, init_from / FUSION_FOLDER, True,
                           classes))
    for key, value, path, names, classes in checks:
        try:
            check_weights(path, names_from_config=names, classes=classes)
        except (WeightFileError, OSError, ValueError) as err:
            raise ConfigError(f"config key {key!r} is {value!r}: {err}") from None


def resume_checkpoint(cfg: DictConfig) -> str | None:
    """The checkpoint ``resume`` names: auto, the newest readable one in ``output_dir`` (None for a new run);
    never, None; a path, that file once it is checked to be a checkpoint of this configuration."""
    if cfg.resume == "never":
        return None
    strategy = cfg.trainer.get("strategy")
    if cfg.resume == "auto":
        found = run_checkpoints.find_resume_checkpoint(Path(cfg.output_dir))
        if found:
            check_resume_layout(found, strategy)  # a run folder of another strategy (ddp <-> fsdp2)
        return str(found) if found else None
    if not (Path(cfg.resume).is_file() or is_sharded_checkpoint(cfg.resume)):
        raise ConfigError(f"resume={cfg.resume!r} is not a checkpoint file; use 'auto', 'never' or a path")
    load_checkpoint_checked(cfg.resume, cfg.model, what="resume=")  # a checkpoint, and of this configuration
    check_resume_layout(cfg.resume, strategy)
    return cfg.resume


def preflight(cfg: DictConfig, on_this_machine: bool = True) -> str | None:
    """Every check of a training run before weights load (see the module docstring); returns the
    checkpoint to resume from, or None. ``on_this_machine``: the run trains where this runs (train.py, a local
    sweep), not on a cluster node (submit.py, sweep.py --slurm), so what this machine lacks counts too."""
    check_sources(cfg)
    check_run_paths(cfg)
    check_llm_config(cfg)
    check_entity_parser(cfg)
    check_performance(cfg, on_this_machine)
    check_scheduler_name(cfg.validation.scheduler, "config key 'validation.scheduler'")
    if cfg.data.precomputed_keys:  # a cache made with other settings is refused before models load
        check_cache_key(cfg.data.shards, cfg)
    return resume_checkpoint(cfg)
