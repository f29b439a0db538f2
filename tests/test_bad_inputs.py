"""Every command keeps the promise (issue 30): any bad input ends in exactly one line
`error: <problem>: <fix>` with exit code 2, no traceback, within 15 s.

The matrix runs each of the 13 commands on missing paths, files of the wrong kind, random bytes,
non-UTF-8 text, truncated Parquet, foreign shards, outputs under a file or on a read-only place,
absurd numbers and hub ids that cannot be reached, in this process (CliRunner: the same code path
as the console script, click's usage errors included). The `slow` part runs one case of every
command as a real process, whose 15 s include Python's and torch's start-up, and the hub probe
against an endpoint that does not answer.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
from typer.testing import CliRunner

import cli
from bad_inputs import NO_SUCH_HUB_ID as NO_HUB
from bad_inputs import build_world

ROOT = Path(__file__).resolve().parent.parent
LIMIT_S = 15.0
W = dict  # the world: name -> path (tests/bad_inputs.py)
Case = Callable[[W, Path], list[str]]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> W:
    return build_world(tmp_path_factory.mktemp("bad-inputs"))


def s(p) -> str:
    return str(p)


def _stats(w, t): return ["stats", s(w["prompts"])]
def _caption(w, t): return ["caption", "--src", s(w["images"]), "--out", s(t / "o"), "--backend", "transformers",
                            "--model", s(w["clip"])]
def _score(w, t): return ["score", "--shards", s(w["captions"]), "--out", s(t / "o"), "--scorers", "lang", "--no-progress"]
def _select(w, t): return ["select", "--shards", s(w["captions"]), "--scores", s(w["scores"]), "--where", "lang = 'en'",
                           "--out", s(t / "o")]
def _features(w, t): return ["features", "--shards", s(w["captions"]), "--out", s(t / "o"), "--vae", s(w["vae"]),
                             "--text-encoder", s(w["text_encoder"]), "--resolution", "16", "--max-tokens", "16"]
def _train(w, t): return ["train", "--shards", s(w["captions"]), "--out", s(t / "o"), "--preset", "PixArt-tiny/2",
                          "--resolution", "16", "--vae", s(w["vae"]), "--text-encoder", s(w["text_encoder"]), "--steps", "2"]
def _sample(w, t): return ["sample", s(w["run"]), "--prompt", "a red circle", "--out", s(t / "grid.png")]
def _export(w, t): return ["export", s(w["run"]), "--out", s(t / "pipe")]
def _eval(w, t): return ["eval", s(w["run"]), "--prompts", s(w["prompts"]), "--clip", s(w["clip"]), "--out", s(t / "e"),
                         "--no-progress"]
def _import(w, t): return ["import-dit", s(w["random.pt"]), "--out", s(t / "pixart")]
def _plan(w, t): return ["plan", s(w["manifest"]), "--images", "sam=10M,aesthetic=14M"]
def _cost(w, t): return ["cost", s(w["ledger-binary"])]
def _demo(w, t): return ["demo", "--out", s(t / "d"), "--quick"]


def swap(base: Case, flag: str, value: Callable[[W, Path], str] | str) -> Case:
    """`base` with `flag`'s value replaced (or the flag added): one bad setting on a good command."""
    def case(w: W, t: Path) -> list[str]:
        args = base(w, t)
        v = value(w, t) if callable(value) else value
        if flag.startswith("#"):  # a positional argument, by index
            args[int(flag[1:])] = v
        elif flag in args:
            args[args.index(flag) + 1] = v
        else:
            args += [flag, v]
        return args
    return case


def add(base: Case, *extra: str) -> Case:
    return lambda w, t: base(w, t) + list(extra)


def path(name: str, *under: str) -> Callable[[W, Path], str]:
    """The world's file `name` (with `under` appended: an output inside it)."""
    return lambda w, t: s(Path(w[name], *under))


UNDER_FILE, READ_ONLY = path("a-file", "out"), path("read-only", "out")
UNDER_FILE_PNG, READ_ONLY_PNG = path("a-file", "grid.png"), path("read-only", "grid.png")

CASES: dict[str, Case] = {
    # stats
    "stats-missing": swap(_stats, "#1", path("missing")),
    "stats-random-bytes-parquet": swap(_stats, "#1", path("random.parquet")),
    "stats-non-utf8-txt": swap(_stats, "#1", path("latin1.txt")),
    "stats-truncated-shards": swap(_stats, "#1", path("truncated-shards")),
    "stats-random-shards": swap(_stats, "#1", path("random-shards")),
    "stats-wrong-kind-dir": swap(_stats, "#1", path("empty-dir")),
    "stats-out-under-file": swap(_stats, "--out", UNDER_FILE),
    "stats-out-read-only": swap(_stats, "--out", READ_ONLY),
    "stats-repeats-0": swap(_stats, "--repeats", "0"),
    "stats-valid-min-negative": swap(_stats, "--valid-min", "-1"),
    "stats-batch-tokens-0": swap(_stats, "--batch-tokens", "0"),
    "stats-seed-negative": swap(_stats, "--seed", "-1"),
    "stats-workers-0": swap(_stats, "--workers", "0"),
    "stats-top-negative": swap(_stats, "--top", "-5"),
    # caption
    "caption-src-missing": swap(_caption, "--src", path("missing")),
    "caption-src-random-parquet": swap(_caption, "--src", path("random.parquet")),
    "caption-src-wrong-kind": swap(_caption, "--src", path("latin1.txt")),
    "caption-out-under-file": swap(_caption, "--out", UNDER_FILE),
    "caption-out-read-only": swap(_caption, "--out", READ_ONLY),
    "caption-model-hub-unreachable": swap(_caption, "--model", path("hub")),
    "caption-model-empty-dir": swap(_caption, "--model", path("empty-dir")),
    "caption-model-random-file": swap(_caption, "--model", path("random.bin")),
    "caption-batch-size-0": swap(_caption, "--batch-size", "0"),
    "caption-shard-size-0": swap(_caption, "--shard-size", "0"),
    "caption-max-new-tokens-0": swap(_caption, "--max-new-tokens", "0"),
    "caption-temperature-negative": swap(_caption, "--temperature", "-1"),
    "caption-seed-negative": swap(_caption, "--seed", "-1"),
    "caption-max-short-0": swap(_caption, "--max-short", "0"),
    "caption-replicas-0": swap(_caption, "--replicas", "0"),
    # score
    "score-shards-missing": swap(_score, "--shards", path("missing")),
    "score-shards-random-bytes": swap(_score, "--shards", path("random-shards")),
    "score-shards-foreign": swap(_score, "--shards", path("foreign-shards")),
    "score-shards-truncated": swap(_score, "--shards", path("truncated-shards")),
    "score-shards-a-file": swap(_score, "--shards", path("random.parquet")),
    "score-out-under-file": swap(_score, "--out", UNDER_FILE),
    "score-out-read-only": swap(_score, "--out", READ_ONLY),
    "score-clip-hub-unreachable": add(swap(_score, "--scorers", "clip"), "--clip-model", NO_HUB),
    "score-clip-empty-dir": add(swap(_score, "--scorers", "clip"), "--clip-model", "PLACEHOLDER"),
    "score-aesthetic-random-weights": lambda w, t: _score(w, t)[:-3] + ["--scorers", "aesthetic", "--clip-model", s(w["clip"]),
                                                                         "--aesthetic-weights", s(w["random.pt"]), "--no-progress"],
    "score-fit-aesthetic-random-bytes": add(_score, "--fit-aesthetic", "PLACEHOLDER-random.parquet"),
    "score-fit-aesthetic-non-utf8": add(_score, "--fit-aesthetic", "PLACEHOLDER-latin1.txt"),
    "score-dedup-threshold-7": add(_score, "--dedup-threshold", "7"),
    "score-batch-size-0": add(_score, "--batch-size", "0"),
    "score-shard-size-0": add(_score, "--shard-size", "0"),
    "score-workers-negative": add(_score, "--workers", "-1"),
    "score-replicas-0": add(_score, "--replicas", "0"),
    # select
    "select-shards-missing": swap(_select, "--shards", path("missing")),
    "select-shards-random-bytes": swap(_select, "--shards", path("random-shards")),
    "select-shards-foreign": swap(_select, "--shards", path("foreign-shards")),
    "select-shards-truncated": swap(_select, "--shards", path("truncated-shards")),
    "select-scores-missing": swap(_select, "--scores", path("missing")),
    "select-scores-random-bytes": swap(_select, "--scores", path("random-shards")),
    "select-scores-foreign": swap(_select, "--scores", path("foreign-shards")),
    "select-scores-truncated": swap(_select, "--scores", path("truncated-shards")),
    "select-out-under-file": swap(_select, "--out", UNDER_FILE),
    "select-out-read-only": swap(_select, "--out", READ_ONLY),
    "select-shard-size-0": add(_select, "--shard-size", "0"),
    "select-shard-size-negative": add(_select, "--shard-size", "-5"),
    "select-where-empty": swap(_select, "--where", " "),
    "select-where-bad-sql": swap(_select, "--where", "lang >>= 1"),
    # features
    "features-shards-missing": swap(_features, "--shards", path("missing")),
    "features-shards-random-bytes": swap(_features, "--shards", path("random-shards")),
    "features-shards-foreign": swap(_features, "--shards", path("foreign-shards")),
    "features-shards-truncated": swap(_features, "--shards", path("truncated-shards")),
    "features-resolution-100000": swap(_features, "--resolution", "100000"),
    "features-resolution-0": swap(_features, "--resolution", "0"),
    "features-max-tokens-0": swap(_features, "--max-tokens", "0"),
    "features-batch-size-0": add(_features, "--batch-size", "0"),
    "features-shard-size-0": add(_features, "--shard-size", "0"),
    "features-threads-negative": add(_features, "--threads", "-1"),
    "features-vae-hub-unreachable": swap(_features, "--vae", path("hub")),
    "features-vae-empty-dir": swap(_features, "--vae", path("empty-dir")),
    "features-text-encoder-random-file": swap(_features, "--text-encoder", path("random.bin")),
    "features-out-under-file": swap(_features, "--out", UNDER_FILE),
    "features-out-read-only": swap(_features, "--out", READ_ONLY),
    # train
    "train-manifest-missing": lambda w, t: ["train", "--manifest", s(w["missing"]), "--out", s(t / "o")],
    "train-manifest-non-utf8": lambda w, t: ["train", "--manifest", s(w["latin1.toml"]), "--out", s(t / "o")],
    "train-manifest-random-bytes": lambda w, t: ["train", "--manifest", s(w["random.toml"]), "--out", s(t / "o")],
    "train-lr-negative": add(_train, "--lr", "-1"),
    "train-steps-0": swap(_train, "--steps", "0"),
    "train-batch-size-0": add(_train, "--batch-size", "0"),
    "train-resolution-100000": swap(_train, "--resolution", "100000"),
    "train-threads-negative": add(_train, "--threads", "-1"),
    "train-family-bogus": add(_train, "--family", "gamma"),
    "train-kv-compress-0": add(_train, "--kv-compress", "0"),
    "train-kv-compress-layers-not-indices": add(_train, "--kv-compress", "2", "--kv-compress-layers", "a,b"),
    "train-init-pixart-hub-unreachable": add(_train, "--init", f"pixart:{NO_HUB}"),
    "train-init-pixart-empty-dir": add(_train, "--init", "PLACEHOLDER-pixart:empty-dir"),
    "train-init-dit-random-bytes": add(_train, "--init", "PLACEHOLDER-dit:random.pt"),
    "train-vae-hub-unreachable": swap(_train, "--vae", path("hub")),
    "train-text-encoder-empty-dir": swap(_train, "--text-encoder", path("empty-dir")),
    "train-shards-random-bytes": swap(_train, "--shards", path("random-shards")),
    "train-shards-truncated": swap(_train, "--shards", path("truncated-shards")),
    "train-out-under-file": swap(_train, "--out", UNDER_FILE),
    "train-out-read-only": swap(_train, "--out", READ_ONLY),
    # sample
    "sample-checkpoint-missing": swap(_sample, "#1", path("missing")),
    "sample-checkpoint-empty-dir": swap(_sample, "#1", path("empty-dir")),
    "sample-checkpoint-truncated": swap(_sample, "#1", path("ck-truncated")),
    "sample-checkpoint-relative-paths": swap(_sample, "#1", path("ck-relative")),
    "sample-weights-bogus": add(_sample, "--weights", "bogus"),
    "sample-steps-0": add(_sample, "--steps", "0"),
    "sample-steps-negative": add(_sample, "--steps", "-3"),
    "sample-guidance-negative": add(_sample, "--guidance", "-1"),
    "sample-seed-negative": add(_sample, "--seed", "-1"),
    "sample-out-under-file": swap(_sample, "--out", UNDER_FILE_PNG),
    "sample-out-read-only": swap(_sample, "--out", READ_ONLY_PNG),
    "sample-prompts-file-missing": add(_sample, "--prompts-file", "PLACEHOLDER-missing"),
    "sample-prompts-file-non-utf8": add(_sample, "--prompts-file", "PLACEHOLDER-latin1.txt"),
    "sample-prompts-file-random-bytes": add(_sample, "--prompts-file", "PLACEHOLDER-random.txt"),
    "sample-text-encoder-hub-unreachable": add(_sample, "--text-encoder", NO_HUB),
    "sample-vae-empty-dir": add(_sample, "--vae", "PLACEHOLDER-empty-dir"),
    # export
    "export-checkpoint-missing": swap(_export, "#1", path("missing")),
    "export-checkpoint-truncated": swap(_export, "#1", path("ck-truncated")),
    "export-checkpoint-relative-paths": swap(_export, "#1", path("ck-relative")),
    "export-weights-bogus": add(_export, "--weights", "bogus"),
    "export-out-under-file": swap(_export, "--out", UNDER_FILE),
    "export-out-read-only": swap(_export, "--out", READ_ONLY),
    "export-out-not-empty": swap(_export, "--out", path("images")),
    "export-text-encoder-random-file": add(_export, "--text-encoder", "PLACEHOLDER-random.bin"),
    # eval
    "eval-target-missing": swap(_eval, "#1", path("missing")),
    "eval-target-empty-dir": swap(_eval, "#1", path("empty-dir")),
    "eval-checkpoint-truncated": swap(_eval, "#1", path("ck-truncated")),
    "eval-prompts-missing": swap(_eval, "--prompts", path("missing")),
    "eval-prompts-non-utf8": swap(_eval, "--prompts", path("latin1.txt")),
    "eval-prompts-random-bytes": swap(_eval, "--prompts", path("random.txt")),
    "eval-prompts-empty": swap(_eval, "--prompts", path("empty.txt")),
    "eval-clip-hub-unreachable": swap(_eval, "--clip", path("hub")),
    "eval-clip-empty-dir": swap(_eval, "--clip", path("empty-dir")),
    "eval-aesthetic-random-weights": add(_eval, "--aesthetic", "PLACEHOLDER-random.pt"),
    "eval-reference-a-file": add(_eval, "--reference", "PLACEHOLDER-random.bin", "--fid-features", "clip"),
    "eval-inception-random-bytes": add(_eval, "--reference", "PLACEHOLDER-images", "--inception", "PLACEHOLDER-random.pt"),
    "eval-steps-0": add(_eval, "--steps", "0"),
    "eval-batch-size-0": add(_eval, "--batch-size", "0"),
    "eval-fid-dims-5": add(_eval, "--fid-dims", "5"),
    "eval-seed-negative": add(_eval, "--seed", "-1"),
    "eval-guidance-negative": add(_eval, "--guidance", "-1"),
    "eval-weights-bogus": add(_eval, "--weights", "bogus"),
    "eval-out-under-file": swap(_eval, "--out", UNDER_FILE),
    "eval-out-read-only": swap(_eval, "--out", READ_ONLY),
    # import-dit
    "import-dit-missing": swap(_import, "#1", path("missing")),
    "import-dit-random-pt": _import,
    "import-dit-random-safetensors": swap(_import, "#1", path("random.safetensors")),
    "import-dit-non-utf8-text": swap(_import, "#1", path("latin1.txt")),
    "import-dit-empty-dir": swap(_import, "#1", path("empty-dir")),
    "import-dit-caption-channels-negative": add(_import, "--caption-channels", "-4"),
    "import-dit-caption-channels-0": add(_import, "--caption-channels", "0"),
    "import-dit-heads-0": add(_import, "--heads", "0"),
    "import-dit-out-under-file": swap(_import, "--out", UNDER_FILE),
    "import-dit-out-read-only": swap(_import, "--out", READ_ONLY),
    # plan
    "plan-manifest-missing": swap(_plan, "#1", path("missing")),
    "plan-manifest-non-utf8": swap(_plan, "#1", path("latin1.toml")),
    "plan-manifest-random-bytes": swap(_plan, "#1", path("random.toml")),
    "plan-manifest-a-dir": swap(_plan, "#1", path("empty-dir")),
    "plan-images-negative": swap(_plan, "--images", "sam=-5"),
    "plan-images-not-a-number": swap(_plan, "--images", "sam=lots"),
    "plan-price-negative": add(_plan, "--price", "-1"),
    "plan-gpus-0": add(_plan, "--gpus", "0"),
    "plan-pue-below-1": add(_plan, "--pue", "0.5"),
    "plan-grid-negative": add(_plan, "--grid-gco2-kwh", "-1"),
    "plan-mfu-2": add(_plan, "--mfu", "2"),
    "plan-caption-rate-negative": add(_plan, "--caption-rate", "-1"),
    "plan-gpu-unknown": add(_plan, "--gpu", "TPU-v9"),
    "plan-gpu-bench-random-bytes": add(_plan, "--gpu-bench", "PLACEHOLDER-random.json"),
    "plan-gpu-bench-non-utf8": add(_plan, "--gpu-bench", "PLACEHOLDER-latin1.json"),
    "plan-gpu-bench-missing": add(_plan, "--gpu-bench", "PLACEHOLDER-missing"),
    "plan-out-under-file": add(_plan, "--out", "PLACEHOLDER-UNDER_FILE"),
    "plan-out-read-only": add(_plan, "--out", "PLACEHOLDER-READ_ONLY"),
    # cost
    "cost-missing": swap(_cost, "#1", path("missing")),
    "cost-ledger-binary-line": _cost,
    "cost-ledger-not-json": swap(_cost, "#1", path("ledger-not-json")),
    "cost-ledger-not-a-record": swap(_cost, "#1", path("ledger-not-a-record")),
    "cost-non-utf8-file": swap(_cost, "#1", path("latin1.txt")),
    "cost-random-bytes-file": swap(_cost, "#1", path("random.bin")),
    "cost-no-ledger": swap(_cost, "#1", path("empty-dir")),
    # demo (every case fails before any work)
    "demo-seed-negative": add(_demo, "--seed", "-1"),
    "demo-out-under-file": swap(_demo, "--out", UNDER_FILE),
    "demo-out-read-only": swap(_demo, "--out", READ_ONLY),
    "demo-backend-unknown": add(_demo, "--backend", "onnx"),
    "demo-quick-and-full": add(_demo, "--full"),
    # click's own usage errors, one line too
    "usage-not-an-integer": add(_sample, "--steps", "abc"),
    "usage-unknown-option": add(_plan, "--no-such-flag"),
    "usage-unknown-command": lambda w, t: ["no-such-command"],
}
PLACEHOLDER = "PLACEHOLDER"


def resolve(args: list[str], w: W) -> list[str]:
    """Fill in the world's files named by PLACEHOLDER-<name> (and the bare PLACEHOLDER: its empty folder)."""
    under = {"UNDER_FILE": UNDER_FILE(w, Path()), "READ_ONLY": READ_ONLY(w, Path())}
    out = []
    for a in args:
        if a == PLACEHOLDER:
            a = s(w["empty-dir"])
        elif a.startswith(PLACEHOLDER + "-"):
            kind, _, name = a[len(PLACEHOLDER) + 1:].rpartition(":")
            a = under.get(name) or s(w[name]) if not kind else f"{kind}:{w[name]}"
        out.append(a)
    return out


def assert_one_line_error(code: int, output: str, seconds: float) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert code == 2, f"exit {code}: {output[-3000:]}"
    assert "Traceback" not in output, output[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and ": " in lines[0][7:], output[-3000:]
    assert seconds < LIMIT_S, f"{seconds:.1f} s: {lines[0]}"
    return lines[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line(world, tmp_path, monkeypatch, case):
    args = resolve(CASES[case](world, tmp_path), world)
    monkeypatch.chdir(tmp_path)
    t = time.perf_counter()
    r = CliRunner().invoke(cli.app, args)
    line = assert_one_line_error(r.exit_code, r.output, time.perf_counter() - t)
    assert "warning" not in line


# ---- as real processes: start-up included, and a hub that does not answer ----------------------

PROCESS_CASES = ["stats-non-utf8-txt", "caption-model-empty-dir", "score-shards-truncated", "select-shard-size-0",
                 "features-resolution-100000", "train-manifest-non-utf8", "sample-steps-negative", "export-weights-bogus",
                 "eval-prompts-non-utf8", "import-dit-caption-channels-negative", "plan-images-negative",
                 "cost-ledger-binary-line", "demo-seed-negative", "usage-not-an-integer"]


def _process(args: list[str], tmp: Path, **env: str) -> tuple[int, str, float]:
    full = {k: v for k, v in os.environ.items() if k not in env}
    full.update(OMP_NUM_THREADS="1", **env)
    t = time.perf_counter()
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=tmp, env=full, capture_output=True, text=True,
                       timeout=120)
    return r.returncode, r.stdout + r.stderr, time.perf_counter() - t


@pytest.mark.slow
@pytest.mark.parametrize("case", PROCESS_CASES)
def test_bad_input_is_one_line_as_a_process(world, tmp_path, case):
    assert_one_line_error(*_process(resolve(CASES[case](world, tmp_path), world), tmp_path))


@pytest.fixture()
def silent_hub():
    """An endpoint that takes connections and never answers (as a firewalled proxy does): the
    probe's 5 s timeout is what ends the wait."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)  # the kernel completes the handshakes; nobody reads or replies
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()


@pytest.mark.slow
@pytest.mark.parametrize("case", ["caption-model-hub-unreachable", "score-clip-hub-unreachable", "features-vae-hub-unreachable",
                                  "train-init-pixart-hub-unreachable", "sample-text-encoder-hub-unreachable",
                                  "eval-clip-hub-unreachable"])
def test_unreachable_hub_is_one_line_within_15_s(world, tmp_path, silent_hub, case):
    """No HF_HUB_OFFLINE, and a hub that never answers: one probe of 5 s, no retries, then the one line."""
    env = {"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_ENDPOINT": silent_hub, "HF_HUB_CACHE": str(tmp_path / "hf-cache")}
    line = assert_one_line_error(*_process(resolve(CASES[case](world, tmp_path), world), tmp_path, **env))
    assert "not reachable" in line and NO_HUB in line, line
