"""Task ids (``canvas.new_id``): drawn in batches from ``os.urandom``, each a
version-4 UUID in hex like ``uuid.uuid4().hex``, never repeated, and never
shared between a forked child and its parent."""

from __future__ import annotations

import os
import uuid

from runtime import canvas


def test_ids_are_uuid4_hex_and_unique() -> None:
    ids = [canvas.new_id() for _ in range(5 * canvas._ID_BATCH + 7)]
    assert len(set(ids)) == len(ids)
    for task_id in ids:
        parsed = uuid.UUID(hex=task_id)
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
        assert parsed.hex == task_id


def test_ids_use_every_variant_digit() -> None:
    # the 17th hex digit carries two random bits under the variant's two
    digits = {canvas.new_id()[16] for _ in range(2000)}
    assert digits == {"8", "9", "a", "b"}


def test_a_forked_child_does_not_repeat_the_parents_ids() -> None:
    canvas.new_id()  # the parent holds ids drawn ahead
    assert canvas._ids
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next ids, then leave at once
        try:
            os.write(write, " ".join(canvas.new_id() for _ in range(5)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = pipe.read().split()
    os.waitpid(pid, 0)
    parent = [canvas.new_id() for _ in range(5)]
    assert len(child) == 5
    assert not set(child) & set(parent)
