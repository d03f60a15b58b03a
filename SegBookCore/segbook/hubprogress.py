"""Download progress of a Hugging Face hub file as the core's progress events, whoever runs the download.

huggingface_hub draws its own tqdm bar, which switches itself off when stderr is not a terminal (the Slicer
panel reads a pipe), and only recent versions take a `tqdm_class`. Instead a thread counts the bytes the hub
client has written to its temporary `*.incomplete` file(s) in the repository's cache folder, every half second,
against the size the hub announces: `{"event": "progress", "stage": "download", "done": bytes, "total": bytes}`
(total 0 while the size is unknown).
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path

log = logging.getLogger(__name__)

STAGE = "download"
INTERVAL_S = 0.5


def _blobs(repo: str) -> Path:
    from huggingface_hub import constants
    return Path(constants.HF_HUB_CACHE) / ("models--" + repo.replace("/", "--")) / "blobs"


def _written(blobs: Path) -> int:
    total = 0
    for path in blobs.glob("*.incomplete"):
        try:
            total += path.stat().st_size
        except OSError:     # renamed into place meanwhile
            pass
    return total


class DownloadProgress:
    """`with DownloadProgress(reporter, repo, filename, revision): hf_hub_download(...)` reports its bytes."""

    def __init__(self, reporter, repo: str, filename: str, revision=None):
        self.reporter, self.repo, self.filename, self.revision = reporter, repo, filename, revision
        self.total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="download-progress")

    def __enter__(self):
        if self.reporter is not None:
            self._thread.start()
        return self

    def __exit__(self, kind, value, traceback):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2 * INTERVAL_S)
        if kind is None and self.reporter is not None and self.total:
            self.reporter.emit({"event": "progress", "stage": STAGE, "done": self.total, "total": self.total})
        return False

    def _size(self) -> int:
        """The file's size as the hub announces it (one HEAD request, as hf_hub_download makes); 0 if unknown."""
        from huggingface_hub import get_hf_file_metadata, hf_hub_url
        try:
            return int(get_hf_file_metadata(hf_hub_url(self.repo, self.filename, revision=self.revision)).size or 0)
        except Exception as e:    # the download itself reports what is wrong with the connection
            log.debug("size of %s/%s unknown: %s", self.repo, self.filename, e)
            return 0

    def _watch(self) -> None:
        blobs, last = _blobs(self.repo), None
        self.total = self._size()
        while not self._stop.wait(INTERVAL_S):
            done = _written(blobs)
            if done != last:
                last = done
                self.reporter.emit({"event": "progress", "stage": STAGE, "done": done, "total": self.total})
