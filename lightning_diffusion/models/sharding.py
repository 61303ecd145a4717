"""FSDP2 sharding of a model family under Lightning's ``ModelParallelStrategy``.

:class:`Sharded` is a mixin of :class:`~lightning_diffusion.models.base.GenerativeModel`:
``configure_model`` shards the model on every rank before the optimizer is built, ``is_sharded``
tells the samplers and likelihoods that every forward needs all ranks, and ``require_fixed_steps``
refuses an adaptive solver (a different number of network calls per rank would hang).
"""

from __future__ import annotations

import lightning as L
import torch


class Sharded(L.LightningModule):
    """``configure_model`` with FSDP2's ``fully_shard``; ``is_sharded`` and ``require_fixed_steps``."""

    #: methods of ``self.net`` that the family calls besides ``forward`` (a VAE's encode/decode);
    #: FSDP2 must gather the net's own parameters around them too
    fsdp_forward_methods: tuple[str, ...] = ()

    def is_sharded(self) -> bool:
        """True when FSDP2 has sharded this model over more than one rank: every forward then needs
        all ranks, so adaptive solvers (different step counts per rank) would hang."""
        try:
            from torch.distributed.fsdp import FSDPModule
        except ImportError:
            return False
        return torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1 and \
            any(isinstance(m, FSDPModule) for m in self.modules())

    def require_fixed_steps(self, what: str, instead: str) -> None:
        """Refuse an adaptive solver (``what``) on a sharded model, naming the alternative."""
        if self.is_sharded():
            raise ValueError(f"{type(self).__name__}.{what} is adaptive: its number of network calls differs "
                             f"between ranks, which a sharded (FSDP) model cannot do; use {instead}")

    def configure_model(self) -> None:
        """Shard the model with FSDP2 (``fully_shard``) under Lightning's ``ModelParallelStrategy``.

        Units, innermost first: every parameter-holding element of an ``nn.ModuleList`` inside the
        net (UNet and ladder blocks, MLP residual blocks: one all-gather per block, so at most one
        block is unsharded at a time), then each child module of this LightningModule that holds
        parameters (the net; a VAE's likelihood head), with ``fsdp_forward_methods`` registered so
        that calls other than ``forward`` gather their parameters as well. Under DDP or on one
        device (no device mesh) this does nothing. Tensor parallelism is not supported: pass
        ``ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)``.
        """
        mesh = self._device_mesh if hasattr(self, "_device_mesh") else None
        if mesh is None:
            return
        from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

        if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
            raise ValueError(f"{type(self).__name__}: tensor parallelism is not supported; use "
                             "ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)")
        dp_mesh = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
        if any(isinstance(m, FSDPModule) for m in self.modules()):
            return  # already sharded (configure_model runs again on a resumed or re-fitted model)
        containers = (torch.nn.ModuleList, torch.nn.ModuleDict)  # no forward: never a unit
        roots = [m for m in self.children() if any(True for _ in m.parameters())]
        for root in roots:
            blocks = [m for parent in root.modules() if isinstance(parent, torch.nn.ModuleList) for m in parent
                      if not isinstance(m, containers) and any(True for _ in m.parameters())]
            for block in reversed(blocks):  # pre-order reversed: nested blocks before their parents
                fully_shard(block, mesh=dp_mesh)
            fully_shard(root, mesh=dp_mesh)
        for name in self.fsdp_forward_methods:
            register_fsdp_forward_method(self.net, name)
