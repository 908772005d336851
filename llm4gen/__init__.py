"""llm4gen: training code for LLM4GEN (Liu, Ma et al., AAAI 2025), Stable Diffusion 1.5 / SDXL whose CLIP
conditioning is enriched with a frozen LLM's token features by a trainable Cross-Adapter Module.

One import name; the repository's top-level folders are its subpackages (setup.cfg's ``package_dir``),
laid out in floors, every import pointing down (README, "Layout"):

    llm4gen.configs, llm4gen.shapes, llm4gen.embedded.registry   facts: schema, choices, errors, the shapes world
    llm4gen.adapters, llm4gen.encoders, llm4gen.embedded         models
    llm4gen.losses, llm4gen.datamodules                          objective pieces and runtime data
    llm4gen.evaluation                                           metrics and benchmarks
    llm4gen.lightning_modules                                    the LightningModule, its callbacks, sampling
    llm4gen.launch, llm4gen.tools                                SLURM, sweeps, preflight; offline tools
    llm4gen.experiments                                          studies
    llm4gen.cli                                                  entry points (console scripts llm4gen-*)
"""

__version__ = "0.2.0"
