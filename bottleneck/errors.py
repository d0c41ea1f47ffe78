"""The one exception users see: the CLI prints its message and exits non-zero."""


class BottleneckError(Exception):
    """A problem the user can act on; the message is one sentence saying what to do."""

    exit_code = 1


class WeightsUnavailable(BottleneckError):
    """Pretrained weights are neither cached nor downloadable from here."""

    exit_code = 3


class Busy(BottleneckError):
    """Another process holds the write lock of a cache or a result folder."""

    exit_code = 4


CacheBusy = Busy  # the name it had when only caches were locked


class Interrupted(BottleneckError):
    """A signal asked a long job to stop; its checkpoint is saved and a rerun resumes it.

    The exit code 75 (EX_TEMPFAIL) tells a Slurm job script to requeue the job.
    """

    exit_code = 75


def write_error(e: BaseException, path) -> OSError:
    """An OSError naming `path` for a failed write, whichever library raised it.

    torch and HDF5 report a full disk as a RuntimeError with a message of their own; the CLI
    turns an OSError into one line naming the file, so translate to that.
    """
    import errno
    import os
    import re
    import shutil

    if isinstance(e, OSError) and e.errno:  # h5py puts a page of HDF5 detail into strerror
        return OSError(e.errno, os.strerror(e.errno), str(path))
    found = re.search(r"errno = (\d+)", str(e))
    if found:
        code = int(found.group(1))
    else:
        try:
            full = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free < 2**20
        except OSError:
            full = False
        code = errno.ENOSPC if full else errno.EIO
    return OSError(code, os.strerror(code), str(path))
