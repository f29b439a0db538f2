"""The VQAScore judge through vLLM against transformers on CPU: images/s of each backend and
whether they make the same decisions, on the world with the tiny judge VLM the project trains
(demo.judge_vlm), plus each backend's agreement with the world's exact judge.

    python benchmarks/judge_bench.py [--judge DIR] [--pairs 60]     # writes its BENCHMARKS.md section
    python benchmarks/judge_bench.py --untrained                    # the same, on an untrained tiny judge built
                                                                    # in seconds (speed and backend agreement only)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def run(judge: Path, n: int) -> dict:
    import torch

    from autolabel.backends import make_captioner
    from evals.vqa import VqaScorer
    from test_evals import suite_images
    from tiny import judge as J

    torch.set_num_threads(2)
    pairs = suite_images(n, seed=99)
    exact = [J.answer_question(q, J.judge_image(im)) for q, im in pairs]
    res = {}
    for backend in ("transformers", "vllm"):
        scorer = VqaScorer(make_captioner(backend, str(judge)))
        scorer.score([pairs[0][1]], [pairs[0][0]])  # warm-up
        t0, verdicts = time.perf_counter(), []
        for s in range(0, len(pairs), 32):
            batch = pairs[s : s + 32]
            verdicts += scorer.score([im for _, im in batch], [q for q, _ in batch])
        seconds = time.perf_counter() - t0
        agree = float(np.mean([(v.answer == "yes") == e for v, e in zip(verdicts, exact)]))
        res[backend] = {"verdicts": verdicts, "seconds": seconds, "agreement": agree, "rate": len(pairs) / seconds}
        scorer.captioner.close()
    t, v = res["transformers"]["verdicts"], res["vllm"]["verdicts"]
    res["same"] = float(np.mean([a.answer == b.answer for a, b in zip(t, v)]))
    res["max_diff"] = max(abs(a.p_yes - b.p_yes) for a, b in zip(t, v))
    res["n"] = len(pairs)
    return res


def main() -> None:
    from _report import load_note, write_section

    ap = argparse.ArgumentParser()
    ap.add_argument("--judge", type=Path, default=Path("/tmp/t2i-judge-vlm"))
    ap.add_argument("--pairs", type=int, default=60, help="scenes; 4 questions each")
    ap.add_argument("--untrained", action="store_true", help=(
        "an untrained tiny judge (the trained one's architecture and vocabulary) instead of training one (about 6 minutes)"))
    args = ap.parse_args()
    if args.untrained:
        from demo.judge_vlm import IMAGE_SIZE, VISION_HIDDEN, corpus
        from tiny.llava import build_tiny_llava

        args.judge = build_tiny_llava(Path("/tmp/t2i-judge-vlm-untrained"), corpus=corpus(), image_size=IMAGE_SIZE, seed=0,
                                      vision_hidden=VISION_HIDDEN)  # fmt: skip
    elif not (args.judge / "config.json").is_file():
        from demo.judge_vlm import train_judge_vlm

        train_judge_vlm(args.judge)
    load = os.getloadavg()[0]
    r = run(args.judge, args.pairs)
    kind = ("untrained: its agreement with the exact judge is chance; the run measures speed and whether both backends "
            "decide alike") if args.untrained else "trained"  # fmt: skip
    t, v = r["transformers"], r["vllm"]
    body = (f"{r['n']} (image, question) pairs of the world (suite questions, half of them about another scene), judged by "
            f"the tiny judge VLM (`demo.judge_vlm`, {kind}) at batch 32 on 2 threads.\n\n"
            f"| backend | images/s | agreement with the exact judge |\n|---|---|---|\n"
            f"| transformers | {t['rate']:.1f} | {t['agreement']:.1%} |\n| vLLM (CPU) | {v['rate']:.1f} | {v['agreement']:.1%} |\n\n"
            f"vLLM / transformers images/s: **{v['rate'] / t['rate']:.2f}x** (higher: vLLM faster). Same yes/no decision on "
            f"{r['same']:.1%} of the pairs; largest P(Yes) difference {r['max_diff']:.2e}. {load_note(load)}")  # fmt: skip
    print(body)
    write_section("VQAScore judge: vLLM vs transformers (CPU)", body)


if __name__ == "__main__":
    main()
