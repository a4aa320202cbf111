"""Writing a folder of files so that a failure leaves no half-written folder behind."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator


@contextlib.contextmanager
def atomic_directory(directory: str) -> Iterator[str]:
    """Yield a temporary folder beside ``directory`` to write into; when the block succeeds, its files replace
    those of the same names in ``directory`` (a new ``directory`` appears whole, by one rename). When the block
    raises, the temporary folder is removed and ``directory`` is left as it was."""
    directory = os.path.abspath(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(f"{directory} exists and is not a directory")
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes 0700; the folder must read like one made by mkdir
    try:
        yield staging
        if not os.path.exists(directory):
            os.replace(staging, directory)
            return
        for name in os.listdir(staging):
            os.replace(os.path.join(staging, name), os.path.join(directory, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
