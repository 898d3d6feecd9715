"""Running a model one block at a time over calibration data.

Layer-wise methods (reconstruction, the budget planner's sensitivity pass) need each block's
inputs as the *current* model produces them, and they change block ``i`` before block ``i + 1``
runs. ``BlockStream`` holds the residual stream entering one block for every calibration batch,
together with the keyword arguments the backbone passes its blocks (attention mask, rotary
position embeddings, ...), captured once from a real forward pass so that no family's internals
are rebuilt here. ``advance`` runs one block on it; ``capture_inputs`` runs a block up to one of
its modules and hands that module's inputs to a callback.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .importance._calibration import block_input, first_tensor, forward_base, make_batches, pad_id
from .pruned_modeling import adapter_for


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass once block 0's inputs are known."""


class BlockStream:
    """The hidden states entering the next block, per calibration batch, plus the block kwargs."""

    def __init__(self, hidden: list[torch.Tensor], kwargs: list[dict], masks: list[torch.Tensor]):
        self.hidden, self.kwargs, self.masks = hidden, kwargs, masks

    @classmethod
    @torch.no_grad()
    def capture(cls, model: nn.Module, calib, batch_size: int = 8) -> "BlockStream":
        """Block 0's inputs for every batch of ``calib`` (see ``importance.make_batches``)."""
        batches = make_batches(calib, batch_size, pad_id(model))
        first = adapter_for(model).blocks(model)[0]
        hidden, kwargs = [], []

        def grab(module, args, kw):
            hidden.append(block_input(args, kw).detach())
            kwargs.append({k: v for k, v in kw.items() if k != "hidden_states"})
            raise _Captured

        device = next(model.parameters()).device
        handle = first.register_forward_pre_hook(grab, with_kwargs=True)
        was_training = model.training
        model.eval()
        try:
            for batch in batches:
                try:
                    forward_base(model, {k: v.to(device) for k, v in batch.items()})
                except _Captured:
                    pass
        finally:
            handle.remove()
            model.train(was_training)
        return cls(hidden, kwargs, [b["attention_mask"].to(device) for b in batches])

    def __len__(self) -> int:
        return len(self.hidden)

    def weights(self) -> list[torch.Tensor]:
        """Per token ``mask / ||h_t||^2`` of the current stream (see ``course_lib.reconstruction``)."""
        return [m.to(torch.float64) / h.to(torch.float64).pow(2).sum(-1).clamp_min(1e-12)
                for h, m in zip(self.hidden, self.masks)]

    def run_one(self, block: nn.Module, b: int) -> torch.Tensor:
        """The block's output for batch ``b``."""
        with torch.no_grad():
            return first_tensor(block(self.hidden[b], **self.kwargs[b]))

    def run(self, block: nn.Module) -> list[torch.Tensor]:
        """The block's output for every batch (the stream itself is unchanged)."""
        with torch.no_grad():
            return [first_tensor(block(h, **kw)) for h, kw in zip(self.hidden, self.kwargs)]

    def advance(self, block: nn.Module) -> None:
        """Replace the stream by ``block``'s output: the stream now enters the next block."""
        self.hidden = self.run(block)


def capture_inputs(block: nn.Module, module: nn.Module, stream: BlockStream,
                   callback: Callable[[torch.Tensor, int], None]) -> None:
    """Run ``block`` on every batch of ``stream`` until ``module``; ``callback(input, batch_index)`` sees its input.

    The rest of the block is not computed (the hook stops the forward pass), so capturing the
    attention output projection's inputs costs the attention alone.
    """
    current = [0]

    def hook(mod, args):
        callback(args[0].detach(), current[0])
        raise _Captured

    handle = module.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for b, (h, kw) in enumerate(zip(stream.hidden, stream.kwargs)):
                current[0] = b
                try:
                    block(h, **kw)
                except _Captured:
                    pass
    finally:
        handle.remove()
