"""The bearer-token check takes the same time wherever a wrong token first differs from
the right one. Measured beside an early-exit comparison on the same long tokens: the
measurement must see the early exit's leak (else it could not see ours), and must not see
one in the daemon's check."""

from __future__ import annotations

import secrets
import string
import time

import pytest

from xend_lite.daemon.tokens import token_matches

LENGTH = 200_000          # long, so a per-byte leak is far above the timer's noise
ROUNDS = 60


def early_exit(given: str, token: str) -> bool:
    """What a careless check does: stop at the first differing byte."""
    a, b = given.strip().encode(), token.encode()
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x != y:
            return False
    return True


def fastest(check, given: str, token: str) -> float:
    t0 = time.perf_counter()
    assert not check(given, token)
    return time.perf_counter() - t0


def late_over_early(check) -> float:
    """Fastest time to refuse a token differing at its last byte over one differing at its
    first (interleaved rounds; the minimum is what noise cannot lower)."""
    alphabet = string.ascii_letters + string.digits
    token = "".join(secrets.choice(alphabet) for _ in range(LENGTH))
    flip = {c: ("a" if c != "a" else "b") for c in alphabet}
    first = flip[token[0]] + token[1:]
    last = token[:-1] + flip[token[-1]]
    assert check(token, token)
    early, late = [], []
    for i in range(ROUNDS):
        for given, out in (((first, early), (last, late)) if i % 2 else ((last, late), (first, early))):
            out.append(fastest(check, given, token))
    return min(late) / min(early)


def test_the_measurement_sees_an_early_exit_leak():
    ratio = late_over_early(early_exit)
    print(f"\nearly exit: differing at the last byte takes {ratio:.0f}x as long as at the first")
    assert ratio > 10


def test_the_token_check_does_not_leak_where_a_token_differs():
    ratio = late_over_early(token_matches)
    print(f"\ntoken_matches: differing at the last byte takes {ratio:.2f}x as long as at the first")
    assert 0.67 < ratio < 1.5


@pytest.mark.parametrize("given", ["", "x", "right-token-0123456789" + "x", " right-token-0123456789 "])
def test_the_token_check_answers_right(given):
    assert token_matches(given, "right-token-0123456789") == (given.strip() == "right-token-0123456789")
