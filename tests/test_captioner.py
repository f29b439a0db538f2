"""The project's own tiny VLM captioner: built, trained on the world, held-out scenes captioned."""

import json

import pytest
import torch

from demo import captioner as C
from tiny import world as W


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    W.write_sam_folder(root / "train", n=4000, seed=0, image_size=64)
    W.write_sam_folder(root / "heldout", n=100, seed=1, image_size=64, split="heldout")
    W.write_sam_folder(root / "unseen", n=100, seed=2, image_size=64, split="train")  # new images, known triples
    return root


def test_training_examples_mask_everything_but_the_caption(tmp_path, worlds):
    from transformers import AutoProcessor

    model_dir = C.build_captioner_model(tmp_path / "m")
    processor = AutoProcessor.from_pretrained(model_dir)
    scenes, images, alts = C._load_world(worlds / "train", limit=3)
    prompts = [C._prompt_for(None), C._prompt_for(alts[1]), C._prompt_for("red circle")]
    captions = [W.dense_caption(s) for s in scenes]
    batch = C.encode_examples(processor, images, prompts, captions)

    tok = processor.tokenizer
    for i, caption in enumerate(captions):
        ids, labels, mask = batch["input_ids"][i], batch["labels"][i], batch["attention_mask"][i]
        target = labels[labels != -100].tolist()
        assert target[-1] == tok.eos_token_id
        assert tok.decode(target[:-1]).strip() == caption
        # the target is the end of the real (unpadded) sequence; the prompt part is exactly
        # what the processor makes for inference (chat template + expanded image tokens)
        n = int(mask.sum())
        assert ids[n - len(target) : n].tolist() == target
        inference = processor(images=[images[i]], text=[C._chat_text(processor, prompts[i])], return_tensors="pt")
        assert ids[: n - len(target)].tolist() == inference["input_ids"][0].tolist()
    assert "ASSISTANT:" in C._chat_text(processor, "q") and "<image>" in C._chat_text(processor, "q")


@pytest.mark.slow
def test_trained_captioner_names_heldout_scenes(tmp_path, worlds):
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

    out = tmp_path / "captioner"
    metrics = C.train_captioner(worlds / "train", out, steps=1200, seed=0, progress=False)
    assert metrics["final_loss"] < metrics["first_loss"] / 10

    # a normal HF model directory
    assert AutoConfig.from_pretrained(out).model_type == "llava"
    LlavaForConditionalGeneration.from_pretrained(out)
    AutoProcessor.from_pretrained(out)
    assert json.loads((out / "captioner_metrics.json").read_text())["steps"] == 1200

    torch.set_num_threads(2)
    acc = lambda r: {k: r[k]["accuracy"] for k in ("color", "shape", "position", "size", "all")}  # noqa: E731
    # new images of the training triples: the captioner's everyday job
    unseen = C.evaluate_captioner(out, worlds / "unseen", n=100)
    # held-out (colour, shape, position) triples never seen in training (chance 1/6, 1/4, 1/5):
    # the position, named last, must overcome a prior that has never seen it with that colour
    # and shape. Measured (200 held-out images, same settings): colour 1.0, shape 0.985,
    # position 0.995 (0.93 with the alt-text prompt); before the sin-cos position init: 0.58-0.8.
    heldout = C.evaluate_captioner(out, worlds / "heldout", n=100)
    with_alt = C.evaluate_captioner(out, worlds / "heldout", n=50, with_alt_text=True)
    print("unseen:", acc(unseen), "held-out:", acc(heldout), "held-out+alt:", acc(with_alt), metrics)
    assert all(unseen[k]["accuracy"] >= 0.85 for k in ("color", "shape", "position", "size"))
    for r in (heldout, with_alt):
        assert r["color"]["accuracy"] >= 0.8 and r["shape"]["accuracy"] >= 0.6
        assert r["position"]["accuracy"] >= 0.7 and r["all"]["accuracy"] >= 0.6  # chance 0.2 and 0.008
