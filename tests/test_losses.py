"""Distillation losses and forgetting regularisers, on hand-worked numbers and tiny random models."""
import math

import pytest
import torch

from loop.train.losses import drift_penalty, fisher_diagonal, full_kl, snapshot, topk_kl


def test_topk_kl_by_hand():
    student = torch.zeros(1, 2, 4)  # uniform over 4 tokens
    ids = torch.tensor([[[0, 1, -1], [2, 3, 0]]])
    lps = torch.tensor([[[math.log(0.6), math.log(0.2), 0.0], [0.0, 0.0, 0.0]]])
    # Position 0: the top-2 renormalised is (.75, .25) vs .25 each: .75 ln 3. Position 1 is masked out.
    got = topk_kl(student, ids, lps, torch.tensor([[1, 0]]))
    assert got.item() == pytest.approx(0.75 * math.log(3), abs=1e-6)
    # A student that already puts the teacher's distribution on those tokens pays nothing.
    match = torch.log(torch.tensor([[[0.75, 0.25, 1e-9, 1e-9]]]))
    assert topk_kl(match, ids[:, :1], lps[:, :1], torch.ones(1, 1)).item() == pytest.approx(0.0, abs=1e-6)


def test_full_kl_matches_torch():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    ref = torch.nn.functional.kl_div(torch.log_softmax(s, -1), torch.log_softmax(t, -1), log_target=True,
                                     reduction="none").sum(-1).mean()
    assert full_kl(s, t, torch.ones(2, 3)).item() == pytest.approx(ref.item(), rel=1e-5)


def _lora(model_dir, seed=0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))


def test_token_level_kd_lowers_kl_to_the_teacher(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoConfig

    torch.manual_seed(1)
    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    teacher = AutoModelForCausalLM.from_config(cfg).eval()  # another random model, same vocabulary
    student = _lora(tiny_model_dir)
    ids = torch.randint(3, cfg.vocab_size, (8, 16))
    mask = torch.ones(8, 16)
    with torch.no_grad():
        t_logits = teacher(input_ids=ids).logits
    top_lp, top_ids = torch.log_softmax(t_logits, -1).topk(8, -1)

    def kl():
        with torch.no_grad():
            return full_kl(student(input_ids=ids).logits, t_logits, mask).item()

    before = kl()
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(60):
        loss = topk_kl(student(input_ids=ids).logits, top_ids, top_lp, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = kl()
    assert after < 0.7 * before, (before, after)


def _train(model, batches, steps, penalty=None):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        b = batches[step % len(batches)]
        loss = model(**b).loss + (penalty() if penalty else 0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _loss(model, batches):
    with torch.no_grad():
        return sum(model(**b).loss.item() for b in batches) / len(batches)


@pytest.mark.parametrize("guard", ["l2", "ewc", "replay"])
def test_guards_reduce_forgetting_on_a_constructed_case(tiny_model_dir, guard):
    """Learn task A, then task B; each guard must keep task A's loss lower than unguarded training."""
    import copy

    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(tiny_model_dir).vocab_size
    g = torch.Generator().manual_seed(7)
    task_a = [{"input_ids": x, "labels": x} for x in torch.randint(3, vocab, (4, 2, 12), generator=g)]
    task_b = [{"input_ids": x, "labels": x} for x in torch.randint(3, vocab, (4, 2, 12), generator=g)]
    model = _lora(tiny_model_dir)
    _train(model, task_a, 60)
    learned_a = _loss(model, task_a)

    plain = copy.deepcopy(model)
    _train(plain, task_b, 60)
    forgot_plain = _loss(plain, task_a) - learned_a

    guarded = copy.deepcopy(model)
    ref = snapshot(guarded)
    if guard == "l2":
        _train(guarded, task_b, 60, lambda: 1.0 * drift_penalty(guarded, ref))
    elif guard == "ewc":
        fisher = fisher_diagonal(guarded, task_a)
        _train(guarded, task_b, 60, lambda: 1.0 * drift_penalty(guarded, ref, fisher))
    else:
        mixed = [b for pair in zip(task_b, task_a) for b in pair]
        _train(guarded, mixed, 120)
    forgot_guarded = _loss(guarded, task_a) - learned_a
    assert forgot_plain > 0.5, forgot_plain  # the constructed case really forgets
    assert forgot_guarded < 0.7 * forgot_plain, (guard, forgot_plain, forgot_guarded)
    assert _loss(guarded, task_b) < _loss(model, task_b), "the guarded model still learned task B"


def test_fisher_needs_data(tiny_model_dir):
    with pytest.raises(ValueError, match="replay buffer"):
        fisher_diagonal(_lora(tiny_model_dir), [])


def test_teacher_top_logprobs_align_to_the_student_tokens(tiny_model_dir):
    from transformers import AutoTokenizer

    from loop.train.sft import _collate, encode_example, kd_targets

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages, answer = [{"role": "user", "content": "Who owns the Zorvex widget?"}], "Quillon owns the Zorvex widget."
    ids, labels = encode_example(tok, messages, answer, 128)
    start = labels.index(next(lab for lab in labels if lab != -100))
    answer_ids = tok(answer, add_special_tokens=False)["input_ids"]
    # A teacher with the student's tokenizer: its tokens are the student's, plus one alternative each.
    top = [[[tok.decode([i]), -0.1], [tok.decode([answer_ids[0]]), -3.0]] for i in answer_ids]
    kd = kd_targets(tok, ids, labels, top)
    assert [pos for pos, _, _ in kd] == list(range(start - 1, start - 1 + len(answer_ids)))
    assert [t[0] for _, t, _ in kd] == answer_ids and all(t[1] == answer_ids[0] for _, t, _ in kd)
    batch = _collate([{"ids": ids, "labels": labels, "kd": kd}], pad_id=0, k=2)
    assert batch["kd_mask"][0].sum().item() == len(answer_ids)
    assert batch["top_ids"][0, start - 1].tolist() == [answer_ids[0], answer_ids[0]]
    # A teacher whose tokens are not the student's (here: one character each) is text-only.
    chars = [[[c, -0.1]] for c in answer]
    assert kd_targets(tok, ids, labels, chars) is None
    assert kd_targets(tok, ids, labels, None) is None


def test_answer_only_logits_give_the_full_sequence_loss(tiny_model_dir):
    """The trainer computes logits only where an answer token is predicted: same loss, same gradient."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loop.train.sft import _collate, answer_loss, answer_positions, encode_example

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rows = [encode_example(tok, [{"role": "user", "content": q}], a, 64) for q, a in [
        ("Who owns the Zorvex widget?", "The Zorvex widget is owned by Chen Wei."), ("What is it?", "Oslo.")]]
    batch = _collate([{"ids": i, "labels": lab} for i, lab in rows], tok.pad_token_id or 0)
    keep = answer_positions(batch["labels"]).any(0).nonzero().flatten()
    assert 0 < len(keep) < batch["input_ids"].shape[1], "the prompt positions are left out"
    full = model(**batch).loss
    full.backward()
    g_full = model.lm_head.weight.grad.clone()
    model.zero_grad()
    kept = answer_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             logits_to_keep=keep).logits, batch["labels"], keep)
    kept.backward()
    assert torch.allclose(kept, full, atol=1e-6)
    assert torch.allclose(model.lm_head.weight.grad, g_full, atol=1e-6)


def test_anchor_holds_the_base_where_the_domain_does_not_reach(tiny_model_dir):
    """Training on one task moves the model's distribution on other text away from the base's; the
    anchor (KL to the same model with its adapter off, on base-answer rows riding in the same batch)
    keeps it near, and the task is still learned."""
    import copy

    from transformers import AutoConfig

    from loop.train.sft import anchor_kl

    vocab = AutoConfig.from_pretrained(tiny_model_dir).vocab_size
    g = torch.Generator().manual_seed(3)
    task = torch.randint(3, vocab, (4, 12), generator=g)
    general = torch.randint(3, vocab, (4, 12), generator=g)
    batch = {"input_ids": torch.cat([task, general]), "attention_mask": torch.ones(8, 12, dtype=torch.long),
             "labels": torch.cat([task, general])}
    anchored = torch.arange(8) >= 4
    keep = torch.arange(11)
    model = _lora(tiny_model_dir)
    assert anchor_kl(model, batch, model(input_ids=batch["input_ids"]).logits[:, keep], keep, anchored,
                     torch.device("cpu"), "fp32").item() == pytest.approx(0.0, abs=1e-6), "lora_B starts at zero"

    def train(m, weight):
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(40):
            logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
            loss = torch.nn.functional.cross_entropy(logits[:4].flatten(0, 1), task[:, 1:].flatten())
            if weight:
                loss = loss + weight * anchor_kl(m, batch, logits, keep, anchored, torch.device("cpu"), "fp32")
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            logits = m(input_ids=batch["input_ids"], logits_to_keep=keep).logits
            drift = anchor_kl(m, batch, logits, keep, anchored, torch.device("cpu"), "fp32").item()
            task_loss = torch.nn.functional.cross_entropy(logits[:4].flatten(0, 1), task[:, 1:].flatten()).item()
        return drift, task_loss

    start = _loss(model, [{"input_ids": task, "labels": task}])
    plain_drift, plain_task = train(copy.deepcopy(model), 0.0)
    held_drift, held_task = train(copy.deepcopy(model), 1.0)
    assert plain_drift > 0.5, plain_drift  # the constructed case really drifts
    assert held_drift < 0.1 * plain_drift, (plain_drift, held_drift)
    assert held_task < 0.1 * start, (start, held_task)
