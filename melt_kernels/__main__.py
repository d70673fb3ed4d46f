"""``python -m melt_kernels SUBCOMMAND ...``: the ``melt`` command (:mod:`melt_kernels.cli`)."""
from melt_kernels.cli import main

if __name__ == "__main__":
    main()
