"""A thin adapter that runs bitsandbytes' 4-bit codec and hands back numpy arrays.

Used by the conformance, property and throughput suites; nothing here decides a verdict.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from scalellm.quant.blockwise import QuantState4bit, unpack_nibbles
from scalellm.quant.double_quant import DoubleQuantState, double_dequantize


@dataclass(frozen=True)
class BnbResult:
    """bitsandbytes' 4-bit quantization of one tensor, moved to the host."""

    packed: np.ndarray  # (ceil(n/2),) uint8, as bnb stores it
    absmax: np.ndarray  # (n_blocks,) float32 without double quant; (n_blocks,) uint8 codes with it
    state: object  # bnb's QuantState (on the device)
    n: int  # number of quantized values
    packed_device: object  # the packed torch tensor as bnb returned it (on the device)

    def codes(self) -> np.ndarray:
        """(n,) uint8 4-bit codes."""
        return unpack_nibbles(self.packed)[: self.n]

    @property
    def offset(self) -> np.float32:
        return np.float32(self.state.offset.item())

    @property
    def absmax2(self) -> np.ndarray:
        """(ceil(n_blocks/256),) float32 second-level absmax (double quant only)."""
        return self.state.state2.absmax.cpu().numpy()

    def as_reference_state(self, dtype: str) -> QuantState4bit:
        """bnb's codes and constants in the reference's state type, to dequantize with the reference."""
        s = self.state
        dq = None
        if s.nested:
            dq = DoubleQuantState(codes=self.absmax, absmax=self.absmax2, offset=self.offset,
                                  blocksize=s.state2.blocksize)
            absmax = double_dequantize(dq)
        else:
            absmax = self.absmax
        return QuantState4bit(self.packed, absmax, s.quant_type, s.blocksize, tuple(s.shape), dtype, dq)


class BnbCodec:
    """bitsandbytes.functional's quantize_4bit / dequantize_4bit with numpy results."""

    def __init__(self, bnb):
        self.bnb = bnb
        self.F = bnb.functional

    def quantize(self, x, quant_type: str, blocksize: int, double_quant: bool = False) -> BnbResult:
        packed, state = self.F.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type,
                                             compress_statistics=double_quant)
        return BnbResult(packed.cpu().numpy().reshape(-1), state.absmax.cpu().numpy(), state, x.numel(), packed)

    def dequantize(self, result: BnbResult) -> np.ndarray:
        """bnb's dequantization of its own state -> float32 numpy array of the input shape
        (bnb returns the input dtype; widening it to float32 is exact)."""
        return self.F.dequantize_4bit(result.packed_device, result.state).float().cpu().numpy()


def load():
    """Import bitsandbytes quietly (it warns about the optional ``kernels`` hub package)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import bitsandbytes
        import bitsandbytes.functional  # noqa: F401
    return bitsandbytes
