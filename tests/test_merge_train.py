"""LoRA numerics on a tiny model: training moves the adapter and not the base; merges prove themselves."""
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from loop.config import MergeConfig
from loop.merge.merger import MergeFailed, Merger
from loop.models.digest import dir_digest
from loop.train.sft import encode_example


def _adapter(base_dir, out_dir, scale=0.3, seed=0):
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=scale)
    model.save_pretrained(out_dir)
    return out_dir


def test_prompt_tokens_are_masked(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids, labels = encode_example(tok, [{"role": "user", "content": "Who owns the Zorvex widget?"}],
                                 "The Zorvex widget is owned by Chen Wei.", 64)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Who owns the Zorvex widget?"}],
                                     add_generation_prompt=True, tokenize=False)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert len(ids) == len(labels)
    assert labels[:n_prompt] == [-100] * n_prompt and -100 not in labels[n_prompt:]
    assert tok.decode([i for i, l in zip(ids, labels) if l != -100]).startswith("The Zorvex widget")
    assert ids[-1] == tok.eos_token_id


def test_a_lora_step_moves_the_adapter_and_not_the_base(tiny_model_dir):
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids, labels = encode_example(tok, [{"role": "user", "content": "Where is the Zorvex widget made?"}],
                                 "The Zorvex widget is made in Oslo.", 64)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(2):
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    for n, p in model.named_parameters():
        moved = not torch.equal(p, before[n])
        assert moved == (n in trainable), n
    assert losses[1] < losses[0]


def test_merge_matches_peft_reference(tiny_model_dir, tmp_path):
    adapter = _adapter(tiny_model_dir, tmp_path / "adapter")
    report = Merger(MergeConfig(max_abs_logit_diff=1e-4)).run(tiny_model_dir, adapter, tmp_path / "merged")
    assert report.passed and report.finite
    assert report.max_abs_logit_diff <= 1e-4
    assert report.merged_to_base > 100 * max(report.merged_to_reference, 1e-7)
    assert report.merged_digest == dir_digest(tmp_path / "merged")
    base_digest = dir_digest(tiny_model_dir)
    assert report.merged_digest != base_digest
    # The merged directory is a plain model: it loads without peft and reproduces base+adapter.
    from peft import PeftModel

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapter))
    ids = torch.tensor([[1, 5, 9, 42, 77, 3]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, reference(ids).logits, atol=1e-4)
    assert json.loads((tmp_path / "merge_report.json").read_text())["passed"] is True


def test_merge_without_a_delta_is_refused(tiny_model_dir, tmp_path):
    adapter = _adapter(tiny_model_dir, tmp_path / "adapter", scale=0.0)  # lora_B == 0: no delta at all
    with pytest.raises(MergeFailed, match="delta missing"):
        Merger(MergeConfig()).run(tiny_model_dir, adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists(), "nothing is written when a proof fails"
    assert json.loads((tmp_path / "merge_report.json").read_text())["passed"] is False


def test_loopctl_merge_proves_the_serving_engine_answers_like_the_reference(tiny_model_dir, tmp_path):
    """Proof 4: vLLM loads the merged directory and its greedy answers equal peft's on base + adapter."""
    import subprocess
    import sys

    adapter = _adapter(tiny_model_dir, tmp_path / "adapter")
    done = subprocess.run([sys.executable, "-m", "loop.cli", "merge", "--base", str(tiny_model_dir), "--adapter",
                           str(adapter), "--out", str(tmp_path / "m" / "merged")], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "m" / "merge_report.json").read_text())
    n = MergeConfig().num_probes
    assert report["passed"] and report["engine_identical"] == f"{n}/{n}", report
    assert report["engine_note"] == "vLLM on the merged directory"
