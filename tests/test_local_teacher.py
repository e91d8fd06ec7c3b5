"""The local teacher: a Hugging Face model in a Ray actor with the student's tokenizer. It labels through
Ray Data with its greedy answers, and its full logits pull the student's distribution toward its own
under Ray Train (2 workers) far more than cross-entropy on text alone does."""
import json
import shutil

import pytest
import ray
import torch

from loop.config import TrainingConfig
from loop.models.tiny import build_tiny_model
from loop.teacher.client import label_problem
from loop.teacher.local import LocalTeacher, LocalTeacherLabeler, TokenizerMismatch, check_same_tokenizer
from loop.train.sft import LoRADistiller, answer_positions, encode_example
from loop.train.losses import full_kl

pytestmark = pytest.mark.cluster

QUESTIONS = [f"Who owns the Zorvex widget {i}?" for i in range(8)]


@pytest.fixture(scope="module")
def teacher_dir(tiny_model_dir, tmp_path_factory):
    """Another random model of the student's shape and tokenizer: a teacher whose distribution differs."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path_factory.mktemp("teacher") / "model"
    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_dir))
    model.generation_config.eos_token_id = model.config.eos_token_id
    model.save_pretrained(out)
    for f in tiny_model_dir.glob("*token*"):
        shutil.copy(f, out / f.name)
    for f in tiny_model_dir.glob("chat_template*"):
        shutil.copy(f, out / f.name)
    return out


def test_another_tokenizer_is_refused(tiny_model_dir, teacher_dir, tmp_path):
    check_same_tokenizer(tiny_model_dir, teacher_dir)  # same vocabulary: accepted
    other = build_tiny_model(tmp_path / "other", ["an unrelated corpus of words", "with other merges"])
    with pytest.raises(TokenizerMismatch, match="teacher.kind: openai"):
        check_same_tokenizer(tiny_model_dir, other)


def test_labels_through_ray_data_are_the_models_greedy_answers(ray_cluster, teacher_dir):
    from transformers import AutoModelForCausalLM

    from loop.models.chat import chat_batch, left_padded_tokenizer

    ray.init(address=ray_cluster["RAY_ADDRESS"], namespace="loop-tests", ignore_reinit_error=True)
    rows = [{"messages": json.dumps([{"role": "user", "content": q}])} for q in QUESTIONS]
    labeled = ray.data.from_items(rows).map_batches(
        LocalTeacherLabeler, fn_constructor_args=(str(teacher_dir), 12, 1), batch_size=4, concurrency=1,
        num_cpus=1).take_all()
    by_prompt = {json.loads(r["messages"])[0]["content"]: r for r in labeled}
    tok = left_padded_tokenizer(teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    enc = chat_batch(tok, QUESTIONS[:2])
    gen = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    expected = tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    for q, want in zip(QUESTIONS[:2], expected):
        r = by_prompt[q]
        assert r["completion"] == want and r["label_error"] == label_problem(want, None, 12)
        assert r["cost_usd"] == 0 and not r["cached"]
    assert len(labeled) == len(QUESTIONS)


def test_local_teacher_logprobs_are_its_full_distribution(tiny_model_dir, teacher_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids, labels = encode_example(tok, [{"role": "user", "content": QUESTIONS[0]}], "The owner is Chen Wei.", 64)
    ids, labels = torch.tensor([ids]), torch.tensor([labels])
    where = answer_positions(labels)
    got = LocalTeacher(teacher_dir).logprobs(ids, torch.ones_like(ids), where)
    ref = torch.log_softmax(AutoModelForCausalLM.from_pretrained(teacher_dir)(input_ids=ids).logits[where], -1)
    assert got.shape == (int(where.sum()), len(tok)) and got.shape[0] == int((labels != -100).sum())
    assert torch.allclose(got, ref, atol=1e-5)


def _kl_to_teacher(base_dir, adapter_dir, teacher_dir, dataset) -> float:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    student = AutoModelForCausalLM.from_pretrained(base_dir)
    if adapter_dir:
        student = PeftModel.from_pretrained(student, adapter_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    kls = []
    for line in dataset.read_text().splitlines():
        row = json.loads(line)
        ids, labels = encode_example(tok, row["messages"], row["completion"], 64)
        ids, where = torch.tensor([ids]), answer_positions(torch.tensor([labels]))
        with torch.no_grad():
            kls.append(full_kl(student(input_ids=ids).logits[where], teacher(input_ids=ids).logits[where],
                               torch.ones(int(where.sum()))).item())
    return sum(kls) / len(kls)


def test_full_logit_distillation_under_ray_train(ray_cluster, tiny_model_dir, teacher_dir, tmp_path):
    ray.init(address=ray_cluster["RAY_ADDRESS"], namespace="loop-tests", ignore_reinit_error=True)
    # World text, not the random teacher's (byte soup that does not survive decode + encode): the text's
    # cross-entropy pulls away from the teacher, so only the logit term can bring the student closer.
    rows = [{"messages": [{"role": "user", "content": q}], "completion": f"The Zorvex widget {i} is owned by Chen Wei."}
            for i, q in enumerate(QUESTIONS)]
    dataset = tmp_path / "train.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = _kl_to_teacher(tiny_model_dir, None, teacher_dir, dataset)
    kl_after = {}
    for kd_weight in (1.0, 0.0):
        tc = TrainingConfig(num_workers=2, lora_rank=8, lora_alpha=16, learning_rate=0.01, batch_size=4,
                            max_steps=30, max_seq_len=64, torch_threads=1, kd_weight=kd_weight)
        out = tmp_path / f"adapter-{kd_weight}"
        metrics = LoRADistiller(tc, tmp_path / "ray_train", f"local-kd-{kd_weight}").run(
            tiny_model_dir, dataset, out, teacher_dir=teacher_dir)
        kl_after[kd_weight] = _kl_to_teacher(tiny_model_dir, out, teacher_dir, dataset)
        if kd_weight:
            assert metrics["kd_kl_last"] < metrics["kd_kl_first"], metrics
        else:
            assert "kd_kl_first" not in metrics, "kd_weight 0 asks nothing of the teacher"
    # Measured: before 2.50, text only 4.87, text + full logits 2.33.
    assert kl_after[1.0] < before and kl_after[1.0] < 0.7 * kl_after[0.0], (before, kl_after)
    assert not list(ray.util.list_named_actors()) or all(
        not n.startswith("loop-teacher-local-kd") for n in ray.util.list_named_actors()), "the teacher actor is gone"
