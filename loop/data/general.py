"""General replay: the original base model's own answers to everyday prompts, as training rows.

A cycle that trains only on its domain drifts away from what the base answered everywhere else (one
cycle from the base cost 20-27 points of general answers on a new domain). Mixing in the base's own
greedy answers to a general prompt set costs no teacher call and pulls the student back toward the
base. The prompts here are disjoint from the base regression suite's (loop/validate/data/), so the
gate's measure of forgetting is not trained on.
"""
from __future__ import annotations

import json
import random
from importlib import resources
from pathlib import Path


def replay_prompts(path: str | None = None) -> list[list[dict]]:
    text = Path(path).read_text() if path else \
        resources.files("loop.data").joinpath("data/general_replay_prompts.jsonl").read_text()
    return [json.loads(line)["messages"] for line in text.splitlines() if line.strip()]


def base_replay_rows(base_dir: Path, n: int, seed: int, max_new_tokens: int, cache_root: Path | None,
                     prompts_path: str | None = None) -> list[dict]:
    """`n` prompts of the replay set (seeded per cycle) with the base's greedy answers (kept under
    `cache_root`, so each base answers each prompt once) as `{"messages", "completion", "eos": false,
    "source": "base"}` rows. Heavy (Hugging Face generation): run it in a Ray task."""
    from loop.models.digest import dir_digest
    from loop.models.answers import AnswerCache, generate_answers

    prompts = replay_prompts(prompts_path)
    picked = random.Random(seed).sample(prompts, min(n, len(prompts)))
    answers = AnswerCache(cache_root).answers(f"base:{dir_digest(base_dir)}", picked, max_new_tokens,
                                              lambda c: generate_answers(base_dir, c, max_new_tokens))
    # No end-of-turn token: an answer cut at max_new_tokens must not teach the student to stop there.
    return [{"messages": p, "completion": a, "eos": False, "source": "base"}
            for p, a in zip(picked, answers) if a.strip()]
