"""Calibration statistics of one layer input, accumulated online with bounded memory (DESIGN.md §4).

Per input (shared by every layer that reads it): the running per-channel minimum and maximum over all
tokens, a uniform random sample of at most ``max_rows`` input rows, the block-diagonal part of ``Σ xᵀx``
(64×64 blocks along K: what the weight-scale search needs, from every token rather than a sample) with the
row sum that applies a shift to it, and optionally the whole ``Σ xᵀx`` (GPTQ's Hessian). Memory never grows
with the number of tokens: ``max_rows·K`` for the sample and ``64·K`` floats for the blocks.
"""

from __future__ import annotations

import torch

from ..threads import single_threaded

GRAM_BLOCK = 64  # the widest group of any format; narrower groups' blocks lie on its diagonal


def gram_block(in_features: int) -> int:
    """The block width of an input's block-diagonal Gram: 64, or 16 when 64 does not divide K."""
    return GRAM_BLOCK if in_features % GRAM_BLOCK == 0 else 16 if in_features % 16 == 0 else 0


class InputStats:
    """Online statistics of one ``[*, K]`` input stream.

    The row sample is priority sampling: every row gets a seeded uniform key and the ``max_rows`` rows with
    the smallest keys are kept. That is a uniform sample without replacement, it merges batch by batch, and
    the same inputs with the same seed give the same sample.
    """

    def __init__(self, in_features: int, max_rows: int, seed: int, hessian: bool = False) -> None:
        self.in_features = in_features
        self.max_rows = max_rows
        self.channel_min = torch.full((in_features,), float("inf"))
        self.channel_max = torch.full((in_features,), float("-inf"))
        self.count = 0
        self.finite = True
        self.rows: torch.Tensor | None = None
        self._keys: torch.Tensor | None = None
        self._generator = torch.Generator().manual_seed(seed)
        self._with_hessian = hessian
        self.xtx: torch.Tensor | None = None
        self.block = gram_block(in_features)
        self.block_gram: torch.Tensor | None = None  # [K/block, block, block], Σ over every token
        self.row_sum = torch.zeros(in_features)

    def update(self, x: torch.Tensor) -> None:
        """Fold a batch of inputs ``[..., K]`` into the statistics."""
        batch = x.detach().reshape(-1, x.shape[-1])
        if batch.shape[1] != self.in_features:
            raise ValueError(f"input has {batch.shape[1]} features, expected {self.in_features}")
        if batch.shape[0] == 0:
            return
        if not torch.isfinite(batch).all():
            self.finite = False
            return
        device = batch.device
        self.channel_min = torch.minimum(self.channel_min.to(device), batch.amin(dim=0).float())
        self.channel_max = torch.maximum(self.channel_max.to(device), batch.amax(dim=0).float())
        self.count += batch.shape[0]
        keys = torch.rand(batch.shape[0], generator=self._generator).to(device)
        rows = batch
        if self.rows is not None:
            rows = torch.cat((self.rows, rows))
            keys = torch.cat((self._keys, keys))
        if rows.shape[0] > self.max_rows:
            keys, order = torch.topk(keys, self.max_rows, largest=False, sorted=True)
            rows = rows[order]
        self.rows, self._keys = rows.clone(), keys
        with single_threaded():  # these sums feed the weight side, whose numerics must not depend on threads
            batch = batch.float()
            self.row_sum = self.row_sum.to(device) + batch.sum(0)
            if self.block:
                blocks = batch.reshape(batch.shape[0], -1, self.block).transpose(0, 1)  # [K/b, rows, b]
                update = torch.bmm(blocks.transpose(1, 2), blocks)
                self.block_gram = update if self.block_gram is None else self.block_gram + update
            if self._with_hessian:
                self.xtx = batch.T @ batch if self.xtx is None else self.xtx + batch.T @ batch

    @property
    def minimum(self) -> float:
        return self.channel_min.min().item()

    def absmax(self, shift: float = 0.0) -> torch.Tensor:
        """Per-channel ``max|x + shift|`` over every token seen."""
        if self.count == 0:
            raise ValueError("no calibration inputs were recorded")
        return torch.maximum((self.channel_min + shift).abs(), (self.channel_max + shift).abs())

    def sample(self, count: int) -> torch.Tensor:
        """Up to ``count`` sampled rows (a uniform random subset), as float32."""
        if self.rows is None:
            raise ValueError("no calibration rows were recorded")
        return self.rows[:count].float()

    def group_gram(self, group: int, smooth: torch.Tensor | None = None, shift: float = 0.0) -> torch.Tensor:
        """The mean ``x̂ᵀx̂`` within each ``group`` of channels for ``x̂ = (x + shift) / λ``, ``[K/group, group,
        group]`` in float64, over every token seen.

        Raises:
            ValueError: no Gram was accumulated, or ``group`` does not tile its blocks.
        """
        if self.block_gram is None or self.count == 0:
            raise ValueError("no calibration inputs were recorded")
        if self.block % group:
            raise ValueError(f"groups of {group} do not tile the Gram's blocks of {self.block}")
        per_block = self.block // group
        blocks = self.block_gram.double().reshape(-1, per_block, group, per_block, group)
        diagonal = torch.arange(per_block)
        gram = blocks[:, diagonal, :, diagonal, :].transpose(0, 1).reshape(-1, group, group)  # [K/group, g, g]
        if shift:
            sums = self.row_sum.double().reshape(-1, group)
            gram = gram + shift * (sums[:, :, None] + sums[:, None, :]) + shift * shift * self.count
        gram = gram / self.count
        if smooth is not None:
            inverse = (1.0 / smooth.double().to(gram.device)).reshape(-1, group)
            gram = gram * inverse[:, :, None] * inverse[:, None, :]
        return gram

    def hessian(self, smooth: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
        """``Σ x̂ᵀx̂`` for ``x̂ = (x + shift) / λ``, from the accumulated ``Σ xᵀx``."""
        if self.xtx is None:
            raise ValueError("the Hessian was not accumulated (calibrate with GPTQ enabled)")
        h = self.xtx.double()
        if shift:
            s = self.row_sum.double()
            h = h + shift * (s[:, None] + s[None, :]) + shift * shift * self.count
        inverse = 1.0 / smooth.double().to(h.device)
        return h * inverse[:, None] * inverse[None, :]

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors that rebuild these statistics with :meth:`from_state` (the collect stage's artifact)."""
        if self.rows is None:
            raise ValueError("no calibration rows were recorded")
        tensors = {
            "channel_min": self.channel_min.cpu(),
            "channel_max": self.channel_max.cpu(),
            "rows": self.rows.cpu().contiguous(),
            "count": torch.tensor(self.count, dtype=torch.int64),
            "row_sum": self.row_sum.cpu(),
        }
        if self.block_gram is not None:
            tensors["block_gram"] = self.block_gram.cpu()
        if self.xtx is not None:
            tensors["xtx"] = self.xtx.cpu()
        return tensors

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor]) -> InputStats:
        """Statistics read back from :meth:`state` (no further updates are expected)."""
        rows = tensors["rows"]
        stats = cls(rows.shape[1], rows.shape[0], seed=0, hessian="xtx" in tensors)
        stats.channel_min, stats.channel_max = tensors["channel_min"], tensors["channel_max"]
        stats.rows, stats.count = rows, int(tensors["count"])
        stats.xtx, stats.row_sum = tensors.get("xtx"), tensors["row_sum"]
        stats.block_gram = tensors.get("block_gram")
        return stats
