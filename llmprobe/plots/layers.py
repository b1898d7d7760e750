"""``llmprobe plot-layers``: how a prediction forms through the layers of one prompt (logit lens).

Two views of a trace written with ``trace --layers``:

* ``next`` — a layer x position heat map of the probability each layer's lens gives the token that
  actually comes next (teacher-forced); at the last position, where nothing follows, the probability
  of the model's answer (its output-layer top-1 token), see :func:`next_token_grid`;
* ``targets`` — at each mark (else the last position), the probability of each target's first token
  against the layer, one panel per position (at most ``MAX_PANELS``, evenly spaced).
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow.compute as pc

from llmprobe.errors import UsageError
from llmprobe.tracing.reader import open_trace

SHOWS = ("next", "targets")
MAX_PANELS = 8
MAX_POSITION_LABELS = 60


def write_layers_figure(trace_path: str, prompt: str | None, output: str, show: str, force: bool) -> str:
    """Draw the logit-lens figure of one prompt into ``output``; returns a one-line summary of what it shows."""
    from llmprobe.plots.common import check_image_output, save_figure

    if show not in SHOWS:
        raise UsageError(f"expected one of {', '.join(SHOWS)}, got {show!r}", where="--show")
    check_image_output(output, force, inputs=[trace_path])
    trace = open_trace(trace_path)
    trace.require_columns("layer", purpose="plot-layers (trace with --layers)")
    table = trace.table
    ids = table.column("prompt_id").unique().to_pylist()
    if prompt is None:
        if len(ids) != 1:
            raise UsageError(f"the trace holds {len(ids)} prompts; choose one with --prompt (e.g. {ids[0]!r})",
                             where="--prompt")
        prompt = ids[0]
    elif prompt not in ids:
        raise UsageError(f"no prompt {prompt!r} in the trace (ids include {', '.join(map(repr, ids[:5]))})",
                         where="--prompt")
    frame = table.filter(pc.equal(table.column("prompt_id"), prompt)).to_pandas()
    frame = frame[frame["phase"] == "prompt"].sort_values(["layer", "position"])
    if show == "next":
        targets = [t["token_ids"][0] for t in trace.meta.get("targets", []) if t.get("token_ids")]
        fig, summary = _next_token_figure(frame, prompt, targets if "target_logprobs" in frame.columns else [],
                                          trace.vocab)
    else:
        trace.require_columns("target_logprobs", purpose="plot-layers --show targets (trace with --targets)")
        fig, summary = _targets_figure(frame, [t["text"] for t in trace.meta.get("targets", [])], prompt)
    save_figure(fig, output, replace=force)
    return summary


def next_token_grid(frame, target_first_ids: list[int], vocab: list[str] | None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """``(layers, positions, probs, answers)``: ``probs[layer, position]`` is the lens probability of the
    token that actually comes next. Where nothing comes next (the prompt's last position: the answer is
    still to come) it is the probability of the *answer*, the output layer's top-1 token there
    (``answers[position]`` = its text), taken exactly from the targets when the answer is a target's first
    token, else from that layer's top-k; NaN only where the answer is below that layer's top-k."""
    layers = np.sort(frame["layer"].unique())
    positions = np.sort(frame["position"].unique())
    probs = np.exp(frame.pivot(index="layer", columns="position", values="next_logprob").reindex(
        index=layers, columns=positions).to_numpy(dtype=float))
    output = frame[frame["layer"] == layers[-1]].set_index("position")
    answers = {}
    for j in np.flatnonzero(np.isnan(probs[-1])):
        top = output.loc[positions[j]]
        answer = int(top["topk_ids"][0])
        answers[int(positions[j])] = vocab[answer] if vocab is not None and answer < len(vocab) else f"#{answer}"
        target = target_first_ids.index(answer) if answer in target_first_ids else None
        rows = frame[frame["position"] == positions[j]].set_index("layer").reindex(layers)
        for i, row in enumerate(rows.itertuples()):
            if target is not None and row.target_logprobs is not None:
                probs[i, j] = math.exp(row.target_logprobs[target])
            elif answer in list(row.topk_ids):
                probs[i, j] = math.exp(row.topk_logprobs[list(row.topk_ids).index(answer)])
    return layers, positions, probs, answers


def _next_token_figure(frame, prompt: str, target_first_ids: list[int], vocab: list[str] | None):
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    from llmprobe.plots.common import plain_label, token_label

    layers, positions, probs, answers = next_token_grid(frame, target_first_ids, vocab)
    tokens = frame[frame["layer"] == layers[-1]].set_index("position")["token"].reindex(positions)
    labels = [token_label(t) + (f" → {token_label(answers[p])}" if p in answers else "")
              for p, t in zip(positions, tokens)]
    fig = Figure(figsize=(max(6.0, 0.28 * len(positions) + 2), max(3.0, 0.18 * len(layers) + 1.5)),
                 layout="constrained")
    ax = fig.add_subplot()
    cmap = colormaps["viridis"].with_extremes(bad="0.82")
    image = ax.imshow(probs, aspect="auto", origin="lower", vmin=0, vmax=1, cmap=cmap, interpolation="nearest")
    fig.colorbar(image, ax=ax, label="P(actual next token; → the answer)")
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    step = max(1, int(np.ceil(len(positions) / MAX_POSITION_LABELS)))
    ticks = sorted(set(range(0, len(positions), step)) | {j for j, p in enumerate(positions) if p in answers})
    ax.set_xticks(ticks, [labels[j] for j in ticks], rotation=90)
    ax.set_xlabel("input token (row predicts the token after it)" + (
        "\n→ X: nothing follows; P(X, the output layer's top-1 answer)" if answers else "")
        + ("\ngrey: the answer is below that layer's top-k" if np.isnan(probs).any() else ""))
    ax.set_ylabel("layer (logit lens)")
    ax.set_title(plain_label(f"prompt {prompt}: probability of the actual next token by layer"))
    ranks = frame.pivot(index="layer", columns="position", values="next_rank").reindex(index=layers)
    top1 = (ranks == 1).fillna(False).astype(bool)  # no next token (null rank): not top-1
    emerged = [int(layers[np.argmax(col)]) for _, col in top1.items() if col.any()]
    summary = (f"{len(layers)} layers x {len(positions)} positions; the next token is top-1 at the output layer"
               f" for {int(top1.iloc[-1].sum())} positions")
    if emerged:
        summary += f", first reaching top-1 at layer {np.median(emerged):.0f} (median)"
    for j, position in enumerate(positions):
        if position in answers:
            summary += f"; after the last token the answer {answers[position]!r} has P = {probs[-1, j]:.3f}"
    return fig, summary


def _targets_figure(frame, targets: list[str], prompt: str):
    from matplotlib.figure import Figure

    from llmprobe.plots.common import plain_label, token_label

    output_layer = frame["layer"].max()
    last = frame[frame["layer"] == output_layer]
    marked = last[last["mark_index"].notna()]["position"].to_numpy()
    positions = marked if len(marked) else last["position"].to_numpy()[-1:]
    if len(positions) > MAX_PANELS:
        positions = positions[np.unique(np.linspace(0, len(positions) - 1, MAX_PANELS).round().astype(int))]
    cols = min(4, len(positions))
    rows = int(np.ceil(len(positions) / cols))
    fig = Figure(figsize=(3.2 * cols + 1, 2.6 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True)
    finals = []
    for ax, position in zip(axes.flat, positions):
        at = frame[frame["position"] == position].sort_values("layer")
        probs = np.exp(np.stack(at["target_logprobs"].to_numpy()))
        finals.append(probs[-1])
        for t, text in enumerate(targets):
            ax.plot(at["layer"], probs[:, t], marker=".", label=token_label(text))
        ax.set_title(f"pos {position}: after {token_label(at['token'].iloc[0])}", fontsize=9)
        ax.set_xlabel("layer")
        ax.set_ylim(0, 1)
    for ax in list(axes.flat)[len(positions):]:
        ax.set_visible(False)
    axes[0][0].set_ylabel("P(target's first token)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(plain_label(f"prompt {prompt}: target probabilities through the layers"))
    mean_final = np.mean(finals, axis=0)
    summary = "output-layer P(first token), mean over plotted positions: " + ", ".join(
        f"{t!r} {p:.3f}" for t, p in zip(targets, mean_final))
    return fig, summary
