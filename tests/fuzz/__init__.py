"""Coverage-guided fuzzing of everything a client or a guest can send (issue 12, item 2).

Each target module holds one target class: built once per fuzzing process, called with
one input (bytes) at a time, and raising only for a finding. A finding is an exception
that is not one of the errors the layer under test defines (GuestError and its
subclasses, an admin status, an errno reply), a broken invariant (:class:`Finding`) or a
hang (libFuzzer's -timeout). Run them with ``make fuzz`` or ``python -m tests.fuzz``
(see __main__.py); tests/fuzz/test_targets.py runs each briefly in CI.
"""
