"""What every endpoint serves right now, and the one place that changes it.

`RolloutStore` holds the rollouts (champion, challenger and weight per endpoint, versioned): gateway
replicas read it on the request path at most every `POLL_S`, so a new version or weight is live
within that time on every replica, without restarting anything.

`RolloutController` changes them, for the cycle or for an operator's admin call. MLflow is the
source of truth. Per registered model `student-<endpoint>`, the aliases `champion`, `challenger` and
`previous` (the champion before the last promotion) name versions, and the registered-model tag
`loop.challenger_weight` is the challenger's share of users. Every action writes MLflow first, then
publishes the derived rollouts to the store, so a restart of anything rebuilds the same state from
MLflow. For an endpoint with the `merged` backend, every live version (and the previous champion, so
a rollback is instant) runs in its own engine app; the version's `engine_app` names it.

Both are plain classes: loop/cluster.py runs each as one named Ray actor, and the gateway's admin
routes call the controller.
"""
from __future__ import annotations

from datetime import datetime, timezone

from loop.config import LoopConfig
from loop.lineage.registry import Lineage, registered_name

POLL_S = 0.2


class RolloutStore:
    def __init__(self):
        self.version, self.rollouts = 0, {}

    def set(self, rollouts: dict) -> int:
        self.version, self.rollouts = self.version + 1, dict(rollouts)
        return self.version

    def get(self, since: int = -1) -> tuple[int, dict] | None:
        """The rollouts if they changed after version `since`, else None (cheap to poll)."""
        return None if since == self.version else (self.version, self.rollouts)


WEIGHT_TAG = "loop.challenger_weight"
ACTIONS = ("deploy", "weights", "promote", "rollback")


class AdminError(ValueError):
    """An admin request that cannot be done as asked; `status` is its HTTP status, `param` the field."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param = message, status, param

    def __reduce__(self):  # keeps status and param when Ray carries it back to the gateway
        return AdminError, (self.message, self.status, self.param)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class RolloutController:
    def __init__(self, cfg: LoopConfig, store, merged_engines=None):
        """`store`: the RolloutStore actor; `merged_engines`: starts, lists and stops the engine apps
        of `merged` endpoints' versions (loop.cluster.MergedEngines; None: no endpoint is merged)."""
        self.store, self.merged_engines = store, merged_engines
        self.configure(cfg)

    def configure(self, cfg: LoopConfig) -> None:
        """A named actor outlives the driver that made it: a later driver hands over its config."""
        self.cfg = cfg
        self.lineage = Lineage(cfg.storage.tracking_uri, cfg.storage.path("mlartifacts"))
        self.endpoints = {e.id: e for _, e in cfg.endpoints()}

    # --- reading ----------------------------------------------------------------------------
    def weight(self, endpoint: str) -> float:
        tags = self.lineage.client.get_registered_model(registered_name(endpoint)).tags
        return float(tags.get(WEIGHT_TAG, self.cfg.rollout.challenger_weight))

    def live(self) -> dict:
        """Per endpoint, in the gateway's shape: champion, challenger, weight and the rollout's id
        (stable while champion and challenger stay, so users keep their arm when only the weight moves)."""
        out = {}
        for endpoint in self.endpoints:
            champion = self.lineage.version_info(endpoint, "champion")
            challenger = self.lineage.version_info(endpoint, "challenger")
            out[endpoint] = {"champion": champion, "challenger": challenger,
                             "challenger_weight": self.weight(endpoint) if challenger else 0.0,
                             "rollout_id": f"{champion['number'] if champion else ''}-"
                                           f"{challenger['number'] if challenger else ''}"}
        return out

    def publish(self) -> dict:
        """Start whatever engines the live versions need, then make every gateway replica serve them."""
        import ray

        rollouts, keep = self.live(), {}
        for endpoint, rollout in rollouts.items():
            if self.endpoints[endpoint].backend != "merged":
                continue
            previous = self.lineage.version_info(endpoint, "previous")
            keep[endpoint] = set()
            for info in (rollout["champion"], rollout["challenger"], previous):
                if info is not None:
                    info["engine_app"] = self._merged_engine(endpoint, info)
                    keep[endpoint].add(info["engine_app"])
        ray.get(self.store.set.remote(rollouts))
        self._retire_merged_engines(keep)
        return rollouts

    def _merged_engine(self, endpoint: str, info: dict) -> str:
        if self.merged_engines is None:
            raise AdminError(f"endpoint {endpoint} is merged, but this controller was given no merged_engines", 500)
        model_dir = info.get("merged_path") or str(self.cfg.model_path(self.cfg.student))
        draft_dir = info.get("draft_path") or str(self.cfg.model_path(self.cfg.draft))
        return self.merged_engines.start(self.cfg, endpoint, info["number"], model_dir, draft_dir)

    def _retire_merged_engines(self, keep: dict[str, set[str]]) -> None:
        """Engines of versions that are no longer champion, challenger or previous champion."""
        for endpoint, apps in keep.items():
            self.merged_engines.stop([a for a in self.merged_engines.running(endpoint) if a not in apps])

    # --- acting -----------------------------------------------------------------------------
    def act(self, action: str, model: str, version: int | None = None, weight: float | None = None,
            role: str = "challenger", by: str = "admin") -> dict:
        """One admin action on endpoint `model` (`model-<id>` or `<id>`); returns the new rollouts.
        deploy: make `version` the challenger (with `weight`) or, with role="champion", the champion.
        weights: set the challenger's share. promote: the challenger becomes champion.
        rollback: drop the challenger if there is one, else return to the previous champion.
        `by`: who decided (`admin`: an operator's API call; `controller`: the promotion controller),
        tagged on the version beside the time."""
        endpoint = self._endpoint(model)
        if action not in ACTIONS:
            raise AdminError(f"unknown action '{action}': one of {', '.join(ACTIONS)}", param="action")
        if weight is not None and not (isinstance(weight, (int, float)) and 0 <= weight <= 1):
            raise AdminError("challenger_weight: must be a number from 0 to 1", param="challenger_weight")
        self._by = by
        getattr(self, f"_{action}")(endpoint, version, weight, role)
        return self.publish()[endpoint]

    def _endpoint(self, model: str) -> str:
        endpoint = model.removeprefix("model-") if isinstance(model, str) else ""
        if endpoint not in self.endpoints:
            raise AdminError(f"model '{model}' is not an endpoint of this loop", status=404, param="model")
        return endpoint

    def _version(self, endpoint: str, version) -> dict:
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise AdminError("version: required, the registered version number (an integer >= 1)", param="version")
        info = self.lineage.version_info_number(endpoint, version)
        if info is None:
            raise AdminError(f"version {version} of {registered_name(endpoint)} does not exist", status=404,
                             param="version")
        if info.get("verdict") == "fail":
            raise AdminError(f"version {version} failed validation; it cannot be deployed", status=409,
                             param="version")
        self._check_files(endpoint, info)
        return info

    def _check_files(self, endpoint: str, info: dict) -> None:
        """The files an engine would load are the ones registered: an adapter (or merged model) damaged or
        changed on disk since is refused before it is served, and the reason is tagged on the version."""
        from loop.models.digest import dir_digest, short

        wanted = [("adapter", info["adapter_path"], info["adapter_digest"])]
        if self.endpoints[endpoint].backend == "merged" and info.get("merged_digest"):
            wanted.append(("merged model", info["merged_path"], info["merged_digest"]))
        for what, path, digest in wanted:
            if path is None or not digest:
                continue
            try:
                now = dir_digest(path)
            except FileNotFoundError:
                now = "no files"
            if now != digest:
                reason = (f"its {what} files at {path} do not match the digest registered ({short(digest)}, now "
                          f"{short(now)}): damaged or changed on disk since registration")
                self.lineage.tag_version(endpoint, info["number"], {"deploy_refused": reason,
                                                                    "deploy_refused_at": _now()})
                raise AdminError(f"version {info['number']} refused: {reason}; register it again from its training "
                                 "run", status=409, param="version")

    def _deploy(self, endpoint, version, weight, role) -> None:
        info = self._version(endpoint, version)
        if role not in ("challenger", "champion"):
            raise AdminError("role: 'challenger' or 'champion'", param="role")
        champion = self.lineage.version_info(endpoint, "champion")
        mv = self.lineage.client.get_model_version(registered_name(endpoint), str(info["number"]))
        self.lineage.tag_version(endpoint, info["number"], {"deployed_at": _now(),
                                                            "deployments": int(mv.tags.get("deployments", 0)) + 1})
        if role == "champion":
            self.lineage.tag_version(endpoint, info["number"], {"deployed_by": self._by})
            self._crown(endpoint, info["number"], champion)
            return
        if champion and champion["number"] == info["number"]:
            raise AdminError(f"version {version} is already the champion", status=409, param="version")
        self.lineage.set_alias(endpoint, "challenger", info["number"])
        if weight is not None:
            self._set_weight(endpoint, weight)
        self.lineage.tag_version(endpoint, info["number"], {"deployed_weight": self.weight(endpoint),
                                                            "deployed_by": self._by})

    def _weights(self, endpoint, version, weight, role) -> None:
        if weight is None:
            raise AdminError("challenger_weight: required, a number from 0 to 1", param="challenger_weight")
        if self.lineage.version_info(endpoint, "challenger") is None:
            raise AdminError(f"model-{endpoint} has no challenger; deploy one first", status=409)
        self._set_weight(endpoint, weight)

    def _promote(self, endpoint, version, weight, role) -> None:
        challenger = self.lineage.version_info(endpoint, "challenger")
        if challenger is None:
            raise AdminError(f"model-{endpoint} has no challenger to promote", status=409)
        self.lineage.tag_version(endpoint, challenger["number"], {"promoted_at": _now(), "promoted_by": self._by})
        self._crown(endpoint, challenger["number"], self.lineage.version_info(endpoint, "champion"))

    def _rollback(self, endpoint, version, weight, role) -> None:
        challenger = self.lineage.version_info(endpoint, "challenger")
        if challenger is not None:
            self.lineage.tag_version(endpoint, challenger["number"], {"rolled_back_at": _now(), "rolled_back_by": self._by})
            self.lineage.delete_alias(endpoint, "challenger")
            return
        previous = self.lineage.version_info(endpoint, "previous")
        if previous is None:
            raise AdminError(f"model-{endpoint} has no previous champion to roll back to", status=409)
        champion = self.lineage.version_info(endpoint, "champion")
        self.lineage.tag_version(endpoint, champion["number"], {"rolled_back_at": _now(), "rolled_back_by": self._by})
        self.lineage.set_alias(endpoint, "champion", previous["number"])
        self.lineage.delete_alias(endpoint, "previous")

    def _crown(self, endpoint: str, number: int, champion: dict | None) -> None:
        if champion and champion["number"] != number:
            self.lineage.set_alias(endpoint, "previous", champion["number"])
        self.lineage.set_alias(endpoint, "champion", number)
        challenger = self.lineage.version_info(endpoint, "challenger")
        if challenger and challenger["number"] == number:
            self.lineage.delete_alias(endpoint, "challenger")

    def _set_weight(self, endpoint: str, weight: float) -> None:
        self.lineage.client.set_registered_model_tag(registered_name(endpoint), WEIGHT_TAG, str(float(weight)))
