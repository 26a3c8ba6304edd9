"""Architectures realisr adds to spandrel's detection (spandrel itself is not modified).

* ``MSRResNet`` (BasicSR's modified SRResNet, the EA-Adam SRResNet backbone; keys ``conv_first``,
  ``body.N.conv1/conv2``, ``upconv1``/``upconv2``, ``conv_hr``, ``conv_last``).

:func:`extended_registry` is spandrel's main registry plus these; :mod:`realisr.weights.gan` loads every
checkpoint through it, so ``-m EA-Adam-srresnet.pt`` works like any spandrel model.
"""

from __future__ import annotations

import functools

__all__ = ["extended_registry"]


def _msrresnet_arch_class():
    from spandrel import Architecture, ImageModelDescriptor
    from spandrel.util import KeyCondition, get_seq_len

    from ..arch.msrresnet_arch import MSRResNet

    class MSRResNetArch(Architecture[MSRResNet]):
        def __init__(self) -> None:
            super().__init__(
                id="MSRResNet", name="MSRResNet",
                detect=KeyCondition.has_all("conv_first.weight", "body.0.conv1.weight", "body.0.conv2.weight",
                                            "upconv1.weight", "conv_hr.weight", "conv_last.weight"))

        def load(self, state_dict):
            num_feat, num_in_ch = state_dict["conv_first.weight"].shape[:2]
            num_out_ch = state_dict["conv_last.weight"].shape[0]
            num_block = get_seq_len(state_dict, "body")
            if "upconv2.weight" in state_dict:
                scale = 4
            else:
                scale = int(round((state_dict["upconv1.weight"].shape[0] / num_feat) ** 0.5))
            model = MSRResNet(num_in_ch=num_in_ch, num_out_ch=num_out_ch, num_feat=num_feat, num_block=num_block,
                              upscale=scale)
            return ImageModelDescriptor(model, state_dict, architecture=self, purpose="SR",
                                        tags=[f"{num_feat}nf", f"{num_block}nb"], supports_half=True,
                                        supports_bfloat16=True, scale=scale, input_channels=num_in_ch,
                                        output_channels=num_out_ch)

    return MSRResNetArch


@functools.lru_cache(maxsize=1)
def extended_registry():
    """spandrel's ``MAIN_REGISTRY`` plus realisr's architectures (a copy; the global registry is untouched)."""
    from spandrel import MAIN_REGISTRY, ArchSupport

    reg = MAIN_REGISTRY.copy()
    reg.add(ArchSupport.from_architecture(_msrresnet_arch_class()()), ignore_duplicates=True)
    return reg
