"""The ``realisr`` command line. Each sub-command lives in its own module, imported only when run."""
