"""Network architectures (``nn.Module`` classes only: no file I/O, no key mapping; loading lives in
:mod:`realisr.weights`). Import the submodules; nothing is imported here so ``import realisr`` stays light."""
