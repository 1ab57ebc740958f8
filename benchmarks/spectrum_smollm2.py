"""The Hessian eigenvalue density of SmolLM2-135M's LM head on a batch of *Hamlet*, saved for ``fam-hf plot``.

    python benchmarks/spectrum_smollm2.py --out outputs/spectrum/smollm2_start.json
    fam-hf plot outputs/spectrum/smollm2_start.json --out docs/images      # docs/images/spectrum.png

Stochastic Lanczos quadrature (``fam_hf.hessian_spectrum``) w.r.t. the LM head's own use of the tied matrix
(``W: 49,152 × 576``), ``--runs`` random starts of ``--steps`` Lanczos steps, on the packaged model as it is
(``--model`` a saved folder to measure a fine-tuned one instead). Prints the time, the products and the top Ritz value.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.cases import build_cases, load_batch, load_model  # noqa: E402
from benchmarks.measure import quiet  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the JSON file to write")
    parser.add_argument("--name", default="SmolLM2-135M", help="the legend name")
    parser.add_argument("--model", default="smollm2-135m", help="an alias or a saved folder (default: the packaged)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet()
    from fam_hf.measures import hessian_spectrum

    case = dataclasses.replace(build_cases(False, "cpu")["smollm2-full-head"], model=args.model,
                               batch_size=args.batch_size, seq_len=args.seq_len)  # fmt: skip
    model, tokenizer = load_model(case, "cpu")
    batch = load_batch(case, tokenizer, model.config.vocab_size, "cpu")
    start = time.process_time()
    spectrum = hessian_spectrum(model.eval(), batch, "lm_head", runs=args.runs, steps=args.steps)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    spectrum.save(args.out, name=args.name)
    top = float(spectrum.nodes[~torch.isnan(spectrum.nodes)].max())
    print(f"{args.name}: n = {spectrum.dim}, {spectrum.matvecs} HVPs, {time.process_time() - start:.0f} CPU s, "
          f"top Ritz value {top:.4g}, implied trace {float(spectrum.trace):.4g} → {args.out}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
