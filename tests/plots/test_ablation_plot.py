"""``plot-ablate`` and the report's sweep section, on sweep tables with known rows (tests/plots/fixtures.py).

The planted head sweep: 3 layers × 4 heads, head L.H at KL 0.5 + 0.01·(L − H) bits against a baseline of 0.5,
except head 1.1 (0.9 bits, verdict rejected: a flip) and head 1.3 (no fit). The figure must draw exactly these
changes in the heatmap (centred on zero), mark the flips where they are, and draw the per-layer and direction
sweeps as bars and strips of their own changes.
"""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.colors import TwoSlopeNorm

from llmprobe.analysis.ablation import open_sweep
from llmprobe.plots.ablation import head_grid, plot_ablation
from tests.cli_helpers import assert_one_line_error, run_cli
from tests.plots.fixtures import PNG_SIGNATURE, coin_trace, planted_sweep


def planted_heads(path):
    components = [(f"{layer}.{head}", "head", layer, head, 0.5 + 0.01 * (layer - head), "consistent")
                  for layer in range(3) for head in range(4)]
    components[5] = ("1.1", "head", 1, 1, 0.9, "rejected")
    components[7] = ("1.3", "head", 1, 3, None, "no-fit")
    return planted_sweep(path, components)


def planted_layers(path, sha="0" * 64):
    return planted_sweep(path, [(f"{layer}.{kind}", kind, layer, None, 0.5 + (0.1 * layer if kind == "attn" else
                                                                                 -0.02 * layer),
                                 "no-updating" if (layer, kind) == (2, "attn") else "consistent")
                                for layer in range(3) for kind in ("attn", "mlp")], sha=sha)


def planted_directions(path):
    return planted_sweep(path, [("2.pc1", "pca", 2, 0, 0.95, "poor-fit"), ("2.pc2", "pca", 2, 1, 0.55, "consistent")]
                         + [(f"2.random{n + 1}", "random", 2, n, 0.5 + 0.001 * (n - 2), "consistent")
                            for n in range(5)])


@pytest.fixture
def sweeps(tmp_path):
    return [planted_heads(tmp_path / "heads.parquet"), planted_layers(tmp_path / "layers.parquet"),
            planted_directions(tmp_path / "directions.parquet")]


def panel(fig, gid):
    found, = [ax for ax in fig.axes if ax.get_gid() == gid]
    return found


def test_the_heatmap_is_the_tables_changes_centred_on_zero_with_the_flips_marked(sweeps):
    expected = np.array([[0.01 * (layer - head) for head in range(4)] for layer in range(3)])
    expected[1, 1], expected[1, 3] = 0.4, np.nan
    grid = head_grid(open_sweep(sweeps[0]).frame)
    np.testing.assert_allclose(grid.delta, expected, atol=1e-12)
    assert grid.layers == [0, 1, 2]
    assert np.argwhere(grid.flipped).tolist() == [[1, 1], [1, 3]]
    fig = plot_ablation([open_sweep(sweeps[0])])
    heads = panel(fig, "heads")
    image, = heads.get_images()
    drawn = image.get_array()
    np.testing.assert_allclose(drawn.filled(np.nan), expected, atol=1e-12)
    assert drawn.mask.tolist() == np.isnan(expected).tolist()  # the no-fit cell is drawn as missing, not as zero
    norm = image.norm
    assert isinstance(norm, TwoSlopeNorm) and norm.vcenter == 0 and norm.vmin == -norm.vmax == pytest.approx(-0.4)
    marked = sorted(tuple(xy) for collection in heads.collections for xy in collection.get_offsets().tolist())
    assert marked == [(1.0, 1.0), (3.0, 1.0)]  # (head, layer row) of the flipped cells
    assert [t.get_text() for t in heads.get_yticklabels()] == ["0", "1", "2"]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["verdict flipped to no-fit", "verdict flipped to rejected"]
    assert "baseline verdict consistent" in fig._suptitle.get_text()


def test_layer_bars_and_direction_strips_show_their_changes(sweeps):
    fig = plot_ablation([open_sweep(path) for path in sweeps])
    assert [ax.get_gid() for ax in fig.axes if ax.get_gid()] == ["heads", "layers", "directions"]
    bars = panel(fig, "layers")
    by_kind = {container.get_label(): [patch.get_height() for patch in container] for container in bars.containers}
    np.testing.assert_allclose(by_kind["attention output"], [0.0, 0.1, 0.2], atol=1e-12)
    np.testing.assert_allclose(by_kind["MLP output"], [0.0, -0.02, -0.04], atol=1e-12)
    flipped, = [c for c in bars.collections if c.get_gid() is None]
    assert flipped.get_offsets().tolist() == [[2 - 0.2, pytest.approx(0.2)]]  # layer 2's attention bar
    strips = panel(fig, "directions")
    points = {c.get_gid(): sorted(c.get_offsets()[:, 1].tolist()) for c in strips.collections if c.get_gid()}
    np.testing.assert_allclose(points["pca"], [0.05, 0.45], atol=1e-12)
    np.testing.assert_allclose(points["random"], [-0.002, -0.001, 0.0, 0.001, 0.002], atol=1e-12)
    assert sorted(t.get_text() for t in strips.texts) == ["pc1", "pc2"]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["verdict flipped to no-fit", "verdict flipped to no-updating", "verdict flipped to poor-fit",
                      "verdict flipped to rejected"]


def test_plot_ablate_writes_the_figure_and_refuses_bad_input(sweeps, tmp_path, capsys, monkeypatch):
    out = tmp_path / "heads.png"
    code, _, err = run_cli(["plot-ablate", *map(str, sweeps), "-o", str(out)], capsys, monkeypatch)
    assert code == 0, err
    assert out.read_bytes().startswith(PNG_SIGNATURE) and f"wrote {out}" in err
    code, _, err = run_cli(["plot-ablate", str(sweeps[0])], capsys, monkeypatch)  # the default name
    assert code == 0 and (tmp_path / "heads.ablate.png").read_bytes().startswith(PNG_SIGNATURE), err
    before = out.read_bytes()
    code, _, err = run_cli(["plot-ablate", str(sweeps[0]), "-o", str(out)], capsys, monkeypatch)
    assert_one_line_error(code, err, str(out), "already exists")
    assert out.read_bytes() == before
    other = planted_layers(tmp_path / "other.parquet", sha="1" * 64)
    for args, needles in (([str(tmp_path / "missing.parquet")], ("missing.parquet", "no such file")),
                          ([str(sweeps[0]), str(other)], (str(other), "another model")),
                          ([str(tmp_path / "heads.png")], ("heads.png", "not a readable sweep table")),
                          ([str(sweeps[0]), "-o", str(tmp_path / "no-dir" / "x.png")], ("no-dir",)),
                          ([str(sweeps[0]), "-o", str(tmp_path / "x.txt")], ("unknown image extension",))):
        code, _, err = run_cli(["plot-ablate", *args, *(["-o", str(tmp_path / "x.png")] if "-o" not in args else [])],
                               capsys, monkeypatch)
        assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "x.txt").exists()


def test_a_table_that_is_not_a_sweep_is_refused(tiny_loaded, tmp_path, capsys, monkeypatch):
    trace = coin_trace(tiny_loaded, tmp_path)
    code, _, err = run_cli(["plot-ablate", str(trace), "-o", str(tmp_path / "x.png")], capsys, monkeypatch)
    assert_one_line_error(code, err, str(trace), "not a sweep table")
    assert not (tmp_path / "x.png").exists()


def test_the_report_carries_the_sweeps(sweeps, tiny_loaded, tmp_path, capsys, monkeypatch):
    trace = coin_trace(tiny_loaded, tmp_path)
    page = tmp_path / "r.html"
    code, _, err = run_cli(["report", str(trace), str(sweeps[0]), str(sweeps[1]), "-o", str(page)], capsys,
                           monkeypatch)
    assert code == 0, err
    html = page.read_text()
    assert "Where in the network: components ablated one at a time" in html
    assert html.count('alt="ablation figure"') == 1
    assert f"sweep <code>{sweeps[0]}</code>" in html and f"sweep <code>{sweeps[1]}</code>" in html
    assert "ablating head 1.1: verdict rejected (baseline consistent), +0.4 bits" in html  # the heads' headline
    table = html.split('alt="ablation figure"', 1)[1].split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    rows = [row.split("</td>", 1)[0].removeprefix("<td>") for row in table.split("<tr>")[1:]]
    assert rows[:4] == ["baseline", "1.1", "2.attn", "1.attn"]  # by change of KL, largest first
    assert len(rows) == 1 + 18 and rows[-1] == "1.3"  # every component (under the 20 shown); the no-fit one last
    other = planted_layers(tmp_path / "other.parquet", sha="1" * 64)
    code, _, err = run_cli(["report", str(trace), str(sweeps[0]), str(other), "-o", str(tmp_path / "r2.html")],
                           capsys, monkeypatch)
    assert_one_line_error(code, err, str(other), "another model")
    assert not (tmp_path / "r2.html").exists()
