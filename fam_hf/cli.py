"""``fam-hf``: what users do outside a training script.

fam-hf layers MODEL_DIR [--task sequence-classification|causal-lm]
    list the layers fam_layer can name, with the one fam_layer='auto' picks
"""

from __future__ import annotations

import argparse
import sys

_TASKS = {"sequence-classification": "AutoModelForSequenceClassification", "causal-lm": "AutoModelForCausalLM"}


def _load(model_dir: str, task: str = "auto"):
    import transformers

    if task != "auto":
        return getattr(transformers, _TASKS[task]).from_pretrained(model_dir)
    config = transformers.AutoConfig.from_pretrained(model_dir)
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls.from_pretrained(model_dir)
    return transformers.AutoModel.from_pretrained(model_dir)


def _layers(args: argparse.Namespace) -> int:
    from .layers import candidate_layers, output_head_name, resolve_layer

    model = _load(args.model, args.task)
    head = output_head_name(model)
    print(f"{type(model).__name__}: fam_layer='auto' -> {head or '(no output head recognised)'}")
    for name in candidate_layers(model):
        layer = resolve_layer(model, name)
        d, m = layer.shape
        print(f"{'*' if name == head else ' '} {name:<60} {layer.kind:<16} {d}×{m}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from . import __version__

    parser = argparse.ArgumentParser(prog="fam-hf", description="Relative Flatness Aware Minimization tools")
    parser.add_argument("--version", action="version", version=f"fam_hf {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    layers = commands.add_parser("layers", help="list the layers fam_layer can name (a saved model folder)")
    layers.add_argument("model", help="a local model folder (or a Hub id where a network exists)")
    layers.add_argument(
        "--task",
        choices=["auto", *_TASKS],
        default="auto",
        help="load with this head (default: the saved architecture)",
    )
    layers.set_defaults(run=_layers)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
