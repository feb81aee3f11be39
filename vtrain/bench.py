"""``python -m vtrain.bench`` is ``python -m vtrain.tools.bench`` (the benchmark moved to ``vtrain/tools/``)."""
from vtrain.tools.bench.cli import main

if __name__ == "__main__":
    main()
