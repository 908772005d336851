"""Where the UNet's cross-attention goes: CLIP's tokens, the connector's real tokens, or LLM padding.

A connector that takes attention from CLIP before it has learned anything damages the base (a frozen UNet
draws what it was trained to draw from CLIP's tokens); padding that takes attention is pure damage. The
split is measured on the module's own conditioning (masks included), over every cross-attention layer,
head, pixel and prompt, at a few timesteps from fixed noise:

- concatenated context: the softmax's mass on each part (it sums to 1);
- gated fusion (adapters/gated_fusion.py): the two attentions' outputs are added with weights 1 and
  ``tanh(g)``, so the split is CLIP 1 / (1 + |tanh g|) and the LLM branch's |tanh g| / (1 + |tanh g|),
  the latter shared between its real tokens and padding as its own softmax shares it (0 on padding when
  masked). A closed gate reads CLIP 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from llm4gen.adapters.attention import attention_probabilities
from llm4gen.adapters.gated_fusion import GatedFusionProcessor, cross_attention_layers


@dataclass(frozen=True)
class AttentionSplit:
    clip: float      # share on CLIP's tokens
    llm: float       # on the connector's real tokens (an LLM token, or a learned query)
    padding: float   # on LLM padding

    def logs(self, prefix: str = "val/attention_") -> dict[str, float]:
        return {f"{prefix}clip": self.clip, f"{prefix}llm": self.llm, f"{prefix}padding": self.padding}

    def line(self) -> str:
        return f"cross-attention on CLIP {self.clip:.2f}, LLM tokens {self.llm:.2f}, padding {self.padding:.2f}"


def layer_split(probs: torch.Tensor, clip_tokens: int, real: torch.Tensor) -> torch.Tensor:
    """(3,) mean mass on CLIP / real / padding of ``probs`` (batch, heads, pixels, tokens) over a context whose
    first ``clip_tokens`` are CLIP's and whose rest are real where ``real`` (batch, tokens - clip_tokens)."""
    mass = probs.float().mean(dim=(1, 2))  # (batch, tokens)
    rest = mass[:, clip_tokens:]
    real = real.to(rest.dtype)
    return torch.stack([mass[:, :clip_tokens].sum(1), (rest * real).sum(1), (rest * (1 - real)).sum(1)]).mean(1)


@torch.no_grad()
def attention_split(module, prompts: Sequence[str], timesteps: Sequence[int] = (200, 500, 800),
                    seed: int = 0) -> AttentionSplit:
    """The split of an ``LLM4GenModule``'s cross-attention for ``prompts`` (CLIP 1 for a run without a connector)."""
    if not module.uses_cam:
        return AttentionSplit(1.0, 0.0, 0.0)
    was_training = module.training
    module.eval()
    clip, llm = module.encode_text(list(prompts))
    layout = module.adapter.layout
    clip_tokens = clip.hidden.shape[1] if layout.starts_with_clip else 0
    if layout.has_word_positions:
        real = llm.mask  # (batch, llm_tokens)
    else:  # learned queries: every one is real
        queries = module.fuse(clip.hidden, llm, torch.full((len(prompts),), timesteps[0])).shape[1] - clip_tokens
        real = torch.ones(len(prompts), queries, dtype=torch.bool)
    shares = []

    def measure(attn, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        context = kwargs.get("encoder_hidden_states")
        bias = kwargs.get("attention_mask")
        if hidden.ndim == 4:
            hidden = hidden.flatten(2).transpose(1, 2)
        batch = hidden.shape[0]

        def heads(x):
            return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        query = heads(attn.to_q(hidden))
        processor = attn.processor
        if isinstance(processor, GatedFusionProcessor) and context.shape[1] > processor.clip_tokens:
            n = processor.clip_tokens
            llm_bias = None if bias is None else bias[:, None, :, n:]
            llm_probs = attention_probabilities(query, heads(processor.layer.keys_values(context[:, n:], query.dtype)[0]), attn.scale, llm_bias)
            within = layer_split(llm_probs, 0, real.to(llm_probs.device))[1:]  # (real, padding) of the LLM branch
            gate = float(processor.layer.openness().abs())
            shares.append(torch.cat([torch.ones(1), gate * within]) / (1 + gate))
        else:
            probs = attention_probabilities(query, heads(attn.to_k(context)), attn.scale,
                                            None if bias is None else bias[:, None])
            shares.append(layer_split(probs, clip_tokens, real.to(probs.device)))
        return None

    handles = [layer.register_forward_pre_hook(measure, with_kwargs=True)
               for layer in cross_attention_layers(module.unet).values()]
    generator = torch.Generator().manual_seed(seed)
    unet = module.unet
    try:
        for t in timesteps:
            step = torch.full((len(prompts),), t, device=module.device)
            context = module.fuse(clip.hidden, llm, step)
            kwargs = module.clip.unet_kwargs(clip, module.image_size())
            mask = module.context_mask(clip.hidden, llm)
            if mask is not None:
                kwargs["encoder_attention_mask"] = mask
            size = unet.config.sample_size
            latents = torch.randn(len(prompts), unet.config.in_channels, size, size, generator=generator)
            unet(latents.to(module.device, unet.dtype), step, context.to(unet.dtype), **kwargs)
    finally:
        for handle in handles:
            handle.remove()
        module.train(was_training)
    clip_share, llm_share, padding = torch.stack(shares).mean(0).tolist()
    return AttentionSplit(clip_share, llm_share, padding)
