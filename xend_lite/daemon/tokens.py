"""The bearer token of TCP clients: the file it is kept in, and the comparison.

The token file must be the daemon's own secret, as ssh insists for its private keys: a
regular file owned by the daemon's user that neither group nor others may read or write.
Otherwise anyone who could read it could drive the VM, and anyone who could write it could
choose the token; the daemon refuses to start (a ConfigError, exit status CONFIG).

The comparison takes the same time wherever the given token first differs from ours
(``hmac.compare_digest``): a client cannot find the token byte by byte by timing refusals.
tests/reliability/test_token_timing.py measures that beside an early-exit comparison.
"""

from __future__ import annotations

import os
import stat

from xend_lite.errors import ConfigError

__all__ = ["check_token_file", "token_matches"]


def check_token_file(path: str, st: os.stat_result) -> None:
    """Refuse a token file that is not private to the daemon's user (``st`` is its fstat)."""
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"token file {path} is not a regular file")
    uid = os.geteuid()
    if st.st_uid != uid:
        raise ConfigError(f"token file {path} is owned by uid {st.st_uid}, not by the daemon's "
                          f"user (uid {uid}): `chown {uid} {path}`")
    if st.st_mode & 0o077:
        raise ConfigError(f"token file {path} is open to group or others (mode "
                          f"{stat.S_IMODE(st.st_mode):04o}): `chmod 600 {path}`, and write a "
                          "new token, since others may have read this one")


def token_matches(given: str, token: str) -> bool:
    """Whether the token a client gave is ours, in a time that does not depend on where
    they differ."""
    import hmac     # here: only a daemon with TCP clients compares tokens

    return hmac.compare_digest(given.strip().encode(), token.encode())
