"""``wind-tunnel``: train a positive control, a small Llama that is Bayesian by construction (docs/wind-tunnel.md)."""

import functools
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from llmprobe.cli import options as opt
from llmprobe.cli.output import Output
from llmprobe.control.settings import ControlSettings
from llmprobe.errors import UsageError

MODEL, TRAINING = "Model size", "Training"
DEFAULTS = ControlSettings()


def wind_tunnel(
    config: Annotated[str, typer.Argument(help="Experiment definition (TOML), e.g. configs/control/coin.toml.")],
    output: opt.output("Checkpoint directory to write (an ordinary Hugging Face model directory; with --save-every or"
                       " several sizes, a series: see docs/emergence.md).") = None,
    prior: Annotated[Optional[str], typer.Option(
        help="The known prior: dirichlet:A1,A2,..., mixture:W*A1,A2,...+W*A1,A2,..., uniform, or a prior JSON file"
             " (default: the experiment's [prior] table).")] = None,
    layers: Annotated[Optional[str], typer.Option(
        rich_help_panel=MODEL, metavar="L[,L...]", show_default=str(DEFAULTS.layers),
        help="Decoder layers; several (with --hidden: every pair) train one control per size (default: the"
             " experiment's [sweep] table, else one).")] = None,
    hidden: Annotated[Optional[str], typer.Option(
        rich_help_panel=MODEL, metavar="H[,H...]", show_default=str(DEFAULTS.hidden),
        help="Hidden size; several: one control per size, as --layers.")] = None,
    heads: Annotated[int, typer.Option(rich_help_panel=MODEL, help="Attention heads (hidden/heads must be even).")]
    = DEFAULTS.heads,
    intermediate: Annotated[Optional[int], typer.Option(rich_help_panel=MODEL, show_default="4 x hidden",
                                                        help="MLP width.")] = DEFAULTS.intermediate,
    steps: Annotated[int, typer.Option(rich_help_panel=TRAINING, help="Optimizer steps.")] = DEFAULTS.steps,
    save_every: Annotated[Optional[int], typer.Option(
        rich_help_panel=TRAINING, metavar="N",
        help="Also save the control at steps 0, N, 2N, ... and the last, under OUTPUT/steps/ (default: the"
             " experiment's [sweep] table, else none).")] = None,
    batch_size: Annotated[int, typer.Option(rich_help_panel=TRAINING, help="Sequences per step.")]
    = DEFAULTS.batch_size,
    learning_rate: Annotated[float, typer.Option(rich_help_panel=TRAINING, help="Peak AdamW learning rate.")]
    = DEFAULTS.learning_rate,
    warmup_steps: Annotated[int, typer.Option(rich_help_panel=TRAINING, help="Linear warm-up steps.")]
    = DEFAULTS.warmup_steps,
    objective: Annotated[str, typer.Option(
        rich_help_panel=TRAINING,
        help="posterior (cross-entropy to the exact posterior predictive at the marks) or next-token"
             " (the sampled outcomes); same minimizer.")] = DEFAULTS.objective,
    eval_sequences: Annotated[int, typer.Option(rich_help_panel=TRAINING,
                                                help="Held-out sequences for the KL before/after.")]
    = DEFAULTS.eval_sequences,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = DEFAULTS.device,
    threads: Annotated[int, typer.Option(help="CPU threads for training.")] = DEFAULTS.threads,
    seed: opt.Seed = 0,
    as_json: opt.Json = False,
    force: opt.Force = False,
    quiet: opt.Quiet = False,
) -> None:
    """Train a small Llama on data drawn under a known prior, so its exact Bayesian answer is known; with
    --save-every or several sizes, a series of checkpoints for `llmprobe compare`."""
    from llmprobe.control.prior import experiment_table, resolve_prior
    from llmprobe.control.series import Sweep, parse_size_list, size_grid, sweep_table
    from llmprobe.experiments import load_experiment
    from llmprobe.files import check_new_output

    if output is None:
        raise UsageError("give the checkpoint directory to write", where="--output")
    check_new_output(output, force, directory=True)
    experiment = load_experiment(config)
    known = resolve_prior(prior, config, experiment.category_names)
    table = experiment_table(config, "sweep")
    table = {} if table is None else sweep_table(table, config)
    settings = ControlSettings(heads=heads, intermediate=intermediate, steps=steps, batch_size=batch_size,
                               learning_rate=learning_rate, warmup_steps=warmup_steps, objective=objective, seed=seed,
                               device=device, threads=threads, eval_sequences=eval_sequences,
                               save_every=save_every if save_every is not None else table.get("save_every"))
    sweep = Sweep(size_grid(parse_size_list(layers, "--layers") if layers is not None
                            else table.get("layers", [DEFAULTS.layers]),
                            parse_size_list(hidden, "--hidden") if hidden is not None
                            else table.get("hidden", [DEFAULTS.hidden])), settings)
    sweep.validate()  # every size, before the heavy imports below, so a bad flag fails in a second

    from llmprobe.control.checkpoint import save_control
    from llmprobe.control.sweep import train_series
    from llmprobe.control.train import train_control

    out = Output(quiet)
    if sweep.is_series:
        series = train_series(experiment, known, sweep, output, replace=force, reporter=out,
                              bar=functools.partial(_training_bar, out))
        finals = ", ".join(f"{size['name']} {size['held_out']['kl_bits_trained']:.2e}" for size in series["sizes"])
        out.log(f"wrote the series {output}: {len(series['checkpoints'])} checkpoints of"
                f" {len(series['sizes'])} size(s), listed in {output}/manifest.json; held-out KL(Bayes || model) at"
                f" the marks after training, bits: {finals}")
        if as_json:
            out.data_text(json.dumps(series, indent=1) + "\n")
        return
    with _training_bar(out, "training", steps) as on_step:
        trained = train_control(experiment, known, sweep.settings_for(sweep.sizes[0]), out, on_step)
    save_control(trained, output, replace=force)
    held = trained.held_out
    out.log(f"wrote {output}: {trained.seconds:.0f} s of training ({trained.cpu_seconds:.0f} CPU-s); held-out"
            f" KL(Bayes || model) at the marks {held['kl_bits_trained']:.2e} bits (untrained"
            f" {held['kl_bits_untrained']:.2e})")
    if as_json:
        out.data_text(json.dumps(trained.summary(), indent=1) + "\n")


@contextmanager
def _training_bar(out: Output, label: str, total: int) -> Iterator[Callable]:
    """A progress bar on stderr with the loss, the KL at the marks, steps/s and the time left."""
    progress = Progress(
        TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  KL {task.fields[kl]} bits  {task.fields[rate]} steps/s"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=out.err, disable=out.quiet, transient=False,
    )
    with progress:
        task = progress.add_task("training", total=total, loss="-", kl="-", rate="-")

        def on_step(stats) -> None:
            speed = progress.tasks[task].speed
            progress.update(task, completed=stats.step, loss=f"{stats.loss:.4f}", kl=f"{stats.kl_bits:.1e}",
                            rate=f"{speed:.1f}" if speed else "-")

        yield on_step
