"""The spread of one probe of κ over a set of layers against one layer, on the benchmarks' real models and batches.

    python benchmarks/set_variance.py --cases minilm-head --draws 16
    python benchmarks/set_variance.py --cases smollm2-lora --draws 8 --estimators gauss_newton

For each case (benchmarks/cases.py: the model, seed 0, and its fixed batch; the model in eval mode) and each
(layer spec, estimator), ``--draws`` independent one-probe estimates of κ: their mean, the per-probe standard
deviation and its ratio to the mean (a P-probe estimate has that spread over √P). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.cases import build_cases, load_batch, load_model  # noqa: E402
from benchmarks.measure import quiet  # noqa: E402

SPECS = {
    "minilm-head": ["bert.encoder.layer.5.output.dense", "bert.encoder.*"],
    "smollm2-lora": ["model.layers.29.self_attn.q_proj", "all-lora"],
}


def one_probe_draws(model, batch, spec: str, estimator: str, draws: int) -> torch.Tensor:
    from fam_hf import RelativeFlatness

    flat = RelativeFlatness(model, spec, estimator, probes=1, generator=torch.Generator().manual_seed(0))
    values = []
    for _ in range(draws):
        with flat.record(batch, differentiable=False) as recording:
            out = model(**batch)
        values.append(float(recording.result(out.loss, logits=out.logits).value))
    flat.close()
    return torch.tensor(values, dtype=torch.float64)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="minilm-head", help="comma-separated: minilm-head, smollm2-lora")
    parser.add_argument("--estimators", default="gauss_newton,probe")
    parser.add_argument("--draws", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = build_cases(quick=False, device="cpu")
    rows = ["| case | layers | estimator | mean κ | per-probe sd | sd / mean | s per probe (CPU) |",
            "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for name in args.cases.split(","):
        case = cases[name]
        model, tokenizer = load_model(case, "cpu")
        model.eval()
        batch = load_batch(case, tokenizer, model.config.vocab_size, "cpu")
        for spec in SPECS[name]:
            for estimator in args.estimators.split(","):
                start = time.process_time()
                values = one_probe_draws(model, batch, spec, estimator, args.draws)
                seconds = (time.process_time() - start) / args.draws
                mean, sd = float(values.mean()), float(values.std())
                rows.append(f"| {name} | `{spec}` | {estimator} | {mean:.4g} | {sd:.3g} | {sd / abs(mean):.2f} | "
                            f"{seconds:.1f} |")  # fmt: skip
                print(rows[-1], flush=True)
    text = "\n".join(rows)
    print(f"\n{text}\n\n{args.draws} one-probe draws each; batch and model as benchmarks/cases.py, eval mode.")
    return text


if __name__ == "__main__":
    quiet()
    main()
