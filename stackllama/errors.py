"""The project's error types: one base class, :class:`StackLlamaError`, that every script
catches once (:func:`stackllama.stage.run_script`) and prints as a one-line message.

Each type also derives from the built-in exception that callers already catch for it
(``ValueError`` for bad input, ``ImportError`` for a missing package, ...), so code written
against those keeps working.
"""

from __future__ import annotations


class StackLlamaError(Exception):
    """Anything this project reports to the user as a one-line message and a non-zero exit."""


class InputError(StackLlamaError, ValueError):
    """A flag, config value, file or folder the user gave that cannot be used as it is."""


class MissingInputError(StackLlamaError, FileNotFoundError):
    """An input (a model, a data folder, a file) that is not where the flags say."""


class OutputExistsError(StackLlamaError, FileExistsError):
    """An output folder that already holds something this run would overwrite."""


class MissingDependencyError(StackLlamaError, ImportError):
    """An optional package a flag needs is not installed; the message says what to install."""


class ModelLoadError(StackLlamaError, RuntimeError):
    """A model or tokenizer could not be loaded; the message names it and says why."""


class CheckpointError(StackLlamaError, ValueError):
    """A checkpoint asked for by path that is missing or incomplete, or written by another setup."""


class NonFiniteError(StackLlamaError, FloatingPointError):
    """A NaN/inf in a reward, a loss or a gradient: training stopped before it reached the weights."""


class DumpError(StackLlamaError, ValueError):
    """A Stack Exchange dump that cannot be read (missing, malformed, wrong layout)."""


class MergeError(StackLlamaError, RuntimeError):
    """An adapter merge that cannot be done, or whose merged model does not reproduce the adapter's outputs."""


class PipelineError(StackLlamaError, ValueError):
    """A pipeline stage that failed or cannot start; the message names the stage and its log."""
