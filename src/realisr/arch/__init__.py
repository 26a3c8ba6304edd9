"""Network architectures (``nn.Module`` definitions only: no file I/O, no downloads).

Import the submodules directly (e.g. ``realisr.arch.seesr_arch``); nothing is imported here.
"""
