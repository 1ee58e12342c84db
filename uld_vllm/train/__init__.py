"""Offline ULD training: ``uld-vllm train`` (see ``run_training``)."""

from uld_vllm.train.config import UldTrainConfig, make_config
from uld_vllm.train.loss import UldLoss, UldLossOutput

__all__ = ["UldLoss", "UldLossOutput", "UldTrainConfig", "make_config", "run_training"]


def run_training(cfg, log=print):
    from uld_vllm.train.trainer import run_training as _run

    return _run(cfg, log=log)
