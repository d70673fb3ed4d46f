"""What ``backend="auto"`` runs on each GPU: the implementations that won the GPU pass's tournament there.

Written by benchmarks/tournament.py; do not edit by hand.  Regenerated on a GPU by
``bash benchmarks/gpu_check.sh OUT --steps build,tune`` then ``cp OUT/auto_table.py melt_kernels/`` (that GPU's
rows replaced, the other GPUs' kept).  The format, and how a call finds its row: melt_kernels/dispatch_table.py.
"""

TABLE = {}
