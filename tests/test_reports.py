"""`tokprof report` on the synthetic H100/H200 fixtures: valid PNGs, self-contained HTML, provenance, omissions."""

from __future__ import annotations

import base64
import copy
import re
import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tokprof.cli import app
from tokprof.profiler.schema import load_run, save_run
from tokprof.reports import plots
from tokprof.reports.document import Notes, Para, Table, footnote_unknowns, num, to_html, to_markdown
from tokprof.reports.render import render_report

DATA = Path(__file__).resolve().parent / "data"
H100, H200 = DATA / "run_h100.json", DATA / "run_h200.json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR; AssertionError when `data` is not a PNG."""
    assert data[:8] == PNG_MAGIC, f"not a PNG (first bytes {data[:8]!r})"
    assert data[12:16] == b"IHDR", "PNG without an IHDR chunk first"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return render_report([H100, H200], out)


def test_every_kind_of_figure_is_a_valid_png(full_report):
    names = sorted(p.name for p in full_report.figures)
    assert "roofline_R1.png" in names and "roofline_R2.png" in names
    assert "pareto.png" in names
    assert "op_share_R1.png" in names and "op_share_R2.png" in names
    # Two reconciled (batch, context) points per fixture run: one iceberg each.
    assert sorted(n for n in names if n.startswith("iceberg_")) == [
        "iceberg_R1_b1_c1024_h100-sxm.png", "iceberg_R1_b64_c8192_h100-sxm.png", "iceberg_R2_b1_c1024_h200.png",
        "iceberg_R2_b64_c8192_h200.png"]
    for path in full_report.figures:
        data = path.read_bytes()
        assert len(data) > 5000, f"{path.name}: only {len(data)} bytes"
        width, height = png_size(data)
        assert 300 < width < 1200 and 200 < height < 1000, f"{path.name}: {width}x{height} px"
    assert full_report.omitted == []


def test_html_is_self_contained(full_report):
    text = full_report.html.read_text()
    links = re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]+)""", text, flags=re.IGNORECASE)
    assert links, "no src/href at all: the images are missing"
    external = [u for u in links if not u.startswith("data:image/png;base64,")]
    assert external == [], f"non-embedded references: {external[:3]}"
    assert "http://" not in text and "https://" not in text
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(embedded) == len(full_report.figures)
    # The embedded images are the PNG files, byte for byte.
    assert sorted(base64.b64decode(e) for e in embedded) == sorted(p.read_bytes() for p in full_report.figures)


def test_markdown_names_provenance_and_runs(full_report):
    md = full_report.markdown.read_text()
    for word in ("measured", "modelled", "projected", "fixture-h100-0001", "fixture-h200-0001", "run_h100.json",
                 "run_h200.json", "SYNTHETIC"):
        assert word in md, f"{word!r} missing from report.md"
    for heading in ("## Roofline and kernels", "## Throughput vs interactivity", "## Cost across GPUs",
                    "### measured rows", "### modelled rows", "### projected rows", "## Per-op share of step time",
                    "## End to end", "## The iceberg"):
        assert heading in md
    for png in full_report.figures:
        assert f"]({png.name})" in md
    assert "Omitted" not in md


def test_cost_rows_carry_their_run_and_provenance(full_report):
    md = full_report.markdown.read_text()
    run = load_run(H100)
    point = next(p for p in run.rollup if p["gpu"] == "b200" and p["context"] == 8192)
    assert point["provenance"] == "modelled"
    row = next(line for line in md.splitlines()
               if line.startswith("| R1 | modelled | b200 |") and "| 8,192 |" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[11] == num(point["usd_per_million_tokens"])
    assert cells[8] == num(point["tokens_per_s_per_gpu"])
    # Energy of a modelled point is unknown: it says so with the reason (a numbered note under the table), never a
    # number.
    assert re.fullmatch(r"n/a \[\d+\]", cells[12])
    assert f"- n/a {cells[12][4:]} modelled point" in md


def test_absent_sections_are_omitted_with_a_reason(tmp_path):
    run = copy.deepcopy(load_run(H100))
    run.rollup, run.e2e, run.reconciliation, run.ceilings = [], [], [], None
    run.provenance.device.kind, run.provenance.device.name, run.provenance.device.spec_key = "cpu", "Test CPU", None
    path = save_run(run, tmp_path / "kernels_only.json")
    report = render_report([path], tmp_path / "out")
    assert [p.name for p in report.figures] == ["roofline_R1.png"]
    assert not (tmp_path / "out" / "pareto.png").exists()
    md = report.markdown.read_text()
    for reason in ("no measured ceilings in this run", "no roll-up points with tokens/s in any run",
                   "no roll-up in any run", "no end-to-end measurements in any run",
                   "no reconciliation in any run", "is a CPU run"):
        assert reason in md, f"missing omission line: {reason!r}"
    assert any("iceberg" in line for line in report.omitted)


def test_roofline_chart_needs_points(tmp_path):
    with pytest.raises(ValueError, match="points"):
        plots.roofline_chart(tmp_path / "r.png", title="t", points=[], roofs=[])


def test_nice_levels_are_1_2_5_within_range():
    assert plots._nice_levels(0.03, 1.2) == [0.05, 0.1, 0.2, 0.5, 1.0]
    assert plots._nice_levels(0.03, 1.2, limit=3) == [0.05, 0.2, 1.0]
    assert plots._nice_levels(1.0, 1.0) == []


def test_cli_report(tmp_path):
    result = CliRunner().invoke(app, ["report", str(H200), "-o", str(tmp_path / "rep")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "rep" / "report.html").stat().st_size > 10000
    assert png_size((tmp_path / "rep" / "roofline_R1.png").read_bytes())[0] > 300


def test_cli_report_bad_file_exits_2(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema_version": 1, "provenance": ')
    result = CliRunner().invoke(app, ["report", str(bad), "-o", str(tmp_path / "rep")])
    assert result.exit_code == 2
    assert "bad.json" in result.output and "not valid JSON" in result.output


def test_fixture_sections_follow_the_record_contracts():
    from tokprof.models.e2e import E2EMeasurement
    from tokprof.rollup.reconcile import Reconciliation
    from tokprof.rollup.records import RollupPoint

    for path in (H100, H200):
        run = load_run(path)
        assert {RollupPoint.from_dict(p).provenance for p in run.rollup} <= {"measured", "modelled", "projected"}
        assert all(E2EMeasurement.from_dict(e).steps == 30 for e in run.e2e)
        assert [Reconciliation.from_dict(r).batch for r in run.reconciliation] == [1, 64]


def test_report_reads_what_reconcile_writes(tmp_path):
    """The reconciliation section as tokprof.rollup.reconcile builds it (unknown layers have provenance None)."""
    from tokprof.rollup.reconcile import reconcile

    run = load_run(H100)
    recs = reconcile(run)
    projected = next(r for r in recs if r.gpu == "b200")  # a modelled point: no L1, L3, L4 on that GPU
    run.reconciliation = [recs[0].to_dict(), projected.to_dict()]
    report = render_report([save_run(run, tmp_path / "run.json")], tmp_path / "out")
    assert len([p for p in report.figures if p.name.startswith("iceberg_")]) == 2
    md = report.markdown.read_text()
    assert "no utilisation stated" in md
    # An unknown layer: tokens/s n/a with its reason in a note, no provenance.
    assert re.search(r"\| L3 \| end to end, CUDA graphs \| n/a \[\d+\] \| n/a \| n/a \[\d+\] \| - \|", md)
    assert "bottom-up error in tokens/s (L2 vs L3, signed, both measured)" in md


def test_unknowns_become_numbered_notes_under_their_table():
    table = Table(["a", "b"], [["1", "n/a (no energy: a CPU)"], ["n/a (no datasheet row)", "n/a (no energy: a CPU)"],
                               ["n/a", "2"]])
    blocks = footnote_unknowns([Para("n/a (a paragraph keeps its reason inline)"), table])
    assert blocks[0] == Para("n/a (a paragraph keeps its reason inline)")
    assert blocks[1].rows == [["1", "n/a [1]"], ["n/a [2]", "n/a [1]"], ["n/a", "2"]]
    assert blocks[2] == Notes(["[1] no energy: a CPU", "[2] no datasheet row"])
    md = to_markdown([table])
    assert "| n/a [2] | n/a [1] |" in md and "- n/a [1] no energy: a CPU\n- n/a [2] no datasheet row" in md
    html_text = to_html([table], "t")
    assert '<ul class="notes"><li>n/a [1] no energy: a CPU</li><li>n/a [2] no datasheet row</li></ul>' in html_text
    assert footnote_unknowns([Table(["a"], [["7"]])]) == [Table(["a"], [["7"]])]  # nothing unknown: no notes


def test_number_formatting_keeps_three_significant_digits():
    assert [num(x) for x in (1.41, 2.226, 23.14, 99.96, 0.05731, 35836.4, 7, None, float("nan"))] == [
        "1.41", "2.23", "23.1", "100", "0.0573", "35,836", "7", "n/a", "n/a"]


def test_index_lists_every_run_folder(tmp_path):
    from tokprof.reports.render import write_index

    for name in ("run-a", "run-b"):
        render_report([H100], tmp_path / name)
    index = write_index(tmp_path).read_text()
    assert 'href="run-a/report.html"' in index and 'href="run-b/report.html"' in index and "2 report(s)" in index


def test_roofline_points_carry_their_shape_tag(tmp_path):
    from tokprof.reports.render import _roof_tag

    run = load_run(H100)
    tags = {_roof_tag(k) for k in run.kernels}
    assert len(tags) > 1 and all(t for t in tags)  # calls of one op told apart by their sizes
    lin = next(k for k in run.kernels if k.op == "linear")
    assert _roof_tag(lin) == f"M={lin.shape['M']} N={lin.shape['N']} K={lin.shape['K']}"[:28]

