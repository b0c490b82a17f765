"""How it runs in parallel: the (replica, stage, column) grid, exchanges, stages, schedules.

Imports torch and torch.distributed (and ``alexnet``); never Ray.
"""
