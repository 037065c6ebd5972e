"""Progress bars for loops a user waits on: on at a terminal, off under CI or when stderr is a
file or pipe (DVC's logs, test captures). Library modules import this, never the stage glue."""
from __future__ import annotations

import os
import sys


def quiet() -> bool:
    """True under CI or when stderr is not a terminal: progress bars stay off."""
    return bool(os.environ.get("CI")) or not sys.stderr.isatty()
