"""VQAScore-style judging (Lin et al. 2024, "Evaluating Text-to-Visual Generation with
Image-to-Text Generation"): the probability that a VLM's answer to a yes/no question about an
image starts with "Yes", read from the first answer token's distribution, not from a sampled text.

    scorer = VqaScorer(make_captioner("transformers", "judge/"))   # any autolabel backend
    scorer.score(images, ["Is there a red circle?", ...]) -> [Verdict(p_yes, p_no, answer)]

- The question is asked through the backend's own prompt format (`format_prompt`: the model's
  chat template), followed by `ASK_SUFFIX` (VQAScore's "Please answer yes or no.").
- p_yes: the softmax probability, over the whole vocabulary, of the first token of "Yes" (the
  spellings in `YES`: the first token of each, summed over distinct ids); p_no likewise. The
  decision ("yes" / "no") is p_yes > p_no; the score is p_yes (VQAScore's number).
- transformers: one forward pass per batch (left padding, the last position's logits, float64
  softmax). vLLM: one generated token with the top `VLLM_LOGPROBS` log-probabilities (ids of yes
  or no outside them count as 0, which is below every listed one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from PIL import Image

ASK_SUFFIX = " Please answer yes or no."
YES = ("Yes", " Yes", "yes", " yes", "YES")
NO = ("No", " No", "no", " no", "NO")
VLLM_LOGPROBS = 20  # vLLM's default cap on returned log-probabilities per token


@dataclass(frozen=True)
class Verdict:
    p_yes: float  # VQAScore
    p_no: float
    answer: str  # "yes" | "no"


def first_token_ids(tokenizer, spellings: Sequence[str]) -> set[int]:
    """The first token id of each spelling (no special tokens added): those that are the whole
    word (" Yes", "yes"), or, when the tokenizer has no such token, the first pieces ("Y")."""
    firsts = set()
    for text in spellings:
        encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
        if encoded:
            firsts.add(int(encoded[0]))
    words = {s.strip().lower() for s in spellings}
    whole = {i for i in firsts if tokenizer.decode([i]).strip().lower() in words}
    return whole or firsts


def answer_ids(tokenizer) -> tuple[list[int], list[int]]:
    """(yes ids, no ids): first tokens of the spellings of each, minus any both share (a byte-level
    tokenizer without a merge for "No" starts it with "N", which no "Yes" shares)."""
    yes, no = first_token_ids(tokenizer, YES), first_token_ids(tokenizer, NO)
    return sorted(yes - no), sorted(no - yes)


def verdict(p_yes: float, p_no: float) -> Verdict:
    return Verdict(float(p_yes), float(p_no), "yes" if p_yes > p_no else "no")


class VqaScorer:
    """Yes/no verdicts from a loaded autolabel captioner (TransformersCaptioner or VllmCaptioner)."""

    def __init__(self, captioner) -> None:
        self.captioner = captioner
        self.yes, self.no = answer_ids(captioner.processor.tokenizer)
        if not self.yes or not self.no:
            raise ValueError(f"{captioner.model_name}'s tokenizer has no first token for yes or no")
        self._rendered: dict[str, str] = {}

    @property
    def name(self) -> str:
        return self.captioner.name

    @property
    def model_name(self) -> str:
        return self.captioner.model_name

    def prompt(self, question: str) -> str:
        """The full prompt of `question` (the model's chat template), rendered once per question."""
        if question not in self._rendered:
            self._rendered[question] = self.captioner.format_prompt(question.strip() + ASK_SUFFIX)
        return self._rendered[question]

    def score(self, images: Sequence[Image.Image], questions: Sequence[str]) -> list[Verdict]:
        """One Verdict per (image, question), in order."""
        if not images:
            return []
        prompts = [self.prompt(q) for q in questions]
        if self.captioner.name == "vllm":
            return self._score_vllm(images, prompts)
        return self._score_transformers(images, prompts)

    def _score_transformers(self, images, prompts) -> list[Verdict]:
        import torch

        cap = self.captioner
        inputs = cap.processor(images=[[im] for im in images], text=list(prompts), return_tensors="pt", padding=True)
        inputs = {k: (v.to(cap.device, cap.model.dtype) if v.is_floating_point() else v.to(cap.device)) for k, v in inputs.items()}
        with torch.inference_mode():
            logits = cap.model(**inputs).logits[:, -1].double()  # left-padded: the last position is every prompt's end
        probs = torch.softmax(logits, dim=-1).cpu()
        return [verdict(p[self.yes].sum(), p[self.no].sum()) for p in probs]

    def _score_vllm(self, images, prompts) -> list[Verdict]:
        import math

        from vllm import SamplingParams

        sp = SamplingParams(temperature=0.0, max_tokens=1, logprobs=VLLM_LOGPROBS)
        requests = [{"prompt": p, "multi_modal_data": {"image": im}} for im, p in zip(images, prompts)]
        outs = self.captioner.llm.generate(requests, sp, use_tqdm=False)
        found = []
        for o in outs:
            top = o.outputs[0].logprobs[0]  # {token id: Logprob} of the first generated token
            p = {int(t): math.exp(lp.logprob) for t, lp in top.items()}
            found.append(verdict(sum(p.get(t, 0.0) for t in self.yes), sum(p.get(t, 0.0) for t in self.no)))
        return found
