"""``fam-hf``: what users do outside a training script.

fam-hf layers MODEL_DIR [--task sequence-classification|causal-lm]
    list the layers fam_layer can name, with the one fam_layer='auto' picks
fam-hf measure --model DIR --data FILE.jsonl|csv [--measures kappa,hessian_trace,...] [--json OUT.json]
    flatness measures of a saved model on a few batches of a small local data file
fam-hf plot RUN_DIR [RUN_DIR ...] --out DIR
    κ, Hessian trace, top eigenvalue, gap, … against the step, from each run's trainer_state.json
fam-hf plot SPECTRUM.json [SPECTRUM.json ...] --out DIR | FILE.png
    Hessian eigenvalue densities (fam_hf.hessian_spectrum(...).save(path)) overlaid in DIR/spectrum.png or FILE.png
fam-hf publish RUN_DIR --repo-id OWNER/NAME [--private] [--token-env VAR] [--revision BRANCH]
    push a finished run (model or adapter, tokenizer, metrics, the FAM model card) to the Hugging Face Hub
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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


def _read_rows(path: str, limit: int) -> list[dict]:
    import csv
    import json

    if not path.endswith((".csv", ".jsonl", ".json")):
        raise SystemExit(f"--data {path}: expected a .jsonl, .json (an array of objects) or .csv file")
    try:
        with open(path, newline="") as f:
            if path.endswith(".csv"):
                rows = list(csv.DictReader(f))
            else:
                text = f.read()
                whole = text.lstrip().startswith("[")  # a JSON array of objects; else one object a line
                rows = json.loads(text) if whole else [json.loads(line) for line in text.splitlines() if line.strip()]
    except FileNotFoundError:
        raise SystemExit(f"--data {path}: no such file") from None
    except json.JSONDecodeError as error:
        raise SystemExit(f"--data {path}: not JSON lines or a JSON array of objects ({error})") from None
    if not all(isinstance(row, dict) for row in rows):
        raise SystemExit(f"--data {path}: every row must be an object with named columns")
    return rows[:limit]


def _label(value, model):
    """A row's target as the model's loss takes it: a class id, a float (regression), floats (multi-label)."""
    config = model.config
    if isinstance(value, list):  # multi-label: one 0/1 target a class
        return [float(v) for v in value]
    if config.problem_type == "regression" or config.num_labels == 1:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise SystemExit(f"label {value!r} is not a number, and {type(model).__name__} is a regressor") from None
    label2id = getattr(config, "label2id", None) or {}
    if isinstance(value, str) and value in label2id:
        return int(label2id[value])
    try:
        return int(value)
    except (TypeError, ValueError):
        raise SystemExit(
            f"label {value!r} is neither an integer nor one of the model's labels {sorted(label2id)}"
        ) from None


def _batches(args: argparse.Namespace, model, tokenizer) -> list[dict]:
    import torch

    rows = _read_rows(args.data, args.max_examples)
    if not rows:
        raise SystemExit(f"--data {args.data} has no rows")
    missing = {args.text_column} - rows[0].keys()
    if missing:
        raise SystemExit(f"--data {args.data} has no column {args.text_column!r}; columns: {', '.join(rows[0])}")
    causal = type(model).__name__.endswith("ForCausalLM") or type(model).__name__.endswith("LMHeadModel")
    if not causal and not type(model).__name__.endswith("ForSequenceClassification"):
        raise SystemExit(
            f"{args.model} loads as {type(model).__name__}, which has no head that computes a loss; pass --task "
            "sequence-classification (its head then starts untrained) or --task causal-lm"
        )
    if tokenizer.pad_token is None:  # GPT-style tokenizers: padded positions are masked out of the loss anyway
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:  # a decoder classifier finds each row's last token by it
        model.config.pad_token_id = tokenizer.pad_token_id
    if not causal:
        unlabelled = [i for i, row in enumerate(rows) if args.label_column not in row]
        if unlabelled:
            raise SystemExit(
                f"--data {args.data}: {len(unlabelled)} row(s) have no label column {args.label_column!r} "
                f"(--label-column), the first is row {unlabelled[0]}"
            )
    batches = []
    # as many batches as --batch-size needs, their sizes within one row of each other: the mean over batches is
    # then (nearly) the mean over examples, where a short last batch would weigh as much as a full one
    count = -(-len(rows) // args.batch_size)
    bounds = [round(i * len(rows) / count) for i in range(count + 1)]
    for start, end in zip(bounds, bounds[1:]):
        chunk = rows[start:end]
        batch = dict(
            tokenizer(
                [str(r[args.text_column]) for r in chunk],
                padding=True,
                truncation=True,
                max_length=args.max_length,
                return_tensors="pt",
            )
        )
        if "token_type_ids" not in _forward_args(model):  # tokenizers return it for models that take none
            batch.pop("token_type_ids", None)
        if causal:
            labels = batch["input_ids"].clone()
            labels[batch["attention_mask"] == 0] = -100
        else:
            labels = torch.tensor([_label(r[args.label_column], model) for r in chunk])
        batch["labels"] = labels
        batches.append(batch)
    return batches


def _forward_args(model) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)


def _measure(args: argparse.Namespace) -> int:
    import json
    import math

    import transformers

    from .callback import check_measures, measure_batches

    measures = [m.strip() for m in args.measures.split(",") if m.strip()]
    try:
        check_measures(measures)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    for name in ("batch_size", "max_examples", "probes", "trace_probes"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)} must be at least 1")
    model = _load(args.model, args.task)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    batches = _batches(args, model, tokenizer)
    try:
        values = measure_batches(
            model, batches, measures, layer=args.layer, probes=args.probes, trace_probes=args.trace_probes,
            rho=args.rho, log=lambda message: print(message, file=sys.stderr, flush=True),
        )  # fmt: skip
    except ValueError as error:  # fam_hf's refusals name the problem and the fix: no traceback
        raise SystemExit(f"fam-hf measure: {error}") from None
    summary = {}
    print(f"{type(model).__name__} on {sum(len(b['labels']) for b in batches)} examples in {len(batches)} batches")
    print(f"{'measure':<16} {'mean':>12} {'± s.e.':>10}  (s.e. over the batches: their spread and the probes')")
    for name, vals in values.items():
        mean = sum(vals) / len(vals)
        sem = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1) / len(vals)) if len(vals) > 1 else None
        summary[name] = {"mean": mean, "std_error": sem, "per_batch": vals}
        print(f"{name:<16} {mean:>12.6g} {'' if sem is None else f'{sem:.3g}':>10}")
    if args.json:
        report = {
            "model": args.model,
            "data": args.data,
            "layer": args.layer,
            "examples": sum(len(b["labels"]) for b in batches),
            "batches": len(batches),
            "measures": summary,
        }
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


def _plot(args: argparse.Namespace) -> int:
    from .plots import is_spectrum_file, plot_runs, plot_spectra

    spectra = [path for path in args.runs if is_spectrum_file(path)]
    if spectra:
        if len(spectra) < len(args.runs):
            raise SystemExit(
                "fam-hf plot draws either runs (folders with trainer_state.json) or spectra (JSON files written by "
                "HessianSpectrum.save), not both at once"
            )
        out = Path(args.out)
        if out.suffix.lower() == ".png":  # one picture: the file itself
            print(plot_spectra(spectra, out.parent, names=args.names, filename=out.name))
        else:
            print(plot_spectra(spectra, out, names=args.names))
        return 0
    quantities = args.quantities.split(",") if args.quantities else None
    written = plot_runs(args.runs, args.out, names=args.names, quantities=quantities, log_y=args.log_y)
    if not written:
        print("nothing to plot: no fam/*, flatness/* or loss entries in the runs' log_history", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


def _publish(args: argparse.Namespace) -> int:
    import os

    from .hub import HubPushError, publish_run

    token = None
    if args.token_env:  # the token itself never goes on the command line (shell history, process list)
        token = os.environ.get(args.token_env)
        if not token:
            raise SystemExit(
                f"--token-env {args.token_env}: that environment variable is not set; export it, or leave "
                "--token-env out to use HF_TOKEN or the token saved by `hf auth login`"
            )
    try:
        url = publish_run(
            args.run_dir,
            args.repo_id,
            private=True if args.private else None,
            token=token,
            revision=args.revision,
            commit_message=args.message,
        )
    except (HubPushError, FileNotFoundError, ValueError) as error:
        raise SystemExit(f"fam-hf publish: {error}") from None
    print(f"pushed {args.run_dir} to {args.repo_id}: {url}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from . import __version__
    from .extras import MissingExtraError

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
    measure = commands.add_parser("measure", help="flatness measures of a saved model on a small local data file")
    measure.add_argument("--model", required=True, help="a saved model folder with its tokenizer")
    measure.add_argument("--task", choices=["auto", *_TASKS], default="auto", help="load with this head")
    measure.add_argument("--data", required=True, help="a .jsonl or .csv file, one example per row")
    measure.add_argument("--text-column", default="text", help="column with the input text (default: text)")
    measure.add_argument(
        "--label-column",
        default="label",
        help="column with the class (id or name in the model's label2id; default: label); causal LMs use the text",
    )
    measure.add_argument("--layer", default="auto", help="layer for κ and the Hessian measures (default: the head)")
    measure.add_argument(
        "--measures",
        default="kappa,hessian_trace,top_eigenvalue",
        help="comma-separated: kappa,hessian_trace,top_eigenvalue,sam_sharpness,jacobian_norm,hessian_spectrum",
    )
    measure.add_argument("--batch-size", type=int, default=8, help="examples per batch (default: 8)")
    measure.add_argument("--max-examples", type=int, default=64, help="first N rows of --data (default: 64)")
    measure.add_argument("--max-length", type=int, default=128, help="truncate inputs to N tokens (default: 128)")
    measure.add_argument("--probes", type=int, default=16, help="probes for κ and the Jacobian (default: 16)")
    measure.add_argument("--trace-probes", type=int, default=64, help="HVPs for the Hessian trace (default: 64)")
    measure.add_argument("--rho", type=float, default=0.05, help="SAM radius (default: 0.05)")
    measure.add_argument("--json", help="also write the results (means, standard errors, per batch) here")
    measure.set_defaults(run=_measure)
    plot = commands.add_parser("plot", help="plot flatness over training from runs' trainer_state.json")
    plot.add_argument(
        "runs",
        nargs="+",
        metavar="RUN_DIR",
        help="Trainer output folders (or trainer_state.json); or spectra saved by HessianSpectrum.save (*.json)",
    )
    plot.add_argument(
        "--out",
        required=True,
        help="folder for the PNGs (created if missing); for spectra also a file name ending in .png",
    )
    plot.add_argument("--names", nargs="+", help="legend names for the runs (default: their folder names)")
    plot.add_argument(
        "--quantities",
        help="comma-separated subset of kappa,hessian_trace,top_eigenvalue,sam_sharpness,jacobian_norm,spectrum_top,"
        "gap,loss, and spectrum (each run's last spectrum saved by FlatnessCallback, overlaid per split) "
        "(default: every one there is)",
    )
    plot.add_argument("--log-y", action="store_true", help="logarithmic y axis (except the gap)")
    plot.set_defaults(run=_plot)
    publish = commands.add_parser(
        "publish", help="push a finished run folder to the Hub (writes its model card first if it has none)"
    )
    publish.add_argument("run_dir", metavar="RUN_DIR", help="a run's output_dir (model or adapter saved)")
    publish.add_argument("--repo-id", required=True, help="the Hub repository, owner/name (created if missing)")
    publish.add_argument("--private", action="store_true", help="create the repository private")
    publish.add_argument(
        "--token-env",
        metavar="VAR",
        help="environment variable holding the token (default: HF_TOKEN, else the token of `hf auth login`)",
    )
    publish.add_argument("--revision", help="branch to push to (default: main)")
    publish.add_argument("--message", help="commit message (default: 'Upload FAM run RUN_DIR')")
    publish.set_defaults(run=_publish)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except MissingExtraError as err:
        parser.exit(2, f"fam-hf {args.command}: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
