"""Imported by the multiprocessing fork server before it forks verifier workers (``VerifierPool``).

Importing it imports math-verify (sympy, latex2sympy) and runs it once, so every worker forked afterwards
starts warm: a replacement for a killed worker is ready in milliseconds instead of about a second.
"""

from __future__ import annotations

from r1mega.rewards.equivalence import warm_up

warm_up()
