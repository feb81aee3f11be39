"""``table=<name>``: a paper's table; ``runs=<multirun dir>``: a sweep's table and plot."""
from __future__ import annotations

import datetime
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from vtrain.config import ConfigError
from vtrain.config.command import run_or_exit
from vtrain.config.compose import CONFIG_DIR
from vtrain.tools.bench.device import device_name, resolve_device
from vtrain.tools.bench.timing import throughput_enabled
from vtrain.tools.table.coverage import ParamsCache, coverage, coverage_markdown, load_tables, replace_generated
from vtrain.tools.table.markdown import write_table
from vtrain.tools.table.paper import fill_table, paper_table_markdown
from vtrain.tools.table.runs import aggregate_runs, plot_runs, runs_markdown


def run(cfg: DictConfig) -> str:
    if cfg.get("runs"):
        return _runs_table(cfg)
    if not cfg.get("table"):
        tables = sorted(p.stem for p in (Path(CONFIG_DIR) / "table").glob("*.yaml") if p.stem != "coverage")
        raise ConfigError(f"give table=<name> (one of {', '.join(tables)}), table=coverage (how much of them vtrain "
                          "builds) or runs=<multirun dir>")
    if "coverage" in cfg.table:
        return _coverage(cfg)
    table = OmegaConf.to_container(cfg.table, resolve=True)
    filled = fill_table(table, cfg)
    device = resolve_device(cfg.throughput.device) if throughput_enabled(cfg.throughput) else None
    context = f"vtrain {datetime.date.today().isoformat()}, torch {torch.__version__}" + (
        f", throughput on {device_name(device)} ({cfg.throughput.precision})" if device is not None else "")
    markdown = paper_table_markdown(filled, context)
    name = HydraConfig.get().runtime.choices.get("table", "table") if HydraConfig.initialized() else "table"
    out_dir = Path(cfg.out_dir or (HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else "."))
    write_table(out_dir, name, markdown, filled)
    print(markdown)
    print(f"wrote {out_dir / (name + '.md')}")
    return markdown


def _coverage(cfg: DictConfig) -> str:
    """``table=coverage``: every table file's rows counted (vtrain/tools/table/coverage.py); ``table.docs=<page>``
    also rewrites that page's generated section."""
    spec = OmegaConf.to_container(cfg.table.coverage, resolve=True)
    summary = coverage(load_tables(Path(CONFIG_DIR) / "table"), spec,
                       ParamsCache(cfg) if cfg.table.measure else None)
    markdown = coverage_markdown(summary)
    out_dir = Path(cfg.out_dir or (HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else "."))
    write_table(out_dir, "coverage", markdown, summary)
    print(markdown)
    if cfg.table.docs:
        page = Path(cfg.table.docs)
        if not page.is_file():
            raise ConfigError(f"table.docs={page} is not a file: give the docs page to update (docs/tables.md)")
        page.write_text(replace_generated(page.read_text(), markdown))
        print(f"updated {page}")
    print(f"wrote {out_dir / 'coverage.md'}")
    return markdown


def _runs_table(cfg: DictConfig) -> str:
    root = Path(cfg.runs)
    if not root.is_dir():
        raise ConfigError(f"runs={root} is not a directory: pass the directory of a finished sweep")
    options = cfg.runs_table
    if options.plot_x == "throughput" and not throughput_enabled(cfg.throughput):
        raise ConfigError("runs_table.plot_x=throughput measures images/s, which throughput.enabled=auto does on CUDA "
                          "only: add throughput.enabled=true to time the models on this CPU")
    summary = aggregate_runs(root, options, cfg.throughput if options.plot_x == "throughput" else None)
    markdown = runs_markdown(summary)
    out_dir = Path(cfg.out_dir or root)
    plot_runs(summary, options.plot_x, out_dir / "table.png")
    write_table(out_dir, "table", markdown, summary)
    print(markdown)
    print(f"wrote {out_dir / 'table.md'} and {out_dir / 'table.png'}")
    return markdown


# conf/table_main.yaml's run directory: the first of its arguments that is set
OmegaConf.register_new_resolver("vtrain.first", lambda *values: next((v for v in values if v is not None), None),
                                replace=True)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="table_main")
def main(cfg: DictConfig) -> None:
    run_or_exit(run, cfg)
