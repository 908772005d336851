"""The named choices the code accepts, each spelled once (imported by the schema, the loaders, the data
pipeline and the shard writer; nothing here imports torch)."""

from __future__ import annotations

# Config dtype names (encoders.sources.TORCH_DTYPES maps them to torch dtypes).
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
# How LLM features are read (encoders.llm): auto detects it from the model config.
LLM_KINDS: tuple[str, ...] = ("auto", "encoder", "encoder-decoder", "decoder")
# model.llm.layer, besides an integer index into the LLM's hidden states.
LLM_LAYER_NAMES: tuple[str, ...] = ("penultimate", "mean")
# Three-way switches spelled as strings (model.llm.layer_norm): auto decides from the other settings.
SWITCHES: tuple[str, ...] = ("auto", "true", "false")
BASE_FAMILIES: tuple[str, ...] = ("sd15", "sdxl")
UNET_TRAINING: tuple[str, ...] = ("frozen", "full", "lora")
# model.adapter.kind: the connector between the LLM and the UNet (adapters/connectors.py)
CONNECTOR_KINDS: tuple[str, ...] = ("cam", "mlp", "lavi_bridge", "ella")
# The kinds whose context keeps CLIP's tokens before theirs unless model.adapter.with_clip says otherwise (as each
# was published: LaVi-Bridge and ELLA replace CLIP)
KINDS_WITH_CLIP: tuple[str, ...] = ("cam", "mlp")
# model.adapter.fusion: how the UNet reads the connector's tokens (adapters/gated_fusion.py)
FUSIONS: tuple[str, ...] = ("concat", "gated")
# Each kind's class, as save_pretrained names it in config.json's _class_name
CONNECTOR_CLASS_NAMES: dict[str, str] = {"cam": "CrossAdapter", "mlp": "MLPConnector",
                                         "lavi_bridge": "LaViBridgeAdapter", "ella": "TimestepAwareConnector"}
LATENTS = ("mean", "sample")  # model.objective.latents: the VAE posterior's mean, or a sample of it
# data.caption_keys' default: the members a caption is read from, first present wins ("json:caption": that
# field of the sample's .json, where img2dataset writes it)
CAPTION_KEYS: tuple[str, ...] = ("txt", "caption", "json:caption")
# recaption.py's default key for the caption it writes (KEY.dense.txt in a companion shard), and its json record's
DENSE_CAPTION_KEY = "dense.txt"


def caption_tag(caption_key: str) -> str:
    """The name a caption key's cached members carry (``llm_features.dense_txt.npy`` for ``dense.txt``): the key
    with every character but letters, digits, ``-`` and ``_`` made ``_`` (a member name splits at its dots)."""
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in caption_key)
LOGGERS: tuple[str, ...] = ("csv", "tensorboard", "wandb")
OPTIMIZERS: tuple[str, ...] = ("adamw", "adamw_fused", "adamw_8bit")  # model.performance.optimizer
LR_SCHEDULERS: tuple[str, ...] = ("constant_with_warmup", "cosine", "linear", "constant")
ENTITY_LAYER_PRESETS: tuple[str, ...] = ("lowest", "all")
# model.objective.entity_parser: a spaCy pipeline's name, or this one, the shapes benchmark's own caption grammar
SHAPES_GRAMMAR = "shapes"
RESUME_MODES: tuple[str, ...] = ("auto", "never")  # or a checkpoint path
# data.buckets.enabled (aspect-ratio bucketing): auto is on for SDXL, off for SD1.5.
BUCKET_MODES: tuple[str, ...] = SWITCHES
# The signal a cluster sends before preempting (slurm.signal; sbatch --signal), which train.py saves and requeues on.
PREEMPTION_SIGNALS: tuple[str, ...] = ("SIGUSR1", "SIGUSR2", "SIGTERM")
# Scores logged from the validation grids (evaluation/validation.py).
VALIDATION_METRICS: tuple[str, ...] = ("shapes", "clip_score")

# Image file extensions, without the dot: what prepare.py reads from a source folder and what training
# and cache.py look for as a sample's image member in a shard (prepare.py writes jpg).
IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")

# data.precomputed_keys: the batch fields a feature cache can hold (datamodules/cache_codec.py names their tar members)
PRECOMPUTED_KEYS: tuple[str, ...] = ("latent_moments", "llm_features", "clip_features", "clip_pooled", "original_size",
                                     "crop_top_left", "entities", "entity_positions")

# Why training (and cache.py) skips a sample. Order matters: it is the index order of batch["skipped"].
SAMPLE_SKIP_REASONS: tuple[str, ...] = (
    "bad_image",  # image member missing, not an image, truncated or undecodable
    "missing_caption",  # none of the caption keys is present
    "empty_caption",  # a caption key is present but holds only whitespace
    "bad_precomputed",  # a precomputed member the config asks for is missing or undecodable
    "bad_shard",  # the tar itself failed (truncated, unreadable, not a tar); rest of that shard lost
    "failed_download",  # the json's status is not "success" (img2dataset, DataComp and LAION shards record it)
)

# Why prepare.py leaves an input out of the shards (reported per reason in report.json).
PREPARE_SKIP_REASONS: dict[str, str] = {
    "duplicate_key": "an earlier input in source order has the same key",
    "bad_record": "the table row or JSONL line cannot be used (invalid JSON, empty image path or key)",
    "missing_caption": "no caption sidecar / no caption value",
    "empty_caption": "the caption is empty or only whitespace",
    "caption_not_utf8": "the caption bytes are not valid UTF-8",
    "missing_image": "the image path does not exist or cannot be read",
    "empty_file": "the image file has zero bytes",
    "not_an_image": "PIL cannot identify the file as an image",
    "corrupt_image": "the image is truncated or fails to decode",
    "image_too_large": "the image exceeds PIL's decompression-bomb limit",
    "unsupported_image_mode": "the image's pixel mode cannot be converted to RGB",
    "too_small": "the image's shorter side is below min_size",
    "failed_download": "a shard sample whose json status is not success (img2dataset)",
}

# Why recaption.py writes no new caption for a sample (its json record says which; report.json counts each).
RECAPTION_SKIP_REASONS: dict[str, str] = {
    "bad_image": "no image member, or the image does not decode",
    "failed_download": "the json's status is not success (img2dataset)",
    "empty_output": "the model wrote no words",
    "too_short": "fewer words than --min-words",
    "too_long": "more words than --max-words",
    "bad_shard": "the tar broke part-way; its later samples are not read (counted once per break)",
}
