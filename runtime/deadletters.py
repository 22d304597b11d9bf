"""Why a message was dead-lettered: the one list of reasons.

Every dead letter the worker writes carries one of these values, and the
brokers write the last two themselves. The README's "Dead letters" section
lists each with what it means and what to do; a test keeps the two in step.
"""

from __future__ import annotations

import enum

__all__ = ["DeadLetterReason"]


class DeadLetterReason(enum.StrEnum):
    """The reason stored with a dead letter (``DeadLetter.reason``)."""

    #: The body is not a task message (bad bytes, wrong types, a number out of
    #: range, unknown content type or encoding, unsupported version, nesting
    #: too deep, a header that is not a string).
    DECODE_ERROR = "decode_error"
    #: Signing is on and the message is unsigned, signed with an unknown key,
    #: or its signature is malformed or does not match the body.
    BAD_SIGNATURE = "bad_signature"
    #: Encryption is on and the message is not encrypted, or it is encrypted
    #: and cannot be read: its key id is not configured on the worker (or the
    #: worker has no keys), or it fails authentication (tampered, another key
    #: under that id, headers changed).
    BAD_ENCRYPTION = "bad_encryption"
    #: The body is over ``max_message_bytes`` (or inflates past 4x of it).
    TOO_LARGE = "too_large"
    #: The message decodes but its canvas references do not hold together (a
    #: chord index outside its size, ``downstream`` ids that its own links and
    #: chord do not name). Checked before the task runs; nothing is written.
    BAD_MESSAGE = "bad_message"
    #: No task of that name is registered on the worker.
    UNKNOWN_TASK = "unknown_task"
    #: The arguments do not fit the task's signature or type hints.
    BAD_ARGUMENTS = "bad_arguments"
    #: The task raised ``Reject``.
    REJECTED = "rejected"
    #: The task raised and had no retries left (or the error is not retried).
    FAILED = "failed"
    #: The task ran past its time limit on its last attempt.
    TIME_LIMIT = "time_limit"
    #: The task's return value cannot be encoded or is over the size limit.
    BAD_RESULT = "bad_result"
    #: What follows the task (next chain step, chord body, replacement canvas)
    #: cannot be built or sent: unknown task, bad arguments, too large.
    BAD_FOLLOW_UP = "bad_follow_up"
    #: A bug in the worker before the task ran; the log line says which error.
    INTERNAL_ERROR = "internal_error"
    #: Set by the brokers: delivered ``max_deliveries`` / ``x-delivery-limit``
    #: times without being settled (its worker died or hung each time).
    DELIVERY_LIMIT = "delivery_limit"
    #: Set by the Redis broker: a stream entry that is not a taskloom envelope.
    MALFORMED_ENTRY = "malformed_entry"
