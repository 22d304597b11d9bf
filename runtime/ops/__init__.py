"""What operators see and steer.

- ``runtime.ops.api``: ``Operations(rt)`` (tasks by state, one task, workers,
  orphans, events; retry, replay, purge dead letters, cancel, pause, resume)
  and ``listeners_for(rt)`` (the task index and the event stream, as
  ``runtime.lifecycle.Listener`` objects the runtime opens);
- ``index`` (ids by state, queue, task name and time: Redis or memory),
  ``events`` (typed, versioned events on a bounded, resumable stream),
  ``workers`` (heartbeats read back, orphaned tasks), ``verbs``,
  ``deadletters`` (one dead letter at a time, per broker), ``pauses``;
- the scheduler (``runtime.ops.scheduler``), flow control (``limits``).

The core never imports this package; it sits on the core and the result store.
"""
