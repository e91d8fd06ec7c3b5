"""How a cycle asks its teacher, whatever kind it is: labels for many prompts (Ray Data, one labelling
actor), and plain greedy answers for measurement. HTTP teachers go through the `openai` client; a
local teacher runs in a Ray actor of its own."""
from __future__ import annotations

from pathlib import Path

from loop.config import LoopConfig


def teacher_dir(cfg: LoopConfig) -> Path | None:
    """A local teacher's model directory (None for an HTTP teacher)."""
    return cfg.model_path(cfg.teacher) if cfg.teacher.kind == "local" else None


def label(cfg: LoopConfig, teacher_url: str, epoch: int, conversations: list[str]) -> list[dict]:
    """Teacher labels for chat conversations (JSON strings): one row per conversation with the
    completion, its cost and cache facts, or a `label_error`."""
    import ray

    from loop.teacher.client import TeacherLabeler, teacher_key

    items = ray.data.from_items([{"messages": c} for c in conversations])
    t = cfg.teacher
    if t.kind == "local":
        from loop.teacher.local import LocalTeacherLabeler

        return items.map_batches(LocalTeacherLabeler, fn_constructor_args=(
            str(teacher_dir(cfg)), t.max_tokens, cfg.training.torch_threads),
            batch_size=32, concurrency=1, num_cpus=1, num_gpus=t.num_gpus).take_all()
    # The reference teacher's answers change with its world's epoch: part of the cache key.
    namespace = f"epoch-{epoch}" if t.kind == "reference" else ""
    return items.map_batches(
        TeacherLabeler, fn_constructor_args=(t.model_dump(), teacher_url, teacher_key(t),
                                             str(cfg.storage.path("teacher-cache.sqlite")), namespace),
        batch_size=32, concurrency=1, num_cpus=0).take_all()


def answers(cfg: LoopConfig, teacher_url: str, conversations: list[list[dict]]) -> list[str]:
    """The teacher's greedy answers: over HTTP, or from the local teacher in a Ray actor."""
    t = cfg.teacher
    if t.kind == "local":
        import ray

        from loop.teacher.local import LocalTeacher

        actor = ray.remote(LocalTeacher).options(num_cpus=1, num_gpus=t.num_gpus).remote(
            str(teacher_dir(cfg)), t.max_tokens, cfg.training.torch_threads)
        try:
            return ray.get(actor.answer.remote(conversations))
        finally:
            ray.kill(actor)
    from loop.teacher.client import ask, make_client

    client = make_client(t, teacher_url)
    return [ask(client, t.model, c, t.max_tokens) for c in conversations]
