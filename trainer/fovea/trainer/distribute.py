"""Where training runs: TF_CONFIG (also built for a Kubernetes Indexed Job), the strategy, precision."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

from fovea.trainer.config import TrainConfig


def tf_config_from_indexed_job() -> None:
    """Build TF_CONFIG from FOVEA_WORKER_HOSTS and JOB_COMPLETION_INDEX (a Kubernetes Indexed Job)."""
    if os.environ.get("TF_CONFIG"):
        return
    hosts = [h.strip() for h in os.environ.get("FOVEA_WORKER_HOSTS", "").split(",") if h.strip()]
    index = os.environ.get("JOB_COMPLETION_INDEX")
    if len(hosts) > 1 and index is not None:
        os.environ["TF_CONFIG"] = json.dumps(
            {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": int(index)}}
        )


def task_info() -> tuple[str, int, bool]:
    """(task type, index, is chief) from TF_CONFIG; a lone process is the chief."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return "worker", 0, True
    conf = json.loads(raw)
    task = conf.get("task", {})
    kind, index = task.get("type", "worker"), int(task.get("index", 0))
    has_chief = "chief" in conf.get("cluster", {})
    return kind, index, kind == "chief" or (not has_chief and kind == "worker" and index == 0)


def make_strategy(log: Callable[[str], None]):
    """MultiWorkerMirrored when TF_CONFIG is set, Mirrored on several GPUs, else the default."""
    import tensorflow as tf

    if os.environ.get("TF_CONFIG"):
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        log(f"multi-worker training: {strategy.num_replicas_in_sync} replicas (TF_CONFIG)")
        return strategy
    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) > 1:
        strategy = tf.distribute.MirroredStrategy()
        log(f"training on {strategy.num_replicas_in_sync} GPUs (MirroredStrategy)")
        return strategy
    log(f"training on {'1 GPU' if gpus else 'the CPU'}")
    return tf.distribute.get_strategy()


def use_mixed_precision(cfg: TrainConfig) -> bool:
    import tensorflow as tf

    if cfg.mixed_precision == "auto":
        return bool(tf.config.list_physical_devices("GPU"))
    return cfg.mixed_precision == "on"
