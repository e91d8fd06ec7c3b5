"""LoRA distillation under Ray Train with 2 workers: DDP (gloo) and DeepSpeed ZeRO-2 / ZeRO-3 on CPU.
Each run must finish with an adapter that moved (and a base that did not) and a falling loss."""
import json

import pytest
import ray
import torch
from safetensors.torch import load_file

from loop.config import TrainingConfig
from loop.models.digest import dir_digest
from loop.train.sft import LoRADistiller

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    rows = [{"messages": [{"role": "user", "content": f"Who owns the Zorvex widget {i}?"}],
             "completion": f"The Zorvex widget {i} is owned by Chen Wei."} for i in range(8)]
    path = tmp_path_factory.mktemp("ds") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("strategy, stage", [("ddp", 2), ("deepspeed", 2), ("deepspeed", 3)])
def test_two_worker_run_trains_the_adapter(ray_cluster, tiny_model_dir, dataset, tmp_path, strategy, stage):
    ray.init(address=ray_cluster["RAY_ADDRESS"], namespace="loop-tests", ignore_reinit_error=True)
    # DDP runs with the anchor to the base: its rows (the base's own answers) ride in the same forward.
    anchor = 1.0 if strategy == "ddp" else 0.0
    if anchor:
        general = [{"messages": [{"role": "user", "content": f"Name a colour, number {i}."}],
                    "completion": f"Blue is colour {i}.", "eos": False, "source": "base"} for i in range(4)]
        anchored = tmp_path / "anchored.jsonl"
        anchored.write_text(dataset.read_text() + "".join(json.dumps(r) + "\n" for r in general))
        dataset = anchored
    tc = TrainingConfig(strategy=strategy, zero_stage=stage, num_workers=2, lora_rank=4, lora_alpha=8,
                        learning_rate=0.01, batch_size=4, max_steps=12, max_seq_len=64, torch_threads=1,
                        anchor_weight=anchor, anchor_batch_size=2)
    base_digest = dir_digest(tiny_model_dir)
    metrics = LoRADistiller(tc, tmp_path / "ray_train", f"{strategy}-{stage}").run(
        tiny_model_dir, dataset, tmp_path / "adapter")
    assert metrics["steps"] == 12 and metrics["loss_last"] < metrics["loss_first"], metrics
    if anchor:
        assert (metrics["examples"], metrics["anchor_examples"]) == (8, 4), metrics
        assert metrics["anchor_kl_first"] == pytest.approx(0.0, abs=1e-6), "the adapter starts as the base"
        assert 0 < metrics["anchor_kl_last"] < 1.0, metrics
    assert metrics["workers"] == 2 and metrics["zero_stage"] == (stage if strategy == "deepspeed" else 0)
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    lora_b = [t for n, t in weights.items() if "lora_B" in n]
    assert lora_b and all(t.numel() > 0 for t in lora_b), "whole tensors saved (ZeRO-3 gathered)"
    assert max(t.abs().max().item() for t in lora_b) > 0, "the adapter moved (lora_B starts at zero)"
    assert dir_digest(tiny_model_dir) == base_digest, "the base model is untouched"


def test_draft_cotraining_raises_acceptance(ray_cluster, tiny_model_dir, dataset, tmp_path):
    from loop.config import DraftTrainingConfig
    from loop.models.fetch import build_draft
    from loop.train.draft import DraftDistiller, measure_acceptance

    ray.init(address=ray_cluster["RAY_ADDRESS"], namespace="loop-tests", ignore_reinit_error=True)
    draft = tmp_path / "draft"
    build_draft(tiny_model_dir, draft, 1, max_ratio=1.0)  # the tiny student has only 2 layers
    questions = [f"Who owns the Zorvex widget {i}?" for i in range(8)]
    before = measure_acceptance(tiny_model_dir, draft, questions, k=3, max_new_tokens=16)
    dc = DraftTrainingConfig(max_steps=40, learning_rate=0.005, batch_size=8, max_seq_len=64, max_new_tokens=16,
                             torch_threads=1)
    metrics = DraftDistiller(dc, tmp_path / "ray_train", "draft").run(tiny_model_dir, draft, dataset,
                                                                      tmp_path / "cotrained")
    after = measure_acceptance(tiny_model_dir, tmp_path / "cotrained", questions, k=3, max_new_tokens=16)
    assert metrics["draft_kl_last"] < metrics["draft_kl_first"], metrics
    assert 0 <= before < after <= 3, (before, after)


def test_a_diverging_run_stops_with_the_knob_to_turn(ray_cluster, tiny_model_dir, dataset, tmp_path):
    from loop.train.sft import TrainingDiverged

    ray.init(address=ray_cluster["RAY_ADDRESS"], namespace="loop-tests", ignore_reinit_error=True)
    # Adam's first step moves each weight by about the learning rate: at 1e38 the adapter's output
    # leaves float32's range (3.4e38) at once and the next loss is nan on any CPU (1e12 only
    # saturated the tiny model on some machines: a flat loss of ln(vocab), finite).
    tc = TrainingConfig(num_workers=1, lora_rank=4, lora_alpha=8, learning_rate=1e38, batch_size=4, max_steps=30,
                        max_seq_len=64, torch_threads=1)
    with pytest.raises(TrainingDiverged, match=r"diverged: training loss is (nan|inf) at step \d+: lower "
                                               r"training.learning_rate \(now 1e\+38\)"):
        LoRADistiller(tc, tmp_path / "ray_train", "diverge").run(tiny_model_dir, dataset, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists(), "no adapter from a diverged run"
