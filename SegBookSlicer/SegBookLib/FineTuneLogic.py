"""Fine-tune panel logic: the training set (TrainingSet) and the fine-tune run on it.

Training runs `python -m segbook finetune ... --progress json` in a child process; its events drive the
progress bar and the loss / Dice chart, and the model folder it writes appears in the Segment panel's
selector.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional

from .Parameters import FineTuneParameters
from .ProcessRunner import EXIT_EVENT, ProcessRunner, coreEnvironment, pythonExecutable
from .TrainingSet import TrainingSet, TrainingSetError, _safeName

log = logging.getLogger(__name__)


def timeLeft(estimate, progress: dict) -> str:
    """", about 3 min left" from the trainer's measured time per iteration, during training only."""
    if not estimate or progress.get("stage") != "train":
        return ""
    seconds = estimate["seconds_per_iteration"] * max(int(progress["total"]) - int(progress["done"]), 0)
    return f", about {round(seconds)} s left" if seconds < 90 else f", about {round(seconds / 60)} min left"


class FineTuneLogic(TrainingSet):
    def __init__(self, trainingDirectory, modelsDirectory,
                 runnerFactory: Optional[Callable[[list], ProcessRunner]] = None, python: Optional[str] = None):
        """`python`: the interpreter to train with (default: Slicer's own, see ProcessRunner.pythonExecutable)."""
        super().__init__(trainingDirectory, python)
        self.modelsDirectory = Path(modelsDirectory)
        self._runnerFactory = runnerFactory or (
            lambda args: ProcessRunner([pythonExecutable(self.python), "-m", "segbook", *args],
                                       env=coreEnvironment(python=self.python)))
        self.runner: Optional[ProcessRunner] = None
        self.history: list = []             # metric events of the current run, for the chart
        self.lastProgress: Optional[dict] = None
        self.final: Optional[dict] = None   # {"ok": bool, "message": str, "model": path}
        self.outputDirectory: Optional[Path] = None
        self._stopping = False

    # -- training ---------------------------------------------------------------------------------
    def isRunning(self) -> bool:
        return self.runner is not None and self.runner.isRunning()

    def start(self, params: FineTuneParameters, resume: bool = False) -> list:
        """Start `segbook finetune` on the training set; returns the command-line arguments used."""
        if self.isRunning():
            raise TrainingSetError("fine-tuning is already running")
        if len(self.cases()) < 2:
            raise TrainingSetError("add at least two cases before fine-tuning")
        self.outputDirectory = self.modelsDirectory / _safeName(params.outputName)
        # Stop creates this file and the trainer polls it: it reaches the trainer on every OS, through
        # PythonSlicer (which forwards no signal), where a SIGTERM would not
        stopFile = self.trainingDirectory / ".segbook-stop"
        args = params.arguments(self.datasetPath, self.outputDirectory, resume=resume) + ["--stop-file", str(stopFile)]
        self.history, self.lastProgress, self.final, self._stopping = [], None, None, False
        self.runner = self._runnerFactory(args)
        self.runner.stopFile = stopFile
        self.runner.start()
        self.runner.closeInput()
        return args

    def _accept(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "progress":
            self.lastProgress = event
        elif kind == "metric":
            self.history.append(event)
        elif kind == "error":
            self.final = {"ok": False, "message": event.get("message", "fine-tuning failed")}
        elif kind == EXIT_EVENT and self.final is None:     # an error event already said what went wrong
            code = event.get("returncode")
            folder = self.outputDirectory
            if self._stopping:
                self.final = {"ok": False, "stopped": True,
                              "message": "stopped; Resume continues from the last saved checkpoint"}
            elif code == 0 and folder is not None and (folder / "model.json").is_file():
                self.final = {"ok": True, "message": "done", "model": str(folder)}
            else:
                tail = (event.get("stderr") or "").strip().splitlines()
                self.final = {"ok": False, "message": tail[-1] if tail else f"fine-tuning exited with {code}"}

    def poll(self) -> list:
        events = self.runner.poll() if self.runner is not None else []
        for event in events:
            self._accept(event)
        return events

    def waitFor(self, predicate, timeout: Optional[float] = None) -> dict:
        """Block until an event satisfies `predicate` (e.g. the first metric); events are recorded on the way."""
        return self.runner.waitFor(predicate, timeout=timeout, onEvent=self._accept)

    def wait(self, timeout: Optional[float] = None, onEvent=None) -> dict:
        """Block until the run ends; returns the final {"ok", "message", "model"}."""
        def seen(event):
            self._accept(event)
            if onEvent is not None:
                onEvent(event)
        self.runner.waitFor(lambda e: e.get("event") == EXIT_EVENT, timeout=timeout, onEvent=seen)
        return self.final

    def stop(self, wait: Optional[float] = None) -> None:
        """Ask training to stop; it saves a checkpoint and exits, and start(resume=True) continues from it.

        Returns at once (the exit arrives through poll()); with `wait`, blocks up to that many seconds and
        then kills the process if it is still running.
        """
        if self.runner is None or not self.runner.isRunning():
            return
        self._stopping = True
        self.runner.terminate()
        if wait is not None:
            try:
                self.wait(timeout=wait)
            except TimeoutError:
                self.runner.kill()
                self.poll()
