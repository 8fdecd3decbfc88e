"""Multi-query associative recall (MQAR, as in the Zoology benchmark): data, model config, training."""

from gdn2q.recall.data import MQARSpec, mqar_batch
from gdn2q.recall.train import mqar_config, train_mqar

__all__ = ["MQARSpec", "mqar_batch", "mqar_config", "train_mqar"]
