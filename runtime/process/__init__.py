"""Process management: the supervisor (:mod:`.supervisor`) and the worker
processes it starts (:mod:`.serve`: one worker, its loop-lag monitor
(:mod:`.lag`) and liveness heartbeats (:mod:`.liveness`)), the process pool
for ``kind="process"`` tasks (:mod:`.pool`, whose children run
:mod:`.pool_child`) and what every process needs first (:mod:`.loading`).

Nothing below this package (the core, the result stores) imports it; the CLI
sits on top of it.
"""
