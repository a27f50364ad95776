"""Exception types shared by the whole runtime.

* :class:`InputError` - something is wrong with an input the user gave (a file, a CSV row, an
  option). Messages name the file and say what is wrong; they never contain patient names, IDs or
  DICOM UIDs. The CLI turns it into exit status 2.
* :class:`ModelError` - a model artifact or inference backend cannot be used (bad ONNX metadata,
  missing provider, engine built for another GPU, ...).
"""

from __future__ import annotations


class InputError(ValueError):
    """A bad input: the message names the file (or option) and what is wrong with it."""


class ModelError(RuntimeError):
    """A model or backend problem: the message names the artifact/backend and what is wrong."""
