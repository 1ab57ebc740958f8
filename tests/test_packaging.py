"""What a fresh install gets: every import declared, optional ones behind named extras, and a wheel that works
on its own in a virtualenv made from nothing (slow: `make test-wheel`, run by .ci/run)."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from fam_hf.extras import EXTRAS, MissingExtraError, require

tomllib = pytest.importorskip("tomllib", reason="reads pyproject.toml with Python 3.11's tomllib")

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# What the tree imports that no distribution provides: its own modules, run as scripts or from sys.path.
LOCAL = {"fam_hf", "benchmarks", "recipes", "kit", "study"} | {
    p.stem for d in ("tests", "benchmarks", "recipes", "study", "examples") for p in (ROOT / d).glob("*.py")
}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return normalise(re.split(r"[ \[<>=!~;]", requirement, maxsplit=1)[0])


def imported_modules(folder: str) -> dict[str, str]:
    """Top-level third-party modules imported anywhere under ``folder`` (also inside functions): module → where."""
    found = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in LOCAL and top != "__future__":
                    found.setdefault(top, f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def distribution(module: str) -> str:
    """The distribution that provides ``module`` (``yaml`` → ``pyyaml``); the module's name if none is installed."""
    return normalise(importlib.metadata.packages_distributions().get(module, [module])[0])


@pytest.mark.parametrize(
    "folder, groups",
    [("fam_hf", ("core", "plots", "deepspeed", "trl")), ("recipes", ("core", "plots", "trl")),
     ("benchmarks", ("core", "bitsandbytes", "trl", "test")), ("study", ("core", "plots")),
     ("examples", ("core", "examples", "plots")), ("tests", ("core", "test", "plots", "deepspeed", "trl", "examples"))],
)  # fmt: skip
def test_every_import_is_declared(folder, groups):
    declared = {
        requirement_name(r)
        for group in groups
        for r in (PROJECT["dependencies"] if group == "core" else PROJECT["optional-dependencies"][group])
    }
    missing = {m: where for m, where in imported_modules(folder).items() if distribution(m) not in declared}
    assert not missing, f"imported under {folder}/ but declared in none of {groups} in pyproject.toml: {missing}"


def test_the_extras_the_errors_name_exist_with_their_modules():
    extras = PROJECT["optional-dependencies"]
    for extra, modules in EXTRAS.items():
        assert extra in extras, f"fam_hf.extras names fam_hf[{extra}], which pyproject.toml does not declare"
        assert {distribution(m) for m in modules} <= {requirement_name(r) for r in extras[extra]}


# Modules that exist for one extra's library: without it they raise MissingExtraError naming the extra.
INTEGRATIONS = {"fam_hf.trl": "trl"}


def test_import_fam_hf_needs_no_extra():
    """Every module of the package imports with the extras' modules missing (they load where a feature needs
    them), except an integration module, which says which extra to install."""
    blocked = sorted({m for modules in EXTRAS.values() for m in modules})
    code = (
        f"import sys, pkgutil, importlib\nfor m in {blocked!r}: sys.modules[m] = None\n"
        "import fam_hf\nfrom fam_hf.extras import MissingExtraError\nrefused = {}\n"
        "for info in pkgutil.walk_packages(fam_hf.__path__, 'fam_hf.'):\n"
        "    try:\n        importlib.import_module(info.name)\n"
        "    except MissingExtraError as err:\n        refused[info.name] = str(err)\n"
        "from fam_hf import FAMConfig, FAMTrainer, SAMConfig, SAMTrainer, FlatnessCallback\nprint(repr(refused))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True, text=True)
    refused = ast.literal_eval(done.stdout.strip().splitlines()[-1])
    assert set(refused) == set(INTEGRATIONS)
    for module, extra in INTEGRATIONS.items():
        assert f"pip install 'fam_hf[{extra}]'" in refused[module]


def fake_run(folder: Path) -> Path:
    folder.mkdir(parents=True)
    history = [{"step": s, "fam/kappa": 1.0 / s, "loss": 2.0 / s} for s in (1, 2, 3)]
    (folder / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    return folder


def test_plot_without_matplotlib_names_the_extra(tmp_path, monkeypatch, capsys):
    from fam_hf.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # an import of it now fails as if it were not installed
    with pytest.raises(SystemExit) as exit_:
        main(["plot", str(fake_run(tmp_path / "run")), "--out", str(tmp_path / "plots")])
    assert exit_.value.code == 2
    assert "fam-hf plot needs matplotlib, which is not installed; install it with `pip install 'fam_hf[plots]'`" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "plots").exists()


def test_require_explains_only_its_own_module(monkeypatch):
    for module in ("matplotlib", "matplotlib.pyplot"):  # as if not installed, even after an earlier import
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(MissingExtraError, match=r"pip install 'fam_hf\[plots\]'"):
        require("matplotlib.pyplot", "x")
    with pytest.raises(MissingExtraError, match="`pip install not_a_module_anywhere`"):
        require("not_a_module_anywhere", "x")  # no extra provides it: the plain install
    assert require("json", "x") is json


# -- the wheel, on its own --------------------------------------------------------------------------------


def run(*command: str | Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, **kwargs)


@pytest.mark.slow
def test_wheel_installs_into_a_clean_virtualenv(tmp_path):
    built = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", tmp_path / "dist", ROOT)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("fam_hf-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    sources = {f"fam_hf/{p.name}" for p in (ROOT / "fam_hf").glob("*.py")}
    assert sources <= names, f"missing from the wheel: {sorted(sources - names)}"
    assert not {n for n in names if n.startswith(("tests/", "recipes/", "benchmarks/", "study/", "kit/"))}
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    for field in ("License-Expression: Apache-2.0", "Requires-Python: >=3.10", "Provides-Extra: plots",
                  "Classifier: Programming Language :: Python :: 3.11", "Requires-Dist: torch>=2.6"):  # fmt: skip
        assert field in metadata
    assert "example.com" not in metadata and "your-org" not in metadata.lower()

    venv = tmp_path / "venv"
    assert run(sys.executable, "-m", "venv", venv).returncode == 0  # from nothing: no system site-packages
    python, fam_hf_command = venv / "bin" / "python", venv / "bin" / "fam-hf"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    for packages in (["torch==2.13.0"], [wheel]):  # the CPU build first, as `make install` does
        installed = run(python, "-m", "pip", "install", "--quiet", *packages, env=env)
        assert installed.returncode == 0, installed.stderr

    outside = tmp_path / "elsewhere"  # not the checkout: nothing of the source tree on sys.path
    outside.mkdir()
    imported = run(python, "-c", "import fam_hf, fam_hf.cli; print(fam_hf.__file__)", cwd=outside, env=env)
    assert imported.returncode == 0 and str(venv) in imported.stdout, imported.stderr
    helped = run(fam_hf_command, "--help", cwd=outside, env=env)
    assert helped.returncode == 0 and "layers" in helped.stdout and "plot" in helped.stdout

    model = outside / "tiny_gpt2"
    saved = run(python, "-c", "from transformers import GPT2Config, GPT2LMHeadModel; GPT2LMHeadModel(GPT2Config("
                "vocab_size=32, n_embd=8, n_layer=1, n_head=2)).save_pretrained('tiny_gpt2')", cwd=outside, env=env)  # fmt: skip
    assert saved.returncode == 0, saved.stderr
    layers = run(fam_hf_command, "layers", model, cwd=outside, env=env)
    assert layers.returncode == 0 and "fam_layer='auto' -> lm_head" in layers.stdout, layers.stderr

    runs = fake_run(outside / "run")
    plot = run(fam_hf_command, "plot", runs, "--out", outside / "plots", cwd=outside, env=env)
    assert plot.returncode == 2 and "pip install 'fam_hf[plots]'" in plot.stderr, plot.stderr
    with_extra = run(python, "-m", "pip", "install", "--quiet", f"{wheel}[plots]", env=env)
    assert with_extra.returncode == 0, with_extra.stderr
    plot = run(fam_hf_command, "plot", runs, "--out", outside / "plots", cwd=outside, env=env)
    assert plot.returncode == 0, plot.stderr
    assert (outside / "plots" / "kappa.png").is_file()
