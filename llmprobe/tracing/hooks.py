"""Every hook the tracer attaches to a model is attached here, and nowhere else.

Design (the pattern of nnsight's ``intervention/hooks.py``)
-----------------------------------------------------------
* Each function attaches one torch hook to one module and returns the handle that removes it
  (:class:`torch.utils.hooks.RemovableHandle`). The caller owns the handle and keeps it inside a
  :class:`Hooks` block, which removes every handle it holds when the block exits, on every path:
  a normal exit, an exception, Ctrl-C, a trace generator closed early. After a trace the model holds
  no hook of ours (tests/tracing/test_hooks.py checks it, failures included).
* Only ``register_forward_hook`` and ``register_forward_pre_hook`` are used, so accelerate's own
  hooks (device maps, disk offload), which replace ``forward``, stay untouched and in force.
* Capture hooks observe: each returns None, so the module's input and output are what they would
  be without it. A one-shot hook (``once=True``) removes itself when it first fires: it serves a
  block that wraps exactly one forward call of its module, and cannot fire again on a later call.
* Edit hooks (:func:`edit_input`, :func:`edit_output`) are the interventions' (issue 22): they return
  the replacement of the module's first input or of its output, built by the caller's function out
  of place (the tensor the model handed over is never written to, so a cached residual stream can be
  fed to the same blocks again). Hooks run in the order they were attached, so an edit attached
  before a capture on the same module is what the capture sees (the logit lens reads the edited
  stream).
* :func:`stop_before` ends a forward call at a module's input: it records the input and keyword
  arguments and raises :class:`StopForward`, which its block absorbs. The sweep (issue 22 part 4)
  uses it to compute the residual stream entering block L without running the blocks after it.

What is attached, and by whom
-----------------------------
* the split path (:mod:`llmprobe.tracing.engine`, :mod:`llmprobe.tracing.targets`): a one-shot hook on
  the final norm (:class:`llmprobe.model.structure.CausalLMParts` names it) takes the final-normed
  hidden states of one forward call (:func:`outputs_of`), which the engine sends through the head;
* the hook path, for models that cannot be split: :func:`capture_logits` reduces the output head's
  logits after every forward call inside its block;
* the logit lens and the embeddings (:func:`llmprobe.tracing.lens.probe_internals`): output hooks on
  decoder layers and an input hook on the output head, for one teacher-forced pass.

* interventions (:mod:`llmprobe.tracing.editing`): edit hooks on ``o_proj`` (a head), the attention
  projection's or the MLP's output, or a decoder layer's output (a whole block, a direction
  projection, a residual patch from a donor prompt), attached inside the same block as the captures
  and before them; the mean ablation's first pass uses capture hooks on the same modules;
* the sweep (:mod:`llmprobe.tracing.sweep`): input hooks with keyword arguments on every decoder layer
  (the attention mask and rotary embeddings a block is called with, reused when blocks >= L are run
  again) and :func:`stop_before`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any
from collections.abc import Callable, Iterator

import torch
from torch.utils.hooks import RemovableHandle

from llmprobe.tracing.reduction import LogitReducer, StepStats


class Hooks:
    """The handles of hooks attached for one block; all removed when the block exits, on every path."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def add(self, handle: RemovableHandle) -> RemovableHandle:
        self._handles.append(handle)
        return handle

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> Hooks:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.remove()


def on_output(module: torch.nn.Module, see: Callable[[Any], None], once: bool = False) -> RemovableHandle:
    """Call ``see(output)`` after each forward call of ``module`` (``once``: after the first only)."""
    handle: RemovableHandle

    def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
        if once:
            handle.remove()
        see(output)

    handle = module.register_forward_hook(hook)
    return handle


def on_input(module: torch.nn.Module, see: Callable[[Any], None], once: bool = False) -> RemovableHandle:
    """Call ``see(first positional input)`` before each forward call of ``module`` (``once``: the first only)."""
    handle: RemovableHandle

    def hook(module: torch.nn.Module, args: tuple) -> None:
        if once:
            handle.remove()
        see(args[0])

    handle = module.register_forward_pre_hook(hook)
    return handle


def on_call(module: torch.nn.Module, see: Callable[[tuple, dict], None]) -> RemovableHandle:
    """Call ``see(positional inputs, keyword inputs)`` before each forward call of ``module``."""

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        see(args, kwargs)

    return module.register_forward_pre_hook(hook, with_kwargs=True)


def edit_input(module: torch.nn.Module, edit: Callable[[torch.Tensor], torch.Tensor | None],
               once: bool = False) -> RemovableHandle:
    """Replace ``module``'s first positional input by ``edit(input)`` on each forward call (``once``: the first);
    an edit that returns None leaves it."""
    handle: RemovableHandle

    def hook(module: torch.nn.Module, args: tuple) -> tuple | None:
        if once:
            handle.remove()
        edited = edit(args[0])
        return None if edited is None else (edited, *args[1:])

    handle = module.register_forward_pre_hook(hook)
    return handle


def edit_output(module: torch.nn.Module, edit: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor | None],
                once: bool = False) -> RemovableHandle:
    """Replace ``module``'s output (its first element, when the output is a tuple) by ``edit(output, first
    positional input)`` after each forward call (``once``: the first); an edit that returns None leaves it."""
    handle: RemovableHandle

    def hook(module: torch.nn.Module, args: tuple, output: Any) -> Any:
        if once:
            handle.remove()
        tensor = output[0] if isinstance(output, tuple) else output
        edited = edit(tensor, args[0] if args else None)
        if edited is None:
            return None
        return (edited, *output[1:]) if isinstance(output, tuple) else edited

    handle = module.register_forward_hook(hook)
    return handle


class StopForward(Exception):
    """Raised by :func:`stop_before`'s hook to end a forward call early; never escapes its block."""


@contextmanager
def stop_before(module: torch.nn.Module) -> Iterator[list[tuple[tuple, dict]]]:
    """A list that receives (positional inputs, keyword inputs) of ``module``'s first forward call inside
    the block, which then ends there: run the model inside the block, and the layers from ``module`` on
    never run. The call's :class:`StopForward` is absorbed by the block."""
    found: list[tuple[tuple, dict]] = []

    def see(args: tuple, kwargs: dict) -> None:
        found.append((args, kwargs))
        raise StopForward

    try:
        with Hooks() as hooks:
            hooks.add(on_call(module, see))
            yield found
    except StopForward:
        pass


@contextmanager
def outputs_of(module: torch.nn.Module, once: bool = False) -> Iterator[list[Any]]:
    """A list that receives ``module``'s output of each forward call inside the block (``once``: the first)."""
    found: list[Any] = []
    with Hooks() as hooks:
        hooks.add(on_output(module, found.append, once=once))
        yield found


class Capture:
    """What the output head's hook computed; the engine sets ``next_ids`` before each forward call."""

    def __init__(self, reducer: LogitReducer) -> None:
        self.reducer = reducer
        self.next_ids: torch.Tensor | None = None
        self._results: list[StepStats] = []

    def see(self, output: Any) -> None:
        logits = output[0] if isinstance(output, tuple) else output
        self._results.append(self.reducer.reduce(logits, self.next_ids))

    def pop(self) -> StepStats:
        if len(self._results) != 1:
            raise RuntimeError(f"expected one captured forward call, found {len(self._results)}")
        return self._results.pop()


@contextmanager
def capture_logits(module: torch.nn.Module, reducer: LogitReducer) -> Iterator[Capture]:
    """Reduce ``module``'s logits after each forward call inside the block (the hook path)."""
    capture = Capture(reducer)
    with Hooks() as hooks:
        hooks.add(on_output(module, capture.see))
        yield capture
