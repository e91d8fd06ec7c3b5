"""MLflow lineage: the cycle's runs, one registered model per endpoint, and what is live.

Registered model `student-<endpoint>`: version 1 is the base model (tagged with its digest); each
validated cycle adds a version whose tags name its parent, training run and every digest. The
`champion` alias is the source of truth for what serves; the gateway is reconciled to it. A version
is created only after validation passed and carries all its tags from birth: nothing half-written.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

BASE_TAG = "loop.kind"


def registered_name(endpoint: str) -> str:
    return f"student-{endpoint}"


def version_label(endpoint: str, version: str | int) -> str:
    """The name a version is served and traced under: `student-<endpoint>/<n>`."""
    return f"{registered_name(endpoint)}/{version}"


class LineageUnavailable(RuntimeError):
    """MLflow did not answer within the wait; the message names the tracking URI and the fix."""


class Lineage:
    def __init__(self, tracking_uri: str, artifact_root: str | Path, experiment: str = "continual-loop"):
        import mlflow
        from mlflow import MlflowClient

        self.mlflow, self.tracking_uri = mlflow, tracking_uri
        mlflow.set_tracking_uri(tracking_uri)
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            Path(artifact_root).mkdir(parents=True, exist_ok=True)
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=Path(artifact_root).resolve().as_uri())
        else:
            self.experiment_id = exp.experiment_id
        mlflow.set_experiment(experiment_id=self.experiment_id)

    def wait_reachable(self, timeout_s: float) -> float:
        """Return (seconds waited) once MLflow answers; after `timeout_s` raise LineageUnavailable.
        Each probe is one short request (MLflow's own retries would wait minutes per call)."""
        started = time.monotonic()
        knobs = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
        saved = {k: os.environ.get(k) for k in knobs}
        os.environ.update(knobs)
        try:
            while True:
                try:
                    self.client.get_experiment(self.experiment_id)
                    return time.monotonic() - started
                except Exception as e:  # noqa: BLE001 - any failure to answer is "unreachable"
                    waited = time.monotonic() - started
                    if waited >= timeout_s:
                        raise LineageUnavailable(
                            f"MLflow at {self.tracking_uri} has not answered for {waited:.1f} s "
                            f"({type(e).__name__}); start the tracking server or fix storage.mlflow_tracking_uri, "
                            "then run again: the loop resumes where it stopped") from None
                    time.sleep(min(2.0, max(0.1, timeout_s - waited)))
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def versions(self, endpoint: str) -> list[int]:
        """Every registered version number of `endpoint`'s model, ascending."""
        return sorted(int(mv.version) for mv in self.client.search_model_versions(f"name = '{registered_name(endpoint)}'"))

    # --- runs -------------------------------------------------------------------------------
    def start_run(self, name: str, parent_run_id: str | None = None, tags: dict | None = None) -> str:
        tags = dict(tags or {})
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        return run.info.run_id

    def end_run(self, run_id: str, ok: bool = True) -> None:
        self.client.set_terminated(run_id, "FINISHED" if ok else "FAILED")

    def log(self, run_id: str, params: dict | None = None, metrics: dict | None = None,
            tags: dict | None = None) -> None:
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in (metrics or {}).items() if v is not None],
            params=[Param(k, str(v)[:6000]) for k, v in (params or {}).items()],
            tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()])

    def log_dict(self, run_id: str, obj: dict, name: str) -> None:
        self.client.log_dict(run_id, obj, name)

    def log_artifacts(self, run_id: str, local_dir: str | Path, path: str) -> str:
        self.client.log_artifacts(run_id, str(local_dir), path)
        return f"runs:/{run_id}/{path}"

    # --- registry ---------------------------------------------------------------------------
    def ensure_base_version(self, endpoint: str, base_dir: Path, manifest: dict) -> dict:
        """Version 1 of `student-<endpoint>` is the base model; created once, champion until replaced."""
        name = registered_name(endpoint)
        if not self.client.search_registered_models(f"name = '{name}'"):
            self.client.create_registered_model(name, tags={"loop.endpoint": endpoint},
                                                description=f"Student model versions served at model-{endpoint}")
        if not self.client.search_model_versions(f"name = '{name}'"):
            run_id = self.start_run(f"{endpoint}-base", tags={"loop.endpoint": endpoint, "loop.stage": "base"})
            self.log_dict(run_id, manifest, "base/loop-model.json")
            self.client.create_model_version(
                name, source=f"runs:/{run_id}/base", run_id=run_id,
                tags={BASE_TAG: "base", "base_digest": manifest["digest"], "base_path": str(base_dir),
                      "checkpoint_digest": manifest["digest"], "parent_version": ""},
                description=f"Base model {manifest.get('name', '')}")
            self.end_run(run_id)
        if self.version_info(endpoint, "champion") is None:
            # Also repairs a crash between creating version 1 and naming it champion.
            self.client.set_registered_model_alias(name, "champion", "1")
        return self.version_info(endpoint, "champion")

    def version_info(self, endpoint: str, alias: str = "champion") -> dict | None:
        """What the gateway needs to serve the version behind `alias` (None if no such alias)."""
        from mlflow.exceptions import MlflowException

        name = registered_name(endpoint)
        try:
            mv = self.client.get_model_version_by_alias(name, alias)
        except MlflowException:
            return None
        return self._info(endpoint, mv)

    def _info(self, endpoint: str, mv) -> dict:
        tags = mv.tags
        adapter_path = None
        if tags.get(BASE_TAG) != "base":
            adapter_path = self._artifact_path(mv.source)
        return {"version": version_label(endpoint, mv.version), "number": int(mv.version),
                "adapter_path": adapter_path, "adapter_digest": tags.get("adapter_digest", ""),
                "checkpoint_digest": tags.get("checkpoint_digest", ""), "training_run_id": tags.get("training_run_id", ""),
                "deployed_at": tags.get("deployed_at", ""), "kind": tags.get(BASE_TAG, "adapter"),
                "verdict": tags.get("validation_verdict", ""), "merged_path": tags.get("merged_path") or None,
                "merged_digest": tags.get("merged_digest", ""),
                "draft_path": tags.get("draft_path") or None}

    def version_info_number(self, endpoint: str, number: int) -> dict | None:
        """Like `version_info`, by version number (None if there is no such version)."""
        from mlflow.exceptions import MlflowException

        try:
            return self._info(endpoint, self.client.get_model_version(registered_name(endpoint), str(number)))
        except MlflowException:
            return None

    def _artifact_path(self, source: str) -> str:
        """Local path of a `runs:/<id>/<path>` source: the engine loads the registered copy itself."""
        if source.startswith("runs:/"):
            run_id, _, path = source[len("runs:/"):].partition("/")
            source = self.client.get_run(run_id).info.artifact_uri.rstrip("/") + "/" + path
        return _local_path(source)

    def find_version(self, endpoint: str, tag: str, value: str) -> dict | None:
        """A version already registered for this output (so a resumed cycle never registers twice)."""
        for mv in self.client.search_model_versions(f"name = '{registered_name(endpoint)}'"):
            if mv.tags.get(tag) == value:
                return self._info(endpoint, mv)
        return None

    def register_version(self, endpoint: str, run_id: str, artifact_path: str, tags: dict) -> dict:
        mv = self.client.create_model_version(
            registered_name(endpoint), source=f"runs:/{run_id}/{artifact_path}", run_id=run_id,
            tags={BASE_TAG: "adapter", **{k: str(v) for k, v in tags.items()}},
            description=json.dumps({k: tags[k] for k in ("parent_version", "dataset_digest") if k in tags}))
        return self._info(endpoint, self._wait_ready(mv))

    def _wait_ready(self, mv, timeout_s: float = 60):
        deadline = time.time() + timeout_s
        while mv.status != "READY" and time.time() < deadline:
            time.sleep(0.2)
            mv = self.client.get_model_version(mv.name, mv.version)
        return mv

    def set_alias(self, endpoint: str, alias: str, number: int) -> None:
        self.client.set_registered_model_alias(registered_name(endpoint), alias, str(number))

    def delete_alias(self, endpoint: str, alias: str) -> None:
        self.client.delete_registered_model_alias(registered_name(endpoint), alias)

    def tag_version(self, endpoint: str, number: int, tags: dict) -> None:
        for k, v in tags.items():
            self.client.set_model_version_tag(registered_name(endpoint), str(number), k, str(v))


def _local_path(uri: str) -> str:
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return unquote(parsed.path)
    raise ValueError(f"artifact URI {uri} is not on a local/shared filesystem; the multi_lora engine needs a path")
