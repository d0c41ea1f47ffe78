"""The one exception users see: the CLI prints its message and exits non-zero."""


class BottleneckError(Exception):
    """A problem the user can act on; the message is one sentence saying what to do."""

    exit_code = 1


class WeightsUnavailable(BottleneckError):
    """Pretrained weights are neither cached nor downloadable from here."""

    exit_code = 3


class CacheBusy(BottleneckError):
    """Another process holds the write lock of a feature cache."""

    exit_code = 4


class Interrupted(BottleneckError):
    """A signal asked a long job to stop; its checkpoint is saved and a rerun resumes it.

    The exit code 75 (EX_TEMPFAIL) tells a Slurm job script to requeue the job.
    """

    exit_code = 75
