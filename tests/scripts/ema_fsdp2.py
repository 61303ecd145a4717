"""EMA under ModelParallelStrategy (FSDP2, fully_shard) or DDP on 2 CPU processes (gloo); run by
tests/test_ema.py: ``python ema_fsdp2.py OUT fsdp2|ddp``. Rank zero saves what the test checks."""
import sys

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from lightning_diffusion.callbacks import EMA


class Sharded(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
        self.seen: dict = {}

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        if getattr(self, "_device_mesh", None) is None:  # DDP: nothing to shard
            return
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return ((self.net(x) - y) ** 2).mean()

    def validation_step(self, batch, batch_idx):
        self.seen = {n: full(p) for n, p in self.named_parameters()}

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


def full(t):
    return t.detach().full_tensor().clone() if hasattr(t, "full_tensor") else t.detach().clone()


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)


if __name__ == "__main__":
    out, kind = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    ema = EMA(decay=0.9)
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if kind == "fsdp2" else "ddp"
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy,
                        max_steps=4, callbacks=[ema, L.pytorch.callbacks.ModelCheckpoint(dirpath=f"{out}/ck", save_last=True)],
                        logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                        num_sanity_val_steps=0)
    model = Sharded()
    trainer.fit(model, data(), data())
    shadow = ema.shadow["net.0.weight"]
    result = {"param_type": type(dict(model.named_parameters())["net.0.weight"]).__name__,
              "shadow_type": type(shadow).__name__,
              "local_shape": tuple(shadow.to_local().shape if hasattr(shadow, "to_local") else shadow.shape),
              "full": {n: full(s) for n, s in ema.shadow.items()},
              "raw": {n: full(p) for n, p in model.named_parameters()}, "seen": model.seen,
              "updates": ema.num_updates}
    torch.save(result, f"{out}/result{trainer.global_rank}.pt")
