"""Experiment trackers beside TensorBoard (``run.trackers``: W&B, MLflow), through accelerate's
tracker classes: the scalars TensorBoard gets, at the same steps (images seen), and the resolved
config as the run's parameters. The trainer logs as ``<run>`` and the evaluator as ``<run>-eval``;
a resumed run continues the same tracker runs. TensorBoard stays the record: a tracker that fails
while logging is reported once and dropped, and training goes on.

Where they write is theirs to configure: W&B by ``WANDB_MODE`` (``offline`` writes into the run
directory's ``wandb/``) and its login, MLflow by ``MLFLOW_TRACKING_URI``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import tempfile

from .. import io

log = logging.getLogger(__name__)

SUPPORTED = ("wandb", "mlflow")  # accelerate's names; both are tested in their offline modes
STATE_DIR = "trackers"  # run.dir/trackers/<tracker>-<kind>.json: what a resumed run continues


def names(spec: str) -> list[str]:
    """The trackers ``run.trackers`` names (comma-separated)."""
    return [n.strip() for n in spec.split(",") if n.strip()]


def check(spec: str) -> str | None:
    """Why ``run.trackers=spec`` cannot work here, or None."""
    for name in names(spec):
        if name not in SUPPORTED:
            return f"run.trackers={spec}: {name!r} is not one of: {', '.join(SUPPORTED)}"
        if importlib.util.find_spec(name) is None:
            package = "mlflow-skinny" if name == "mlflow" else name
            return (f"run.trackers={spec}: the {name} package is not installed (pip install {package}, or leave "
                    f"{name} out of run.trackers)")
    return None


class Trackers:
    """The started trackers of one process (the trainer's or the evaluator's main process)."""

    def __init__(self, spec: str, project: str, run_dir: str, config: dict, kind: str = "train",
                 storage_options: dict | None = None):
        from ..config import _flatten
        from ..dist import make_tracker

        self.run_dir, self.kind, self.so = run_dir, kind, storage_options
        run_name = run_dir.rstrip("/").rsplit("/", 1)[-1]
        name = run_name if kind == "train" else f"{run_name}-{kind}"
        local_dir = io.fs_for(run_dir, storage_options)[1] if io.is_local(run_dir) else tempfile.mkdtemp(
            prefix="gan-trackers-")
        # The same run directory always maps to the same W&B run: a resume continues it.
        ident = hashlib.sha256(f"{run_dir}|{kind}".encode()).hexdigest()[:16]
        saved = self._saved("mlflow")
        kwargs = {
            "wandb": {"name": name, "id": ident, "resume": "allow", "group": run_name, "job_type": kind,
                      "dir": local_dir},
            "mlflow": {"run_name": name, "run_id": saved.get("run_id"), "tags": {"gan_pipeline.run_dir": run_dir,
                                                                             "gan_pipeline.kind": kind}},
        }
        flat = {k: v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v)
                for k, v in _flatten(config).items()}
        self.active = []
        for tracker_name in names(spec):
            try:
                tracker = make_tracker(tracker_name, project, **kwargs[tracker_name])
                tracker.start()
                if tracker_name == "mlflow" and saved.get("run_id"):
                    _continue_params(tracker, flat)
                else:
                    tracker.store_init_configuration(flat)
            except Exception as exc:  # their own errors: not logged in, a server unreachable, ...
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                hint = "WANDB_MODE=offline or wandb login" if tracker_name == "wandb" else "MLFLOW_TRACKING_URI"
                raise TrackerError(f"run.trackers: {tracker_name} did not start ({first}); see {hint}, or leave "
                                   f"it out of run.trackers") from None
            if tracker_name == "mlflow":
                self._save("mlflow", {"run_id": tracker.active_run.info.run_id})
            self.active.append(tracker)

    def _state_url(self, tracker: str) -> str:
        return io.join(self.run_dir, STATE_DIR, f"{tracker}-{self.kind}.json")

    def _saved(self, tracker: str) -> dict:
        url = self._state_url(tracker)
        try:
            return io.read_json(url, self.so) if io.exists(url, self.so) else {}
        except ValueError:
            return {}

    def _save(self, tracker: str, state: dict) -> None:
        io.atomic_write_json(self._state_url(tracker), state, self.so)

    def log(self, values: dict[str, float], step: int) -> None:
        for tracker in list(self.active):
            try:
                tracker.log(values, step=step)
            except Exception as exc:
                log.error("run.trackers: %s stopped logging (%s); TensorBoard has everything", tracker.name,
                          (str(exc).strip().splitlines() or [type(exc).__name__])[0])
                self.active.remove(tracker)

    def finish(self) -> None:
        for tracker in self.active:
            try:
                tracker.finish()
            except Exception as exc:
                log.warning("run.trackers: %s did not finish cleanly: %s", tracker.name, exc)
        self.active = []


def _continue_params(tracker, flat: dict) -> None:
    """A resumed MLflow run's parameters: MLflow never changes a logged one, so new keys are
    logged and changed values (the changes a resume accepts) become ``changed.<key>`` tags."""
    import mlflow

    logged = mlflow.get_run(tracker.active_run.info.run_id).data.params
    new = {k: v for k, v in flat.items() if k not in logged}
    if new:
        tracker.store_init_configuration(new)
    changed = {f"changed.{k}": f"{logged[k]} -> {v}" for k, v in flat.items() if k in logged and logged[k] != str(v)}
    if changed:
        mlflow.set_tags(changed)


class TrackerError(RuntimeError):
    """A tracker asked for in ``run.trackers`` could not start."""
