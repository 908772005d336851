"""What recaptioning costs: LLaVA-1.5-7B's FLOPs per image, counted, and the GPU-hours of a 1 M-image job.

    python bench/recaption_cost.py                       # 636 prompt tokens (576 image + 60 text), 128 new tokens
    python bench/recaption_cost.py --new-tokens 160 --images 1000000 --batch-size 32

Method (prints a Markdown table; seconds on a CPU, no GPU, no download):
- FLOPs: LLaVA-1.5-7B is built from its published config on the ``meta`` device (``embedded/full_size.py``:
  shapes only, no memory, no weights) and run under ``torch.utils.flop_counter.FlopCounterMode``, which counts
  every matmul and attention from the shapes: the vision tower and projector on one 336 px image; the prefill, the
  decoder over the prompt (image tokens + text), with the LM head on the last position only (as ``generate``
  computes it); one decode step (one token, LM head included) against a KV cache holding the prompt, and one
  against a cache holding the prompt and all but the last new token. A step's attention grows linearly with the
  cache, so the mean of the two steps times ``new_tokens`` is the decode's exact total.
- GPU time, a floor from the two limits of an H100: the vision tower and prefill are compute-bound, timed at
  ``--mfu`` (default 0.5) of the 790 TFLOP/s measured on a large bf16 matmul (docs/performance.md); a decode
  step is bandwidth-bound: it reads the 14.1 GB of bf16 weights once for the batch plus each sample's KV cache
  (2 x layers x width x 2 bytes per token of context), at ``--bandwidth`` (default 3.35 TB/s, H100 SXM HBM3).
  Host overhead is not in it: an eager-mode decode step launches about a thousand kernels (32 layers of ~30), at
  5-10 us each the same order as the ~8 ms the step's memory traffic takes at batch 32, so the real job may take
  up to about twice the floor (less with CUDA graphs or a serving engine); time it where a GPU is lent.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from llm4gen.embedded import full_size  # noqa: E402

H100_BF16_TFLOPS = 790.0  # measured on a large bf16 matmul (docs/performance.md)
H100_BANDWIDTH_TBS = 3.35


def flops_of(run) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        run()
    return counter.get_total_flops()


def recaption_flops(model, prompt_tokens: int, new_tokens: int) -> dict[str, float]:
    """FLOPs of captioning one image with a LLaVA-style model (see the module doc): vision, prefill, decode."""
    config, dtype = model.config, torch.bfloat16
    model = model.to(dtype)
    vision = config.vision_config
    pixels = torch.empty(1, 3, vision.image_size, vision.image_size, device="meta", dtype=dtype)
    text = config.text_config
    decoder = model.model.language_model
    width = text.hidden_size
    image = flops_of(lambda: model.model.get_image_features(
        pixel_values=pixels, vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy))

    def prefill():
        prompt = torch.empty(1, prompt_tokens, width, device="meta", dtype=dtype)  # (1, tokens, width)
        model.lm_head(decoder(inputs_embeds=prompt, use_cache=True).last_hidden_state[:, -1:])

    def decode_step(context: int) -> int:
        cache = DynamicCache(config=text)
        heads = text.num_key_value_heads
        for layer in range(text.num_hidden_layers):
            past = torch.empty(1, heads, context, width // text.num_attention_heads, device="meta", dtype=dtype)
            cache.update(past, past, layer)
        token = torch.empty(1, 1, width, device="meta", dtype=dtype)  # (1, 1, width)
        return flops_of(lambda: model.lm_head(decoder(inputs_embeds=token, cache=cache, use_cache=True).last_hidden_state))

    first, last = decode_step(prompt_tokens), decode_step(prompt_tokens + new_tokens - 1)
    return {"vision": image, "prefill": flops_of(prefill), "decode": (first + last) / 2 * new_tokens,
            "decode_step_first": first, "decode_step_last": last}


def gpu_seconds_per_image(flops: dict[str, float], model, prompt_tokens: int, new_tokens: int, batch_size: int,
                          mfu: float, bandwidth_tbs: float) -> dict[str, float]:
    """The floor of one image's GPU time (see the module doc), per phase."""
    text = model.config.text_config
    compute = (flops["vision"] + flops["prefill"]) / (mfu * H100_BF16_TFLOPS * 1e12)
    weights = sum(p.numel() for p in model.parameters()) * 2  # bf16 bytes
    kv_per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * (text.hidden_size // text.num_attention_heads) * 2
    mean_context = prompt_tokens + (new_tokens - 1) / 2
    step_bytes = weights + batch_size * kv_per_token * mean_context  # one decode step of the whole batch
    decode = new_tokens * step_bytes / (bandwidth_tbs * 1e12) / batch_size
    return {"compute": compute, "decode": decode, "weights_gb": weights / 1e9, "kv_mb_per_sample": kv_per_token * mean_context / 1e6}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-tokens", type=int, default=636, help="576 image tokens + the instruction in LLaVA's template")
    parser.add_argument("--new-tokens", type=int, default=128, help="a ~95-word caption at ~1.35 tokens a word")
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--mfu", type=float, default=0.5, help="share of 790 TFLOP/s the prefill reaches")
    parser.add_argument("--bandwidth", type=float, default=H100_BANDWIDTH_TBS, help="HBM TB/s")
    args = parser.parse_args(argv)
    model = full_size.llava_15_7b("meta")
    flops = recaption_flops(model, args.prompt_tokens, args.new_tokens)
    seconds = gpu_seconds_per_image(flops, model, args.prompt_tokens, args.new_tokens, args.batch_size, args.mfu,
                                    args.bandwidth)
    total = flops["vision"] + flops["prefill"] + flops["decode"]
    per_image = seconds["compute"] + seconds["decode"]
    print(f"LLaVA-1.5-7B ({sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters), one 336 px image, "
          f"{args.prompt_tokens} prompt tokens, {args.new_tokens} new tokens, batch {args.batch_size}\n")
    print("| phase | TFLOP per image | H100 floor, ms per image | bound by |")
    print("| --- | ---: | ---: | --- |")
    compute_ms = seconds["compute"] * 1e3
    share = flops["vision"] / (flops["vision"] + flops["prefill"])
    print(f"| vision tower + projector | {flops['vision'] / 1e12:.2f} | {compute_ms * share:.1f} | compute at MFU {args.mfu} |")
    print(f"| prefill ({args.prompt_tokens} tokens) | {flops['prefill'] / 1e12:.2f} | {compute_ms * (1 - share):.1f} | "
          f"compute at MFU {args.mfu} |")
    print(f"| decode ({args.new_tokens} steps; {flops['decode_step_first'] / 1e9:.2f} to "
          f"{flops['decode_step_last'] / 1e9:.2f} GFLOP a step) | {flops['decode'] / 1e12:.2f} | "
          f"{seconds['decode'] * 1e3:.1f} | HBM: {seconds['weights_gb']:.1f} GB of weights a step over the batch, "
          f"{seconds['kv_mb_per_sample']:.0f} MB of KV cache a sample |")
    print(f"| total | {total / 1e12:.2f} | {per_image * 1e3:.1f} | |")
    print(f"\n{args.images:,} images: {total * args.images:.2e} FLOP; floor {per_image * args.images / 3600:.1f} H100 "
          f"GPU-hours ({1 / per_image:.0f} images/s per GPU); with eager generate's per-step host overhead, up to about "
          f"twice that.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
