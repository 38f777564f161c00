"""Every bad input a user can give, through the command line in a subprocess as they run it.

Each case asserts the exit status (2), that the message names the argument or file and what is
expected, that there is no traceback, and that nothing was written (the case's own ``--out`` does
not exist and the rest of the tree is unchanged) -- or, for failures after work has started, that
only a resumable checkpoint is left. This module is the one place for these cases: a new command
adds its own here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml

from calibprompt.cli import main
from calibprompt.demo.tissue import write_demo_dataset

ENV = {**os.environ, "COLUMNS": "200", "PYTHONWARNINGS": "ignore"}
#: The installed command, as a user runs it.
COMMAND = [shutil.which("calibprompt", path=str(Path(sys.executable).parent)) or "calibprompt"]


def cli(argv: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 120):
    """``calibprompt ARGV`` as a user runs it: (exit status, stdout, stderr, seconds)."""
    start = time.perf_counter()
    done = subprocess.run([*COMMAND, *argv], cwd=cwd, capture_output=True, text=True,
                          env={**ENV, **(env or {})}, timeout=timeout)
    return done.returncode, done.stdout, done.stderr, time.perf_counter() - start


def tree(root: Path, skip: tuple[str, ...] = ("cache",)) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` (but ``skip``) with its size and modification time."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if rel.parts[0] in skip or not path.is_file():
            continue
        stat = path.stat()
        out[rel.as_posix()] = (stat.st_size, stat.st_mtime_ns)
    return out


def copy_classes(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A user's working directory: an image folder with train/test splits, the variants of it a
    user gets wrong, a finished run, and a warm feature cache."""
    root = tmp_path_factory.mktemp("world")
    base = write_demo_dataset(root / "gen", per_class={"train": 10, "test": 4}, seed=0)
    data = root / "data"
    shutil.copytree(base / "images", data)
    shutil.copy(base / "classnames.txt", data / "classnames.txt")
    shutil.rmtree(root / "gen")
    copy_classes(data / "test", root / "flat")                     # a folder of classes without a split
    shutil.copy(data / "classnames.txt", root / "flat" / "classnames.txt")
    mismatch = copy_classes(data, root / "mismatch")               # the test split lacks a class
    shutil.rmtree(mismatch / "test" / sorted(p.name for p in (mismatch / "test").iterdir() if p.is_dir())[1])
    (mismatch / "classnames.txt").unlink()
    nameless = copy_classes(data, root / "nameless")                # folder names the model cannot read
    (nameless / "classnames.txt").unlink()
    rows = [f"{p.relative_to(root / 'flat').as_posix()},{p.parent.name}"
            for p in sorted((root / "flat").rglob("*.png"))]
    (root / "list.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    (root / "flat.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    shutil.move(root / "flat.csv", root / "flat" / "list.csv")
    (root / "afile").write_text("not a directory")
    (root / "bad.yaml").write_text("backbones: [demo\n")
    sweep = {"backbones": ["demo"], "datasets": [{"name": "imagefolder", "root": str(data)}], "methods": ["ce"],
             "seeds": [1], "cache": str(root / "cache"), "out": str(root / "out" / "sweep")}
    for name, extra in SWEEP_ERRORS.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump({**sweep, **extra}))
    z = np.random.default_rng(0).normal(size=(40, 4))
    np.savez(root / "scores.npz", scores=z)                          # neither logits nor probs
    np.savez(root / "logits_as_probs.npz", probs=z, labels=np.arange(40) % 4)
    np.savez(root / "logits.npz", logits=z, labels=np.arange(40) % 4)
    common = ["--backbone", "demo", "--dataset", "imagefolder", "--root", str(data), "--cache",
              str(root / "cache"), "--workers", "0", "--quiet"]
    assert main(["zeroshot", *common, "--out", str(root / "runs")]) == 0
    return root


def finished_run(world: Path) -> Path:
    return next(p.parent for p in (world / "runs").rglob("metrics.json") if "external" not in p.parts)


#: Sweep files with one bad entry each (written into the world as ``<name>.yaml``).
SWEEP_ERRORS = {
    "sweep_bad_init": {"grid": {"init": ["random", "bogus"]}},
    "sweep_bad_lr": {"grid": {"lr": [0.01, "abc"]}},
    "sweep_bad_bool": {"class_specific": "no"},
    "sweep_bad_seed": {"seeds": ["x"]},
    "sweep_negative_epochs": {"grid": {"epochs": [1, -2]}},
    "sweep_unknown_field": {"grid": {"nonsense": [1]}},
    "sweep_bad_regime": {"grid": {"regime": ["prompt", "fully"]}},
}


@dataclass
class Case:
    """``argv`` ({world}, {data}, {out}, {run} are filled in), the texts the message must hold."""

    name: str
    argv: list[str]
    expect: list[str]
    env: dict[str, str] = field(default_factory=dict)
    lines: int = 1  # lines of stderr (argparse adds its usage line)


def train(*extra: str, command: str = "train", backbone: str = "demo", dataset: str = "imagefolder",
          root: str = "{data}") -> list[str]:
    """A run command on the world's data (``{out}`` its own output directory)."""
    return [command, "--backbone", backbone, "--dataset", dataset, "--root", root, "--cache", "{world}/cache",
            "--workers", "0", "--quiet", "--out", "{out}", *extra]


def on_root(root: str, *extra: str, command: str = "train", dataset: str = "imagefolder") -> list[str]:
    return train(*extra, command=command, dataset=dataset, root=root)


CASES = [
    # numbers out of range: rejected up front with the allowed range
    Case("negative epochs", train("--epochs", "-1"), ["--epochs", "positive integer", "-1"]),
    Case("zero epochs", train("--epochs", "0"), ["--epochs", "positive integer"]),
    Case("zero shots", train("--shots", "0"), ["--shots", "positive integer"]),
    Case("zero n_ctx", train("--n-ctx", "0"), ["--n-ctx", "positive integer"]),
    Case("zero batch size", train("--batch-size", "0"), ["--batch-size", "positive integer"]),
    Case("zero views", train("--views", "0"), ["--views", "positive integer"]),
    Case("negative lr", train("--lr", "-0.1"), ["--lr", "non-negative"]),
    Case("negative warm-up lr", train("--warmup-lr", "-1"), ["--warmup-lr", "non-negative"]),
    Case("negative seed", train("--seed", "-3"), ["--seed", "non-negative"]),
    Case("zero bins", train("--n-bins", "0"), ["--n-bins", "positive integer"]),
    Case("absurd bins", train("--n-bins", "100000000"), ["--n-bins", "1 to 100,000"]),
    Case("not a number", train("--lr", "abc"), ["--lr", "invalid float value: 'abc'"]),
    Case("zero validation", train("--val-per-class", "0"), ["--val-per-class", "positive integer"]),
    Case("too many validation images", train("--val-per-class", "99", "--shots", "2"),
         ["--val-per-class 99", "left after the few-shot split"]),
    Case("too many calibration images", train("--calib-per-class", "99", "--shots", "2"),
         ["--calib-per-class 99", "left after the few-shot split", "calibration"]),
    Case("zero calibration", train("--calib-per-class", "0"), ["--calib-per-class", "positive integer"]),
    Case("search without tune", train("--search", "a=1:2"), ["--search applies to --tune auto"]),
    Case("placeholder without tune", train("--objective", "ls(alpha=?a)"), ["?a", "--tune auto"]),
    Case("tune a preset without hyperparameters", train("--method", "ce", "--tune", "auto"),
         ["ce preset has no hyperparameters", "?placeholders"]),
    Case("search for an unknown placeholder", train("--method", "calibprompt", "--tune", "auto", "--search", "x=1:2"),
         ["--search", "x is not a placeholder", "?alpha, ?weight"]),
    Case("search missing a range", train("--objective", "ls(alpha=?a) + ?w*as", "--tune", "auto", "--search",
                                         "a=0.01:0.3"), ["--search", "give a range for ?w"]),
    Case("search range reversed", train("--method", "calibprompt", "--tune", "auto", "--search", "alpha=0.3:0.01"),
         ["--search", "LOW must be smaller than HIGH"]),
    Case("tune with a fixed alpha", train("--method", "calibprompt", "--tune", "auto", "--alpha", "0.1"),
         ["--alpha/--weight", "--tune auto"]),
    Case("trials without tune", train("--method", "calibprompt", "--trials", "8"), ["--trials applies to --tune auto"]),
    Case("search range outside the loss's", train("--method", "calibprompt", "--tune", "auto", "--search", "alpha=-1:1"),
         ["--search alpha=-1:1", "alpha=-1 is outside what the objective accepts", "[0, 1]"]),
    Case("search a negative weight", train("--method", "calibprompt", "--tune", "auto", "--search", "weight=-5:-1"),
         ["?weight weights a term", ">= 0"]),
    Case("search range not a number", train("--method", "calibprompt", "--tune", "auto", "--search", "alpha=0.1:x"),
         ["--search", "'x' is not a number"]),
    Case("tpt tune metric without tune", train("--method", "ctpt", "--tune-metric", "brier", command="tpt"),
         ["--tune-metric applies to --tune auto"]),
    Case("tune zero trials", train("--method", "calibprompt", "--tune", "auto", "--trials", "0"),
         ["--trials", "positive integer"]),
    Case("too many shots", train("--shots", "50"), ["--shots 50", "fewer images"]),
    Case("test fraction above 1", train("--test-fraction", "1.5"), ["--test-fraction", "between 0 and 1"]),
    Case("test fraction 0", train("--test-fraction", "0"), ["--test-fraction", "between 0 and 1"]),
    Case("negative workers", train("--workers", "-2"), ["--workers", "non-negative"]),
    Case("half precision on the CPU", train("--precision", "fp16"), ["--precision", "fp16", "use fp32 or auto"]),
    Case("unknown regime", train("--regime", "partial"), ["--regime", "invalid choice: 'partial'"]),
    Case("save weights without full regime", train("--save-weights"), ["--save-weights", "--regime full only"]),
    Case("train logit scale without full regime", train("--train-logit-scale"), ["--regime full only"]),
    Case("full regime negative lr", train("--regime", "full", "--lr=-2e-7"), ["--lr", "non-negative"]),
    Case("tpt negative lr", train("--lr", "-1", command="tpt"), ["--lr", "non-negative"]),
    Case("tpt zero views", train("--views", "0", command="tpt"), ["--views", "positive integer"]),
    Case("tpt zero limit", train("--limit", "0", command="tpt"), ["--limit", "positive integer"]),
    Case("tpt selection above 1", train("--selection", "1.5", command="tpt"), ["--selection", "(0, 1]"]),
    Case("tpt lam for tpt", train("--method", "tpt", "--lam", "3", command="tpt"), ["--lam", "no regulariser"]),
    Case("tpt ensemble with its own context words", train("--ensemble", "tpt4", "--ctx-init", "a photo of a",
                                                          command="tpt"), ["--ensemble", "--ctx-init"]),
    Case("tca without attributes", train("--method", "tca", command="tpt"), ["--attributes", "JSON file"]),
    Case("tca attributes not a file", train("--method", "tca", "--attributes", "{world}/nothing.json", command="tpt"),
         ["--attributes", "nothing.json", "no such file"]),
    Case("beta for another method", train("--method", "ctpt", "--beta", "2", command="tpt"),
         ["--beta/--attributes apply to --method tca"]),
    Case("tpt unknown ensemble", train("--ensemble", "tpt5", command="tpt"), ["--ensemble", "invalid choice: 'tpt5'"]),
    Case("tpt tune without a regulariser", train("--method", "tpt", "--tune", "auto", command="tpt"),
         ["--tune auto", "tpt has no regulariser weight to tune", "ctpt"]),
    Case("tpt tune with a fixed lam", train("--method", "ctpt", "--tune", "auto", "--lam", "5", command="tpt"),
         ["--lam/--delta", "--tune auto"]),
    Case("tpt search for another method's value", train("--method", "ctpt", "--tune", "auto", "--search",
                                                        "delta=0.1:1", command="tpt"),
         ["--search", "ctpt tunes lam, not delta"]),
    Case("tpt negative lam range", train("--method", "soc", "--tune", "auto", "--search", "lam=-1,5", command="tpt"),
         ["--search lam=-1,5", "lam must be >= 0"]),
    Case("tune folds without tune", train("--tune-folds", "3"), ["--tune-folds applies to --tune auto"]),
    Case("tune too many folds", train("--method", "ls", "--tune", "auto", "--tune-folds", "40", "--shots", "2"),
         ["--tune-folds 40", "at most", "folds"]),
    Case("tune one fold", train("--method", "ls", "--tune", "auto", "--tune-folds", "1"),
         ["--tune-folds", "integer >= 2"]),
    Case("negative training noise", train("--noise-sigmas", "0", "-0.1"), ["--noise-sigmas", "noise levels >= 0"]),
    Case("training noise with full fine-tuning", train("--noise-sigmas", "0.25", "--regime", "full"),
         ["--noise-sigmas", "not zero-shot or full fine-tuning"]),
    Case("certify sigma 0", train("--sigma", "0", command="certify"), ["--sigma", "positive noise level"]),
    Case("certify calibration size without the split", train("--calib-per-class", "3", command="certify"),
         ["--calib-per-class applies to --split calibration"]),
    Case("certify unknown split", train("--split", "val", command="certify"), ["--split", "invalid choice: 'val'"]),
    Case("certify alpha above 1/2", train("--alpha", "0.7", command="certify"), ["--alpha", "(0, 0.5)"]),
    Case("certify zero draws", train("--n", "0", command="certify"), ["n: expected a positive integer"]),
    Case("certify unknown test-time step", train("--test-time", "tent", command="certify"),
         ["--test-time", "invalid choice: 'tent'"]),
    Case("certify as weight without its step", train("--as-weight", "3", command="certify"),
         ["--as-weight applies to --test-time entropy+as only"]),
    Case("certify prompt not a run", train("--prompt", "{world}/flat", command="certify"),
         ["--prompt", "expected a finished prompt-tuning run"]),
    # names: a misspelt method lists the presets and suggests the closest
    Case("misspelt method", train("--method", "calibprmpt"),
         ["calibprmpt", "presets: ce, ls", "did you mean 'calibprompt'"]),
    Case("bad objective", train("--objective", "ls(alpha=0.1) + bogus"), ["bogus"]),
    Case("unknown tpt method", train("--method", "tptx", command="tpt"), ["--method", "invalid choice: 'tptx'"]),
    Case("unknown backbone", train(backbone="nonesuch"), ["nonesuch", "plip"]),
    Case("unknown dataset", on_root("{data}", dataset="nonesuch"), ["nonesuch", "imagefolder"]),
    Case("unknown device", train("--device", "cuda:7"), ["--device", "cuda:7"]),
    Case("bad device", train("--device", "gpu0"), ["--device", "gpu0", "not a torch device"]),
    # files and folders
    Case("missing root", on_root("{world}/nowhere"), ["nowhere", "not a directory"]),
    Case("out is a file", train("--out", "{world}/afile"), ["--out", "afile", "not a directory"]),
    Case("cache is a file", train("--cache", "{world}/afile"), ["--cache", "afile", "not a directory"]),
    Case("missing weights", train("--weights", "{world}/noweights"), ["noweights", "does not exist"]),
    Case("flat folder for training", on_root("{world}/flat"), ["no 'train' folder", "--test-fraction"]),
    Case("csv without split for training", on_root("{world}/list.csv", dataset="csv"),
         ["no split column", "--test-fraction"]),
    Case("test fraction with a split", train("--test-fraction", "0.3"), ["own split", "drop --test-fraction"]),
    Case("classes differ", on_root("{world}/mismatch"), ["train classes", "differ from the test classes"]),
    Case("identical prompts", on_root("{world}/nameless", command="zeroshot"), ["give identical prompts"]),
    Case("tpt missing init prompt", train("--init-prompt", "{world}/norun", command="tpt"), ["norun"]),
    Case("sweep file missing", ["sweep", "{world}/nosweep.yaml", "--out", "{out}"], ["nosweep.yaml"]),
    Case("sweep lockstep 0", ["sweep", "{world}/sweep_bad_init.yaml", "--out", "{out}", "--lockstep", "0"],
         ["--lockstep", "positive number of runs"]),
    Case("sweep address without ray", ["sweep", "{world}/sweep_bad_init.yaml", "--out", "{out}", "--address", "auto"],
         ["--address", "--executor ray"]),
    Case("sweep zero ray workers", ["sweep", "{world}/sweep_bad_init.yaml", "--out", "{out}", "--executor", "ray",
                                    "--ray-workers", "0"], ["--ray-workers", "positive number"]),
    Case("certify unknown executor", train("--executor", "dask", command="certify"), ["--executor", "dask"]),
    Case("certify ray workers without ray", train("--ray-workers", "2", command="certify"),
         ["--ray-workers", "--executor ray"]),
    Case("sweep file malformed", ["sweep", "{world}/bad.yaml", "--out", "{out}"], ["bad.yaml", "line 2"]),
    Case("report of nothing", ["report", "{world}/nowhere", "--out", "{out}"], ["nowhere"]),
    Case("report out is a file", ["report", "{world}/runs", "--out", "{world}/afile"], ["afile", "not a directory"]),
    Case("predict without a run", ["predict", "{world}/data", "{world}/flat", "--out", "{out}"], ["run"]),
    Case("predict missing images", ["predict", "{run}", "{world}/noimages", "--out", "{out}"], ["noimages"]),
    Case("referral error target above 1", ["referral", "{run}", "--max-error", "1.5"],
         ["--max-error", "strictly between 0 and 1"]),
    Case("referral confidence 1", ["referral", "{run}", "--confidence", "1"], ["--confidence", "between 0 and 1"]),
    Case("referral not a run", ["referral", "{world}/flat"], ["flat", "not a run directory"]),
    Case("conformal coverage 0", ["conformal", "{run}", "--coverage", "0"], ["--coverage", "between 0 and 1"]),
    Case("conformal raps option with aps", ["conformal", "{run}", "--score", "aps", "--raps-k", "2"],
         ["--raps-lambda/--raps-k apply to --score raps only"]),
    Case("conformal unknown score", ["conformal", "{run}", "--score", "thr"], ["--score", "invalid choice: 'thr'"]),
    Case("conformal raps lambda nan", ["conformal", "{run}", "--score", "raps", "--raps-lambda", "nan"],
         ["--raps-lambda", "finite number >= 0"]),
    Case("conformal negative raps k", ["conformal", "{run}", "--score", "raps", "--raps-k", "-1"],
         ["--raps-k", "integer >= 0"]),
    Case("evaluate zero bins", ["evaluate", "{run}", "--n-bins", "0"], ["--n-bins 0"]),
    Case("evaluate on other classes", ["evaluate", "{run}", "--dataset", "imagefolder", "--root",
                                       "{world}/mismatch", "--split", "test"], ["classes", "run's classes"]),
    Case("metrics of a missing file", ["metrics", "{world}/none.npz"], ["none.npz", "not found"]),
    Case("metrics of a non-npz file", ["metrics", "{world}/afile"], ["afile", "not a readable .npz"]),
    Case("calibrate out is a file", ["calibrate", "{run}", "--out", "{world}/afile"], ["afile"]),
    Case("predict out is a file", ["predict", "{run}", "{world}/flat", "--out", "{world}/afile"],
         ["afile", "not a directory"]),
    Case("tpt lam for several methods", train("--method", "tpt", "ctpt", "--lam", "3", command="tpt"),
         ["--lam", "one method"]),
    Case("registered dataset, wrong layout", on_root("{world}/flat", dataset="kather"),
         ["expected the layout ROOT/kather/images"]),
    Case("splits on a wrong layout", ["splits", "--dataset", "covid", "--root", "{world}/flat", "--shots", "4",
                                      "--out", "{out}"], ["expected the layout ROOT/covid/images"]),
    Case("extract with an unknown backbone", ["extract", "--backbone", "nope", "--dataset", "imagefolder",
                                              "--root", "{data}", "--cache", "{world}/cache"],
         ["backbone 'nope' is unknown; available: plip"]),
    Case("metrics without logits or probs", ["metrics", "{world}/scores.npz", "--json", "{out}/m.json"],
         ["scores.npz", "expected arrays 'labels' and 'logits' or 'probs'"]),
    Case("metrics of logits stored as probs", ["metrics", "{world}/logits_as_probs.npz", "--json", "{out}/m.json"],
         ["apply softmax first"]),
    Case("metrics calibration without data", ["metrics", "{world}/logits.npz", "--calibrate", "temperature",
                                              "--json", "{out}/m.json"], ["needs --fit-on"]),
    *(Case(f"sweep: {name}", ["sweep", f"{{world}}/{name}.yaml"], [f"{name}.yaml", expect])
      for name, expect in (("sweep_bad_init", "init"), ("sweep_bad_lr", "lr"), ("sweep_bad_bool", "class_specific"),
                           ("sweep_bad_seed", "seed"), ("sweep_negative_epochs", "epochs"),
                           ("sweep_unknown_field", "nonsense"), ("sweep_bad_regime", "regime"))),
    Case("demo out is a file", ["demo", "--out", "{world}/afile"], ["afile", "not a directory"]),
    Case("offline hub id", train(command="zeroshot", backbone="plip"),
         ["vinid/plip", "HF_HUB_OFFLINE=1", "config.json", "--weights DIR"], env={"HF_HUB_OFFLINE": "1"},
         lines=12),  # the files to place, one per line
]


def fill(argv: list[str], world: Path, out: Path) -> list[str]:
    values = {"world": str(world), "data": str(world / "data"), "out": str(out), "run": str(finished_run(world))}
    return [a.format(**values) for a in argv]


@pytest.fixture(scope="module")
def outcomes(world):
    """Every case run once (three at a time), with the tree before and after all of them."""
    before = tree(world)
    cache_before = tree(world / "cache", skip=())

    def one(i_case):
        i, case = i_case
        out = world / "out" / f"case{i:02d}"
        return case.name, (out, *cli(fill(case.argv, world, out), cwd=world, env=case.env))

    with ThreadPoolExecutor(3) as pool:
        results = dict(pool.map(one, enumerate(CASES)))
    return results, before, tree(world), cache_before, tree(world / "cache", skip=())


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_clear_line_and_writes_nothing(case, outcomes):
    results, *_ = outcomes
    out, status, stdout, stderr, seconds = results[case.name]
    assert status == 2, (case.argv, status, stderr)
    assert "Traceback" not in stderr and "Traceback" not in stdout
    assert len(stderr.strip().splitlines()) <= case.lines, stderr
    for text in case.expect:
        assert text in stderr, (text, stderr)
    assert not out.exists(), f"{case.name}: wrote {out}"
    print(f"{seconds:.1f} s")
    assert seconds < 60  # validation, not work (an offline hub id fails in seconds, not after retries)


def test_bad_inputs_leave_the_tree_unchanged(outcomes):
    _, before, after, cache_before, cache_after = outcomes
    assert after == before
    assert cache_after == cache_before  # no case got as far as encoding an image


def test_an_offline_hub_id_fails_in_seconds(outcomes):
    _, _, _, _, seconds = outcomes[0]["offline hub id"]
    assert seconds < 20  # the Hub libraries' retries take 30-60 s


# -- failures after work has started: only what resume needs is left ----------------------------


def test_an_unreadable_image_stops_the_run_until_skipping_is_chosen(world, tmp_path):
    data = shutil.copytree(world / "data", tmp_path / "data")
    broken = sorted((data / "test").rglob("*.png"))[2]
    broken.write_bytes(broken.read_bytes()[:100])  # truncated: the header reads, the pixels do not
    argv = [a.replace(str(world / "data"), str(data)) for a in fill(train("--epochs", "1", "--shots", "2",
                                                                          "--views", "1"), world, tmp_path / "o")]
    status, _, stderr, _ = cli(argv, cwd=tmp_path)
    assert status == 2 and "Traceback" not in stderr
    assert "1 image(s) of the test split" in stderr and broken.name in stderr and "--skip-unreadable" in stderr
    assert not list((tmp_path / "o").rglob("metrics.json"))  # no result, only a resumable .partial
    assert all(p.name.startswith(".") and p.name.endswith(".partial")
               for p in (tmp_path / "o").glob("*/*/*/*"))

    status, stdout, stderr, _ = cli([*argv, "--skip-unreadable"], cwd=tmp_path)
    assert status == 0, stderr
    assert "1 unreadable image(s) left out" in stdout and broken.name in stdout
    metrics = json.loads(next((tmp_path / "o").rglob("metrics.json")).read_text())
    assert [Path(p).name for p, _ in metrics["excluded_test_images"]] == [broken.name]
    assert "unreadable image" in metrics["excluded_test_images"][0][1]
    config = json.loads(next((tmp_path / "o").rglob("config.json")).read_text())
    assert config["config"]["skip_unreadable"] is True
    assert metrics["uncalibrated"]["n_samples"] == len(list((data / "test").rglob("*.png"))) - 1


def test_a_sweep_with_a_bad_run_anywhere_starts_none(world, tmp_path):
    spec = {"backbones": ["demo"], "datasets": [{"name": "imagefolder", "root": str(world / "data")}],
            "methods": ["ce", "zeroshot", "calibprmpt"], "seeds": [1], "epochs": 1, "views": 1, "shots": 2,
            "cache": str(world / "cache"), "workers": 0, "progress": False, "out": str(tmp_path / "o")}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    status, _, stderr, _ = cli(["sweep", str(tmp_path / "s.yaml")], cwd=tmp_path)
    assert status == 2 and "Traceback" not in stderr
    assert "s.yaml" in stderr and "calibprmpt" in stderr and "did you mean" in stderr
    assert not (tmp_path / "o").exists()
    spec["methods"] = ["ce"]
    spec["datasets"].append({"name": "imagefolder", "root": str(world / "flat")})
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    status, _, stderr, _ = cli(["sweep", str(tmp_path / "s.yaml")], cwd=tmp_path)
    assert status == 2 and "no 'train' folder" in stderr and not (tmp_path / "o").exists()


def test_ctrl_c_prints_one_line_and_the_rerun_resumes(world, tmp_path):
    argv = fill(train("--epochs", "400", "--shots", "2", "--views", "2"), world, tmp_path / "o")
    process = subprocess.Popen([*COMMAND, *argv], cwd=tmp_path, env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    while not list((tmp_path / "o").rglob("checkpoint*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert stderr.strip().count("\n") == 0 and "interrupted" in stderr and "run again" in stderr
    assert "Traceback" not in stderr
    partial = [p for p in (tmp_path / "o").rglob("*.partial")]
    assert len(partial) == 1 and list(partial[0].rglob("checkpoint*"))
    assert not list((tmp_path / "o").rglob("metrics.json"))


def test_held_out_test_fraction_is_seeded_disjoint_recorded_and_reported(world, tmp_path):
    argv = on_root("{world}/flat", "--test-fraction", "0.34", "--epochs", "1", "--shots", "1", "--views", "1",
                   "--val-per-class", "1")
    status, _, stderr, _ = cli(fill(argv, world, tmp_path / "o"), cwd=tmp_path)
    assert status == 0, stderr
    run = next((tmp_path / "o").rglob("metrics.json")).parent
    config = json.loads((run / "config.json").read_text())
    assert config["identity"]["config"]["test_fraction"] == 0.34
    classes = sorted(p.name for p in (world / "flat").iterdir() if p.is_dir())
    assert config["test_split"] == {"held_out_fraction": 0.34, "images": len(classes), "of": 4 * len(classes),
                                    "seed": 0}
    with np.load(run / "predictions.npz") as preds:
        test_files = set(preds["test_files"].tolist())
        assert len(test_files) == len(classes)  # round(0.34 * 4) = 1 per class; 3 left: 1 shot, 1 tuning, 1 calibration
    used = {f for name in ("few_shot", "validation", "calibration") for f in
            json.loads((run / "splits" / f"{name}.json").read_text())["files"]}
    assert used and not used & test_files  # the held-out test images never train or validate
    # the same test images for every seed (the split does not depend on the run seed)
    status, _, stderr, _ = cli(fill([*argv, "--seed", "2"], world, tmp_path / "o"), cwd=tmp_path)
    assert status == 0, stderr
    runs = [p.parent for p in (tmp_path / "o").rglob("metrics.json")]
    assert len(runs) == 2
    files = []
    for r in runs:
        with np.load(r / "predictions.npz") as preds:
            files.append(set(preds["test_files"].tolist()))
    assert files[0] == files[1]
    status, _, stderr, _ = cli(["report", str(tmp_path / "o"), "--bootstrap", "20"], cwd=tmp_path)
    assert status == 0, stderr
    report = (tmp_path / "o" / "report.md").read_text()
    assert "Held-out test set" in report and "34% of each class" in report


def test_a_full_or_read_only_disk_is_one_line_and_exit_2(world, tmp_path, capsys, monkeypatch):
    """In-process: a full disk cannot be produced for a subprocess (and root ignores read-only)."""
    import errno

    from calibprompt.runs.directory import RunDirectory

    def full(self, record, force=False):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.work))

    monkeypatch.setattr(RunDirectory, "begin", full)
    assert main(fill(train(command="zeroshot"), world, tmp_path / "runs")) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and ".partial" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists() or not [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]
