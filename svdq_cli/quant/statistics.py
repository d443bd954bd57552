"""Calibration statistics of one layer input, accumulated online with bounded memory (DESIGN.md §4).

Per input (shared by every layer that reads it): the running per-channel minimum and maximum over all
tokens, a uniform random sample of at most ``max_rows`` input rows, the block-diagonal part of ``Σ xᵀx``
(64×64 blocks along K: what the weight-scale search needs, from every token rather than a sample) with the
row sum that applies a shift to it, and optionally the whole ``Σ xᵀx`` (GPTQ's Hessian). Memory never grows
with the number of tokens: ``max_rows·K`` for the sample and ``64·K`` floats for the blocks.

Calibration runs in *units* (one prompt each), and the statistics are the same bits whichever process ran
which unit (the distributed collect relies on it): a row's sample key depends on its unit and position only,
and each unit's sums are added to the totals in unit order (floating-point sums depend on their order).
"""

from __future__ import annotations

import hashlib

import torch

from ..system.threads import single_threaded

GRAM_BLOCK = 64  # the widest group of any format; narrower groups' blocks lie on its diagonal


def gram_block(in_features: int) -> int:
    """The block width of an input's block-diagonal Gram: 64, or 16 when 64 does not divide K."""
    return GRAM_BLOCK if in_features % GRAM_BLOCK == 0 else 16 if in_features % 16 == 0 else 0


def unit_seed(seed: int, unit: int) -> int:
    """The sample-key seed of calibration unit ``unit`` of a stream seeded ``seed`` (well mixed: neighbouring
    units and streams get unrelated keys)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{unit}".encode()).digest()[:8], "little") >> 1


class InputStats:
    """Online statistics of one ``[*, K]`` input stream.

    The row sample is priority sampling: every row gets a seeded uniform key (float64) and an id (its unit and
    position), and the ``max_rows`` rows with the smallest (key, id) are kept, in that order. That is a uniform
    sample without replacement (any prefix of it too), and being a function of the set of rows seen, it merges
    batch by batch and process by process (:meth:`merge_sample`) in any order. So do the channel extremes and
    the count. The sums are another matter: floating-point addition depends on its order, so each unit's sums
    are kept apart (:meth:`start_unit`, :meth:`finish_unit`) and added to the totals (:meth:`add_sums`) in unit
    order. Without :meth:`start_unit`, updates add to the totals directly.
    """

    def __init__(self, in_features: int, max_rows: int, seed: int, hessian: bool = False) -> None:
        self.in_features = in_features
        self.max_rows = max_rows
        self.seed = seed
        self.channel_min = torch.full((in_features,), float("inf"))
        self.channel_max = torch.full((in_features,), float("-inf"))
        self.count = 0
        self.finite = True
        self.rows: torch.Tensor | None = None
        self._keys: torch.Tensor | None = None
        self._ids: torch.Tensor | None = None
        self._generator = torch.Generator().manual_seed(seed)
        self._unit, self._unit_rows = 0, 0
        self._with_hessian = hessian
        self.block = gram_block(in_features)
        self.row_sum = torch.zeros(in_features)
        self.block_gram: torch.Tensor | None = None  # [K/block, block, block], Σ over every token
        self.xtx: torch.Tensor | None = None
        self._unit_sums: dict[str, torch.Tensor] | None = None  # the open unit's sums (None: no unit open)

    def start_unit(self, unit: int) -> None:
        """Record the next batches as calibration unit ``unit`` (a prompt): its rows' keys are seeded by the unit,
        not by what came before, and its sums are kept apart until :meth:`finish_unit`."""
        self._generator.manual_seed(unit_seed(self.seed, unit))
        self._unit, self._unit_rows, self._unit_sums = unit, 0, {}

    def finish_unit(self) -> dict[str, torch.Tensor]:
        """The open unit's sums (on the CPU; empty when it recorded nothing), for :meth:`add_sums`."""
        sums, self._unit_sums = self._unit_sums or {}, None
        return {name: value.cpu() for name, value in sums.items()}

    def add_sums(self, sums: dict[str, torch.Tensor]) -> None:
        """Add a unit's sums to the totals (units in one fixed order: the result's last bits depend on it). The
        row sum and Gram blocks add in float32, the Hessian in float64."""
        for name, value in sums.items():
            total = getattr(self, name)
            value = value.double() if name == "xtx" else value
            if total is None:
                setattr(self, name, value.clone())
            else:
                setattr(self, name, total.to(value.device) + value)

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
        # + 0.0 turns -0.0 into +0.0: min/max of signed zeros would otherwise depend on the order of batches
        self.channel_min = torch.minimum(self.channel_min.to(device), batch.amin(dim=0).float()) + 0.0
        self.channel_max = torch.maximum(self.channel_max.to(device), batch.amax(dim=0).float()) + 0.0
        self.count += batch.shape[0]
        keys = torch.rand(batch.shape[0], generator=self._generator, dtype=torch.float64).to(device)
        ids = self._unit * 2**40 + self._unit_rows + torch.arange(batch.shape[0], device=device)
        self._unit_rows += batch.shape[0]
        self._keep(batch, keys, ids)
        with single_threaded():  # these sums feed the weight side, whose numerics must not depend on threads
            batch = batch.float()
            update = {"row_sum": batch.sum(0)}
            if self.block:
                blocks = batch.reshape(batch.shape[0], -1, self.block).transpose(0, 1)  # [K/b, rows, b]
                update["block_gram"] = torch.bmm(blocks.transpose(1, 2), blocks)
            if self._with_hessian:
                update["xtx"] = batch.T @ batch
        if self._unit_sums is None:
            self.add_sums(update)
        else:
            for name, value in update.items():
                before = self._unit_sums.get(name)
                self._unit_sums[name] = value if before is None else before + value

    def _keep(self, rows: torch.Tensor, keys: torch.Tensor, ids: torch.Tensor) -> None:
        """Fold ``rows`` into the sample: the ``max_rows`` smallest (key, id), in that order (ids are unique, so
        the result does not depend on the order rows arrive in)."""
        if self.rows is not None:
            rows = torch.cat((self.rows, rows.to(self.rows.dtype)))
            keys, ids = torch.cat((self._keys, keys)), torch.cat((self._ids, ids))
        by_id = torch.argsort(ids)
        order = by_id[torch.sort(keys[by_id], stable=True).indices][: self.max_rows]
        self.rows, self._keys, self._ids = rows[order].clone(), keys[order], ids[order]

    def sample_state(self) -> dict[str, torch.Tensor]:
        """What :meth:`merge_sample` needs of these statistics (on the CPU, picklable)."""
        state = {"channel_min": self.channel_min.cpu(), "channel_max": self.channel_max.cpu(),
                 "count": torch.tensor(self.count), "finite": torch.tensor(self.finite)}
        if self.rows is not None:
            state.update(rows=self.rows.cpu(), keys=self._keys.cpu(), ids=self._ids.cpu())
        return state

    def merge_sample(self, state: dict[str, torch.Tensor]) -> None:
        """Fold another process's extremes, count and row sample (:meth:`sample_state`) into these: the result
        is the one that process's inputs would have given here, whatever the order of merges."""
        self.finite = self.finite and bool(state["finite"])
        device = self.channel_min.device
        self.channel_min = torch.minimum(self.channel_min, state["channel_min"].to(device)) + 0.0
        self.channel_max = torch.maximum(self.channel_max, state["channel_max"].to(device)) + 0.0
        self.count += int(state["count"])
        if "rows" in state:
            self._keep(state["rows"].to(device), state["keys"].to(device), state["ids"].to(device))

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
