"""Strict loading of frozen models: every weight of the checkpoint lands in the model, or nothing loads.

transformers and diffusers both load a checkpoint whose names do not match the model class, initialise
the unmatched weights randomly and only print a note. A frozen model that is partly random trains an
adapter on noise without any error (a RankGen checkpoint, whose T5 encoder sits under ``t5_encoder.``,
loaded that way gives features off by up to 5.0). Here every load asks for the loading info (missing,
unexpected and mismatched keys) and refuses any of them with one paragraph saying what to do.

RankGen's layout is handled without its remote code: its weights are ``t5_encoder.<T5EncoderModel key>``
beside a ``projection.weight`` head (used only for RankGen's own scoring). :data:`RANKGEN_KEY_MAPPING`
renames the encoder's keys onto transformers' ``T5EncoderModel``; the head is the one unexpected key that
is allowed, and only for T5 encoders.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

from llm4gen.configs.errors import UserError
from llm4gen.encoders.sources import load_pretrained

# RankGen (kalpeshk2011/rankgen-t5-*): encoder weights under this prefix, beside its projection head.
RANKGEN_KEY_MAPPING = {r"^t5_encoder\.": ""}
RANKGEN_HEAD_KEYS = ("projection.weight", "projection.bias")
SHOWN_KEYS = 5


class WeightLoadingError(UserError, ValueError):
    """A checkpoint whose weight names or shapes do not match the model class it is loaded into."""


def _as_list(keys: Any) -> list[str]:
    return sorted(str(k) for k in (keys or ()))


def _show(keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOWN_KEYS])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > SHOWN_KEYS else ''})"


def loading_problems(info: Mapping[str, Any], allowed_unexpected: Iterable[str] = ()) -> dict[str, list[str]]:
    """The non-empty problem lists of a ``from_pretrained(..., output_loading_info=True)`` info dict.

    transformers and diffusers both return ``missing_keys``, ``unexpected_keys``, ``mismatched_keys``
    (transformers: ``(key, checkpoint shape, model shape)`` tuples) and ``error_msgs``.
    """
    allowed = set(allowed_unexpected)
    mismatched = [(f"{m[0]} {tuple(m[1])} vs model {tuple(m[2])}" if isinstance(m, (tuple, list)) and len(m) == 3
                   else str(m)) for m in (info.get("mismatched_keys") or ())]
    problems = {
        "missing": _as_list(info.get("missing_keys")),
        "unexpected": [k for k in _as_list(info.get("unexpected_keys")) if k not in allowed],
        "mismatched": sorted(mismatched),
        "errors": [str(e).splitlines()[0] for e in (info.get("error_msgs") or ())],
    }
    return {name: keys for name, keys in problems.items() if keys}


def check_loading_info(info: Mapping[str, Any], what: str, source: str, model_name: str,
                       allowed_unexpected: Iterable[str] = (), hint: str = "") -> None:
    """Raises WeightLoadingError naming the model, the first offending keys and what to do."""
    problems = loading_problems(info, allowed_unexpected)
    if not problems:
        return
    described = "; ".join(f"{name} keys {_show(keys)}" if name != "errors" else f"errors {_show(keys)}"
                          for name, keys in problems.items())
    raise WeightLoadingError(
        f"{what}: the checkpoint {source!r} does not match {model_name}: {described}. Loading it anyway would "
        f"leave those weights randomly initialised (or drop them) in a frozen model, and train on a wrong model "
        f"without any error. Check that {what} points at the intended weights (folder, hub id, revision) and "
        f"that they are of this architecture{'; ' + hint if hint else ''}.")


def load_strict(loader: Callable[..., Any], source: str, what: str, allowed_unexpected: Iterable[str] = (),
                hint: str = "", **kwargs) -> Any:
    """``loader(source, output_loading_info=True, **kwargs)`` through :func:`load_pretrained`, refusing
    any missing, unexpected or mismatched key."""
    model, info = load_pretrained(loader, source, what, output_loading_info=True, **kwargs)
    check_loading_info(info, what, source, type(model).__name__, allowed_unexpected, hint)
    return model
