"""TFDS builder for every registered dataset; importing this module registers `laga_reid` with TFDS."""

from data_pipelines.tfds.laga_reid import LagaReid, ReidConfig

__all__ = ["LagaReid", "ReidConfig"]
