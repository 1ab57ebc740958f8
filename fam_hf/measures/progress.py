"""The progress bar of a long measurement: a tqdm bar over Hessian-vector products (probes, Lanczos steps)."""

from __future__ import annotations

from contextlib import contextmanager

DELAY_S = 5.0  # a measurement shorter than this never shows a bar


@contextmanager
def progress(total: int | None, description: str, disable_tqdm: bool | None = None):
    """A ``tqdm`` bar over ``total`` steps that appears only once the measurement has run for ``DELAY_S`` seconds (so
    the measures on small models stay silent), to stderr, as ``Trainer``'s bars do; ``disable_tqdm=True`` hides it.
    Yields an object with ``update(k)``."""
    from tqdm.auto import tqdm

    with tqdm(
        total=total, desc=description, unit="HVP", delay=DELAY_S, disable=bool(disable_tqdm), leave=False
    ) as bar:
        yield bar
