"""``python -m vtrain.tools.table table=coverage``: every seed table's rows counted, and docs/tables.md's generated
section kept true.

The docs section holds the full command's output. Measuring every row's parameters (about 100 builds on the meta
device, ~40 s) is too slow for the suite, so the test re-measures a deterministic subset, the tables in
``MEASURED`` (their lines must equal the docs' to the character), and checks every other line with its params cell
left out (that cell is the full command's: `python -m vtrain.tools.table table=coverage table.docs=docs/tables.md`).
"""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from conftest import CONF, ROOT
from vtrain.config import ConfigError
from vtrain.config.compose import compose_config
from vtrain.layers.non_local import NonLocalBlock
from vtrain.tools.table.cli import run
from vtrain.profiling import count_params
from vtrain.tools.table.coverage import (DOCS_BEGIN, DOCS_END, ParamsCache, coverage, coverage_markdown,
                                         equal_to_printed, load_tables, rank_missing, replace_generated,
                                         row_params_equal)
from vtrain.tools.table.markdown import DASH

MEASURED = ("gcnet_coco", "lrnet_imagenet", "videoswin_k400")  # ResNets, LR-Nets, Mask R-CNNs, Video Swins: ~15 builds

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def spec() -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF / "table" / "coverage.yaml"))["coverage"]


@pytest.fixture(scope="module")
def tables() -> dict:
    return load_tables(CONF / "table")


@pytest.fixture(scope="module")
def cache() -> ParamsCache:
    """One cache for the module: the docs test re-measures builds the other tests made."""
    return ParamsCache(compose_config("table_main", ["throughput.enabled=false"]))


def test_the_paper_rounding_decides_equality():
    assert equal_to_printed(28.288, 28) and equal_to_printed(27.5, 28) and not equal_to_printed(27.49, 28)
    assert equal_to_printed(28.16, 28.2) and not equal_to_printed(28.29, 28.2)
    assert not equal_to_printed(25.557, 25.5)          # ResNet-50 is 25.56M: the paper's 25.5 is not its rounding
    assert equal_to_printed(88.104, "88.10") and not equal_to_printed(88.11, "88.10")  # quoted: trailing zero kept


def test_missing_pieces_are_ranked_by_the_rows_they_unlock():
    pieces = {"a": "piece a", "b": "piece b", "c": "piece c"}
    tables = {"t1": {"rows": {"r1": {"missing": "a"}, "r2": {"missing": ["a", "b"]}, "r3": {"scope": "out"}}},
              "t2": {"rows": {"r4": {"missing": ["b", "c"]}, "r5": {"missing": "a"}, "r6": {"experiment": "x"},
                              "r7": {}}}}
    ranked = rank_missing(tables, pieces)
    # a: alone in r1 and r5, needed by r1, r2, r5; b: never alone; c after b (fewer rows); r7 names nothing
    assert [(p["piece"], p["alone"], p["rows"], p["tables"]) for p in ranked] == [
        ("a", 2, 3, ["t1", "t2"]), ("unnamed", 1, 1, ["t2"]), ("b", 0, 2, ["t1", "t2"]), ("c", 0, 1, ["t2"])]
    summary = coverage(tables, {"pieces": pieces, "out_of_scope_tables": [{"source": "s", "rows": 4, "why": "3D"}]},
                       None)
    assert summary["totals"] == {"in_scope": 6, "buildable": 1, "out": 5, "params_checked": 0, "params_equal": 0}
    with pytest.raises(ConfigError, match=r"t1.yaml, row r1: missing piece\(s\) \['d'\]"):
        coverage({"t1": {"rows": {"r1": {"missing": "d"}}}}, {"pieces": pieces}, None)


def test_every_row_of_every_table_names_real_configs(spec, tables):
    """Each experiment and backbone a row names exists in conf/, each missing piece is in the controlled list
    (coverage raises otherwise), and every in-scope row says what builds it or what it lacks, but for the one
    row of swin_coco_backbones (edited elsewhere)."""
    summary = coverage(tables, spec, None)
    for name, table in tables.items():
        group = table.get("backbone_group", "backbone")
        for key, row in table["rows"].items():
            if row.get("experiment"):
                assert (CONF / "experiment" / f"{row['experiment']}.yaml").is_file(), (name, key)
            if row.get("backbone"):
                assert (CONF / group / f"{row['backbone']}.yaml").is_file(), (name, key)
    unnamed = [piece for piece in summary["missing"] if piece["piece"] == "unnamed"]
    assert all(piece["tables"] == ["swin_coco_backbones"] for piece in unnamed)


def test_params_of_one_build_are_measured_once(cache):
    """Two rows with the same experiment and overrides build one model, whose count is the baseline Mask R-CNN's
    plus one non-local block on c4's 1024 channels (GCNet's NL-Net row: 44.4M + 2.1M = 46.5M)."""
    table = {"columns": {"p": {"measure": "task_params"}}, "rows": {}}
    row = {"experiment": "gcnet_r50_maskrcnn_coco_1x", "overrides": ["backbone=nl_r50"], "paper": {"p": 46.5}}
    baseline = {"experiment": "gcnet_r50_maskrcnn_coco_1x", "overrides": ["backbone=resnet50"]}
    before = len(cache.counts)
    assert row_params_equal("a", row, table, cache) and row_params_equal("b", dict(row), table, cache)
    row_params_equal("base", {**baseline, "paper": {"p": 44.4}}, table, cache)
    assert len(cache.counts) == before + 2
    nl_block = count_params(NonLocalBlock(1024, reduction=2))
    assert cache.params("task_params", "a", row, table) == cache.params("task_params", "base", baseline, table) + nl_block
    assert row_params_equal("c", {**row, "paper": {"p": 46.6}}, table, cache) is False
    assert row_params_equal("d", {**row, "paper": {}}, table, cache) is None


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_docs_hold_the_generated_coverage(spec, tables, cache):
    text = (ROOT / "docs" / "tables.md").read_text()
    documented = text.split(DOCS_BEGIN, 1)[1].split(DOCS_END, 1)[0].strip("\n").splitlines()
    generated = coverage_markdown(coverage(tables, spec, cache, measure=MEASURED)).strip("\n").splitlines()
    assert len(documented) == len(generated), "regenerate: python -m vtrain.tools.table table=coverage table.docs=docs/tables.md"
    params = _cells(generated[0]).index("params = paper")
    for doc, gen in zip(documented, generated):
        if gen.startswith("| `table=") and any(f"`table={name}`" in gen for name in MEASURED):
            assert doc == gen
        elif gen.startswith("| `table=") or gen.startswith("| all ("):
            doc_cells, gen_cells = _cells(doc), _cells(gen)
            assert gen_cells[params] == DASH or gen.startswith("| all (")
            assert doc_cells[:params] + doc_cells[params + 1:] == gen_cells[:params] + gen_cells[params + 1:]
        else:
            assert doc == gen


def test_replace_generated_keeps_the_rest_of_the_page():
    page = f"intro\n{DOCS_BEGIN}\nold\n{DOCS_END}\nafter\n"
    assert replace_generated(page, "new\n") == f"intro\n{DOCS_BEGIN}\nnew\n{DOCS_END}\nafter\n"
    with pytest.raises(ConfigError, match="no generated section"):
        replace_generated("intro\n", "new\n")


def test_the_command_writes_the_coverage_and_rewrites_the_docs_section(tmp_path, spec, tables):
    """table=coverage table.measure=false table.docs=<page>: coverage.md / .json in out_dir and the page's section,
    the counts of the files (no model built); a page without the markers is refused with one line."""
    page = tmp_path / "page.md"
    page.write_text(f"# Tables\n{DOCS_BEGIN}\nstale\n{DOCS_END}\nend\n")
    cfg = compose_config("table_main", ["table=coverage", "table.measure=false", f"table.docs={page}",
                                        f"out_dir={tmp_path}"])
    markdown = run(cfg)
    assert markdown == coverage_markdown(coverage(tables, spec, None))
    assert (tmp_path / "coverage.md").read_text() == markdown and (tmp_path / "coverage.json").is_file()
    assert page.read_text() == f"# Tables\n{DOCS_BEGIN}\n{markdown}{DOCS_END}\nend\n"
    page.write_text("# Tables\n")
    with pytest.raises(ConfigError, match="no generated section"):
        run(cfg)
