"""The --out folder of a run: protected (a folder that holds a run is refused unless --overwrite or --resume),
locked (a second run into it fails at once), and cleaned up (a run that wrote nothing leaves no folder).

--overwrite removes nothing before the new run has succeeded: the old run's files move into .replaced/ at the
start, and go only when the new run finishes; a new run that stops before training puts them back; one that
fails, diverges or is interrupted later leaves them there (said in one line), until it is resumed to its end (a
further --overwrite is refused meanwhile)."""

from __future__ import annotations

import os
import shutil
import sys
from datetime import datetime
from pathlib import Path

from ..utils import NanotuneError

LOCK = "run.lock"
REPLACED = ".replaced"  # the run --overwrite replaces, until the new one has finished


class OutputFolder:
    """run_files: the names a run writes into the folder; a folder holding any of them holds a run, and
    --overwrite removes exactly those (nothing else a user keeps there)."""

    def __init__(self, path: Path, run_files: tuple[str, ...]):
        self.path, self.run_files = Path(path), run_files
        self._lock_file = None
        self._created = False

    def present(self) -> list[str]:
        """The run files already in the folder."""
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir() if p.name in self.run_files)

    def claim(self, overwrite: bool, resume: bool):
        """Create (or check) the folder and take its lock; with overwrite, remove the run that was there."""
        out = self.path
        if out.exists() and not out.is_dir():
            raise NanotuneError(f"--out {out} is a file, not a folder")
        present = self.present()
        if present and not (overwrite or resume):
            raise NanotuneError(
                f"--out {out} already holds a run ({', '.join(present)}); pass --overwrite to "
                f"replace it or --resume {out} to continue it"
            )
        if overwrite and present and (out / REPLACED).exists():  # (removing either run would lose work)
            raise NanotuneError(
                f"--out {out}: the run an earlier --overwrite replaced is kept in {out / REPLACED}, and the run that "
                f"replaced it never finished: --resume {out} to finish it, or remove {out / REPLACED} first"
            )
        self._created = not out.exists()
        try:
            out.mkdir(parents=True, exist_ok=True)
            self._lock_file = open(out / LOCK, "a+")
        except OSError as e:
            raise NanotuneError(f"--out {out} cannot be written: {e.strerror}") from None
        self._lock()
        if overwrite and present:
            (out / REPLACED).mkdir()
            for name in present:
                os.replace(out / name, out / REPLACED / name)

    def _lock(self):
        try:
            import fcntl

            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:
            pass  # no fcntl (Windows): no lock
        except OSError:
            self._lock_file.seek(0)
            holder = self._lock_file.read().strip() or "another process"
            self._lock_file.close()
            self._lock_file = None
            raise NanotuneError(
                f"--out {self.path} is in use by another run ({holder}); wait for it to end or pick another --out"
            ) from None
        self._lock_file.seek(0)
        self._lock_file.truncate()
        self._lock_file.write(f"pid {os.getpid()}, started {datetime.now():%Y-%m-%d %H:%M:%S}\n")
        self._lock_file.flush()

    def release(self, status: str = "failed", started: bool = False):
        """Drop the lock; a folder this run created and left empty goes too. The run --overwrite replaced goes if
        this one finished, comes back if it never started training, and otherwise stays in .replaced/."""
        if self._lock_file is None:
            return
        replaced = self.path / REPLACED
        if replaced.is_dir() and status == "finished":
            shutil.rmtree(replaced, ignore_errors=True)
        elif replaced.is_dir() and not started:
            for old in replaced.iterdir():
                new = self.path / old.name
                shutil.rmtree(new) if new.is_dir() else new.unlink(missing_ok=True)
                os.replace(old, new)
            replaced.rmdir()
        elif replaced.is_dir():
            print(f"note: the run --overwrite replaced is kept in {replaced} until this run finishes", file=sys.stderr)
        self._lock_file.close()
        self._lock_file = None
        (self.path / LOCK).unlink(missing_ok=True)
        if self._created and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()
