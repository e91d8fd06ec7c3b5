"""The loop config: pydantic v2 models that mirror the YAML file 1:1, one module per concern (`infra`,
`tenants`, `learning`, `release`); here the whole file, its cross-field rules, and loading it.

Only shape and cross-field rules live here; nothing is loaded, started or downloaded.
"""
from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import Field, ValidationError, model_validator

from loop.config.base import Section, hash_api_key
from loop.config.infra import (CostConfig, DraftConfig, EngineConfig, ModelConfig, RayConfig, ServingConfig,
                               StorageConfig, StudentConfig, TeacherConfig)
from loop.config.learning import (BootstrapConfig, DataConfig, DraftTrainingConfig, JudgeConfig, MergeConfig,
                                  OutcomeJudgeConfig, SuiteConfig, TrafficConfig, TrainingConfig, ValidationConfig,
                                  WorldConfig)
from loop.config.release import PromotionConfig, RolloutConfig, ScheduleConfig
from loop.config.tenants import CascadeConfig, EndpointConfig, TenantConfig

__all__ = ["BootstrapConfig", "CascadeConfig", "ConfigError", "CostConfig", "DataConfig", "DraftConfig",
           "DraftTrainingConfig", "EndpointConfig", "EngineConfig", "JudgeConfig", "LoopConfig", "MergeConfig", "ModelConfig",
           "OutcomeJudgeConfig", "PromotionConfig", "RayConfig", "RolloutConfig", "ScheduleConfig", "ServingConfig", "StorageConfig", "StudentConfig",
           "SuiteConfig",
           "TeacherConfig", "TenantConfig", "TrafficConfig", "TrainingConfig", "ValidationConfig", "WorldConfig",
           "hash_api_key", "load_config", "simulation"]


class LoopConfig(Section):
    name: str
    ray: RayConfig = RayConfig()
    storage: StorageConfig = StorageConfig()
    student: StudentConfig
    draft: DraftConfig
    teacher: TeacherConfig = TeacherConfig()
    tenants: list[TenantConfig] = Field(min_length=1)
    world: WorldConfig = WorldConfig()
    traffic: TrafficConfig = TrafficConfig()
    data: DataConfig = DataConfig()
    training: TrainingConfig = TrainingConfig()
    draft_training: DraftTrainingConfig = DraftTrainingConfig()
    merge: MergeConfig = MergeConfig()
    validation: ValidationConfig = ValidationConfig()
    serving: ServingConfig = ServingConfig()
    rollout: RolloutConfig = RolloutConfig()
    promotion: PromotionConfig = PromotionConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    cost: CostConfig = CostConfig()

    @model_validator(mode="after")
    def _cross_field(self) -> "LoopConfig":
        ids = [e.id for t in self.tenants for e in t.endpoints]
        if len(ids) != len(set(ids)):
            raise ValueError(f"tenants[].endpoints[].id must be unique across tenants, got {ids}")
        eng = self.serving.engine
        if eng.max_cpu_loras is not None and eng.max_cpu_loras < eng.max_loras:
            raise ValueError(f"serving.engine.max_cpu_loras ({eng.max_cpu_loras}) must be at least "
                             f"serving.engine.max_loras ({eng.max_loras})")
        if self.teacher.kind == "local":
            cascading = [e.id for _, e in self.endpoints() if e.cascade is not None]
            if cascading:
                raise ValueError(f"endpoints {cascading} escalate to the teacher over HTTP; a local teacher has no "
                                 "endpoint: drop their cascade or use teacher.kind 'openai'")
            if self.data.judge is not None:
                raise ValueError("data.judge: the teacher grades answers over HTTP; a local teacher has no "
                                 "endpoint: delete data.judge or use teacher.kind 'openai'")
        t = self.training
        if t.strategy == "deepspeed" and t.zero_stage == 3 and t.regularizer != "none" and t.reg_weight > 0:
            raise ValueError("training.regularizer needs whole parameters on every worker; ZeRO-3 shards them: "
                             "use training.zero_stage 2 (or regularizer 'none')")
        if self.training.regularizer == "ewc" and self.training.replay_ratio <= 0:
            raise ValueError("training.regularizer 'ewc' estimates its Fisher on replayed examples: "
                             "set training.replay_ratio > 0 (or use regularizer 'l2')")
        if not self.traffic.simulate and self.teacher.kind == "reference":
            raise ValueError("teacher.kind 'reference' is the simulated world's teacher: with traffic.simulate "
                             "false use teacher.kind 'openai' (or 'local')")
        if not self.traffic.simulate and "world" in self.model_fields_set:
            raise ValueError("world (with its bootstrap) describes the demo's simulated world, which a "
                             "traffic.simulate false config never builds: delete the world section (your own "
                             "model is student.path; your evaluations are validation.suites)")
        if self.training.lora_rank > self.serving.engine.max_lora_rank:
            raise ValueError(
                f"training.lora_rank ({self.training.lora_rank}) exceeds serving.engine.max_lora_rank "
                f"({self.serving.engine.max_lora_rank}): raise max_lora_rank or lower lora_rank")
        return self

    def model_path(self, model: "ModelConfig | TeacherConfig") -> Path:
        p = Path(model.path)
        return p if p.is_absolute() else self.storage.path(model.path)

    def endpoints(self) -> list[tuple[TenantConfig, EndpointConfig]]:
        return [(t, e) for t in self.tenants for e in t.endpoints]


def simulation(cfg: LoopConfig):
    """The simulation that drives a `traffic.simulate: true` config (None otherwise), loaded by its
    import path `traffic.simulator`: the product's only door to the demo, and it never opens for a
    real-traffic config."""
    if not cfg.traffic.simulate:
        return None
    import importlib

    module, _, name = cfg.traffic.simulator.partition(":")
    try:
        return getattr(importlib.import_module(module), name)(cfg)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"traffic.simulator: cannot load {cfg.traffic.simulator} ({e}); "
                          "set it to module:Class, or traffic.simulate false for real traffic") from None


class ConfigError(ValueError):
    """A config that cannot be used; the message names the field and the fix, one line per problem."""


def load_config(path: str | Path) -> LoopConfig:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such config file (the demo's is configs/demo.yaml)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections (name, student, tenants, ...)")
    if os.environ.get("LOOP_STORAGE_ROOT") and isinstance(raw.get("storage", {}), dict):
        raw.setdefault("storage", {})["root"] = os.environ["LOOP_STORAGE_ROOT"]
    try:
        return LoopConfig.model_validate(raw, context={"config_dir": str(path.resolve().parent)})
    except ValidationError as e:
        raise ConfigError("\n".join(f"{path}: {_where(err['loc'])}: {err['msg']}" for err in e.errors())) from None


def _where(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"
