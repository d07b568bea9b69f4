"""Compute settings shared by every model-running asset (device, batching, loaders, AMP)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from dagster import ConfigurableResource
from pydantic import Field

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ComputeSettings:
    """The compute settings as a plain, picklable value: a step's compute function captures
    this (not the Dagster resource) so that a Slurm job resolves ``device="auto"`` on the
    node it runs on, not on the machine that submitted it."""

    device: str = "auto"
    batch_size: int = 64
    num_workers: int = 2
    pin_memory: bool = True
    amp: bool = True
    torch_threads: int = 0

    def torch_device(self):
        import torch

        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        if self.device == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("compute.device='cuda' but torch sees no CUDA device; set device='auto' or 'cpu'")
            return torch.device("cuda")
        if self.device == "cpu":
            return torch.device("cpu")
        chosen = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        log.info("compute.device=auto resolved to %s", chosen)
        return chosen

    def use_amp(self) -> bool:
        return self.amp and self.torch_device().type == "cuda"

    def describe(self) -> dict:
        import torch

        dev = self.torch_device()
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
        return {
            "device": str(dev),
            "device_name": name,
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "amp": self.use_amp(),
        }


class ComputeResource(ConfigurableResource):
    """Where and how tensors are computed.

    ``device="auto"`` picks CUDA when present, else CPU, and says which in the log;
    ``device="cuda"`` on a machine without CUDA is an error, never a quiet CPU run.
    """

    device: Literal["auto", "cuda", "cpu"] = "auto"
    batch_size: int = Field(default=64, gt=0)
    num_workers: int = Field(default=2, ge=0, description="DataLoader worker processes")
    pin_memory: bool = True
    amp: bool = Field(default=True, description="mixed precision on CUDA (ignored on CPU)")
    torch_threads: int = Field(default=0, ge=0, description="0 = torch default")

    def settings(self) -> ComputeSettings:
        return ComputeSettings(self.device, self.batch_size, self.num_workers, self.pin_memory, self.amp,
                               self.torch_threads)

    def torch_device(self):
        return self.settings().torch_device()

    def use_amp(self) -> bool:
        return self.settings().use_amp()

    def describe(self) -> dict:
        return self.settings().describe()
