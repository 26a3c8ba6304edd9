"""Model-level helpers for the diffusion backbones: SD-2.1-base loading (:mod:`.backbone`), LoRA adapters with
the official selection rules (:mod:`.lora`) and tiled VAE (:mod:`.tiled_vae`).

Nothing is imported here so that ``import realisr.models`` stays light; import the submodules.
"""
