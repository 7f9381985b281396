"""Errors a user can act on.

Every message says what was wrong and how to fix it; the CLI prints it as one line and exits
with status 2, so no traceback ever reaches a user for bad input.
"""


class AutotuneError(Exception):
    """Base class: something the user can fix."""


class ShapeError(AutotuneError, ValueError):
    """A problem shape that cannot describe a valid kernel launch."""


class UnknownNameError(AutotuneError, KeyError):
    """An op, algorithm, sampler, policy or device name we do not know."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class SearchSpaceError(AutotuneError):
    """A search-space file that is missing, unreadable or malformed."""


class DeviceError(AutotuneError):
    """A device was requested that this machine does not have."""


class CacheWriteError(AutotuneError):
    """The results cache could not be written (permissions, a full disk, a read-only folder)."""


class PluginError(AutotuneError):
    """A user's kernel module (AUTOTUNE_PLUGINS or entry point `autotune.kernels`) that does not
    import, has no KERNELS list of KernelSpecs, or reuses a built-in (op, algorithm)."""


class OptimizerError(AutotuneError, ValueError):
    """An optimizer that cannot update flattened parameters (its update is not elementwise), or
    nothing to flatten."""
