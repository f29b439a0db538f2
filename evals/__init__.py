"""Judge what a text-to-image model draws: a VQAScore-style VLM judge run through autolabel's
backends (`vqa`, `judge_job`), the yes/no questions of a prompt (`questions`), and benchmark
suites (`own`: one built from the lab's own caption shards; `public`: GenEval, T2I-CompBench and
DPG-Bench from their vendored prompt files in `suites/`), preference scores by CLIP-architecture reward
models and ImageReward (`preference`, `imagereward`) and each checkpoint's scores against its run's ledger cost (`cost`).

`evals` sits above the jobs it combines (t2i samples, autolabel's backends load the judge,
dataset_stats' spaCy pipeline parses captions) and below tiny, demo and the CLI.
"""
