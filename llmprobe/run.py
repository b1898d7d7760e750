"""One trace run, end to end: prompts -> model -> engine -> sink, with progress on stderr.

Everything that can be checked without the model (prompt file, output path, option values) is
checked first, so a typo fails in a second rather than after a model load.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from llmprobe._output import Output
from llmprobe.engine import TraceSettings, Tracer
from llmprobe.errors import UsageError
from llmprobe.models import load_model
from llmprobe.prompts import PromptRecord, read_prompts
from llmprobe.writer import check_output, open_trace_sink


@dataclass
class ModelOptions:
    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    device_map: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False


def default_output(prompts: str) -> str:
    """Stdout when it is a pipe or file, else ``<prompts stem>.parquet`` in the working directory."""
    if not sys.stdout.isatty():
        return "-"
    return "trace.parquet" if prompts == "-" else f"{Path(prompts).stem}.parquet"


def targets_from_records(records: list[PromptRecord]) -> list[str]:
    """The ``targets`` field that experiment prompts carry; all records must agree."""
    found = {tuple(r.meta["targets"]) for r in records if isinstance(r.meta.get("targets"), list)}
    if len(found) > 1:
        raise UsageError("prompts carry different \"targets\" lists; trace them separately or pass --targets")
    return list(found.pop()) if found else []


def read_targets_file(path: str) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read targets file: {exc}", where=path) from None
    targets = [line.removesuffix("\r") for line in lines if line.strip()]
    if not targets:
        raise UsageError("no targets in file", where=path)
    return targets


def run_trace(prompts: str, output: str, fmt: str, force: bool, input_format: str, settings: TraceSettings,
              model_options: ModelOptions, command: str, out: Output) -> None:
    settings.validate()
    records = read_prompts(prompts, input_format)
    check_output(output, fmt, force)
    if not settings.targets:
        settings.targets = targets_from_records(records)
    loaded = load_model(model_options.model, device=model_options.device, dtype=model_options.dtype,
                        device_map=model_options.device_map, trust_remote_code=model_options.trust_remote_code,
                        allow_pickle=model_options.allow_pickle, log=out.log)
    tracer = Tracer(loaded, settings)
    out.log(f"loaded {loaded.source.label} on {loaded.device} ({str(loaded.dtype).removeprefix('torch.')})"
            f" in {loaded.load_seconds:.1f} s")
    metadata = {**tracer.metadata(), "command": command, "prompts": prompts, "n_prompts": len(records)}
    rows = 0
    with out.progress("tracing", total=len(records)) as advance, \
            open_trace_sink(output, fmt, tracer.schema, metadata, tracer.vocab) as sink:
        for batch in tracer.trace(records, on_prompts_done=advance):
            sink.write(batch)
            rows += batch.num_rows
    out.log(f"wrote {rows} rows for {len(records)} prompts to {'stdout' if output == '-' else output}")
