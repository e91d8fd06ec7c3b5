"""The cycle-0 student (`world.bootstrap`): setup teaches the fetched base the world at epoch 0 and
merges it; the loop's student is that model, its draft is built from it, and it is rebuilt only when
what it depends on changes."""
import pytest
import ray
import yaml

from conftest import ROOT
from loop.config import load_config
from loop.models.fetch import ensure_models, read_manifest
from loop.sim.world import World, is_correct
from loop.models.answers import generate_answers

pytestmark = pytest.mark.cluster


def _config(tmp_path, **world):
    raw = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    raw["storage"]["root"] = str(tmp_path)
    raw["world"].update(bootstrap={"epoch": 0, "max_steps": 80}, **world)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


def test_the_cycle0_student_learns_epoch_0_and_is_built_once(ray_cluster, tmp_path):
    ray.init(address=ray_cluster["RAY_ADDRESS"], namespace="loop-tests", ignore_reinit_error=True)
    cfg = _config(tmp_path)
    models = ensure_models(cfg)
    student, base = cfg.model_path(cfg.student), cfg.model_path(cfg.student).with_name("tiny-llama-base")
    boot = models["student"]["bootstrap"]
    assert boot["epoch"] == 0 and boot["steps"] == 80 and boot["max_abs_logit_diff"] <= cfg.merge.max_abs_logit_diff
    assert read_manifest(base)["digest"] != models["student"]["digest"], "the merged weights moved"
    assert models["draft"]["student_digest"] == models["student"]["digest"], "the draft is the student's"
    # It was taught the facts: its answers to the training phrasings, against the base's.
    w = cfg.world
    facts = World(w.seed, 0, w.num_entities, w.drift_fraction, w.new_per_epoch).facts
    questions = [q for f in facts for q in f.train_questions()]
    right = {d: sum(is_correct(f, a) for f, a in zip([f for f in facts for _ in range(3)],
                                                     generate_answers(d, questions, 16))) for d in (base, student)}
    assert right[student] > right[base] + len(questions) // 4, right
    # Built once: a second setup keeps it; a different world builds it again.
    assert ensure_models(cfg)["student"]["digest"] == models["student"]["digest"]
    other = ensure_models(_config(tmp_path, seed=99))
    assert other["student"]["bootstrap_key"] != models["student"]["bootstrap_key"]
