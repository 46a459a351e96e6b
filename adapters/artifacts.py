"""Where finished videos live: a local folder (the embedded default)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


class LocalArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.incoming = root / ".incoming"
        self.incoming.mkdir(exist_ok=True)

    def path(self, job_id: str, index: int) -> Path:
        return self.root / job_id / f"{index}.mp4"

    def scratch(self, job_id: str) -> Path:
        """A download target outside the served tree, so half a file is never served."""
        return self.incoming / f"{job_id}.mp4"

    def discard_scratch(self, job_id: str) -> None:
        """Drop a download that will not be kept (not a video, or the job ended meanwhile)."""
        self.scratch(job_id).unlink(missing_ok=True)

    def put(self, job_id: str, index: int, source: Path) -> Path:
        target = self.path(job_id, index)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
        return target

    def exists(self, job_id: str, index: int) -> bool:
        return self.path(job_id, index).is_file()

    def delete(self, job_id: str) -> None:
        shutil.rmtree(self.root / job_id, ignore_errors=True)
