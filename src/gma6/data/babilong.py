"""One-stop import of the BABILong-style benchmark API (see :mod:`gma6.data`)."""

from . import *  # noqa: F401,F403
from . import __all__  # noqa: F401
