"""Error families. Each carries every problem found, not just the first.

Stages and the CLI catch :class:`CtsynthError`, print one clean line per problem and exit
non-zero; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class CtsynthError(Exception):
    """Base class: an expected, user-fixable failure with one or more problems."""

    kind = "error"

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class ConfigError(CtsynthError):
    """params.yaml (or a CLI option) is invalid."""

    kind = "config error"


class InputError(CtsynthError):
    """An input file (NIfTI, mask, folder) is unusable."""

    kind = "input error"


class ModelFileError(CtsynthError):
    """A model or checkpoint file is missing, corrupt or not a ctsynth model."""

    kind = "model error"


class TrainingError(CtsynthError):
    """Training cannot continue (non-finite loss, tracking store unavailable, ...)."""

    kind = "training error"


class MetricUnavailable(CtsynthError):
    """A metric cannot be computed here (e.g. no local Inception weights)."""

    kind = "metric unavailable"
