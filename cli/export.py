"""Export a trained run in the authors' release layout: `python export.py --help`.

    python export.py --checkpoint runs/x/checkpoints/last.ckpt --output runs/x/release

writes ``projector.pth`` (the CAM under the released key names) and ``unet/`` (the trained UNet, or the
frozen one the CAM was trained against), the layout of the released LLM4GEN SD1.5 model: load it with
``generate.py --release`` or ``model.adapter.init_from=DIR model.base.unet=DIR/unet``. EMA weights are
exported when the run has them (``--no-ema``: the trained ones).
"""

from __future__ import annotations

import argparse
import sys

from llm4gen.cli.generate import check_checkpoint_sources
from llm4gen.configs.errors import UserError, entry_point
from llm4gen.lightning_modules.checkpoint_files import load_checkpoint_checked
from llm4gen.lightning_modules.llm4gen import LLM4GenModule


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a training checkpoint (.ckpt)")
    parser.add_argument("--output", required=True, help="the folder to write projector.pth and unet/ into")
    parser.add_argument("--no-ema", action="store_true", help="export the trained weights, not their EMA")
    return parser.parse_args(argv)


@entry_point("export.py")
def main(argv=None) -> int:
    args = parse_args(argv)
    check_checkpoint_sources(load_checkpoint_checked(args.checkpoint, what="--checkpoint"))

    module = LLM4GenModule.load_from_checkpoint(args.checkpoint, map_location="cpu")
    try:
        print(module.export_release(args.output, use_ema=not args.no_ema))
    except ValueError as err:  # a run the release layout cannot hold (LoRA)
        raise UserError(str(err)) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
