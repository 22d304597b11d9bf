"""What operators see and steer: the scheduler (``runtime.ops.scheduler``).

The core never imports this package; it sits on the core and the result store.
"""
