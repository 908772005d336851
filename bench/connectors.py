"""Trainable parameters and training FLOPs per sample of each connector (model.adapter.kind) at full size.

    python bench/connectors.py                      # SD1.5 at 512 px, T5-XL-wide features (2048), 128 tokens
    python bench/connectors.py --llm-width 4096 --llm-tokens 77

Everything is built on the meta device from the published configs (``embedded/full_size.py``'s SD1.5 UNet)
and each kind's defaults (``configs/schema.py``: the CAM's one block, ELLA's 64 queries x 6 blocks at width 768,
LaVi-Bridge's and the MLP's hidden width 768), so it runs in seconds on a CPU with no weights. FLOPs are
``lightning_modules/flops.py``'s count of the trained path (connector -> UNet -> MSE, forward and backward)
with a frozen UNet and with LoRA rank 32 in the UNet (LaVi-Bridge's recipe). Step times need a GPU:
``bench/gpu_bench.py --scenarios f,g,h``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch  # noqa: E402

from llm4gen.adapters.connectors import build_connector  # noqa: E402
from llm4gen.configs.choices import CONNECTOR_KINDS  # noqa: E402
from llm4gen.configs.schema import load_config  # noqa: E402
from llm4gen.embedded import full_size  # noqa: E402
from llm4gen.lightning_modules.flops import trained_path_flops  # noqa: E402


def connector_rows(llm_width: int = 2048, llm_tokens: int = 128, resolution: int = 512) -> list[dict]:
    from peft import LoraConfig

    rows = []
    for kind in CONNECTOR_KINDS:
        adapter_cfg = load_config(overrides=[f"model.adapter.kind={kind}"]).model.adapter
        with torch.device("meta"):
            connector = build_connector(adapter_cfg, clip_dim=768, llm_dim=llm_width)
        context = connector(torch.empty(1, 77, 768, device="meta"), torch.empty(1, llm_tokens, llm_width, device="meta"),
                            None, torch.zeros(1, dtype=torch.long, device="meta")).shape[1]
        row = {"kind": kind, "params": sum(p.numel() for p in connector.parameters()), "context": context}
        for unet_training in ("frozen", "lora"):
            unet = full_size.sd15_unet("meta").requires_grad_(False)
            if unet_training == "lora":
                unet.add_adapter(LoraConfig(r=32, lora_alpha=32, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
                row["lora_params"] = sum(p.numel() for p in unet.parameters() if p.requires_grad)
            row[f"tflops_{unet_training}"] = trained_path_flops(connector, unet, resolution // 8, 77, llm_tokens) / 1e12
        rows.append(row)
    return rows


PAPER_CONFIGS = ("configs/sd15_t5xl.yaml", "configs/ella_sd15.yaml", "configs/lavi_bridge_sd15.yaml")


def config_rows(configs=PAPER_CONFIGS, resolution: int = 512) -> list[dict]:
    """Each shipped connector config at full size on the meta device: its own LLM (T5-XL, FLAN-T5-XL's
    T5-XL encoder, Llama-2-7B) at its own max_length, its connector, its UNet training; FLOPs per sample of
    the LLM's forward and of the trained path (connector -> UNet, forward and backward)."""
    from peft import LoraConfig

    from llm4gen.lightning_modules.flops import text_encoder_flops

    rows = []
    for path in configs:
        cfg = load_config(path)
        llm = full_size.llm_architecture(cfg.model.llm.pretrained)
        width = getattr(llm.config, "d_model", None) or llm.config.hidden_size
        tokens = cfg.model.llm.max_length
        with torch.device("meta"):
            connector = build_connector(cfg.model.adapter, clip_dim=768, llm_dim=width)
        unet = full_size.sd15_unet("meta").requires_grad_(cfg.model.unet_training == "full")
        if cfg.model.unet_training == "lora":
            lora = cfg.model.lora
            unet.add_adapter(LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=list(lora.target_modules)))
        rows.append({"config": Path(path).name, "llm": cfg.model.llm.pretrained,
                     "llm_params": sum(p.numel() for p in llm.parameters()), "tokens": tokens,
                     "llm_tflops": text_encoder_flops(llm, tokens, decoder=cfg.model.llm.kind == "decoder") / 1e12,
                     "kind": cfg.model.adapter.kind, "unet_training": cfg.model.unet_training,
                     "trained": sum(p.numel() for p in connector.parameters())
                     + sum(p.numel() for p in unet.parameters() if p.requires_grad),
                     "path_tflops": trained_path_flops(connector, unet, resolution // 8, 77, tokens) / 1e12})
    return rows


def main(argv=None) -> dict[str, list[dict]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm-width", type=int, default=2048)
    parser.add_argument("--llm-tokens", type=int, default=128)
    parser.add_argument("--resolution", type=int, default=512)
    args = parser.parse_args(argv)
    rows = connector_rows(args.llm_width, args.llm_tokens, args.resolution)
    print(f"\nSD1.5 at {args.resolution} px, LLM features {args.llm_tokens} x {args.llm_width}; FLOPs per sample, "
          f"forward + backward of the trained path\n")
    print("| kind | connector params | context tokens | TFLOPs (frozen UNet) | TFLOPs (+ LoRA r32, "
          f"{rows[0]['lora_params'] / 1e6:.1f} M) |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['kind']} | {r['params'] / 1e6:.2f} M | {r['context']} | {r['tflops_frozen']:.3f} | {r['tflops_lora']:.3f} |")
    configs = config_rows(resolution=args.resolution)
    print(f"\nThe shipped connector configs at full size (SD1.5 at {args.resolution} px, each with its own LLM)\n")
    print("| config | LLM | LLM params | tokens | LLM forward TFLOPs | connector | UNet | trained params | "
          "trained path TFLOPs |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in configs:
        print(f"| {r['config']} | {r['llm']} | {r['llm_params'] / 1e9:.2f} B | {r['tokens']} | {r['llm_tflops']:.3f} | "
              f"{r['kind']} | {r['unet_training']} | {r['trained'] / 1e6:.2f} M | {r['path_tflops']:.3f} |")
    return {"connectors": rows, "configs": configs}


if __name__ == "__main__":
    main()
