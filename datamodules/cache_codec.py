"""The members a feature cache adds to a sample (``cache.py`` writes them, the stream reads them): which batch field
is stored under which tar member, and how each is encoded and decoded."""

from __future__ import annotations

import io
import json
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from llm4gen.configs.choices import caption_tag
from llm4gen.datamodules.transforms import SampleError


# Batch field -> tar member extension written by the cache writer (``sample-000123.latent_moments.npy``).
# ``.npy`` is canonical; a ``.pt`` member with the same stem (``latent_moments.pt``) is read as well.
PRECOMPUTED_MEMBERS: dict[str, str] = {
    "latent_moments": "latent_moments.npy",  # (2C, h, w) the VAE posterior's mean and log-variance (sampled at train time, like online encoding)
    "llm_features": "llm_features.npy",  # (tokens, dim), unpadded: only the caption's real tokens
    "clip_features": "clip_features.npy",  # (77, clip_dim) CLIP's last hidden state of the caption
    "clip_pooled": "clip_pooled.npy",  # (pooled_dim,) SDXL only: written and read with clip_features
    # Written and read with latent_moments (the image is not decoded then): SDXL's size/crop conditioning.
    "original_size": "original_size.npy",  # (2,) (height, width) before any resize
    "crop_top_left": "crop_top_left.npy",  # (2,) (top, left) of the crop in the resized image
    "entities": "entities.json",  # the entity parse of the caption, passed through as parsed JSON
    # its words' positions in the fused [CLIP, LLM] context: {"positions": [[int]], "num_tokens": int}
    "entity_positions": "entity_positions.json",
}
JSON_MEMBERS = ("entities", "entity_positions")
# The members that depend on the caption. With ``data.caption_mix`` a cache holds them once per caption key, named
# with the key's tag (``llm_features.dense_txt.npy``); without, once, for the caption ``data.caption_keys`` picks.
CAPTION_MEMBERS = ("llm_features", "clip_features", "clip_pooled", "entities", "entity_positions")


def member_name(name: str, caption_key: Optional[str] = None) -> str:
    """The tar member extension field ``name`` is stored under: :data:`PRECOMPUTED_MEMBERS`, with the caption key's
    tag before the suffix for a caption member of a per-key cache (``caption_key`` given)."""
    member = PRECOMPUTED_MEMBERS[name]
    if caption_key is None or name not in CAPTION_MEMBERS:
        return member
    stem, suffix = member.rsplit(".", 1)
    return f"{stem}.{caption_tag(caption_key)}.{suffix}"


# ---------------------------------------------------------------- precomputed members


def encode_precomputed(
    latent_moments: Optional[Union[np.ndarray, torch.Tensor]] = None,
    llm_features: Optional[Union[np.ndarray, torch.Tensor]] = None,
    entities: Optional[Any] = None,
    clip_features: Optional[Union[np.ndarray, torch.Tensor]] = None,
    clip_pooled: Optional[Union[np.ndarray, torch.Tensor]] = None,
    original_size: Optional[Sequence[int]] = None,
    crop_top_left: Optional[Sequence[int]] = None,
    entity_positions: Optional[Mapping[str, Any]] = None,
    caption_key: Optional[str] = None,
) -> dict[str, bytes]:
    """Tar members for one sample's cached values, named by :func:`member_name` (the caption members with
    ``caption_key``'s tag when given: the values of that caption of a ``data.caption_mix``).

    Arrays keep their dtype (write float16 to halve the cache); the loader returns float32.
    ``llm_features`` is ``(tokens, dim)`` of the caption's real tokens only (no padding).
    """
    members: dict[str, bytes] = {}
    for name, value in (("latent_moments", latent_moments), ("llm_features", llm_features), ("clip_features", clip_features),
                        ("clip_pooled", clip_pooled), ("original_size", original_size), ("crop_top_left", crop_top_left)):
        if value is None:
            continue
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        expected_ndim = _EXPECTED_NDIM.get(name, 2)
        if array.ndim != expected_ndim:
            raise ValueError(f"{name} must have {expected_ndim} dims per sample, got shape {array.shape}")
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        members[member_name(name, caption_key)] = buffer.getvalue()
    for name, value in (("entities", entities), ("entity_positions", entity_positions)):
        if value is not None:
            members[member_name(name, caption_key)] = json.dumps(value).encode("utf-8")
    return members


_EXPECTED_NDIM = {"latent_moments": 3, "clip_pooled": 1, "original_size": 1, "crop_top_left": 1}
_GEOMETRY = ("original_size", "crop_top_left")


def _load_array(sample: Mapping[str, Any], name: str, caption_key: Optional[str]) -> torch.Tensor:
    extension = member_name(name, caption_key)
    torch_extension = extension.rsplit(".", 1)[0] + ".pt"
    if extension in sample:
        array = np.load(io.BytesIO(sample[extension]), allow_pickle=False)
        return torch.from_numpy(np.ascontiguousarray(array)).float()
    if torch_extension in sample:
        return torch.load(io.BytesIO(sample[torch_extension]), weights_only=True).float()
    raise SampleError("bad_precomputed", f"member {extension!r} (or {torch_extension!r}) is missing")


def decode_precomputed(sample: Mapping[str, Any], fields: Sequence[str], caption_key: Optional[str] = None) -> dict[str, Any]:
    """The requested cached fields of a raw sample, or ``SampleError("bad_precomputed")``; the caption members
    those of ``caption_key`` (the caption this sample trains on, drawn from ``data.caption_mix``) when given."""
    out: dict[str, Any] = {}
    try:
        for name in fields:
            if name in JSON_MEMBERS:
                raw = sample.get(member_name(name, caption_key))
                if raw is None:
                    raise SampleError("bad_precomputed", f"member {member_name(name, caption_key)!r} is missing")
                out[name] = json.loads(raw)
                continue
            names = [name]
            if name == "clip_features" and member_name("clip_pooled", caption_key) in sample:
                names.append("clip_pooled")  # an SDXL cache: the pooled embedding comes with the hidden states
            if name == "latent_moments":
                names += [g for g in _GEOMETRY if PRECOMPUTED_MEMBERS[g] in sample]
            for part in names:
                tensor = _load_array(sample, part, caption_key)
                if tensor.ndim != _EXPECTED_NDIM.get(part, 2) or tensor.shape[0] == 0:
                    raise SampleError("bad_precomputed", f"{part} has shape {tuple(tensor.shape)}")
                out[part] = tuple(int(v) for v in tensor.tolist()) if part in _GEOMETRY else tensor
    except SampleError:
        raise
    except Exception as error:
        raise SampleError("bad_precomputed", f"{type(error).__name__}: {error}") from error
    return out


